"""The llm model: ``<name>-flash`` runs a prepared model, streaming its experts from disk.

Nothing here imports mlx / mlx_lm at module level: llm imports every plugin on every command.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import llm
from pydantic import Field, field_validator

from . import registry
from .errors import FlashMoeError

DEFAULT_MAX_TOKENS = 4096
DEFAULT_TEMPERATURE = 0.6  # Qwen3.5's generation_config.json (thinking-mode sampling)
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 20
DEFAULT_MIN_P = 0.0
DEFAULT_CACHE_GB = 0.0  # the OS page cache is the only cache unless cache_gb asks for more
CACHE_MEMORY_SHARE = 0.75  # cache_gb may use this share of the machine's memory, less the resident weights

# What `llm flash-moe prepare` (flagship defaults: 4-bit experts, group 64, 4-bit resident) writes,
# and what it downloads first (the MLX 4-bit release) unless --delete-source drops each shard once used.
FLAGSHIP_PREPARED_GB = 223
FLAGSHIP_DOWNLOAD_GB = 223

# Prepared models loaded by this process: (directory, manifest mtime) -> FlashModel. `llm chat` loads once.
_LOADED: Dict[Tuple[str, int], object] = {}


def model_id_for(name: str) -> str:
    return name + registry.MODEL_SUFFIX


def not_prepared_message(name: str) -> str:
    """The one line shown when a listed model is used before `llm flash-moe prepare` made it."""
    model_id = model_id_for(name)
    if name == registry.FLAGSHIP_NAME:
        return (
            f"{model_id} is not prepared yet: run `llm flash-moe prepare` (downloads "
            f"{registry.FLAGSHIP_SOURCE}; needs about {FLAGSHIP_PREPARED_GB + FLAGSHIP_DOWNLOAD_GB} GB free disk: "
            f"{FLAGSHIP_PREPARED_GB} GB prepared + {FLAGSHIP_DOWNLOAD_GB} GB download, or about "
            f"{FLAGSHIP_PREPARED_GB + 5} GB with `llm flash-moe prepare --delete-source`)"
        )
    return (
        f"{model_id} is not prepared (no complete model in {registry.default_output(name)}): run "
        f"`llm flash-moe prepare SOURCE --name {name}` again, or `llm flash-moe remove {name}`"
    )


# ------------------------------------------------------------------------------ reasoning split


class ThinkSplitter:
    """Splits streamed model text into reasoning (``<think>...</think>``) and answer.

    ``feed(text)`` returns ``[(kind, chunk), ...]`` with kind "reasoning" or "text"; ``finish()``
    flushes what is held back. Tags split across chunks are recognised; the whitespace around the
    reasoning (the template's ``<think>\\n`` and the ``\\n\\n`` after ``</think>``) is dropped.
    ``in_reasoning``: the prompt already opened ``<think>`` (Qwen3.5's generation prompt does when
    thinking is on). Otherwise a ``<think>`` is only recognised before any answer text.
    """

    START, REASONING_START, REASONING, ANSWER_START, ANSWER = range(5)

    def __init__(self, start: Optional[str] = "<think>", end: Optional[str] = "</think>",
                 in_reasoning: bool = False):
        self.start, self.end = start, end
        self.mode = self.REASONING_START if (in_reasoning and end) else self.START
        self.buffer = ""

    @property
    def in_reasoning(self) -> bool:
        return self.mode in (self.REASONING_START, self.REASONING)

    def feed(self, text: str) -> List[Tuple[str, str]]:
        self.buffer += text
        events: List[Tuple[str, str]] = []
        while self.buffer and self._step(events):
            pass
        return [(kind, chunk) for kind, chunk in events if chunk]

    def finish(self) -> List[Tuple[str, str]]:
        """Everything still held back: a partial tag is text, trailing reasoning whitespace is dropped."""
        rest, self.buffer = self.buffer, ""
        if self.in_reasoning:
            return [("reasoning", rest.rstrip())] if rest.strip() else []
        if self.mode in (self.START, self.ANSWER_START):
            rest = rest.lstrip()
        return [("text", rest)] if rest else []

    def _step(self, events: List[Tuple[str, str]]) -> bool:
        """Consume part of the buffer; False when more text is needed to decide."""
        if self.mode in (self.START, self.ANSWER_START):
            stripped = self.buffer.lstrip()
            if not stripped:
                return False
            if self.mode == self.START and self.start and self.end:
                if stripped.startswith(self.start):
                    self.buffer = stripped[len(self.start):]
                    self.mode = self.REASONING_START
                    return True
                if self.start.startswith(stripped):
                    return False  # maybe the beginning of the tag
            self.buffer, self.mode = stripped, self.ANSWER
            return True
        if self.mode == self.REASONING_START:
            stripped = self.buffer.lstrip()
            if not stripped:
                return False
            self.buffer, self.mode = stripped, self.REASONING
            return True
        if self.mode == self.REASONING:
            i = self.buffer.find(self.end)
            if i >= 0:
                events.append(("reasoning", self.buffer[:i].rstrip()))
                self.buffer, self.mode = self.buffer[i + len(self.end):], self.ANSWER_START
                return True
            emit = self.buffer[:len(self.buffer) - _partial_tag_length(self.buffer, self.end)]
            body = emit.rstrip()  # trailing whitespace waits: it is dropped if `</think>` follows
            events.append(("reasoning", body))
            self.buffer = self.buffer[len(body):]
            return False
        events.append(("text", self.buffer))
        self.buffer = ""
        return False


def _partial_tag_length(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


# ------------------------------------------------------------------------------ prompt rendering


def chat_messages(messages) -> List[dict]:
    """llm Messages (``prompt.messages``: system, history, new turn) -> chat-template messages.

    Only text reaches the template: earlier reasoning is left out (Qwen's template drops it
    from history anyway). All system text is merged into one leading system message.
    """
    from llm.parts import TextPart, ToolResultPart

    system: List[str] = []
    out: List[dict] = []
    for message in messages:
        if message.role == "tool":
            for part in message.parts:
                if isinstance(part, ToolResultPart):
                    out.append({"role": "tool", "content": part.output})
            continue
        text = "".join(p.text for p in message.parts if isinstance(p, TextPart))
        if message.role == "system":
            if text:
                system.append(text)
        else:
            out.append({"role": message.role, "content": text})
    if system:
        out.insert(0, {"role": "system", "content": "\n\n".join(system)})
    return out


def render_prompt(tokenizer, messages: List[dict], thinking: bool) -> str:
    """The prompt text the model sees, through the model's own chat template."""
    if not getattr(tokenizer, "has_chat_template", False):
        return "\n\n".join(m["content"] for m in messages)
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             enable_thinking=thinking, tokenize=False)
    except Exception as e:  # jinja's TemplateError and friends: the template refused these messages
        raise FlashMoeError(f"the chat template rejected this conversation: {str(e).splitlines()[0]}")


