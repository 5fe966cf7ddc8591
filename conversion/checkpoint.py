"""What a source checkpoint is: its config, its shards, and which of its tensors are routed experts."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from ..errors import FlashMoeError
from ..flash_layout import MAX_DIMENSION, MAX_EXPERTS, MAX_LAYERS

SUPPORTED_MODEL_TYPES = ("qwen3_5_moe", "qwen3_next", "qwen3_moe")

# Files copied next to the converted weights (tokenizer, chat template, generation defaults).
METADATA_PATTERNS = ("*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken")
TOKENIZER_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "qwen.tiktoken",
                   "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")

_EXPERT_KEY = re.compile(
    r"(?:^|\.)layers\.(\d+)\.mlp\."
    r"(?:experts\.(?:(\d+)\.)?(gate_up_proj|gate_proj|up_proj|down_proj)(?:\.(weight))?"
    r"|switch_mlp\.(gate_proj|up_proj|down_proj)\.(weight|scales|biases))$"
)


@dataclass(frozen=True)
class ExpertKey:
    """A source tensor holding routed-expert weights.

    ``expert`` is None for tensors stacked over all experts (first axis = expert).
    ``projection`` is gate_proj, up_proj, down_proj, or gate_up_proj (HF fused gate+up).
    """

    layer: int
    expert: Optional[int]
    projection: str
    part: str  # weight, scales or biases


def classify(key: str) -> Optional[ExpertKey]:
    """The ExpertKey of a routed-expert tensor, or None for every other tensor (MTP experts included)."""
    if "mtp." in key:
        return None
    m = _EXPERT_KEY.search(key)
    if not m:
        return None
    layer, expert, fused_proj, _, stacked_proj, stacked_part = m.groups()
    if stacked_proj:
        return ExpertKey(int(layer), None, stacked_proj, stacked_part)
    return ExpertKey(int(layer), None if expert is None else int(expert), fused_proj, "weight")


VISION_PREFIXES = ("model.visual.", "model.language_model.visual.", "visual.", "vision_tower.")


def is_vision(key: str) -> bool:
    """Whether a source tensor belongs to the vision encoder (HF ``model.visual.*``, MLX ``vision_tower.*``)."""
    return key.startswith(VISION_PREFIXES)


# The metadata files of a checkpoint (config, tokenizer, chat template, index) are small: bigger is not one.
MAX_METADATA_BYTES = 256 << 20
# Bounds on what a config may claim, checked before a model is built from it (a million layers is no model).
CONFIG_BOUNDS = {"num_hidden_layers": MAX_LAYERS, "num_experts": MAX_EXPERTS, "hidden_size": MAX_DIMENSION,
                 "moe_intermediate_size": MAX_DIMENSION, "intermediate_size": MAX_DIMENSION,
                 "shared_expert_intermediate_size": MAX_DIMENSION, "num_attention_heads": 4096,
                 "num_key_value_heads": 4096, "head_dim": 65536, "vocab_size": 1 << 22,
                 "num_experts_per_tok": MAX_EXPERTS}


def checked_file(directory: Path, name: str, root: Optional[Path] = None) -> Path:
    """``directory/name``, refused in one line unless it is a regular file of sane size inside ``root``
    (the checkpoint's directory; a hub snapshot's links point into its cache folder, which is given instead)."""
    path = Path(directory) / name
    real = path.resolve()
    if not real.is_relative_to(Path(root or directory).resolve()):
        raise FlashMoeError(f"{path} links outside the checkpoint (to {real}); copy the file itself into {directory}")
    if not real.is_file():
        raise FlashMoeError(f"{path} is not a regular file; give the checkpoint's own {name}")
    if real.stat().st_size > MAX_METADATA_BYTES:
        raise FlashMoeError(f"{path} is larger than {MAX_METADATA_BYTES >> 20} MB: not a checkpoint's {name}")
    return path


def check_metadata_files(directory: Path, root: Optional[Path] = None) -> None:
    """Refuse, before anything is written, tokenizer or template files that are links out of the checkpoint,
    not regular files, or too large (they are copied into the prepared model at the end)."""
    for name in TOKENIZER_FILES:
        if (Path(directory) / name).exists() or (Path(directory) / name).is_symlink():
            checked_file(directory, name, root)


def load_config(directory: Path, root: Optional[Path] = None) -> dict:
    """The checkpoint's config.json, checked: a supported model type whose fields mlx-lm can build from."""
    from ..engine.mlx_model import config_problem, json_kind

    if not (Path(directory) / "config.json").exists():
        raise FlashMoeError(f"{directory} is not a checkpoint: it has no config.json")
    path = checked_file(directory, "config.json", root)
    try:
        config = json.loads(path.read_text())
    except RecursionError:
        raise FlashMoeError(f"{path} is not valid JSON (nested too deeply); download the checkpoint's config.json "
                            "again") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise FlashMoeError(f"{path} is not valid JSON ({e}); download the checkpoint's config.json again")
    if not isinstance(config, dict):
        raise FlashMoeError(f"{path} is {json_kind(config)}, not a JSON object; download the checkpoint's "
                            "config.json again")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise FlashMoeError(
            f"model type {model_type!r} is not supported; llm-flash-moe converts "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoints"
        )
    problem = config_problem(config) or _our_fields_problem(config)
    if problem:
        raise FlashMoeError(f"{path} does not describe a {model_type} model: {problem}; download the "
                            "checkpoint's config.json again (or fix that field)")
    return config


