"""The streaming MoE layer: stands in for mlx-lm's SwitchGLU inside mlx-lm's own sparse MoE block.

mlx-lm's block still computes the router (fp32 softmax, top-k, renormalization) and the shared expert;
this module receives the chosen expert indices, has the store read each distinct expert once per call
(a whole prompt chunk shares one read per expert), and runs mlx-lm's SwitchGLU arithmetic on the
buffers the reads filled.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwiGLU, SwitchGLU

from .expert_store import ExpertStore
from .flash_layout import PROJECTIONS


class _LoadedProjection(dict):
    """mlx-lm's QuantizedSwitchLinear, over weights that live in the store's buffers."""

    __call__ = QuantizedSwitchLinear.__call__

    def __init__(self, arrays: dict, bits: int, group_size: int, mode: str):
        super().__init__(arrays)
        self.bits, self.group_size, self.mode, self.global_scale = bits, group_size, mode, None


class _LoadedGLU:
    """mlx-lm's SwitchGLU (sorting for large batches, SwiGLU), over loaded projections."""

    __call__ = SwitchGLU.__call__

    def __init__(self, projections: dict):
        self.gate_proj, self.up_proj, self.down_proj = (projections[p] for p in PROJECTIONS)
        self.activation = SwiGLU()


class StreamingExperts(nn.Module):
    """Drop-in for ``block.switch_mlp``: ``(x [..., H], indices [..., k]) -> [..., k, H]``."""

    def __init__(self, layer: int, store: ExpertStore):
        super().__init__()
        self.layer = layer
        self.store = store

    def _glu(self, experts: np.ndarray, dtype) -> _LoadedGLU:
        arrays = self.store.load(self.layer, experts)
        quant = self.store.layers[self.layer].quantization
        projections = {}
        for proj in PROJECTIONS:
            parts = {kind: arrays[f"{proj}.{kind}"] for kind in ("weight", "scales", "biases")
                     if f"{proj}.{kind}" in arrays}
            if parts["scales"].dtype != dtype:  # e.g. bf16 records in a model run with fp32 activations
                parts = {k: (v if k == "weight" else v.astype(dtype)) for k, v in parts.items()}
            projections[proj] = _LoadedProjection(parts, quant.bits, quant.group_size, quant.mode)
        return _LoadedGLU(projections)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        dtype = x.dtype
        chosen = np.array(indices)  # the one host synchronization per layer: which experts to read
        unique, local = np.unique(chosen, return_inverse=True)
        local = local.reshape(chosen.shape).astype(np.uint32)
        slots = self.store.slots
        if len(unique) <= slots:
            y = self._glu(unique, dtype)(x, mx.array(local))
        else:
            y = self._in_groups(x, chosen, unique, slots, dtype)
        self.store.retain(self.layer, y)
        return y

    def _in_groups(self, x, chosen, unique, slots, dtype):
        """More distinct experts than slots: run them a group at a time over the (token, k) pairs they serve."""
        H = x.shape[-1]
        k = chosen.shape[-1]
        flat_x = x.reshape(-1, H)
        flat = chosen.reshape(-1)
        y = mx.zeros((flat.size, H), dtype=x.dtype)
        for start in range(0, len(unique), slots):
            group = unique[start:start + slots]
            pairs = np.nonzero(np.isin(flat, group))[0]
            slot_of = np.zeros(int(unique[-1]) + 1, dtype=np.uint32)
            slot_of[group] = np.arange(len(group), dtype=np.uint32)
            glu = self._glu(group, dtype)
            out = glu(flat_x[mx.array(pairs // k)], mx.array(slot_of[flat[pairs]])[:, None])
            y = y.at[mx.array(pairs)].add(out[:, 0, :])
            self.store.retain(self.layer, y)  # evaluated before the next group refills the buffers
        return y.reshape(*chosen.shape, H)
