"""A tiny qwen3_5_moe trained briefly on real English text, so that quality measurements mean something.

Random-weight checkpoints (``checkpoint.py``) test that the engine computes what mlx-lm computes, but
their perplexity means nothing: quantizing random experts or routing fewer of them changes the output
without making it "worse". This module trains a tiny model of the real architecture (mlx-lm's own
``qwen3_5_moe`` class: 3 Gated DeltaNet layers + 1 full-attention layer, 16 routed experts, 4 per token,
a shared expert) for ten minutes on two CPU cores, and writes it as a Hugging Face checkpoint with the real
key names, exactly like the random ones. ``tests/data/trained-moe/`` is its output, shipped with the
repository, with ``tests/data/heldout.txt``: text the model never saw, for the tests' perplexities.

The text: the documentation topics that ship inside CPython itself (``pydoc_data.topics``, ~460 KB of
English prose and code examples, under the PSF documentation licence: freely redistributable), so
the training needs no download. Every tenth topic (sorted by name) is held out.

The tokenizer: a byte-level BPE of 400 tokens trained on the training text with the Qwen3.5 pipeline
(``tokenizer.py``), then the 33 Qwen3.5 special tokens: the same ids as the ``tiny`` tokenizer.

Regenerate (10 minutes on 2 cores with OpenBLAS, see below; 400 steps of 16 x 64 tokens)::

    python -m llm_flash_moe.synthetic.trained --out tests/data/trained-moe --heldout tests/data/heldout.txt

MLX's Linux CPU wheel ships the reference BLAS; with OpenBLAS preloaded the training runs ~1.7x faster
(``apt-get install libopenblas0-pthread`` then
``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python -m ...``). The result is not
bit-for-bit reproducible across machines (thread timing changes float sums); the measurements made on it
are, because the checkpoint itself is shipped.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

from .checkpoint import TinySpec, _cast, _save_safetensors, _write_json, generation_config, hf_config
from .tokenizer import (
    TEMPLATE_PATH, TINY_BPE_SIZE, _add_specials, _pipeline, special_token_ids, tokenizer_config,
)

TRAINED_SPEC = TinySpec(
    model_type="qwen3_5_moe", num_hidden_layers=4, hidden_size=64, num_experts=16, num_experts_per_tok=4,
    moe_intermediate_size=64, shared_expert_intermediate_size=64, vocab_size=448, dtype="bfloat16",
)
HELDOUT_EVERY = 10  # every tenth topic (sorted by name), starting at HELDOUT_OFFSET, is held out
HELDOUT_OFFSET = 5
HELDOUT_CHARS = 24_000  # how much held-out text is shipped for the tests

# The norms mlx-lm's sanitize shifts by +1 when it loads an HF checkpoint (zero-centred in HF files).
_CENTRED_NORMS = (".input_layernorm.weight", ".post_attention_layernorm.weight", "model.norm.weight",
                  ".q_norm.weight", ".k_norm.weight")


# ----------------------------------------------------------------------------------- text, tokenizer


def corpus() -> Tuple[str, str]:
    """(training text, held-out text) from CPython's own documentation topics."""
    from pydoc_data.topics import topics

    train, heldout = [], []
    for i, name in enumerate(sorted(topics)):
        (heldout if i % HELDOUT_EVERY == HELDOUT_OFFSET else train).append(topics[name].strip())
    return "\n\n".join(train) + "\n", "\n\n".join(heldout) + "\n"


def train_tokenizer(text: str) -> str:
    """A byte-level BPE of TINY_BPE_SIZE tokens trained on ``text``, plus the Qwen3.5 specials (tokenizer.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = _pipeline(Tokenizer(models.BPE(fuse_unk=False)))
    trainer = trainers.BpeTrainer(vocab_size=TINY_BPE_SIZE, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    if tok.get_vocab_size() != TINY_BPE_SIZE:
        raise RuntimeError(f"BPE has {tok.get_vocab_size()} tokens, want {TINY_BPE_SIZE}")
    _add_specials(tok)
    return tok.to_str()


# ----------------------------------------------------------------------------------- the model


def hf_config_for(spec: TinySpec = TRAINED_SPEC) -> dict:
    return hf_config(spec, spec.vocab_size, special_token_ids("tiny"))


def new_model(spec: TinySpec = TRAINED_SPEC, seed: int = 0):
    """mlx-lm's model class for ``spec`` in float32 with its own initialization."""
    import mlx.core as mx
    from mlx_lm.utils import _get_classes

    config = hf_config_for(spec)
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    return model


def hf_tensors(model, num_experts: int) -> Dict[str, np.ndarray]:
    """The model's parameters under their HF names and layouts (float32): mlx-lm's sanitize, inverted.

    Keys ``language_model.model.X`` -> ``model.language_model.X``, ``language_model.lm_head`` ->
    ``lm_head``; the zero-centred norms get their 1.0 back off; conv1d [C, K, 1] -> [C, 1, K]; each
    layer's ``switch_mlp`` -> the fused ``experts.gate_up_proj`` [E, 2I, H] + ``experts.down_proj``.
    """
    from mlx.utils import tree_flatten

    flat = {k: np.array(v, dtype=np.float32) for k, v in tree_flatten(model.parameters())}
    out = {}
    for key, value in flat.items():
        assert key.startswith("language_model."), key
        name = key[len("language_model."):]
        name = "model.language_model." + name[len("model."):] if name.startswith("model.") else name
        if ".switch_mlp." in name:
            continue
        if any(name.endswith(s) for s in _CENTRED_NORMS) and value.ndim == 1:
            value = value - 1.0
        if name.endswith("conv1d.weight"):
            value = np.swapaxes(value, 1, 2)
        out[name] = value
    for key in flat:
        if key.endswith(".switch_mlp.gate_proj.weight"):
            prefix = key[: -len(".switch_mlp.gate_proj.weight")]
            hf = "model.language_model." + prefix[len("language_model.model."):] + ".experts."
            gate, up = flat[key], flat[prefix + ".switch_mlp.up_proj.weight"]
            assert gate.shape[0] == num_experts
            out[hf + "gate_up_proj"] = np.concatenate([gate, up], axis=1)
            out[hf + "down_proj"] = flat[prefix + ".switch_mlp.down_proj.weight"]
    return out


