"""The generation session: prepared models loaded once per process, and one response's pass through the
model (``Turn``), continuing from the longest cached prefix of its prompt.

Nothing here imports mlx at module level.
"""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from ..errors import FlashMoeError
from ..flash_layout import MANIFEST_NAME

# Prepared models loaded by this process: (directory, manifest mtime) -> FlashModel. `llm chat` loads once.
_LOADED: Dict[Tuple[str, int], object] = {}

# One generation at a time per process: the sync and the async model share the loaded model.
GENERATION_LOCK = threading.RLock()


def load(model_dir: Path, bank_bytes: Optional[int] = None):
    """The FlashModel of ``model_dir``, loaded once per process (reloaded if it was prepared again), with
    an expert bank of ``bank_bytes`` (None: the automatic budget; a loaded model's bank is resized)."""
    from . import loader as engine
    from ..cluster import leader

    flash = loaded(model_dir)
    if flash is None:
        unload(model_dir)
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "PyTorch was not found"
        flash = engine.load_flash_model(model_dir, bank_bytes=bank_bytes)
        try:
            leader.attach_leader(flash)  # rank 0 of a cluster (`llm flash-moe worker`): joins the other ranks
        except BaseException:
            flash.close()
            raise
        _LOADED[_key(model_dir)] = flash
    elif bank_bytes is not None:
        flash.set_bank_bytes(bank_bytes)
    return flash


def loaded(model_dir: Path):
    """The FlashModel of ``model_dir`` if this process has it loaded (and it was not prepared again)."""
    return _LOADED.get(_key(model_dir))


def _key(model_dir: Path) -> Tuple[str, int]:
    model_dir = Path(model_dir)
    try:
        return str(model_dir), (model_dir / MANIFEST_NAME).stat().st_mtime_ns
    except FileNotFoundError:
        raise FlashMoeError(f"{model_dir} has no {MANIFEST_NAME} any more (is a `prepare --repair` running?); "
                            "run `llm flash-moe models`")


def unload(model_dir: Optional[Path] = None) -> None:
    """Forget (and close) loaded models: those of ``model_dir``, or all."""
    for key in list(_LOADED):
        if model_dir is None or key[0] == str(Path(model_dir)):
            _LOADED.pop(key).close()


def make_sampler(settings):
    """mlx-lm's sampler for these Settings (tests replace it to steer the model's output)."""
    from mlx_lm.sample_utils import make_sampler as mlx_make_sampler

    return mlx_make_sampler(settings.temperature, settings.top_p, settings.min_p, top_k=settings.top_k)


def prefill(flash, cache, tokens: List[int]) -> None:
    """Run ``tokens`` through ``flash``'s model into ``cache``, computing no logits: layer by layer, so that
    each expert the prompt needs is read once (``prefill.layer_major_prefill``); a model leading a cluster
    (its calls announced to the workers) goes through mlx-lm's own chunked prompt loop instead."""
    import mlx.core as mx

    if flash.cluster is None:
        from .prefill import layer_major_prefill

        layer_major_prefill(flash.model, cache, tokens)
        return
    from mlx_lm.generate import generate_step

    for _ in generate_step(mx.array(tokens), flash.model, max_tokens=0, prompt_cache=cache):
        pass  # it computes the last token's logits too (one row of the output layer)


def check_finite(step, model_id: str, name: str) -> None:
    """Stop before a token sampled from NaN or infinite logits reaches the user (damaged weights).

    Any NaN in the logits makes every log-probability NaN, the sampled token's included; one scalar
    check per token (already computed by mlx-lm) catches it.
    """
    logprobs = getattr(step, "logprobs", None)
    if logprobs is None:
        return
    value = logprobs.reshape(-1)[step.token].item()
    if not math.isfinite(value):
        raise FlashMoeError(
            f"{model_id} produced non-finite values (NaN or infinity) at token "
            f"{step.generation_tokens}: its weights are damaged; run `llm flash-moe verify {name}`"
        )


class EndDeferred:
    """Stands in for the model in mlx-lm's generation loop, so that no expert is read for a token after the
    answer has ended.

    mlx-lm feeds each sampled token to the model before handing it out, the last one too (the end-of-answer
    token, or the ``max_tokens``-th), whose logits nobody uses. Here that call returns placeholder logits
    and keeps the token in ``pending``; ``feed_pending()`` runs it through the model when the state after
    the whole answer is wanted (``Turn.save``). ``prompt_length``: the tokens the loop is given to process
    before it generates.
    """

    def __init__(self, model, end_tokens, max_tokens: int, prompt_length: int):
        self.model, self.end_tokens = model, set(end_tokens)
        self.max_tokens, self.prompt_length = max_tokens, prompt_length
        self.fed = 0  # tokens the loop has fed so far
        self.vocab = None  # from the logits of the first call
        self.pending = None  # (inputs, cache) put off

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, inputs, cache=None, **kwargs):
        import mlx.core as mx

        before, self.fed = self.fed, self.fed + inputs.shape[-1]
        if before >= self.prompt_length and inputs.shape[-1] == 1:  # a generated token fed back
            number = before - self.prompt_length + 1
            if number == self.max_tokens or int(inputs.reshape(-1)[0].item()) in self.end_tokens:
                self.pending = (inputs, cache)
                return mx.zeros((*inputs.shape, self.vocab), dtype=mx.float32)
        logits = self.model(inputs, cache=cache, **kwargs)
        self.vocab = logits.shape[-1]
        return logits

    def feed_pending(self) -> None:
        import mlx.core as mx

        if self.pending is not None:
            inputs, cache = self.pending
            self.pending = None
            mx.eval(self.model(inputs, cache=cache))


