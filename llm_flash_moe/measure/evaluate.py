"""What a speed setting costs in quality: perplexity, and agreement with a reference configuration.

``llm flash-moe eval`` runs a prepared model over a text in fixed windows, with the experts streamed from
disk exactly as in generation, once per configuration (experts per token, or another prepared copy of
the same model at other bits), and reports for each:

- perplexity: exp(mean negative log-likelihood of each next token), every window scored on its own
  (no context carried from the previous window, no overlap), logits in float32;
- against the reference configuration (the model at its own ``num_experts_per_tok``, or the ``--against``
  model), token by token: top-1 agreement (both put the same token first) and the mean KL divergence
  KL(reference || configuration) in nats per token, from float32 log-softmax of both;
- the expert bytes read from disk (the bank's counters; each setting's window starts from an empty bank,
  so the bytes are what the setting reads) and the time it took.

The reference and every configuration run window by window, so memory stays at one window's logits per
configuration whatever the length of the text.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, List, Optional, Sequence

from ..errors import FlashMoeError

DEFAULT_WINDOW = 512
_CHUNK_ELEMENTS = 1 << 24  # logits rows compared at once: ~64 MB of float32 per array


def native_experts_per_token(manifest) -> int:
    """The model's own experts per token (``num_experts_per_tok`` of its config), not the served default."""
    config = manifest.config
    text = config.get("text_config") or {}
    k = text.get("num_experts_per_tok") or config.get("num_experts_per_tok")
    return int(k) if k else manifest.experts_per_token


@dataclass
class Configuration:
    """One way to run a model: a loaded FlashModel (``engine.load_flash_model``) at ``experts`` per token."""

    name: str
    flash: object
    experts: int

    @property
    def bits(self) -> str:
        """The expert bits: "4", or the per-layer rule it was prepared with ("3,0=4,59=4")."""
        manifest = self.flash.manifest
        return str(manifest.settings.get("bits") or manifest.bits)

    @property
    def key(self):
        return (id(self.flash), self.experts)


@dataclass
class Result:
    name: str
    bits: str
    experts_per_token: int
    reference: bool
    nll_sum: float = 0.0
    scored: int = 0  # tokens predicted
    agree: int = 0
    kl_sum: float = 0.0
    tokens_run: int = 0  # tokens through the model (every window's tokens)
    bytes_read: int = 0
    expert_reads: int = 0
    bank_hits: int = 0
    seconds: float = 0.0

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.scored if self.scored else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def top1_agreement(self) -> float:
        return self.agree / self.scored if self.scored else float("nan")

    @property
    def kl_mean(self) -> float:
        return self.kl_sum / self.scored if self.scored else float("nan")

    def as_dict(self) -> dict:
        return {
            "model": self.name, "bits": self.bits, "experts_per_token": self.experts_per_token,
            "reference": self.reference, "perplexity": self.perplexity, "mean_nll": self.mean_nll,
            "top1_agreement": self.top1_agreement, "kl_mean": self.kl_mean, "scored_tokens": self.scored,
            "bytes_read": self.bytes_read, "expert_reads": self.expert_reads, "bank_hits": self.bank_hits,
            "bytes_read_per_token": self.bytes_read / self.tokens_run if self.tokens_run else 0.0,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class Report:
    tokens: int  # tokens of the text evaluated
    window: int
    windows: int
    reference: Result
    results: List[Result] = field(default_factory=list)  # reference first, then each configuration

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "scored_tokens": self.reference.scored, "window": self.window,
                "windows": self.windows,
                "reference": {"model": self.reference.name, "bits": self.reference.bits,
                              "experts_per_token": self.reference.experts_per_token},
                "results": [r.as_dict() for r in self.results]}


def windows_of(ids: Sequence[int], window: int) -> List[Sequence[int]]:
    """Non-overlapping windows of ``window`` tokens (the last may be shorter); windows under 2 tokens are dropped."""
    if window < 2:
        raise FlashMoeError(f"the window must be at least 2 tokens, not {window}")
    return [ids[s:s + window] for s in range(0, len(ids), window) if len(ids[s:s + window]) >= 2]


