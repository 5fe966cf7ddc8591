"""Tiny random checkpoints of the real Qwen MoE architectures, laid out like the HF releases.

``write_hf_checkpoint`` writes a directory that looks like a Hugging Face release of
Qwen3.5-397B-A17B (``qwen3_5_moe``), Qwen3-Next-80B-A3B (``qwen3_next``) or Qwen3-30B-A3B
(``qwen3_moe``) -- config.json, generation_config.json, tokenizer files and safetensors with
the real key names, dtypes and tensor layouts -- only with tiny dimensions and random weights.
``mlx_lm.load`` loads them (the fused expert layout for ``qwen3_5_moe``, the per-expert one for
the other two, which is what mlx-lm 0.32 accepts).

Every tensor is drawn from its own RNG stream, keyed by (seed, canonical name), so the numbers
do not depend on the expert layout, the sharding or the order of writing: the per-expert layout
holds exactly the slices of the fused tensors, and the same spec always gives the same bytes.
Weights are drawn in float32 and rounded to the spec's dtype (round to nearest even for bf16).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .tokenizer import QWEN_VOCAB_SIZE, special_token_ids, tokenizer_size, write_tokenizer

MODEL_TYPES = ("qwen3_5_moe", "qwen3_next", "qwen3_moe")
DTYPES = ("bfloat16", "float16", "float32")
ROUTER_SCALE = 4.0  # router logits ~ N(0, 4^2): decisive, token-dependent top-k


@dataclass(frozen=True)
class TinySpec:
    """Dimensions of a tiny checkpoint.

    Defaults satisfy every constraint of mlx-lm's classes and keep every Linear / SwitchLinear /
    Embedding input dim a multiple of 64 (hidden 64, attention heads*head_dim 128, DeltaNet
    value dim 128, expert and shared-expert intermediate 64), so mlx-lm quantizes every layer
    at group sizes 32 and 64. DeltaNet key head dim 32 keeps mlx-lm's Metal kernel eligible.
    Layer 3 (with the default 4 layers) is the full-attention layer of the hybrid types.
    """

    model_type: str = "qwen3_5_moe"
    num_hidden_layers: int = 4
    hidden_size: int = 64
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 64
    shared_expert_intermediate_size: int = 64  # unused for qwen3_moe
    vocab_size: int = 512  # >= tokenizer size (tiny: 433); "qwen" tokenizer raises it to 248320
    dtype: str = "bfloat16"
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    linear_num_key_heads: int = 2
    linear_num_value_heads: int = 4
    linear_key_head_dim: int = 32
    linear_value_head_dim: int = 32
    linear_conv_kernel_dim: int = 4
    partial_rotary_factor: float = 0.25
    full_attention_interval: int = 4
    rms_norm_eps: float = 1e-6
    seed: int = 0
    # extra config.json fields (into text_config for qwen3_5_moe), e.g. {"rope_theta": 1e6}
    config_extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError("linear_num_value_heads must be a multiple of linear_num_key_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError("need 1 <= num_experts_per_tok <= num_experts")
        if int(self.head_dim * self.partial_rotary_factor) % 2:
            raise ValueError("head_dim * partial_rotary_factor must be even")

    @property
    def hybrid(self) -> bool:
        """True for the DeltaNet + full-attention types (qwen3_5_moe, qwen3_next)."""
        return self.model_type != "qwen3_moe"

    def is_full_attention(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` uses full attention (always, for qwen3_moe)."""
        return not self.hybrid or (layer + 1) % self.full_attention_interval == 0

    @property
    def layer_types(self) -> list[str]:
        """HF ``layer_types``: "linear_attention" / "full_attention" per layer."""
        return [
            "full_attention" if self.is_full_attention(i) else "linear_attention"
            for i in range(self.num_hidden_layers)
        ]


# ----------------------------------------------------------------------------------- configs