def _our_fields_problem(config: dict) -> Optional[str]:
    """Fields the converter and the engine read beside mlx-lm's model arguments."""
    from ..engine.mlx_model import json_kind

    text = config.get("text_config")
    for prefix, values in (("", config), ("text_config.", text if isinstance(text, dict) else {})):
        for key, bound in CONFIG_BOUNDS.items():
            value = values.get(key)
            low = 0 if key == "shared_expert_intermediate_size" else 1
            if isinstance(value, int) and not isinstance(value, bool) and not low <= value <= bound:
                return f"{prefix}{key} is {value:,}, outside {low} to {bound:,}"
        q = values.get("quantization")
        if q is not None:
            if not isinstance(q, dict):
                return f"{prefix}quantization must be an object, not {json_kind(q)}"
            for key in ("bits", "group_size"):
                if not isinstance(q.get(key), int) or isinstance(q.get(key), bool):
                    return f"{prefix}quantization.{key} must be an integer, not {json_kind(q.get(key))}"
            for key, layer in q.items():
                if isinstance(layer, dict) and not all(isinstance(layer.get(k), int) for k in ("bits", "group_size")):
                    return f"{prefix}quantization.{key} must give integer bits and group_size"
        eos = values.get("eos_token_id")
        if eos is not None and not (isinstance(eos, int) or (isinstance(eos, list) and all(
                isinstance(t, int) for t in eos))):
            return f"{prefix}eos_token_id must be an integer or a list of integers, not {json_kind(eos)}"
    return None


def shard_names(directory: Path, root: Optional[Path] = None) -> List[str]:
    """The safetensors files of a checkpoint: from its index when it has one, else every model*.safetensors."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        checked_file(directory, index.name, root)
        try:
            weight_map: Dict[str, str] = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise FlashMoeError(f"{index} is damaged ({type(e).__name__}: {e}); download it again")
        if not all(isinstance(n, str) for n in names):
            raise FlashMoeError(f"{index} is damaged (its weight_map names non-files); download it again")
        return names
    names = sorted(p.name for p in directory.glob("*.safetensors"))
    if not names:
        raise FlashMoeError(f"{directory} is not a checkpoint: it has no .safetensors files")
    return names


def _text_config(config: dict) -> dict:
    text = config.get("text_config")
    return text if isinstance(text, dict) else {}


def quantization_of(config: dict) -> Optional[dict]:
    """The MLX quantization of a source checkpoint ({bits, group_size, mode, per-layer...}) or None."""
    q = config.get("quantization") or _text_config(config).get("quantization")
    return dict(q) if q else None


def conversion_dtype(config: dict) -> Optional[str]:
    """The float dtype mlx-lm's converter casts weights to (config torch_dtype), or None to keep the source's."""
    dtype = config.get("torch_dtype") or _text_config(config).get("dtype")
    return dtype if dtype in ("float16", "bfloat16", "float32") else None
