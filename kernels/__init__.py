"""Fused routed-expert kernels for one token, with their pure-MLX twin.

    expert_glu(x, parts, quant, scores=None, slots=None)

computes mlx-lm's SwitchGLU for one token over k experts held in a bank: ``x`` is the token's activation
(``[H]``, any leading axes of size 1), ``parts`` the bank's per-part arrays
(``{"gate_proj.weight": [S, I, H*bits/32] uint32, "gate_proj.scales": [S, I, H/gs], ...}``), ``slots``
the k rows (uint32 ``[k]``) holding the chosen experts (default: every row), and ``quant`` anything with
``bits``, ``group_size`` and ``mode`` (an ExpertQuantization). It returns the per-expert outputs
``[k, H]`` (what SwitchGLU returns), or with ``scores`` ``[k]`` their weighted sum ``[H]`` (what mlx-lm's
MoE block computes next).

Backends, chosen per call by ``backend()``:
- "cuda": two kernels (kernels/expert_glu.cu): gate+up+SwiGLU into an fp32 [k, I] buffer, then down
  and the weighted sum, straight from the quantized buffers;
- "metal": the line-for-line Metal mirror (kernels/expert_glu.metal); unverified on hardware, so only
  used when LLM_FLASH_MOE_METAL_KERNEL=1;
- "twin": ``twin_glu``, mlx's own quantized ops, exactly SwitchGLU's arithmetic: the CPU path and
  the oracle. LLM_FLASH_MOE_KERNEL=twin forces it everywhere.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from importlib import resources

ENV_KERNEL = "LLM_FLASH_MOE_KERNEL"  # "twin" forces the pure-MLX twin
ENV_METAL = "LLM_FLASH_MOE_METAL_KERNEL"  # "1" opts in to the (unverified) Metal kernel
METAL_VERIFIED = False  # set True once benchmarks/metal_check.py has passed on a Mac (docs/PERFORMANCE.md)
SUPPORTED_BITS = (2, 3, 4, 8)
ROWS = {"gate_up": 4, "down": 8}  # output rows per warp, picked by benchmarks/cuda_check.py (H100)
SOURCES = {"cuda": "expert_glu.cu", "metal": "expert_glu.metal"}
_INPUTS = {
    "gate_up": ["x", "slots", "gate_w", "gate_s", "gate_b", "up_w", "up_s", "up_b"],
    "down": ["act", "slots", "down_w", "down_s", "down_b", "scores"],
}
_OUTPUTS = {"gate_up": ["act"], "down": ["out"]}


def kernel_sections(backend: str) -> dict:
    """The kernel file's sections ("header", "gate_up", "down"), read from the installed package."""
    text = resources.files(__package__).joinpath(SOURCES[backend]).read_text()
    parts = re.split(r"^// ===== (\w+) =====\n", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def backend() -> str:
    """The backend expert_glu uses now: "cuda", "metal" or "twin"."""
    import mlx.core as mx

    if os.environ.get(ENV_KERNEL, "auto").lower() == "twin" or mx.default_device() != mx.gpu:
        return "twin"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available() and (METAL_VERIFIED or os.environ.get(ENV_METAL) == "1"):
        return "metal"
    return "twin"


def expert_glu(x, parts: dict, quant, scores=None, slots=None):
    """SwitchGLU for one token over experts held in ``parts``; see the module docstring."""
    name = backend()
    if name != "twin" and supported(x, parts, quant):
        return kernel_glu(x, parts, quant, scores, slots=slots, backend=name)
    return twin_glu(x, parts, quant, scores, slots)


def supported(x, parts: dict, quant) -> bool:
    """Whether the kernels handle these shapes and this quantization (else the twin runs)."""
    import mlx.core as mx

    _, I, _ = parts["gate_proj.weight"].shape
    return (x.dtype in (mx.float32, mx.bfloat16, mx.float16) and parts["down_proj.weight"].shape[1] == x.size
            and shapes_supported(x.size, I, quant, "gate_proj.biases" in parts))


def shapes_supported(hidden: int, intermediate: int, quant, has_biases: bool = True) -> bool:
    """Whether the kernels handle experts of these sizes and this quantization."""
    return (getattr(quant, "mode", "affine") == "affine" and quant.bits in SUPPORTED_BITS and has_biases
            and hidden % 32 == 0 and intermediate % 32 == 0
            and intermediate % ROWS["gate_up"] == 0 and hidden % ROWS["down"] == 0)


class _LoadedProjection(dict):
    """mlx-lm's QuantizedSwitchLinear over loaded arrays (its own __call__, so its own arithmetic)."""

    def __init__(self, arrays: dict, quant):
        from mlx_lm.models.switch_layers import QuantizedSwitchLinear

        super().__init__(arrays)
        self.bits, self.group_size = quant.bits, quant.group_size
        self.mode, self.global_scale = getattr(quant, "mode", "affine"), None
        self._call = QuantizedSwitchLinear.__call__

    def __call__(self, x, indices, sorted_indices=False):
        return self._call(self, x, indices, sorted_indices)


class LoadedSwitchGLU:
    """mlx-lm's SwitchGLU (its sorting for large batches, its SwiGLU) over experts held in ``parts``.

    ``(x [..., H], indices [..., k] into the loaded experts) -> [..., k, H]``: the pure-MLX path for
    any number of tokens, and the twin of the kernels.
    """

    def __init__(self, parts: dict, quant):
        from mlx_lm.models.switch_layers import SwiGLU, SwitchGLU

        self._call = SwitchGLU.__call__
        self.activation = SwiGLU()
        for proj in ("gate_proj", "up_proj", "down_proj"):
            arrays = {k: parts[f"{proj}.{k}"] for k in ("weight", "scales", "biases") if f"{proj}.{k}" in parts}
            setattr(self, proj, _LoadedProjection(arrays, quant))

    def __call__(self, x, indices):
        return self._call(self, x, indices)


def twin_glu(x, parts: dict, quant, scores=None, slots=None):
    """The pure-MLX twin: exactly mlx-lm's SwitchGLU arithmetic (three gather_qmm + SwiGLU)."""
    import mlx.core as mx

    if slots is None:
        slots = mx.arange(parts["gate_proj.weight"].shape[0], dtype=mx.uint32)
    n = slots.size
    H = x.shape[-1]
    y = LoadedSwitchGLU(parts, quant)(x.reshape(1, H), slots.reshape(1, n))[0]
    if scores is None:
        return y  # [n, H]
    return (y * scores.reshape(n)[:, None]).sum(axis=0)  # mlx-lm's block: (y * scores[..., None]).sum(axis=-2)


@lru_cache(maxsize=None)
def _kernel(backend: str, name: str):
    import mlx.core as mx

    sections = kernel_sections(backend)
    make = mx.fast.cuda_kernel if backend == "cuda" else mx.fast.metal_kernel
    return make(name=f"flash_moe_{name}", input_names=_INPUTS[name], output_names=_OUTPUTS[name],
                source=sections[name], header=sections["header"])


@lru_cache(maxsize=None)
def _one(dtype):
    import mlx.core as mx

    return mx.ones((1,), dtype=dtype)  # the scores input of the unweighted down kernel (not read)


def kernel_glu(x, parts: dict, quant, scores=None, *, slots=None, backend: str = "cuda", rows=None,
               init_value=None):
    """The fused kernels (CUDA or Metal). ``rows`` = (gate_up, down) rows per warp overrides ROWS;
    ``init_value`` fills the outputs before launch (the checks poison them with NaN)."""
    import mlx.core as mx

    rows_gu, rows_dn = rows or (ROWS["gate_up"], ROWS["down"])
    gw, gs, gb = (parts[f"gate_proj.{k}"] for k in ("weight", "scales", "biases"))
    uw, us, ub = (parts[f"up_proj.{k}"] for k in ("weight", "scales", "biases"))
    dw, ds, db = (parts[f"down_proj.{k}"] for k in ("weight", "scales", "biases"))
    if slots is None:
        slots = mx.arange(gw.shape[0], dtype=mx.uint32)
    slots = slots.reshape(-1).astype(mx.uint32)
    n, I = slots.size, gw.shape[1]
    H = x.size
    x = x.reshape(H)
    out_dtype = mx.result_type(x, gs)
    common = [("BITS", quant.bits), ("GS", quant.group_size), ("H", H), ("I", I)]
    extra = {} if init_value is None else {"init_value": init_value}
    act = _kernel(backend, "gate_up")(
        inputs=[x, slots, gw, gs, gb, uw, us, ub],
        template=[("T", x.dtype), ("S", gs.dtype), *common, ("ROWS", rows_gu)],
        **_launch(n * I // rows_gu), output_shapes=[(n, I)], output_dtypes=[mx.float32], **extra)[0]
    weighted = scores is not None
    if weighted:
        scores = scores.reshape(n)
        out_dtype = mx.result_type(out_dtype, scores)
        shape = (H,)
    else:
        scores = _one(mx.float32)
        shape = (n, H)
    return _kernel(backend, "down")(
        inputs=[act, slots, dw, ds, db, scores],
        template=[("S", ds.dtype), *common, ("ROWS", rows_dn), ("WEIGHTED", weighted), ("O", out_dtype)],
        **(_launch(H // rows_dn * 8, per_group=8) if weighted else _launch(n * H // rows_dn)),
        output_shapes=[shape], output_dtypes=[out_dtype], **extra)[0]


def _launch(warps: int, per_group: int = 0) -> dict:
    """Exactly ``warps`` warps (the kernels have no bounds checks), ``per_group`` (else up to 8) per
    threadgroup."""
    per_group = per_group or next(w for w in (8, 4, 2, 1) if warps % w == 0)
    return {"grid": (warps * 32, 1, 1), "threadgroup": (per_group * 32, 1, 1)}