def prompt_opens_reasoning(prompt_text: str, tokenizer) -> bool:
    """True when the rendered prompt leaves a ``<think>`` open, so the output starts as reasoning."""
    start, end = getattr(tokenizer, "think_start", None), getattr(tokenizer, "think_end", None)
    if not start or not end:
        return False
    return prompt_text.rfind(start) > prompt_text.rfind(end)


# ------------------------------------------------------------------------------ settings


@dataclass
class Settings:
    """One response's generation settings, options resolved against the model's defaults."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: Optional[int]
    experts_per_token: int
    thinking: bool
    cache_bytes: int


def generation_defaults(model_dir: Path) -> dict:
    """temperature / top_p / top_k from the model's generation_config.json, else Qwen3.5's."""
    defaults = {"temperature": DEFAULT_TEMPERATURE, "top_p": DEFAULT_TOP_P, "top_k": DEFAULT_TOP_K}
    try:
        config = json.loads((Path(model_dir) / "generation_config.json").read_text())
    except (OSError, ValueError):
        return defaults
    for key in defaults:
        if isinstance(config.get(key), (int, float)) and not isinstance(config.get(key), bool):
            defaults[key] = config[key]
    return defaults


def check_experts(experts: Optional[int], manifest, model_id: str) -> int:
    """The experts-per-token to use: the option, checked against the model, or the model's default."""
    if experts is None:
        return manifest.experts_per_token
    if not 1 <= experts <= manifest.num_experts:
        raise FlashMoeError(
            f"-o experts must be between 1 and {manifest.num_experts} for {model_id} "
            f"(default {manifest.experts_per_token}), not {experts}"
        )
    return experts


def pick(value, default):
    """An option's value, or its default when the option was not given."""
    return default if value is None else value


def total_memory() -> Optional[int]:
    """Bytes of physical memory of this machine, or None when it cannot be told."""
    import subprocess

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    try:  # macOS
        return int(subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True,
                                  timeout=5).stdout.strip())
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def cache_budget(cache_gb: float, resident_bytes: int, memory: Optional[int]) -> Tuple[int, Optional[str]]:
    """(bytes, warning): the in-memory cache budget for ``-o cache_gb``, clamped to what the machine has."""
    want = cache_gb * 1e9
    if memory is None:
        return int(min(want, 1 << 62)), None
    limit = max(0, int(memory * CACHE_MEMORY_SHARE) - resident_bytes)
    if want <= limit:
        return int(round(want)), None
    return limit, (f"-o cache_gb {cache_gb:g} is more than this machine can hold ({memory / 1e9:.1f} GB of memory, "
                   f"{resident_bytes / 1e9:.1f} GB of it for the resident weights); using {limit / 1e9:.2f} GB")


