"""mlx-lm's own model classes, with each MoE block's stacked experts swapped for something else.

The router, shared expert and everything outside the experts stay mlx-lm's code; only the
``switch_mlp`` of each sparse MoE block is replaced (by the streaming layer in the engine, by an empty
module in the converter).
"""

from __future__ import annotations

from typing import Callable, List, Tuple

from .errors import FlashMoeError


def model_classes(config: dict):
    from mlx_lm.utils import _get_classes

    try:
        return _get_classes(config=config)
    except ValueError:
        raise FlashMoeError(
            f"this mlx-lm has no model class for model type {config.get('model_type')!r}; upgrade mlx-lm"
        )


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
    return construct(args_class.from_dict(config))


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