def hf_config(spec: TinySpec, vocab_size: int, special_ids: dict | None = None) -> dict:
    """config.json as the HF release of ``spec.model_type`` has it, with the tiny dimensions.

    ``special_ids`` maps special tokens to ids (default: the real Qwen3.5 ids).
    """
    ids = special_ids or special_token_ids("qwen")
    eot, im_end = ids["<|endoftext|>"], ids["<|im_end|>"]
    s = spec
    if s.model_type == "qwen3_5_moe":
        rotary_half = int(s.head_dim * s.partial_rotary_factor) // 2
        text = {
            "attention_bias": False,
            "attention_dropout": 0.0,
            "attn_output_gate": True,
            "dtype": s.dtype,
            "eos_token_id": eot,
            "full_attention_interval": s.full_attention_interval,
            "head_dim": s.head_dim,
            "hidden_act": "silu",
            "hidden_size": s.hidden_size,
            "initializer_range": 0.02,
            "layer_types": s.layer_types,
            "linear_conv_kernel_dim": s.linear_conv_kernel_dim,
            "linear_key_head_dim": s.linear_key_head_dim,
            "linear_num_key_heads": s.linear_num_key_heads,
            "linear_num_value_heads": s.linear_num_value_heads,
            "linear_value_head_dim": s.linear_value_head_dim,
            "mamba_ssm_dtype": "float32",
            "max_position_embeddings": 262144,
            "model_type": "qwen3_5_moe_text",
            "moe_intermediate_size": s.moe_intermediate_size,
            "mtp_num_hidden_layers": 1,
            "mtp_use_dedicated_embeddings": False,
            "num_attention_heads": s.num_attention_heads,
            "num_experts": s.num_experts,
            "num_experts_per_tok": s.num_experts_per_tok,
            "num_hidden_layers": s.num_hidden_layers,
            "num_key_value_heads": s.num_key_value_heads,
            "output_router_logits": False,
            "pad_token_id": None,
            "partial_rotary_factor": s.partial_rotary_factor,
            "rms_norm_eps": s.rms_norm_eps,
            "rope_parameters": {
                "mrope_interleaved": True,
                "mrope_section": _mrope_section(rotary_half),
                "partial_rotary_factor": s.partial_rotary_factor,
                "rope_theta": 10000000,
                "rope_type": "default",
            },
            "router_aux_loss_coef": 0.001,
            "shared_expert_intermediate_size": s.shared_expert_intermediate_size,
            "tie_word_embeddings": False,
            "use_cache": True,
            "vocab_size": vocab_size,
        }
        text.update(s.config_extra)
        return {
            "architectures": ["Qwen3_5MoeForConditionalGeneration"],
            "image_token_id": ids["<|image_pad|>"],
            "model_type": "qwen3_5_moe",
            "text_config": text,
            "tie_word_embeddings": False,
            "transformers_version": "4.57.0.dev0",
            "video_token_id": ids["<|video_pad|>"],
            "vision_config": _vision_config(s),
            "vision_end_token_id": ids["<|vision_end|>"],
            "vision_start_token_id": ids["<|vision_start|>"],
        }
    common = {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": eot,
        "decoder_sparse_step": 1,
        "eos_token_id": im_end,
        "head_dim": s.head_dim,
        "hidden_act": "silu",
        "hidden_size": s.hidden_size,
        "initializer_range": 0.02,
        "mlp_only_layers": [],
        "model_type": s.model_type,
        "moe_intermediate_size": s.moe_intermediate_size,
        "norm_topk_prob": True,
        "num_attention_heads": s.num_attention_heads,
        "num_experts": s.num_experts,
        "num_experts_per_tok": s.num_experts_per_tok,
        "num_hidden_layers": s.num_hidden_layers,
        "num_key_value_heads": s.num_key_value_heads,
        "output_router_logits": False,
        "rms_norm_eps": s.rms_norm_eps,
        "rope_scaling": None,
        "router_aux_loss_coef": 0.001,
        "tie_word_embeddings": False,
        "torch_dtype": s.dtype,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }
    if s.model_type == "qwen3_next":  # Qwen/Qwen3-Next-80B-A3B-Instruct
        cfg = common | {
            "architectures": ["Qwen3NextForCausalLM"],
            "full_attention_interval": s.full_attention_interval,
            "intermediate_size": 5 * s.moe_intermediate_size,  # unused: every layer is MoE
            "linear_conv_kernel_dim": s.linear_conv_kernel_dim,
            "linear_key_head_dim": s.linear_key_head_dim,
            "linear_num_key_heads": s.linear_num_key_heads,
            "linear_num_value_heads": s.linear_num_value_heads,
            "linear_value_head_dim": s.linear_value_head_dim,
            "max_position_embeddings": 262144,
            "partial_rotary_factor": s.partial_rotary_factor,
            "rope_theta": 10000000,
            "shared_expert_intermediate_size": s.shared_expert_intermediate_size,
            "transformers_version": "4.57.0.dev0",
        }
    else:  # qwen3_moe, Qwen/Qwen3-30B-A3B
        cfg = common | {
            "architectures": ["Qwen3MoeForCausalLM"],
            "intermediate_size": 3 * s.moe_intermediate_size,  # unused: every layer is MoE
            "max_position_embeddings": 40960,
            "max_window_layers": s.num_hidden_layers,
            "rope_theta": 1000000.0,
            "sliding_window": None,
            "transformers_version": "4.51.0",
        }
    cfg.update(s.config_extra)
    return dict(sorted(cfg.items()))