def vocab_size(config: dict) -> Optional[int]:
    size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    return size if isinstance(size, int) else None


def warn(message: str) -> None:
    import click

    click.echo(f"Warning: {message}", err=True)


def resolve_settings(options, manifest, model_dir: Path, model_id: str, has_thinking: bool,
                     cache_bytes: Optional[int] = None, vocab_size: Optional[int] = None) -> Settings:
    """``cache_bytes``: the clamped cache budget (see ``cache_budget``); ``vocab_size`` bounds top_k."""
    defaults = generation_defaults(model_dir)
    if cache_bytes is None:
        cache_bytes = int(round(pick(options.cache_gb, DEFAULT_CACHE_GB) * 1e9))
    top_k = int(pick(options.top_k, defaults["top_k"]))
    if vocab_size is not None and top_k >= vocab_size:
        top_k = 0  # every token: the same as no top-k (mlx-lm refuses a top_k as large as the vocabulary)
    return Settings(
        max_tokens=pick(options.max_tokens, DEFAULT_MAX_TOKENS),
        temperature=float(pick(options.temperature, defaults["temperature"])),
        top_p=float(pick(options.top_p, defaults["top_p"])),
        top_k=top_k,
        min_p=float(pick(options.min_p, DEFAULT_MIN_P)),
        seed=options.seed,
        experts_per_token=check_experts(options.experts, manifest, model_id),
        thinking=bool(pick(options.thinking, has_thinking)),
        cache_bytes=cache_bytes,
    )


# ------------------------------------------------------------------------------ loading


def load(model_dir: Path, cache_bytes: int = 0):
    """The FlashModel of ``model_dir``, loaded once per process (reloaded if it was prepared again)."""
    from . import engine

    model_dir = Path(model_dir)
    try:
        key = (str(model_dir), (model_dir / "manifest.json").stat().st_mtime_ns)
    except FileNotFoundError:
        raise FlashMoeError(f"{model_dir} has no manifest.json any more (is a `prepare --repair` running?); "
                            "run `llm flash-moe models`")
    flash = _LOADED.get(key)
    if flash is None:
        unload(model_dir)
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "PyTorch was not found"
        flash = engine.load_flash_model(model_dir, cache_bytes=cache_bytes)
        _LOADED[key] = flash
    return flash


def unload(model_dir: Optional[Path] = None) -> None:
    """Forget (and close) loaded models: those of ``model_dir``, or all."""
    for key in list(_LOADED):
        if model_dir is None or key[0] == str(Path(model_dir)):
            _LOADED.pop(key).close()


# ------------------------------------------------------------------------------ the model


