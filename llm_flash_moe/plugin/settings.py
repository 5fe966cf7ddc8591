"""One response's generation settings: the prompt's options resolved against the model's own defaults.

Nothing here imports mlx: llm imports the plugin (and its option defaults) on every command.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from .demo import is_demo
from ..errors import FlashMoeError
from ..flash_layout import check_experts_per_token, read_small

DEFAULT_MAX_TOKENS = 4096
DEFAULT_TEMPERATURE = 0.6  # Qwen3.5's generation_config.json (thinking-mode sampling)
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 20
DEFAULT_MIN_P = 0.0


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
    prompt_cache: bool = True


def generation_defaults(model_dir: Path) -> dict:
    """temperature / top_p / top_k from the model's generation_config.json, else Qwen3.5's."""
    defaults = {"temperature": DEFAULT_TEMPERATURE, "top_p": DEFAULT_TOP_P, "top_k": DEFAULT_TOP_K}
    try:
        config = json.loads(read_small(Path(model_dir) / "generation_config.json", 1 << 20))
    except (OSError, ValueError, RecursionError):
        return defaults
    if not isinstance(config, dict):
        return defaults
    for key in defaults:
        if isinstance(config.get(key), (int, float)) and not isinstance(config.get(key), bool):
            defaults[key] = config[key]
    return defaults


def check_experts(experts: Optional[int], manifest, model_id: str) -> int:
    """The experts-per-token to use: ``-o experts``, checked against the model, or the model's default."""
    if experts is None:
        return manifest.experts_per_token
    return check_experts_per_token(experts, manifest.num_experts, "-o experts",
                                   f"{model_id} (default {manifest.experts_per_token})")


def pick(value, default):
    """An option's value, or its default when the option was not given."""
    return default if value is None else value


def bank_budget(bank_gb: Optional[float], manifest, held: int = 0, loaded: bool = True):
    """(bytes or None, warning): ``-o bank_gb`` as a budget, clamped to what the memory the bank lives
    in can hold (its free memory, plus the bank it would replace, less the reserve; less the resident
    weights when the model is not loaded yet). None: the automatic budget, chosen when the model loads.
    Less than the smallest bank the model runs with (0 included) is refused: there is no "no bank"."""
    from ..engine.loader import smallest_bank_bytes
    from ..bank.memory import bank_memory, bank_room, reserve_bytes

    if bank_gb is None:
        return None, None
    want = int(round(bank_gb * 1e9))
    smallest = smallest_bank_bytes(manifest)
    if want < smallest:
        raise FlashMoeError(
            f"-o bank_gb {bank_gb:g} is less than the smallest expert bank {manifest.name} runs with "
            f"({smallest / 1e6:.2f} MB: twice the experts of one token); give -o bank_gb "
            f"{math.ceil(smallest / 1e6) / 1e3:g} or more, or leave it out for the automatic size")
    free, total = bank_memory()
    if free is None:
        return want, None
    limit = bank_room(free, total, held, weights=0 if loaded else manifest.resident_bytes)
    if want <= limit:
        return want, None
    return limit, (f"-o bank_gb {bank_gb:g} is more than this machine can hold ({free / 1e9:.1f} GB free "
                   f"where the bank lives, {reserve_bytes(total) / 1e9:.1f} GB of it kept free); "
                   f"using {limit / 1e9:.2f} GB")


def vocab_size(config: dict) -> Optional[int]:
    text = config.get("text_config")
    size = config.get("vocab_size") or (text.get("vocab_size") if isinstance(text, dict) else None)
    return size if isinstance(size, int) else None


def warn(message: str) -> None:
    import click

    click.echo(f"Warning: {message}", err=True)


def resolve_settings(options, manifest, model_dir: Path, experts_per_token: int, has_thinking: bool,
                     vocab_size: Optional[int] = None, thinking: Optional[bool] = None) -> Settings:
    """``experts_per_token``: ``check_experts``'s answer; ``vocab_size`` bounds top_k; ``thinking``: the
    conversation's earlier choice, used when ``-o thinking`` is not given. Without either, a model that can
    think does, except the random-weight demo: its output is not language, and as reasoning it would only
    show on stderr."""
    defaults = generation_defaults(model_dir)
    top_k = int(pick(options.top_k, defaults["top_k"]))
    if vocab_size is not None and top_k >= vocab_size:
        top_k = 0  # every token: the same as no top-k (mlx-lm refuses a top_k as large as the vocabulary)
    can_think = has_thinking and not is_demo(manifest)
    return Settings(
        max_tokens=pick(options.max_tokens, DEFAULT_MAX_TOKENS),
        temperature=float(pick(options.temperature, defaults["temperature"])),
        top_p=float(pick(options.top_p, defaults["top_p"])),
        top_k=top_k,
        min_p=float(pick(options.min_p, DEFAULT_MIN_P)),
        seed=options.seed,
        experts_per_token=experts_per_token,
        thinking=bool(pick(options.thinking, pick(thinking, can_think))),
        prompt_cache=bool(pick(options.prompt_cache, True)),
    )
