"""The streaming MoE layer: stands in for mlx-lm's SwitchGLU inside mlx-lm's own sparse MoE block.

mlx-lm's block still computes the router (fp32 softmax, top-k, renormalization) and the shared expert;
this module receives the chosen expert indices, has the store read each distinct expert once per call
(a whole prompt chunk shares one read per expert), and computes on the buffers the reads filled: for
one token with the fused kernel where the backend has one (``kernels.expert_glu``), otherwise with
mlx-lm's SwitchGLU arithmetic (``kernels.LoadedSwitchGLU``, the kernels' twin).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import kernels
from .expert_store import ExpertStore


class StreamingExperts(nn.Module):
    """Drop-in for ``block.switch_mlp``: ``(x [..., H], indices [..., k]) -> [..., k, H]``."""

    def __init__(self, layer: int, store: ExpertStore):
        super().__init__()
        self.layer = layer
        self.store = store

    @property
    def quant(self):
        return self.store.layers[self.layer].quantization

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        chosen = np.array(indices)  # the one host synchronization per layer: which experts to read
        if chosen.size == chosen.shape[-1] <= self.store.slots:  # one token: k distinct experts, router order
            y = kernels.expert_glu(x, self.store.load(self.layer, chosen.reshape(-1)), self.quant)
            y = y.astype(x.dtype).reshape(*chosen.shape, x.shape[-1])
        else:
            unique, local = np.unique(chosen, return_inverse=True)
            if len(unique) <= self.store.slots:
                glu = kernels.LoadedSwitchGLU(self.store.load(self.layer, unique), self.quant)
                y = glu(x, mx.array(local.reshape(chosen.shape).astype(np.uint32)))
            else:
                y = self._in_groups(x, chosen, unique)
        self.store.retain(self.layer, y)
        return y

    def _in_groups(self, x, chosen, unique):
        """More distinct experts than slots: run them a group at a time over the (token, k) pairs they serve."""
        H, k, slots = x.shape[-1], chosen.shape[-1], self.store.slots
        flat_x = x.reshape(-1, H)
        flat = chosen.reshape(-1)
        y = mx.zeros((flat.size, H), dtype=x.dtype)
        slot_of = np.zeros(int(unique[-1]) + 1, dtype=np.uint32)
        for start in range(0, len(unique), slots):
            group = unique[start:start + slots]
            pairs = np.nonzero(np.isin(flat, group))[0]
            slot_of[group] = np.arange(len(group), dtype=np.uint32)
            glu = kernels.LoadedSwitchGLU(self.store.load(self.layer, group), self.quant)
            out = glu(flat_x[mx.array(pairs // k)], mx.array(slot_of[flat[pairs]])[:, None])
            y = y.at[mx.array(pairs)].add(out[:, 0, :])
            self.store.retain(self.layer, y)  # evaluated before the next group refills the buffers
        return y.reshape(*chosen.shape, H)