class Turn:
    """One response's pass through the model, continuing from the longest cached prefix of its prompt.

    ``steps()`` looks the prompt up in ``store`` (a PromptCache, or None for a full prefill), processes
    the prompt up to ``checkpoint`` (see ``chat.reuse_point``) and snapshots the state there, then lets
    mlx-lm's ``stream_generate`` process the rest and generate. ``save(next_turns)`` keeps the snapshots
    the next turn can use: the state after prompt + generated tokens when the next turn's rendering
    starts with exactly those tokens (Qwen3.5: a tool call continued by its results), and the state at
    the checkpoint when the next turn goes on from there (Qwen3.5: a new user message; the history shows
    the previous answer without its reasoning, so the answer's tokens are processed again).
    """

    def __init__(self, flash, prompt_ids: List[int], store=None, checkpoint: Optional[int] = None,
                 logits_processors: Optional[list] = None):
        self.flash, self.prompt_ids, self.store, self.checkpoint = flash, list(prompt_ids), store, checkpoint
        self.logits_processors = logits_processors  # e.g. constrained.Constraint (--schema, tool calls)
        self.cached = 0
        self.source: Optional[str] = None
        self.generated: List[int] = []
        self.finished = False
        self.prompt_seconds: Optional[float] = None
        self.saved: List[int] = []
        self._cache = None
        self._mid = None
        self._model = None

    @property
    def processed(self) -> int:
        return len(self.prompt_ids) - self.cached

    def steps(self, max_tokens: int, sampler) -> Iterator:
        import mlx_lm
        from mlx_lm.models.cache import make_prompt_cache

        from . import prompt_cache

        started = time.perf_counter()
        hit = self.store.lookup(self.prompt_ids) if self.store is not None else None
        if hit is not None:
            cache, self.cached, self.source = hit.caches, hit.length, hit.source
        else:
            cache = make_prompt_cache(self.flash.model)
        self._cache = cache
        position = self.prefill_prompt(lambda start, end: prefill(self.flash, cache, self.prompt_ids[start:end]),
                                       lambda: prompt_cache.freeze(cache))
        rest = self.prompt_ids[position:]
        self._model = EndDeferred(self.flash.model, self.flash.tokenizer.eos_token_ids, max_tokens, len(rest))
        for response in mlx_lm.stream_generate(self._model, self.flash.tokenizer, rest,
                                               max_tokens=max_tokens, sampler=sampler, prompt_cache=cache,
                                               logits_processors=self.logits_processors):
            if self.prompt_seconds is None:
                self.prompt_seconds = time.perf_counter() - started
            self.generated.append(response.token)
            yield response
        self.finished = True

    def prefill_prompt(self, prefill, snapshot) -> int:
        """Process the prompt from the cached prefix to its last token (``prefill(start, end)``), taking the
        state at the checkpoint on the way (``snapshot()``); the position reached. The generation loop gets
        the last prompt token alone."""
        position = self.cached
        if self.store is not None and self.checkpoint is not None and position < self.checkpoint:
            prefill(position, self.checkpoint)
            self._mid = snapshot()
            position = self.checkpoint
        if len(self.prompt_ids) - position > 1:
            prefill(position, len(self.prompt_ids) - 1)
            position = len(self.prompt_ids) - 1
        return position

    def save(self, next_turns: List[List[int]]) -> None:
        from mlx_lm.utils import common_prefix_len

        from . import prompt_cache

        if self.store is None or not self.finished:
            return
        full = self.prompt_ids + self.generated
        reach = [common_prefix_len(full, ids) for ids in next_turns]
        # The cache holds prompt + every generated token (mlx-lm feeds each sampled token before
        # yielding it); checked, so a state is never filed under tokens it did not see.
        end_saved = False
        if len(full) in reach:
            self._model.feed_pending()  # the answer's last token, put off while generating
        if len(full) in reach and prompt_cache.kv_length(self._cache) in (None, len(full)):
            self.store.save(full, prompt_cache.freeze(self._cache))
            end_saved = True
            self.saved.append(len(full))
        if self._mid is not None and any(r >= self.checkpoint and not (end_saved and r == len(full))
                                         for r in reach):
            self.store.save(self.prompt_ids[:self.checkpoint], self._mid)
            self.saved.append(self.checkpoint)
        self._cache = self._mid = None
