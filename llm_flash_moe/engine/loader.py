"""Loading a prepared model: mlx-lm's model class with resident weights, routed experts in the expert bank."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import FlashMoeError
from ..bank.expert_bank import MIN_SLOTS_PER_TOKEN, ExpertBank, slots_for
from ..flash_layout import TOKENIZER_VOCAB_FILES, Manifest, check_experts_per_token, has_tokenizer
from ..integrity import parallel_checksum
from ..verify import metadata_problems
from .mlx_model import cast_floats, moe_blocks, no_experts, streaming_model_classes


def load_resident_model(model_dir: Path, lazy: bool = False, make_experts=no_experts):
    """mlx-lm's ``load_model`` (strict), with each block's experts replaced by ``make_experts(layer, block)``."""
    from mlx_lm.utils import load_model

    return load_model(Path(model_dir), lazy=lazy, strict=True,
                      get_model_classes=streaming_model_classes(make_experts))


@dataclass
class FlashModel:
    directory: Path
    manifest: Manifest
    model: object
    tokenizer: object
    bank: ExpertBank
    cluster: Optional[object] = None  # a distributed.Cluster while this process computes as one rank of several
    prefetch: Optional[bool] = None  # read ahead: on, off, or None: while the bank holds every expert
    vision: Optional[object] = None  # vision.VisionLanguageModel, built on the first image

    @property
    def experts_per_token(self) -> int:
        return moe_blocks(self.model)[0][1].top_k

    def set_experts_per_token(self, k: int) -> None:
        check_experts_per_token(k, self.manifest.num_experts)
        for _, block in moe_blocks(self.model):
            block.top_k = k

    def set_prefetch(self, enabled: Optional[bool]) -> None:
        """Let each MoE layer predict the next layer's experts with that layer's router and read them ahead:
        True, False, or None (the default): only while the bank can hold every expert. A partial bank reads
        more with it than without (each wrong guess is a read; on new tokens +7-14 % records at 512 experts
        per layer), so there it stays off (docs/PERFORMANCE.md, "Read-ahead")."""
        self.prefetch = enabled
        on = self.bank.holds_every_expert() if enabled is None else enabled
        blocks = [block for _, block in moe_blocks(self.model)]
        for block, following in zip(blocks, blocks[1:] + [None]):
            object.__setattr__(block, "next_block", following if on else None)

    def set_bank_bytes(self, budget_bytes: Optional[int]) -> None:
        """Give the expert bank another budget (None: the automatic one); it starts empty."""
        budget = auto_bank_budget(self.manifest) if budget_bytes is None else int(budget_bytes)
        if budget != self.bank.budget_bytes:
            self.bank.resize(budget)
            self.set_prefetch(self.prefetch)

    def resident_bytes(self) -> int:
        """Bytes of every array the model holds (the expert bank's arrays are not the model's)."""
        from mlx.utils import tree_flatten

        return sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))

    def close(self) -> None:
        self.bank.close()


COMPUTE_DTYPES = ("auto", "model", "float32")


def activation_dtype(compute: str):
    """The dtype to run the model in, or None for the weights' own (bf16 for most checkpoints).

    "model" reproduces mlx-lm bit for bit. "float32" is ~10x faster on the CPU backend, whose quantized
    matmuls are slow with bf16 activations (and it is more precise); "auto" picks it on the CPU only.
    """
    import mlx.core as mx

    if compute not in COMPUTE_DTYPES:
        raise FlashMoeError(f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}, not {compute!r}")
    if compute == "auto":
        compute = "float32" if mx.default_device() == mx.cpu else "model"
    return mx.float32 if compute == "float32" else None


def auto_bank_budget(manifest: Manifest, loaded: bool = True) -> int:
    """The bank's default budget: what the memory it lives in has free (less a reserve, and less the
    resident weights when the model is not ``loaded`` yet), at most every expert of the model; the
    smallest bank when the free memory cannot be told."""
    from ..bank.memory import bank_memory, bank_room

    free, total = bank_memory()
    if free is None:
        return 0
    return min(all_experts_bytes(manifest), bank_room(free, total, weights=0 if loaded else manifest.resident_bytes))


def bank_summary(manifest: Manifest) -> dict:
    """The expert bank a model gets on this machine by default (for ``info``): its bytes and the experts it
    holds (a bank keeps an expert's arrays without its record's padding on disk)."""
    slots = slots_for(auto_bank_budget(manifest, loaded=False), manifest.expert_layers, min_bank_slots(manifest))
    return {"bank_bytes": sum(n * layout.parts_bytes for layout, n in slots.items()),
            "bank_experts": sum(slots.values())}


def smallest_bank_bytes(manifest: Manifest) -> int:
    """The bank of the fewest slots a model runs with (``min_bank_slots`` per record layout)."""
    slots = slots_for(0, manifest.expert_layers, min_bank_slots(manifest))
    return sum(n * layout.parts_bytes for layout, n in slots.items())


def all_experts_bytes(manifest: Manifest) -> int:
    """What a bank holding every expert of the model takes (the records' arrays, without their padding)."""
    return sum(layer.num_experts * layer.layout.parts_bytes for layer in manifest.expert_layers)


def min_bank_slots(manifest: Manifest) -> int:
    """The fewest slots per record layout: twice the model's own experts per token."""
    native = manifest.config.get("num_experts_per_tok") or manifest.config.get("text_config", {}).get(
        "num_experts_per_tok") or manifest.experts_per_token
    return MIN_SLOTS_PER_TOKEN * max(int(native), manifest.experts_per_token)


def load_flash_model(model_dir: Path, experts_per_token: Optional[int] = None, bank_bytes: Optional[int] = None,
                     compute: str = "auto", prefetch: Optional[bool] = None, **bank_options) -> FlashModel:
    """Load a prepared model. ``bank_bytes``: the expert bank's budget (None: ``auto_bank_budget``);
    ``compute``: "auto", "model" (bit-identical to mlx-lm) or "float32"; ``prefetch``: read the next
    layer's predicted experts while this layer computes (see set_prefetch; None: where it pays)."""
    import mlx.core as mx

    from mlx_lm.utils import load_tokenizer

    from .streaming_moe import StreamingMoE

    model_dir = Path(model_dir)
    manifest = Manifest.load(model_dir)
    dtype = activation_dtype(compute)
    bank = ExpertBank(model_dir, manifest, min_slots=min_bank_slots(manifest), **bank_options)  # sized below
    damaged = metadata_problems(model_dir, manifest)  # config, tokenizer, chat template: small, checked every load
    if damaged:
        bank.close()
        what = "config" if damaged[0].startswith("config.json") else "tokenizer"
        raise FlashMoeError(f"cannot load the {what} of {model_dir}: {damaged[0]}; {bank.remedy}")
    try:
        for entry in manifest.resident_files:  # read in full at load anyway: a flipped byte stops here
            if os.stat(model_dir / entry["file"]).st_size != entry["bytes"]:
                raise ValueError(f"{entry['file']} has {os.stat(model_dir / entry['file']).st_size:,} bytes, "
                                 f"expected {entry['bytes']:,}")
            if parallel_checksum(model_dir / entry["file"]) != entry["checksum"]:
                raise ValueError(f"{entry['file']}: checksum mismatch (damaged)")
        model, config = load_resident_model(model_dir, lazy=True)
        for index, block in moe_blocks(model):
            model.layers[index].mlp = StreamingMoE(block, index, bank)
        if dtype is not None:
            cast_floats(model, dtype)
        mx.eval(model.parameters())  # reads the resident weights: a damaged file fails here, not mid-answer
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        bank.close()
        raise FlashMoeError(f"cannot load the resident weights of {model_dir}: "
                            f"{(str(e) or type(e).__name__).splitlines()[0]}; {bank.remedy}")
    except BaseException:
        bank.close()
        raise
    try:
        if not has_tokenizer(model_dir):
            raise FileNotFoundError(f"none of {', '.join(TOKENIZER_VOCAB_FILES)} is there")
        tokenizer = load_tokenizer(model_dir, eos_token_ids=config.get("eos_token_id", None))
    except Exception as e:  # a missing or damaged tokenizer file: transformers raises many kinds
        bank.close()
        raise FlashMoeError(f"cannot load the tokenizer of {model_dir}: "
                            f"{(str(e) or type(e).__name__).splitlines()[0]}; {bank.remedy}")
    flash = FlashModel(model_dir, manifest, model, tokenizer, bank)
    try:
        flash.set_bank_bytes(bank_bytes)  # once the resident weights are in: the free memory is known
    except BaseException:
        bank.close()
        raise
    flash.set_experts_per_token(experts_per_token or manifest.experts_per_token)
    flash.set_prefetch(prefetch)
    return flash
