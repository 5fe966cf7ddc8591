"""The streaming MoE layer: stands in for mlx-lm's SwitchGLU inside mlx-lm's own sparse MoE block.

mlx-lm's block still computes the router (fp32 softmax, top-k, renormalization) and the shared expert;
this module receives the chosen expert indices, has the store read each distinct expert once per call
(a whole prompt chunk shares one read per expert), and computes on the buffers the reads filled: for
one token with the fused kernel where the backend has one (``kernels.expert_glu``), otherwise with
mlx-lm's SwitchGLU arithmetic (``kernels.LoadedSwitchGLU``, the kernels' twin).
"""

from __future__ import annotations

import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import kernels
from .expert_store import ExpertStore


def route(block, x: mx.array) -> mx.array:
    """The experts mlx-lm's MoE ``block`` would choose for ``x`` (its router: softmax, then top-k)."""
    gates = mx.softmax(block.gate(x), axis=-1, precise=True)
    return mx.argpartition(gates, kth=-block.top_k, axis=-1)[..., -block.top_k:]


class StreamingExperts(nn.Module):
    """Drop-in for ``block.switch_mlp``: ``(x [..., H], indices [..., k]) -> [..., k, H]``.

    With ``next_block`` set (the next MoE block), a decoded token also runs that block's router on this
    layer's input and starts reading the experts it predicts, so the next layer's reads overlap this
    layer's compute; the store counts how many predictions were right.
    """

    def __init__(self, layer: int, store: ExpertStore):
        super().__init__()
        self.layer = layer
        self.store = store
        self.next_block = None  # a plain attribute (set with object.__setattr__): not a child module

    @property
    def quant(self):
        return self.store.layers[self.layer].quantization

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        one_token = indices.size == indices.shape[-1] <= self.store.slots
        predicted = route(self.next_block, x) if one_token and self.next_block is not None else None
        if one_token:
            self._synchronize(indices, predicted)
        if predicted is not None:
            self.store.prefetch(self.store.next_layer[self.layer], np.array(predicted).reshape(-1))
        chosen = np.array(indices)  # the host synchronization per layer: which experts to read
        if one_token:  # k distinct experts
            parts, slots = self.store.load(self.layer, chosen.reshape(-1))
            backend = kernels.backend()
            if backend == "twin" or not kernels.supported(x, parts, self.quant):
                y = kernels.LoadedSwitchGLU(parts, self.quant)(x.reshape(1, -1), mx.array(slots)[None])
            else:  # the fused kernel computes every loaded slot (prefetched ones too); keep the chosen
                y = kernels.kernel_glu(x, parts, self.quant, backend=backend)[mx.array(slots)].astype(x.dtype)
            y = y.reshape(*chosen.shape, x.shape[-1])
        else:
            unique, local = np.unique(chosen, return_inverse=True)
            if len(unique) <= self.store.slots:
                parts, slots = self.store.load(self.layer, unique)
                y = kernels.LoadedSwitchGLU(parts, self.quant)(x, mx.array(slots[local].reshape(chosen.shape)))
            else:
                y = self._in_groups(x, chosen, unique)
        self.store.retain(self.layer, y)
        return y

    def _synchronize(self, indices, predicted) -> None:
        """The one host synchronization of a decoded token's layer (for the router's choice and the
        prediction together), timed in two halves: launching the GPU work queued so far, then waiting."""
        arrays = [indices] if predicted is None else [indices, predicted]
        start = time.perf_counter()
        mx.async_eval(*arrays)
        launched = time.perf_counter()
        mx.eval(*arrays)
        stats = self.store.stats
        stats.router_launch_seconds += launched - start
        stats.router_wait_seconds += time.perf_counter() - launched

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
            parts, slot_of[group] = self.store.load(self.layer, group)
            glu = kernels.LoadedSwitchGLU(parts, self.quant)
            out = glu(flat_x[mx.array(pairs // k)], mx.array(slot_of[flat[pairs]])[:, None])
            y = y.at[mx.array(pairs)].add(out[:, 0, :])
            self.store.retain(self.layer, y)  # evaluated before the next group refills the buffers
        return y.reshape(*chosen.shape, H)
