"""How often each expert is chosen on your text: the counts that ``ownership.Ownership.balanced`` splits.

``llm flash-moe popularity NAME --text FILE --out COUNTS.json`` runs the text through the model in windows
(each on its own, as ``eval`` does) and counts, per MoE layer, the experts the router chooses for every
token; the file is what ``prepare --popularity`` and ``worker --popularity`` read.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np


class _Counter:
    """Stands in for a cluster on every MoE block (``StreamingMoE.cluster``): counts the router's choices,
    then computes the block as it would alone."""

    def __init__(self, counts: Dict[int, np.ndarray]):
        self.counts = counts

    def experts(self, block, x, inds, scores):
        chosen = np.array(inds).reshape(-1)
        self.counts[block.layer] += np.bincount(chosen, minlength=self.counts[block.layer].size)
        if x.size == x.shape[-1]:
            return block._one_token(x, inds, scores)
        return block._chunk(x, inds, scores)


def count_choices(flash, tokens: List[int], window: int = 512) -> Dict[int, np.ndarray]:
    """Per MoE layer, how many tokens of ``tokens`` (in windows of ``window``) chose each expert."""
    import mlx.core as mx

    from .distributed import attach

    counts = {layer.layer: np.zeros(layer.num_experts, dtype=np.int64) for layer in flash.manifest.expert_layers}
    attach(flash, _Counter(counts))
    try:
        for start in range(0, len(tokens), window):
            mx.eval(flash.model(mx.array(tokens[start:start + window])[None]))
    finally:
        attach(flash, None)
    return counts