def _mrope_section(half: int) -> list[int]:
    """Split ``half`` rotary pairs into (t, h, w) sections the way [11, 11, 10] splits 32."""
    return [half // 3 + (i < half % 3) for i in range(3)]


def _vision_config(spec: TinySpec) -> dict:
    """A tiny vision encoder config of the Qwen3.5 shape (16-pixel patches become 4)."""
    return {
        "deepstack_visual_indexes": [],
        "depth": 1,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 32,
        "in_channels": 3,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "model_type": "qwen3_5_moe",
        "num_heads": 2,
        "num_position_embeddings": 16,
        "out_hidden_size": spec.hidden_size,
        "patch_size": 4,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }


def preprocessor_config() -> dict:
    """preprocessor_config.json in the shape of the Qwen3.5 release, for the tiny encoder: 4-pixel patches,
    images resized to between 8x8 and 64x64 pixels (1 to 64 image tokens)."""
    return {"image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Qwen2VLImageProcessorFast",
            "image_std": [0.5, 0.5, 0.5], "merge_size": 2, "patch_size": 4, "processor_class": "Qwen3VLProcessor",
            "size": {"longest_edge": 64 * 64, "shortest_edge": 8 * 8}, "temporal_patch_size": 2}


def _vision_tower(g: "_Gen", v: dict) -> None:
    """The vision encoder's tensors under the HF release's names (patch embedding as a Conv3d
    [out, in, t, p, p], LayerNorms with biases, the 2x2 patch merger)."""
    vh, ps, inner = v["hidden_size"], v["patch_size"], v["intermediate_size"]
    merged = vh * v["spatial_merge_size"] ** 2
    p = "model.visual."
    g.normal(p + "patch_embed.proj.weight", (vh, v["in_channels"], v["temporal_patch_size"], ps, ps), 0.1)
    g.normal(p + "patch_embed.proj.bias", (vh,), 0.02)
    g.normal(p + "pos_embed.weight", (v["num_position_embeddings"], vh), 0.5)
    for i in range(v["depth"]):
        b = f"{p}blocks.{i}."
        for norm in ("norm1", "norm2"):
            g.normal(b + norm + ".weight", (vh,), 0.1, 1.0)
            g.normal(b + norm + ".bias", (vh,), 0.02)
        for name, out_dim, in_dim in (("attn.qkv", 3 * vh, vh), ("attn.proj", vh, vh),
                                      ("mlp.linear_fc1", inner, vh), ("mlp.linear_fc2", vh, inner)):
            g.linear(b + name + ".weight", out_dim, in_dim)
            g.normal(b + name + ".bias", (out_dim,), 0.02)
    g.normal(p + "merger.norm.weight", (vh,), 0.1, 1.0)
    g.normal(p + "merger.norm.bias", (vh,), 0.02)
    g.linear(p + "merger.linear_fc1.weight", merged, merged)
    g.normal(p + "merger.linear_fc1.bias", (merged,), 0.02)
    g.linear(p + "merger.linear_fc2.weight", v["out_hidden_size"], merged, 4.0)
    g.normal(p + "merger.linear_fc2.bias", (v["out_hidden_size"],), 0.02)


def generation_config(special_ids: dict) -> dict:
    """generation_config.json in the shape of the Qwen3.5 release."""
    eot, im_end = special_ids["<|endoftext|>"], special_ids["<|im_end|>"]
    return {
        "bos_token_id": eot,
        "do_sample": True,
        "eos_token_id": [im_end, eot],
        "pad_token_id": eot,
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.95,
        "transformers_version": "4.57.0.dev0",
    }


# ----------------------------------------------------------------------------------- weights


class _Gen:
    """Draws tensors from per-name RNG streams (float32) into a dict of canonical tensors."""

    def __init__(self, spec: TinySpec):
        self.spec = spec
        self.out: dict[str, np.ndarray] = {}

    def _rng(self, name: str) -> np.random.Generator:
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
        return np.random.default_rng([self.spec.seed, key])

    def normal(self, name, shape, std, mean=0.0):
        self.out[name] = (self._rng(name).standard_normal(shape, np.float32) * std + mean).astype(
            np.float32
        )

    def uniform(self, name, shape, low, high):
        self.out[name] = self._rng(name).uniform(low, high, shape).astype(np.float32)

    def linear(self, name, out_dim, in_dim, scale=1.0):
        """A Linear weight [out, in] with outputs of about ``scale`` times unit variance."""
        self.normal(name, (out_dim, in_dim), scale / np.sqrt(in_dim))

    def norm(self, name, dim):
        """An RMSNorm weight as HF stores it: zero-centred (weight = 1 + w) for the hybrid
        types, around 1 for qwen3_moe."""
        self.normal(name, (dim,), 0.1, 0.0 if self.spec.hybrid else 1.0)


def _attention(g: _Gen, p: str, gated: bool):
    s = g.spec
    q_out = s.num_attention_heads * s.head_dim * (2 if gated else 1)  # query + output gate
    g.linear(p + "q_proj.weight", q_out, s.hidden_size)
    g.linear(p + "k_proj.weight", s.num_key_value_heads * s.head_dim, s.hidden_size)
    g.linear(p + "v_proj.weight", s.num_key_value_heads * s.head_dim, s.hidden_size)
    g.linear(p + "o_proj.weight", s.hidden_size, s.num_attention_heads * s.head_dim)
    g.norm(p + "q_norm.weight", s.head_dim)
    g.norm(p + "k_norm.weight", s.head_dim)


def _deltanet(g: _Gen, p: str):
    """Gated DeltaNet weights: Qwen3.5 splits the input projections, Qwen3-Next fuses them."""
    s = g.spec
    key_dim = s.linear_num_key_heads * s.linear_key_head_dim
    value_dim = s.linear_num_value_heads * s.linear_value_head_dim
    nv, H = s.linear_num_value_heads, s.hidden_size
    if s.model_type == "qwen3_5_moe":
        g.linear(p + "in_proj_qkv.weight", 2 * key_dim + value_dim, H)
        g.linear(p + "in_proj_z.weight", value_dim, H)
        g.linear(p + "in_proj_b.weight", nv, H)
        g.linear(p + "in_proj_a.weight", nv, H)
    else:
        g.linear(p + "in_proj_qkvz.weight", 2 * key_dim + 2 * value_dim, H)
        g.linear(p + "in_proj_ba.weight", 2 * nv, H)
    k = s.linear_conv_kernel_dim
    g.normal(p + "conv1d.weight", (2 * key_dim + value_dim, 1, k), 1 / np.sqrt(k))  # HF [C,1,K]
    g.uniform(p + "dt_bias", (nv,), 0.5, 1.5)
    g.out[p + "A_log"] = np.log(g._rng(p + "A_log").uniform(1.0, 16.0, (nv,))).astype(np.float32)
    g.normal(p + "norm.weight", (s.linear_value_head_dim,), 0.1, 1.0)  # gated norm: not centred
    g.linear(p + "out_proj.weight", H, value_dim)


def _moe(g: _Gen, p: str):
    """Router, stacked experts (canonical fused HF layout) and, if any, the shared expert."""
    s = g.spec
    E, H, I = s.num_experts, s.hidden_size, s.moe_intermediate_size
    g.linear(p + "gate.weight", E, H, ROUTER_SCALE)
    g.normal(p + "experts.gate_up_proj", (E, 2 * I, H), 1 / np.sqrt(H))  # gate = first I rows
    g.normal(p + "experts.down_proj", (E, H, I), 1 / np.sqrt(I))
    if s.model_type != "qwen3_moe":
        S = s.shared_expert_intermediate_size
        g.linear(p + "shared_expert.gate_proj.weight", S, H)
        g.linear(p + "shared_expert.up_proj.weight", S, H)
        g.linear(p + "shared_expert.down_proj.weight", H, S)
        g.linear(p + "shared_expert_gate.weight", 1, H)


def _decoder_layer(g: _Gen, p: str, full_attention: bool):
    s = g.spec
    g.norm(p + "input_layernorm.weight", s.hidden_size)
    g.norm(p + "post_attention_layernorm.weight", s.hidden_size)
    if full_attention:
        _attention(g, p + "self_attn.", gated=s.hybrid)
    else:
        _deltanet(g, p + "linear_attn.")
    _moe(g, p + "mlp.")


def canonical_tensors(
    spec: TinySpec, vocab_size: int, include_extras: bool = True, num_tokens: int | None = None,
    vision: bool = False,
) -> dict:
    """All float32 tensors of the checkpoint under their HF names, experts in the fused layout
    (``vision``: with the vision encoder, ``model.visual.*``, qwen3_5_moe only).

    ``lm_head`` rows of ids >= ``num_tokens`` (vocabulary padding that no tokenizer id maps to)
    are zero, so their logit is 0 and greedy decoding practically never picks them.
    """
    g = _Gen(spec)
    H = spec.hidden_size
    m = "model.language_model." if spec.model_type == "qwen3_5_moe" else "model."
    g.normal(m + "embed_tokens.weight", (vocab_size, H), 1.0)
    g.norm(m + "norm.weight", H)
    g.linear("lm_head.weight", vocab_size, H, 2.0)
    if num_tokens is not None:
        g.out["lm_head.weight"][num_tokens:] = 0.0
    for i in range(spec.num_hidden_layers):
        _decoder_layer(g, f"{m}layers.{i}.", spec.is_full_attention(i))
    if include_extras and spec.hybrid:  # the multi-token-prediction head, dropped by mlx-lm
        g.linear("mtp.fc.weight", H, 2 * H)
        g.norm("mtp.pre_fc_norm_embedding.weight", H)
        g.norm("mtp.pre_fc_norm_hidden.weight", H)
        g.norm("mtp.norm.weight", H)
        _decoder_layer(g, "mtp.layers.0.", full_attention=True)
    if vision:
        _vision_tower(g, _vision_config(spec))
    return g.out


def _split_experts(tensors: dict, num_experts: int) -> dict:
    """Rewrite fused ``experts.gate_up_proj`` / ``experts.down_proj`` as per-expert weights."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("experts.gate_up_proj"):
            p, mid = name[: -len("gate_up_proj")], t.shape[1] // 2
            for e in range(num_experts):
                out[f"{p}{e}.gate_proj.weight"] = t[e, :mid]
                out[f"{p}{e}.up_proj.weight"] = t[e, mid:]
        elif name.endswith("experts.down_proj"):
            p = name[: -len("down_proj")]
            for e in range(num_experts):
                out[f"{p}{e}.down_proj.weight"] = t[e]
        else:
            out[name] = t
    return out


def _cast(t: np.ndarray, dtype: str) -> tuple[np.ndarray, str]:
    """Round float32 to ``dtype``; bf16 comes back as its uint16 bit pattern."""
    if dtype == "float32":
        return np.ascontiguousarray(t, np.float32), "float32"
    if dtype == "float16":
        return np.ascontiguousarray(t, np.float16), "float16"
    u = np.ascontiguousarray(t, np.float32).view(np.uint32)
    u = (u + (0x7FFF + ((u >> 16) & 1))) >> 16  # round to nearest, ties to even
    return u.astype(np.uint16), "bfloat16"


def _save_safetensors(path: Path, tensors: dict[str, tuple[np.ndarray, str]]) -> None:
    """Write a standard safetensors file (header metadata {"format": "pt"} like HF's)."""
    from safetensors import TensorSpec, serialize_file

    specs = {
        k: TensorSpec(dtype=d, shape=list(a.shape), data_ptr=a.ctypes.data, data_len=a.nbytes)
        for k, (a, d) in tensors.items()
    }
    serialize_file(specs, str(path), metadata={"format": "pt"})  # arrays stay alive in tensors


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_hf_checkpoint(
    out_dir,
    spec: TinySpec,
    *,
    expert_layout: str = "fused",
    num_shards: int = 1,
    tokenizer: str = "tiny",
    include_extras: bool = True,
    vision: bool = False,
) -> Path:
    """Write a tiny HF-style checkpoint of ``spec`` into ``out_dir`` and return it as a Path.

    ``expert_layout``: "fused" (``mlp.experts.gate_up_proj`` [E, 2I, H] + ``down_proj``
    [E, H, I]) or "per_expert" (``mlp.experts.{e}.{gate,up,down}_proj.weight``). qwen3_next and
    qwen3_moe only exist (and only load in mlx-lm) per expert: "fused" raises ValueError there.
    ``num_shards`` > 1 writes ``model-0000K-of-0000N.safetensors`` + an index, dealing the
    sorted keys round-robin so that one layer's tensors are spread over several shards.
    ``tokenizer``: "tiny" or "qwen" (real Qwen3.5 vocabulary; vocab raised to 248320).
    ``include_extras`` adds the MTP head (hybrid types); ``vision`` the vision encoder and
    preprocessor_config.json (qwen3_5_moe only).
    """
    if vision and spec.model_type != "qwen3_5_moe":
        raise ValueError(f"{spec.model_type} has no vision encoder")
    if expert_layout not in ("fused", "per_expert"):
        raise ValueError(f"expert_layout must be 'fused' or 'per_expert', got {expert_layout!r}")
    if expert_layout == "fused" and spec.model_type != "qwen3_5_moe":
        raise ValueError(
            f"{spec.model_type} checkpoints store experts per expert; mlx-lm's sanitize "
            "does not accept a fused layout for it"
        )
    if num_shards < 1:
        raise ValueError("num_shards must be >= 1")
    vocab = spec.vocab_size
    if tokenizer == "qwen":
        vocab = max(vocab, QWEN_VOCAB_SIZE)
    elif vocab < tokenizer_size(tokenizer):
        raise ValueError(f"vocab_size {vocab} < tokenizer size {tokenizer_size(tokenizer)}")
    ids = special_token_ids(tokenizer)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = canonical_tensors(spec, vocab, include_extras, tokenizer_size(tokenizer), vision)
    if expert_layout == "per_expert":
        tensors = _split_experts(tensors, spec.num_experts)
    cast = {}
    for k, t in tensors.items():  # A_log stays float32 (mlx-lm never casts it either)
        cast[k] = _cast(t, "float32" if k.endswith("A_log") else spec.dtype)

    names = sorted(cast)
    if num_shards == 1:
        _save_safetensors(out / "model.safetensors", cast)
    else:
        files = [f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors" for k in range(num_shards)]
        weight_map = {name: files[i % num_shards] for i, name in enumerate(names)}
        for f in files:
            _save_safetensors(out / f, {n: cast[n] for n in names if weight_map[n] == f})
        total = sum(a.nbytes for a, _ in cast.values())
        _write_json(
            out / "model.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": weight_map},
        )
    _write_json(out / "config.json", hf_config(spec, vocab, ids))
    _write_json(out / "generation_config.json", generation_config(ids))
    if vision:
        _write_json(out / "preprocessor_config.json", preprocessor_config())
    write_tokenizer(out, tokenizer)
    return out


def write_mlx_quantized(hf_dir, out_dir, bits: int, group_size: int) -> Path:
    """Convert an HF checkpoint with mlx-lm's own converter (affine quantization of every
    layer mlx-lm quantizes; routers stay at 8 bits). ``out_dir`` must not exist yet."""
    from mlx_lm import convert

    convert(str(hf_dir), str(out_dir), quantize=True, q_bits=bits, q_group_size=group_size)
    return Path(out_dir)