class FlashMoeModel(llm.Model):
    """A prepared Mixture-of-Experts model, experts streamed from disk (``<name>-flash``)."""

    can_stream = True

    class Options(llm.Options):
        max_tokens: Optional[int] = Field(
            None, description=f"Maximum tokens to generate, reasoning included (default {DEFAULT_MAX_TOKENS}; "
                              "-1: no limit)", ge=-1)
        temperature: Optional[float] = Field(
            None, description=f"Sampling temperature; 0 is greedy (default: the model's generation_config.json, "
                              f"{DEFAULT_TEMPERATURE} for Qwen3.5)", ge=0, allow_inf_nan=False)
        top_p: Optional[float] = Field(
            None, description=f"Nucleus sampling top-p (default: the model's, {DEFAULT_TOP_P} for Qwen3.5)",
            ge=0, le=1, allow_inf_nan=False)
        top_k: Optional[int] = Field(
            None, description=f"Sample from the k most likely tokens; 0 is off (default: the model's, "
                              f"{DEFAULT_TOP_K} for Qwen3.5)", ge=0)
        min_p: Optional[float] = Field(
            None, description=f"Min-p sampling (default {DEFAULT_MIN_P})", ge=0, le=1, allow_inf_nan=False)
        seed: Optional[int] = Field(None, description="Random seed, for repeatable sampling", ge=0, le=2**64 - 1)
        experts: Optional[int] = Field(
            None, description="Experts per token, 1 to the model's expert count (default: chosen at prepare time; "
                              "4 for qwen397). Fewer is faster and reads less, at some cost in quality", ge=1)
        thinking: Optional[bool] = Field(
            None, description="Let the model think before answering; its thinking is shown as reasoning "
                              "(default: on when the model can think)")
        cache_gb: Optional[float] = Field(
            None, description=f"In-memory expert cache budget in GB, on top of the OS page cache "
                              f"(default {DEFAULT_CACHE_GB:g}; at most {CACHE_MEMORY_SHARE:.0%} of the machine's "
                              "memory less the resident weights)", ge=0, allow_inf_nan=False)

        @field_validator("max_tokens")
        @classmethod
        def _no_zero_tokens(cls, value):
            if value == 0:
                raise ValueError("max_tokens must be at least 1, or -1 for no limit")
            return value

    def __init__(self, name: str):
        self.name = name
        self.model_id = model_id_for(name)

    def __str__(self) -> str:
        return f"Flash MoE: {self.model_id}"

    def model_dir(self) -> Path:
        path = registry.prepared().get(self.name)
        if path is None:
            raise llm.ModelError(not_prepared_message(self.name))
        return path

    def execute(self, prompt, stream, response, conversation) -> Iterator:
        try:
            yield from self._generate(prompt, response)
        except FlashMoeError as e:
            raise llm.ModelError(str(e)) from None

    def _generate(self, prompt, response) -> Iterator:
        import mlx.core as mx
        import mlx_lm
        from llm.parts import StreamEvent
        from mlx_lm.sample_utils import make_sampler

        flash, settings = self._ready(prompt.options)
        tokenizer = flash.tokenizer
        text = render_prompt(tokenizer, chat_messages(prompt.messages), settings.thinking)
        prompt_ids = tokenizer.encode(text, add_special_tokens=False)
        if not prompt_ids:
            raise FlashMoeError(f"the tokenizer of {self.model_id} turned the prompt into no tokens; "
                                f"run `llm flash-moe verify {self.name}`")
        splitter = ThinkSplitter(tokenizer.think_start, tokenizer.think_end,
                                 in_reasoning=prompt_opens_reasoning(text, tokenizer))
        if settings.seed is not None:
            mx.random.seed(settings.seed)
        sampler = make_sampler(settings.temperature, settings.top_p, settings.min_p, top_k=settings.top_k)
        stats_before = replace(flash.store.stats)
        mx.reset_peak_memory()
        last = None
        try:
            for last in mlx_lm.stream_generate(flash.model, tokenizer, prompt_ids,
                                               max_tokens=settings.max_tokens, sampler=sampler):
                check_finite(last, self.name)
                for kind, chunk in splitter.feed(last.text):
                    yield StreamEvent(type=kind, chunk=chunk)
            for kind, chunk in splitter.finish():
                yield StreamEvent(type=kind, chunk=chunk)
        finally:
            record_usage(response, last, len(prompt_ids), settings, flash.store.stats.since(stats_before))

    def _ready(self, options):
        """The loaded model, set up for this response's options, and the resolved settings."""
        from .flash_layout import Manifest

        model_dir = self.model_dir()
        manifest = Manifest.load(model_dir)
        check_experts(options.experts, manifest, self.model_id)  # a bad value fails before the slow load
        cache_bytes, warning = cache_budget(pick(options.cache_gb, DEFAULT_CACHE_GB), manifest.resident_bytes,
                                            total_memory())
        if warning:
            warn(warning)
        flash = load(model_dir, cache_bytes=cache_bytes)
        settings = resolve_settings(options, manifest, model_dir, self.model_id, flash.tokenizer.has_thinking,
                                    cache_bytes=cache_bytes, vocab_size=vocab_size(manifest.config))
        flash.set_experts_per_token(settings.experts_per_token)
        if flash.store.cache_bytes != settings.cache_bytes:
            flash.store.set_cache_bytes(settings.cache_bytes)
        return flash, settings


def check_finite(step, name: str) -> None:
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
            f"{model_id_for(name)} produced non-finite values (NaN or infinity) at token "
            f"{step.generation_tokens}: its weights are damaged; run `llm flash-moe verify {name}`"
        )


def record_usage(response, last, prompt_tokens: int, settings: Settings, stats) -> None:
    """Token usage and ``response_json``: what this run cost (also after an interrupted one).

    ``stats``: the expert store's StoreStats for this response alone (``stats.since(before)``).
    """
    generated = last.generation_tokens if last is not None else 0
    response.set_usage(input=prompt_tokens, output=generated)
    reads, hits = stats.reads, stats.cache_hits
    response.response_json = {
        "finish_reason": getattr(last, "finish_reason", None) or "interrupted",
        "prompt_tokens": prompt_tokens,
        "generation_tokens": generated,
        "prompt_tps": round(last.prompt_tps, 3) if last is not None else None,
        "generation_tps": round(last.generation_tps, 3) if last is not None else None,
        "experts_per_token": settings.experts_per_token,
        "bytes_read": stats.bytes_read,
        "expert_reads": reads,
        "cache_hits": hits,
        "cache_hit_rate": round(hits / (reads + hits), 4) if reads + hits else 0.0,
        "read_seconds": round(stats.read_seconds, 4),
        "peak_memory_gb": round(last.peak_memory, 3) if last is not None else None,
    }
