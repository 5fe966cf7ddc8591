"""The streaming MoE block: mlx-lm's sparse MoE block with its routed experts in the expert bank.

It replaces the whole block (``model.layers[i].mlp``) and reuses mlx-lm's own router and shared expert
modules (their weights and their ``__call__``). Per call: the router (fp32 softmax, top-k, renormalized
scores, as mlx-lm computes them) -> one host synchronization for the chosen experts (and, when decoding,
the next layer's prediction) -> the bank's slots for them (hits cost nothing, misses are read) -> the
chosen experts computed on the bank with their routing weights -> + the shared expert. For one token the
expert compute is the fused kernel's weighted path where the backend has one (``kernels``), otherwise
mlx-lm's SwitchGLU arithmetic over the bank (the kernels' twin, bit-identical to mlx-lm). A prompt chunk
reads each distinct expert at most once, through the bank.
"""

from __future__ import annotations

import math
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import kernels
from ..bank.expert_bank import ExpertBank

# Of the next layer's predicted experts, the share read ahead (the most likely first) where read-ahead is on
# (by default only while the bank holds every expert: FlashModel.set_prefetch). Reading them all doubled the
# bytes a partial bank read for a quarter of the misses (docs/PERFORMANCE.md).
PREFETCH_SHARE = 0.5
# A prompt whose experts of one layer do not all fit the bank keeps each (token, expert) pair's output until
# the layer is done (``StreamingMoE.prompt``): at most this many bytes of them at a time.
PAIR_BUFFER_BYTES = 1 << 30


def route(block, x: mx.array):
    """mlx-lm's routing for ``block``: (chosen experts [..., k], their renormalized scores [..., k])."""
    return route_and_gates(block, x)[:2]


def route_and_gates(block, x: mx.array):
    """``route`` and the router's softmax over every expert [..., experts] (what the bank's policy ranks by)."""
    gates = mx.softmax(block.gate(x), axis=-1, precise=True)
    k = block.top_k
    inds = mx.argpartition(gates, kth=-k, axis=-1)[..., -k:]
    scores = mx.take_along_axis(gates, inds, axis=-1)
    if block.norm_topk_prob:
        scores = scores / scores.sum(axis=-1, keepdims=True)
    return inds, scores, gates


def _likelihood(gates: mx.array) -> mx.array:
    """The router softmax of a call, per expert, averaged over its tokens (fp32: numpy has no bfloat16)."""
    return gates.reshape(-1, gates.shape[-1]).astype(mx.float32).mean(axis=0)