def evaluate(configurations: Sequence[Configuration], reference: Configuration, ids: Sequence[int],
             window: int = DEFAULT_WINDOW, progress: Optional[Callable[[int], None]] = None) -> Report:
    """Perplexity of each configuration and of the reference on ``ids``, and each one's agreement with it.

    ``progress(n)`` is called with the tokens scored after each window. A configuration identical to the
    reference (same FlashModel, same experts per token) is the reference: listed and computed once. Each
    model's experts per token is set back to what it was.
    """
    import mlx.core as mx

    ids = [int(t) for t in ids]
    chunks = windows_of(ids, window)
    if not chunks:
        raise FlashMoeError("the text has fewer than 2 tokens: nothing to evaluate")
    every = [reference] + [c for c in configurations if c.key != reference.key]
    results = [Result(c.name, c.bits, c.experts, c is reference) for c in every]
    restore = {id(c.flash): (c.flash, c.flash.experts_per_token) for c in every}
    try:
        for chunk in chunks:
            targets = mx.array(chunk[1:])
            ref = _log_probs(reference, chunk, results[0])
            for config, result in zip(every, results):
                # one configuration's logits at a time beside the reference's: memory stays at two windows' worth
                log_probs = ref if config is reference else _log_probs(config, chunk, result)
                if log_probs.shape != ref.shape:
                    raise FlashMoeError(
                        f"{config.name} predicts {log_probs.shape[-1]:,} tokens and {reference.name} "
                        f"{ref.shape[-1]:,}: they are not copies of the same model and cannot be compared")
                start = time.perf_counter()
                nll, agree, kl = _compare(log_probs, ref, targets)
                result.nll_sum += nll
                result.agree += agree
                result.kl_sum += kl
                result.scored += len(chunk) - 1
                result.seconds += time.perf_counter() - start
                del log_probs
            if progress is not None:
                progress(len(chunk) - 1)
    finally:
        for flash, k in restore.values():
            flash.set_experts_per_token(k)
    return Report(len(ids), window, len(chunks), results[0], results)


def _log_probs(config: Configuration, chunk: Sequence[int], result: Result):
    """float32 log-softmax of the logits predicting chunk[1:], with the reads it took counted in ``result``."""
    import mlx.core as mx

    flash = config.flash
    if flash.experts_per_token != config.experts:
        flash.set_experts_per_token(config.experts)
    flash.bank.clear()  # each setting's reads are its own, not what another setting left in the bank
    before = replace(flash.bank.stats)
    start = time.perf_counter()
    logits = flash.model(mx.array(chunk)[None])[0, :-1].astype(mx.float32)
    log_probs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    mx.eval(log_probs)
    result.seconds += time.perf_counter() - start
    delta = flash.bank.stats.since(before)
    result.bytes_read += delta.bytes_read
    result.expert_reads += delta.reads
    result.bank_hits += delta.hits
    result.tokens_run += len(chunk)
    return log_probs


def _compare(log_probs, ref, targets):
    """(sum of -log p(target), top-1 matches with ``ref``, sum of KL(ref || log_probs)) over the rows."""
    import mlx.core as mx

    n, vocab = log_probs.shape
    rows = max(1, _CHUNK_ELEMENTS // vocab)
    nll = agree = kl = 0.0
    for s in range(0, n, rows):
        lp, rp, t = log_probs[s:s + rows], ref[s:s + rows], targets[s:s + rows]
        picked = mx.take_along_axis(lp, t[:, None], axis=-1)
        same = mx.argmax(lp, axis=-1) == mx.argmax(rp, axis=-1)
        divergence = mx.sum(mx.exp(rp) * (rp - lp), axis=-1)
        values = mx.stack([-mx.sum(picked), mx.sum(same.astype(mx.float32)), mx.sum(divergence)])
        a, b, c = values.tolist()
        nll, agree, kl = nll + a, agree + b, kl + c
    return nll, int(agree), kl


ARCHITECTURE_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "num_experts", "moe_intermediate_size",
                       "vocab_size")


def check_comparable(name: str, manifest, model_dir, against: str, other, other_dir) -> None:
    """``eval NAME --against OTHER`` compares copies of one model (other bits, other experts per token): refuse,
    before either is loaded, a model of another architecture (config.json's shape fields) or vocabulary (its
    tokenizer's vocabulary files)."""
    from pathlib import Path

    from ..flash_layout import TOKENIZER_VOCAB_FILES

    def field(config: dict, key: str):
        text = config.get("text_config")
        return text[key] if isinstance(text, dict) and key in text else config.get(key)

    differs = [f"{key} {field(manifest.config, key)} and {field(other.config, key)}" for key in ARCHITECTURE_FIELDS
               if field(manifest.config, key) != field(other.config, key)]
    if not differs:
        for file in TOKENIZER_VOCAB_FILES:
            mine, theirs = Path(model_dir) / file, Path(other_dir) / file
            if mine.exists() != theirs.exists() or (mine.exists() and mine.read_bytes() != theirs.read_bytes()):
                differs.append(f"their {file} differ")
                break
    if differs:
        raise FlashMoeError(f"{name} and {against} are not copies of the same model ({'; '.join(differs)}): "
                            "--against compares a model with another copy of it prepared at other bits")


def tokenize(text: str, configurations: Sequence[Configuration]) -> List[int]:
    """The text's token ids; every model must tokenize it the same way (or they cannot be compared)."""
    ids, seen = None, set()
    for config in configurations:
        if id(config.flash) in seen:
            continue
        seen.add(id(config.flash))
        these = list(config.flash.tokenizer.encode(text))
        if ids is None:
            ids, first = these, config.name
        elif these != ids:
            raise FlashMoeError(f"{config.name} and {first} tokenize the text differently: they are not the same "
                                "model and cannot be compared token by token")
    return ids
