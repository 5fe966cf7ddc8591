"""Which rank owns which expert: the fixed map of expert parallelism.

With N ranks every rank keeps the resident model and *owns* a part of each MoE layer's experts: it reads
and computes only the chosen experts it owns, and one ``all_sum`` per MoE layer adds the ranks' parts.

The map, per MoE layer, is an array ``owner[expert] -> rank``:

- **round-robin** (the default): expert ``e`` belongs to rank ``e % N``. Every rank owns the same number
  of experts (within one) of every layer.
- **balanced** (from measured popularity: ``counts[layer][expert]``, how often each expert was chosen):
  per layer, experts in order of falling popularity (ties: lower id first) each go to the rank with the
  least load so far among those that still have room (ties: lower rank), every rank getting
  ``num_experts // N`` or one more. Equal expert counts keep each rank's disk and bank share equal; the
  greedy order evens out the expected reads per token.

The map is a pure function of (its kind, N, the layers and their expert counts, the counts used), so every
machine computing it gets the same one; ``digest()`` names it, and ranks compare digests before serving.
Nothing here imports mlx.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from ..errors import FlashMoeError


@dataclass
class Ownership:
    ranks: int
    kind: str  # "round-robin" or "balanced"
    owners: Dict[int, np.ndarray] = field(default_factory=dict)  # MoE layer -> owner rank of each expert

    # ------------------------------------------------------------------ building

    @classmethod
    def round_robin(cls, experts_per_layer: Mapping[int, int], ranks: int) -> "Ownership":
        _check_ranks(ranks)
        return cls(ranks, "round-robin", {int(layer): np.arange(n, dtype=np.int32) % ranks
                                          for layer, n in experts_per_layer.items()})

    @classmethod
    def balanced(cls, experts_per_layer: Mapping[int, int], ranks: int,
                 counts: Mapping[int, Sequence[float]]) -> "Ownership":
        """Greedy balance of each layer's popularity (module docstring); a layer without counts is
        round-robin."""
        _check_ranks(ranks)
        owners = {}
        for layer, n in experts_per_layer.items():
            layer = int(layer)
            c = counts.get(layer)
            if c is None:
                owners[layer] = np.arange(n, dtype=np.int32) % ranks
                continue
            c = np.asarray(c, dtype=np.float64)
            if c.shape != (n,):
                raise FlashMoeError(f"the popularity counts of layer {layer} have {c.size} entries; "
                                    f"the model has {n} experts there")
            room = np.full(ranks, n // ranks, dtype=np.int64)
            room[:n % ranks] += 1
            load = np.zeros(ranks)
            owner = np.empty(n, dtype=np.int32)
            for e in sorted(range(n), key=lambda e: (-c[e], e)):
                free = np.nonzero(room > 0)[0]
                r = int(free[np.argmin(load[free])])  # argmin takes the lowest rank on ties
                owner[e], load[r], room[r] = r, load[r] + c[e], room[r] - 1
            owners[layer] = owner
        return cls(ranks, "balanced", owners)

    @classmethod
    def for_model(cls, manifest, ranks: int, popularity: Optional[Path] = None) -> "Ownership":
        """The map for ``manifest``'s MoE layers: balanced by the counts in ``popularity`` (a JSON file,
        see ``read_counts``) when given, else round-robin."""
        experts = {layer.layer: layer.num_experts for layer in manifest.expert_layers}
        if popularity is None:
            return cls.round_robin(experts, ranks)
        return cls.balanced(experts, ranks, read_counts(popularity))

    # ------------------------------------------------------------------ using

    def owned(self, layer: int, rank: int) -> np.ndarray:
        """Boolean mask over ``layer``'s experts: those ``rank`` owns."""
        return self.owners[int(layer)] == rank

    def share(self, rank: int) -> float:
        """The fraction of all experts ``rank`` owns."""
        total = sum(o.size for o in self.owners.values())
        return sum(int((o == rank).sum()) for o in self.owners.values()) / total if total else 0.0

    def digest(self) -> str:
        h = hashlib.sha256(f"{self.ranks}:".encode())
        for layer in sorted(self.owners):
            h.update(f"{layer}:".encode())
            h.update(self.owners[layer].astype("<i4").tobytes())
        return h.hexdigest()[:16]

    def to_json(self) -> dict:
        return {"ranks": self.ranks, "kind": self.kind,
                "owners": {str(layer): self.owners[layer].tolist() for layer in sorted(self.owners)}}

    @classmethod
    def from_json(cls, data: dict) -> "Ownership":
        return cls(int(data["ranks"]), str(data["kind"]),
                   {int(layer): np.asarray(o, dtype=np.int32) for layer, o in data["owners"].items()})

    def table(self) -> np.ndarray:
        """``[layers, max experts]`` int32 of owners (-1 pads), layers in order: what the leader sends."""
        layers = sorted(self.owners)
        width = max((self.owners[layer].size for layer in layers), default=0)
        out = np.full((len(layers), width), -1, dtype=np.int32)
        for i, layer in enumerate(layers):
            out[i, :self.owners[layer].size] = self.owners[layer]
        return out

    @classmethod
    def from_table(cls, ranks: int, kind: str, layers: Sequence[int], table: np.ndarray) -> "Ownership":
        return cls(ranks, kind, {int(layer): row[row >= 0].astype(np.int32) for layer, row in zip(layers, table)})


def _check_ranks(ranks: int) -> None:
    if not isinstance(ranks, int) or ranks < 1:
        raise FlashMoeError(f"the number of ranks must be at least 1, not {ranks}")


def read_counts(path: Path) -> Dict[int, list]:
    """Popularity counts: a JSON object ``{"layers": {"<layer>": [count per expert, ...], ...}}`` (what
    ``write_counts`` writes)."""
    try:
        data = json.loads(Path(path).read_text())
        return {int(layer): list(map(float, c)) for layer, c in data["layers"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise FlashMoeError(f"cannot read expert popularity from {path} ({type(e).__name__}: {e}); it must be "
                            '{"layers": {"<layer>": [count per expert, ...]}}')


def write_counts(path: Path, counts: Mapping[int, Sequence[float]]) -> None:
    Path(path).write_text(json.dumps({"layers": {str(layer): [float(c) for c in counts[layer]]
                                                 for layer in sorted(counts)}}))