class StreamingMoE(nn.Module):
    """Stands in for mlx-lm's ``Qwen3NextSparseMoeBlock`` (qwen3_5_moe, qwen3_next) or
    ``Qwen3MoeSparseMoeBlock`` (qwen3_moe, no shared expert), built from the loaded block.

    With ``next_block`` set (the following StreamingMoE), a decoded token also runs that block's router on
    this layer's input and has the bank read the experts it predicts while this layer computes.
    """

    def __init__(self, block, layer: int, bank: ExpertBank):
        super().__init__()
        self.gate = block.gate
        self.shared = hasattr(block, "shared_expert")
        if self.shared:
            self.shared_expert = block.shared_expert
            self.shared_expert_gate = block.shared_expert_gate
        self.top_k, self.norm_topk_prob, self.num_experts = block.top_k, block.norm_topk_prob, block.num_experts
        self.layer = layer
        object.__setattr__(self, "bank", bank)  # plain attributes, not child modules
        object.__setattr__(self, "next_block", None)
        object.__setattr__(self, "cluster", None)  # a distributed.Cluster: experts split across ranks
        self.quant = bank.layers[layer].quantization
        layout = bank.layers[layer].layout
        hidden, intermediate = layout.part("down_proj.weight").shape[0], layout.part("gate_proj.weight").shape[0]
        supported = kernels.shapes_supported(hidden, intermediate, self.quant, self.quant.has_biases)
        self.kernel = kernels.backend() if supported else "twin"  # "cuda", "metal" or "twin", resolved once

    def __call__(self, x: mx.array) -> mx.array:
        if self.cluster is not None:  # this rank's experts, summed over the ranks (distributed.Cluster)
            y = self.cluster.experts(self, x, *route(self, x))
        elif x.size == x.shape[-1]:
            y = self._one_token(x, *route_and_gates(self, x))
        else:
            y = self._chunk(x, *route_and_gates(self, x))
        return self._plus_shared(x, y)

    def _plus_shared(self, x, y):
        """``y`` (the routed experts' sum) plus the gated shared expert, where the block has one."""
        if self.shared:
            return y + mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y

    def _one_token(self, x, inds, scores, gates=None):
        table = self.bank.device_table(self.layer)
        if table is not None:  # every expert of the layer is in the bank: pick the slots on the device
            y = self._experts(x, mx.take(table, inds.reshape(-1)), inds, scores)
            self.bank.served_on_device(self.layer, inds.size, y)
            return y
        predicted = self.predict(x)
        likelihood = None if gates is None else _likelihood(gates)
        self._synchronize(inds, predicted, likelihood)
        if likelihood is not None:
            self.bank.observe(self.layer, likelihood)
        slots = self.bank.lookup(self.layer, np.array(inds).reshape(-1), prefetch=self.read_ahead(predicted))
        y = self._experts(x, mx.array(slots.astype(np.uint32)), inds, scores)
        self.bank.retain(self.layer, slots, y)
        return y

    def predict(self, x):
        """The next layer's router on this layer's input (its predicted experts and their scores), to be
        synchronized with this layer's router; None when there is nothing to read ahead."""
        following = self.next_block
        if following is None or self.bank.complete(following.layer):
            return None
        guess, likelihood = route(following, x)
        return guess, likelihood.astype(mx.float32)  # numpy has no bfloat16

    def read_ahead(self, predicted, keep=None):
        """``bank.lookup``'s prefetch for a synchronized prediction: the next layer, its predicted experts
        most likely first (those ``keep`` accepts, a mask over expert ids), and how many of them to read."""
        if predicted is None:
            return None
        guess, likelihood = (np.array(a).reshape(-1) for a in predicted)
        guess = guess[np.argsort(-likelihood, kind="stable")]
        if keep is not None:
            guess = guess[keep[guess]]
        return (self.next_block.layer, guess, math.ceil(len(guess) * PREFETCH_SHARE)) if len(guess) else None

    def _experts(self, x, chosen, inds, scores):
        """The routed experts' weighted sum for one token, ``chosen`` being their slots in the bank."""
        pool = self.bank.arrays(self.layer)
        if self.kernel != "twin":
            y = kernels.kernel_glu(x, pool, self.quant, scores, slots=chosen, backend=self.kernel)
            return y.reshape(x.shape).astype(x.dtype)
        return self._weighted(kernels.LoadedSwitchGLU(pool, self.quant)(x, chosen.reshape(inds.shape)), scores)

    def _weighted(self, y, scores):
        """mlx-lm's weighted sum of the experts' outputs, with its dtypes."""
        out = (y * scores[..., None]).sum(axis=-2)
        return out if self.shared else out.astype(y.dtype)

    def _chunk(self, x, inds, scores, gates=None):
        """Several tokens: each distinct expert read once (a group of them at a time if the bank is smaller)."""
        if gates is not None:
            likelihood = _likelihood(gates)
            mx.eval(inds, likelihood)
            self.bank.observe(self.layer, likelihood)
        chosen = np.array(inds)
        unique, inverse = np.unique(chosen, return_inverse=True)
        limit = self.bank.capacity(self.layer)
        pool = self.bank.arrays(self.layer)
        if len(unique) <= limit:
            slots = self.bank.lookup(self.layer, unique)
            local = mx.array(slots[inverse.reshape(chosen.shape)].astype(np.uint32))
            y = self._weighted(kernels.LoadedSwitchGLU(pool, self.quant)(x, local), scores)
            mx.eval(y)  # the bank may refill these slots before anything else evaluates this output
            return y
        return self.pairs(x, chosen, unique, scores)

    def prompt(self, xs):
        """The block's outputs for a whole prompt given as chunks of inputs (``prefill``): each expert the
        prompt routes to is read once. When the bank holds them all at once, each chunk is computed as
        ``_chunk`` computes it (the same arithmetic). A bank too small for them runs ``pairs`` (a group of
        experts at a time) over windows of chunks whose pair outputs fit ``PAIR_BUFFER_BYTES``: each expert is
        then read once per window (a window holds ~6,500 tokens of the 397B in bf16)."""
        routed = [route_and_gates(self, x) for x in xs]
        likelihood = _likelihood(mx.concatenate([gates.reshape(-1, gates.shape[-1]) for _, _, gates in routed]))
        routed = [(inds, scores) for inds, scores, _ in routed]
        mx.eval(routed, likelihood)
        self.bank.observe(self.layer, likelihood)
        chosen = [np.array(inds) for inds, _ in routed]
        unique = np.unique(np.concatenate([c.reshape(-1) for c in chosen]))
        if len(unique) > self.bank.capacity(self.layer):
            return [y for window in self._windows(xs) for y in self._window(xs, routed, chosen, window)]
        pool = self.bank.arrays(self.layer)
        slot_of = np.zeros(self.num_experts, dtype=np.uint32)
        slot_of[unique] = self.bank.lookup(self.layer, unique)
        ys = []
        for x, c, (_, scores) in zip(xs, chosen, routed):
            y = self._plus_shared(x, self._weighted(kernels.LoadedSwitchGLU(pool, self.quant)(x, mx.array(slot_of[c])),
                                                    scores))
            mx.eval(y)
            ys.append(y)
        return ys

    def _windows(self, xs):
        """Consecutive chunk numbers grouped so that each group's pair outputs fit ``PAIR_BUFFER_BYTES``."""
        windows, size = [[]], 0
        for i, x in enumerate(xs):
            need = x.size * self.top_k * x.itemsize
            if windows[-1] and size + need > PAIR_BUFFER_BYTES:
                windows.append([])
                size = 0
            windows[-1].append(i)
            size += need
        return windows

    def _window(self, xs, routed, chosen, window):
        lengths = [xs[i].shape[1] for i in window]
        x = mx.concatenate([xs[i] for i in window], axis=1)
        c = np.concatenate([chosen[i] for i in window], axis=1)
        scores = mx.concatenate([routed[i][1] for i in window], axis=1)
        y = self._plus_shared(x, self.pairs(x, c, np.unique(c), scores))
        mx.eval(y)
        bounds = np.cumsum(lengths)[:-1].tolist()
        return mx.split(y, bounds, axis=1) if bounds else [y]

    def pairs(self, x, chosen, experts, scores):
        """The weighted sum over the (token, expert) pairs of ``chosen`` whose expert is in ``experts``
        (distinct ids; the other pairs add zero): each of them read once, a group at a time that fits the
        bank, the group's output evaluated before the next group refills the slots."""
        H, k = x.shape[-1], chosen.shape[-1]
        flat_x, flat = x.reshape(-1, H), chosen.reshape(-1)
        out = mx.zeros((flat.size, H), dtype=x.dtype)
        limit, pool = self.bank.capacity(self.layer), self.bank.arrays(self.layer)
        slot_of = np.zeros(self.num_experts, dtype=np.uint32)
        for start in range(0, len(experts), limit):
            group = experts[start:start + limit]
            pairs = np.nonzero(np.isin(flat, group))[0]
            slot_of[group] = self.bank.lookup(self.layer, group)
            part = kernels.LoadedSwitchGLU(pool, self.quant)(flat_x[mx.array(pairs // k)],
                                                             mx.array(slot_of[flat[pairs]])[:, None])
            out = out.at[mx.array(pairs)].add(part[:, 0, :])
            mx.eval(out)
        y = self._weighted(out.reshape(*chosen.shape, H), scores)
        mx.eval(y)
        return y

    def _synchronize(self, inds, predicted, likelihood=None) -> None:
        """The one host synchronization of a decoded token's layer (for the router's choice, its softmax and
        the prediction together), timed in two halves: launching the GPU work queued so far, then waiting."""
        arrays = [inds] + ([] if likelihood is None else [likelihood]) + ([] if predicted is None else list(predicted))
        start = time.perf_counter()
        mx.async_eval(*arrays)
        launched = time.perf_counter()
        mx.eval(*arrays)
        stats = self.bank.stats
        stats.router_launch_seconds += launched - start
        stats.router_wait_seconds += time.perf_counter() - launched