def write_checkpoint(model, out_dir: Path, tokenizer_json: str, spec: TinySpec = TRAINED_SPEC,
                     dtype: str = None, info: dict = None) -> Path:
    """The trained model as an HF checkpoint (like ``write_hf_checkpoint``'s, without MTP/vision extras)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype or spec.dtype
    tensors = hf_tensors(model, spec.num_experts)
    cast = {k: _cast(t, "float32" if k.endswith("A_log") else dtype) for k, t in sorted(tensors.items())}
    _save_safetensors(out / "model.safetensors", cast)
    config = hf_config_for(spec)
    config["text_config"]["dtype"] = dtype
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", generation_config(special_token_ids("tiny")))
    (out / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    _write_json(out / "tokenizer_config.json", tokenizer_config("tiny"))
    (out / "chat_template.jinja").write_bytes(TEMPLATE_PATH.read_bytes())
    if info is not None:
        _write_json(out / "training.json", info)
    return out


# ----------------------------------------------------------------------------------- training


def _batches(ids: np.ndarray, batch: int, length: int, rng: np.random.Generator):
    while True:
        starts = rng.integers(0, len(ids) - length - 1, size=batch)
        yield np.stack([ids[s:s + length + 1] for s in starts])


def mean_nll(model, ids: np.ndarray, window: int) -> float:
    """Mean next-token negative log-likelihood over non-overlapping windows (float32 logits)."""
    import mlx.core as mx
    import mlx.nn as nn

    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = mx.array(ids[start:start + window + 1][None])
        if chunk.shape[1] < 2:
            break
        logits = model(chunk[:, :-1]).astype(mx.float32)
        losses = nn.losses.cross_entropy(logits, chunk[:, 1:], reduction="sum")
        total += float(losses)
        count += chunk.shape[1] - 1
    return total / count


def train(steps: int = 400, batch: int = 16, length: int = 64, lr: float = 4e-3, seed: int = 0,
          log=print):
    """Train the tiny model; returns (model, tokenizer.json, held-out text, info)."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from tokenizers import Tokenizer

    train_text, heldout_text = corpus()
    tokenizer_json = train_tokenizer(train_text)
    tok = Tokenizer.from_str(tokenizer_json)
    train_ids = np.array(tok.encode(train_text).ids, dtype=np.int32)
    heldout_ids = np.array(tok.encode(heldout_text[:HELDOUT_CHARS]).ids, dtype=np.int32)
    log(f"training text {len(train_text):,} chars = {len(train_ids):,} tokens; "
        f"held-out {len(heldout_ids):,} tokens")

    model = new_model(TRAINED_SPEC, seed)
    model.train()
    warmup = max(1, steps // 20)
    schedule = optim.join_schedules([optim.linear_schedule(lr / 20, lr, warmup),
                                     optim.cosine_decay(lr, steps - warmup, lr / 10)], [warmup])
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.01)

    def loss_fn(model, x, y):
        return nn.losses.cross_entropy(model(x), y, reduction="mean")

    grad_fn = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    @partial_compile(state)
    def step(x, y):
        loss, grads = grad_fn(model, x, y)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(seed)
    batches = _batches(train_ids, batch, length, rng)
    start, smooth = time.perf_counter(), None
    for i in range(steps):
        data = mx.array(next(batches))
        loss = step(data[:, :-1], data[:, 1:])
        mx.eval(loss, state)
        smooth = float(loss) if smooth is None else 0.95 * smooth + 0.05 * float(loss)
        if (i + 1) % 25 == 0 or i + 1 == steps:
            log(f"step {i + 1}/{steps}: loss {smooth:.3f} ({time.perf_counter() - start:.0f} s)")
    seconds = time.perf_counter() - start
    model.eval()
    nll = mean_nll(model, heldout_ids, length)
    log(f"held-out perplexity (float32 weights): {math.exp(nll):.2f}")
    info = {
        "corpus": "CPython documentation topics (pydoc_data.topics); every "
                  f"{HELDOUT_EVERY}th topic from {HELDOUT_OFFSET} held out",
        "python": platform.python_version(), "train_tokens": int(len(train_ids)),
        "steps": steps, "batch": batch, "length": length, "lr": lr, "seed": seed,
        "tokens_seen": steps * batch * length, "seconds": round(seconds, 1),
        "final_train_loss": round(smooth, 4), "heldout_tokens": int(len(heldout_ids)),
        "heldout_perplexity_float32": round(math.exp(nll), 4),
    }
    return model, tokenizer_json, heldout_text[:HELDOUT_CHARS], info


def partial_compile(state):
    import mlx.core as mx

    return lambda fn: mx.compile(fn, inputs=state, outputs=state)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/data/trained-moe"))
    parser.add_argument("--heldout", type=Path, default=Path("tests/data/heldout.txt"))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model, tokenizer_json, heldout, info = train(args.steps, args.batch, args.length, args.lr, args.seed)
    write_checkpoint(model, args.out, tokenizer_json, info=info)
    args.heldout.parent.mkdir(parents=True, exist_ok=True)
    args.heldout.write_text(heldout, encoding="utf-8")
    print(f"wrote {args.out} and {args.heldout}")


if __name__ == "__main__":
    main()
