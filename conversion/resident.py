"""Resident weights: everything but the routed experts, sanitized and quantized the way mlx-lm does it.

mlx-lm's own ``sanitize``, ``load_weights(strict=True)`` and ``quantize_model`` (with the model's quant
predicate: router and shared-expert gate at 8 bits) do the work; this module feeds them lazily
loaded tensors and writes the result one module at a time, so memory stays near one tensor.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Dict, Optional, Tuple

from ..errors import FlashMoeError
from ..flash_layout import file_checksum
from ..engine.mlx_model import build_model, cast_floats, no_experts
from . import faults
from .checkpoint import classify, conversion_dtype, quantization_of
from .safetensors_io import SafetensorsWriter, TensorInfo

RESIDENT_GROUP_SIZE = 64


def _cast(model, dtype: Optional[str]) -> None:
    """Cast floating parameters as mlx-lm's converter does (honouring the model's cast predicate)."""
    import mlx.core as mx

    if dtype is not None:
        cast_floats(model, getattr(mx, dtype), getattr(model, "cast_predicate", lambda _: True))


def _quantize(model, config: dict, bits: int, group_size: int, predicate):
    from mlx_lm.utils import quantize_model

    with contextlib.redirect_stdout(io.StringIO()):  # quantize_model prints bits per weight
        return quantize_model(model, config, group_size, bits, quant_predicate=predicate)


def resident_parameters(config: dict, tensors: Dict[str, TensorInfo], expert_shapes: Dict[str, Tuple[str, tuple]],
                        resident_bits: int) -> Tuple[dict, dict, Optional[str]]:
    """Lazily computed resident weights, the config.json to write beside them, and a note for the user.

    ``tensors``: the source's non-expert tensors; ``expert_shapes``: key -> (mlx dtype, shape) of its
    expert tensors, stood in by lazy zeros that are never evaluated (some sanitize functions only
    rewrite a checkpoint when they see its experts).
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    weights = {}
    by_file: Dict[Path, list] = {}
    for key, info in tensors.items():
        by_file.setdefault(info.file, []).append(key)
    for file, keys in by_file.items():
        loaded = mx.load(str(file))
        weights.update({k: loaded[k] for k in keys})
        del loaded
    for key, (dtype, shape) in expert_shapes.items():
        weights[key] = mx.zeros(shape, dtype=getattr(mx, dtype))

    model = build_model(config, no_experts)
    weights = {k: v for k, v in model.sanitize(weights).items() if classify(k) is None}

    source_quant = quantization_of(config)
    if source_quant is not None:
        note = None
        if resident_bits != source_quant["bits"]:
            note = (f"resident weights keep the source's {source_quant['bits']}-bit quantization "
                    f"(--resident-bits {resident_bits} cannot be applied to already-quantized weights)")
        return weights, config, note

    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise FlashMoeError(f"the checkpoint does not match mlx-lm's {config['model_type']} model: "
                            f"{str(e).splitlines()[0]}")
    del weights
    _cast(model, conversion_dtype(config))
    out_config = config
    if resident_bits < 16:
        model, out_config = _quantize(model, config, resident_bits, RESIDENT_GROUP_SIZE, model.quant_predicate)
    return dict(tree_flatten(model.parameters())), out_config, None


def estimate_resident_bytes(config: dict, resident_bits: int) -> int:
    """Size of the resident weights, from shapes alone (nothing is computed or read)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    model = build_model(config, no_experts)
    source_quant = quantization_of(config)
    if source_quant is not None:
        per_layer = {k: v for k, v in source_quant.items() if isinstance(v, dict)}
        model, _ = _quantize(model, {}, source_quant["bits"], source_quant["group_size"],
                             lambda path, _: per_layer.get(path, True))
        scale_bytes = 2
    else:
        _cast(model, conversion_dtype(config) or "bfloat16")
        if resident_bits < 16:
            model, _ = _quantize(model, {}, resident_bits, RESIDENT_GROUP_SIZE, model.quant_predicate)
        scale_bytes = 2
    total = 0
    for _, v in tree_flatten(model.parameters()):
        total += v.size * (scale_bytes if v.dtype == mx.float32 else v.itemsize)
    return total


def write_resident(params: dict, path: Path, progress) -> Tuple[int, str]:
    """Write lazily computed parameters to one safetensors file, evaluating one module at a time.

    Returns (file size, checksum). ``params`` is emptied as it goes so evaluated weights are freed.
    """
    import mlx.core as mx
    import numpy as np

    keys = sorted(params)
    names = {mx.bfloat16: "bfloat16", mx.float16: "float16", mx.float32: "float32", mx.uint32: "uint32",
             mx.uint8: "uint8", mx.int32: "int32"}
    writer = SafetensorsWriter(path, [(k, names[params[k].dtype], tuple(params[k].shape)) for k in keys],
                               metadata={"format": "mlx"})
    try:
        groups: Dict[str, list] = {}
        for k in keys:
            groups.setdefault(k.rsplit(".", 1)[0], []).append(k)
        for group in groups.values():
            arrays = [params.pop(k) for k in group]
            mx.eval(arrays)
            for k, a in zip(group, arrays):
                data = np.array(mx.contiguous(a).view(mx.uint8)).reshape(-1)
                writer.write(k, data)
                progress.update(data.nbytes)
            del arrays
            mx.clear_cache()  # else mlx's buffer cache keeps every freed tensor: RSS would grow to the whole model
            faults.point("resident")
        writer.close()
    except OSError as err:
        writer.abort()
        from .experts import disk_error

        raise disk_error(err, path.name)
    except BaseException:
        writer.abort()
        raise
    return writer.size, file_checksum(path)
