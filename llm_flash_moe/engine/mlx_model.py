"""mlx-lm's own model classes, with each MoE block's stacked experts swapped for something else.

The router, shared expert and everything outside the experts stay mlx-lm's code; only the
``switch_mlp`` of each sparse MoE block is replaced (by the streaming layer in the engine, by an empty
module in the converter).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from typing import Callable, List, Optional, Tuple

from ..errors import FlashMoeError, one_line


def model_classes(config: dict):
    from mlx_lm.utils import _get_classes

    try:
        return _get_classes(config=config)
    except ValueError:
        raise FlashMoeError(
            f"this mlx-lm has no model class for model type {config.get('model_type')!r}; upgrade mlx-lm"
        )


# ------------------------------------------------------------------------------ config.json checks


def config_problem(config) -> Optional[str]:
    """What makes ``config`` (a parsed config.json) unfit for mlx-lm's model class, in a few words, or None.

    Every field mlx-lm's ``ModelArgs`` (and, for Qwen3.5, ``TextModelArgs`` of ``text_config``) reads must
    have the JSON type its annotation gives (an int where a float is asked for is fine) and the fields it
    requires must be there. Fields mlx-lm does not read are not looked at.
    """
    if not isinstance(config, dict):
        return f"it is {json_kind(config)}, not a JSON object"
    model_class, args_class = model_classes(config)
    text_class = _text_args_class(model_class, args_class)
    problem = _fields_problem(config, args_class, "", skip={"text_config"} if text_class else set())
    if problem or text_class is None:
        return problem
    if "text_config" in config:
        return _fields_problem(config["text_config"], text_class, "text_config.")
    return _fields_problem(config, text_class, "")


def json_kind(value) -> str:
    """How JSON calls a value's type, for messages: "a string", "a list", "null"..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    return {int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__)


def _text_args_class(model_class, args_class):
    """The args class of a nested ``text_config`` (qwen3_5's TextModelArgs), if the model has one."""
    if "text_config" not in {f.name for f in dataclasses.fields(args_class)}:
        return None
    for cls in model_class.__mro__:
        found = getattr(sys.modules.get(cls.__module__), "TextModelArgs", None)
        if found is not None:
            return found
    return None


# Fields that set a weight's shape or the routing: required even where mlx-lm has a default for them (its
# qwen3_5 TextModelArgs defaults every field, so a config.json without hidden_size would build a model of
# another shape, and the weights would fail to fit it with a byte count instead of the field's name).
SHAPE_FIELDS = frozenset({
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
    "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
    "linear_num_value_heads", "linear_num_key_heads", "linear_key_head_dim", "linear_value_head_dim",
    "linear_conv_kernel_dim",
})


def _fields_problem(values, args_class, prefix: str, skip=frozenset()) -> Optional[str]:
    if not isinstance(values, dict):
        return f"{prefix.rstrip('.') or 'it'} is {json_kind(values)}, not a JSON object"
    hints = typing.get_type_hints(args_class)
    for f in dataclasses.fields(args_class):
        if f.name in skip:
            continue
        if f.name not in values:
            required = f.name in SHAPE_FIELDS or (f.default is dataclasses.MISSING
                                                  and f.default_factory is dataclasses.MISSING)
            if required:
                return f"{prefix}{f.name} is missing"
            continue
        value = values[f.name]
        if not _matches(value, hints.get(f.name, typing.Any)):
            shown = json.dumps(value)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            return f"{prefix}{f.name} must be {_expected(hints[f.name])}, not {shown}"
    return None


_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
          dict: "an object", type(None): "null"}


def _matches(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return any(_matches(value, a) for a in args)
    if hint is typing.Any or hint is object:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, (bool, int)) and not isinstance(value, float)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (list, tuple) or origin in (list, tuple):
        item = args[0] if origin is list and args else typing.Any
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return True  # a type JSON cannot spell: mlx-lm's own checks decide


def _expected(hint) -> str:
    if typing.get_origin(hint) is typing.Union:
        return " or ".join(dict.fromkeys(_expected(a) for a in typing.get_args(hint)))
    return _KINDS.get(typing.get_origin(hint) or hint, "of another type")


def no_experts(index, block):
    """A ``make_experts`` that leaves the experts out (an empty module: no parameters)."""
    import mlx.nn as nn

    return nn.Module()


def cast_floats(model, dtype, cast=lambda path: True) -> None:
    """Cast the model's floating parameters to ``dtype`` (an mlx dtype), those whose path ``cast`` accepts."""
    import mlx.core as mx
    from mlx.utils import tree_map_with_path

    model.update(tree_map_with_path(
        lambda k, v: v.astype(dtype) if cast(k) and mx.issubdtype(v.dtype, mx.floating) else v,
        model.parameters()))


def moe_blocks(model) -> List[Tuple[int, object]]:
    """(layer index, sparse MoE block) for every decoder layer whose MLP routes to experts (mlx-lm's
    block, or the streaming block that replaces it)."""
    return [(i, layer.mlp) for i, layer in enumerate(model.layers) if hasattr(layer.mlp, "top_k")]


def build_model(config: dict, make_experts: Callable[[int, object], object]):
    """Instantiate mlx-lm's model for ``config`` with ``switch_mlp`` replaced by ``make_experts(layer, block)``.

    Parameters are created lazily by mlx and the replaced experts are never evaluated, so this costs
    no memory for the expert weights even at the 397B's size.
    """
    construct, args_class = streaming_model_classes(make_experts)(config)
    try:
        return construct(args_class.from_dict(config))
    except Exception as e:  # mlx-lm's classes check a config as they build the model, each in its own way
        raise FlashMoeError(f"mlx-lm cannot build a {config.get('model_type')} model from this config.json: "
                            f"{one_line(e)}") from None


def streaming_model_classes(make_experts: Callable[[int, object], object]):
    """A ``get_model_classes`` for ``mlx_lm.utils.load_model`` that builds the model with replaced experts."""

    def get_classes(config: dict):
        model_class, args_class = model_classes(config)

        def construct(args):
            model = model_class(args)
            for index, block in moe_blocks(model):
                block.switch_mlp = make_experts(index, block)
            return model

        return construct, args_class

    return get_classes
