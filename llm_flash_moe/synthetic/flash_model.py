"""A prepared model with the 397B's exact per-layer shapes, synthesized directly in the flash layout.

Quantizing 6.4 billion random weights per layer would take longer than the benchmark, so the expert
records are written directly: random packed words with scales and biases that give zero-mean weights of
a chosen spread. Resident weights are synthesized the same way, except three that shape the routing:

- token embeddings mix a slow AR(1) walk along token ids (``s[t+1] = rho * s[t] + sqrt(1-rho^2) * noise``,
  weight ``slow``) with fresh noise per token and a shared direction ``c``; the benchmark feeds tokens
  0, 1, 2, ... so consecutive hidden states are partly correlated (the real model's reuse between
  consecutive tokens) while the walk keeps moving (new experts keep being touched);
- each router row gets a popularity term ``beta_e * c`` with ``beta_e ~ N(0, skew_layer)``, so some experts
  are chosen far more often than others, each layer as skewed as the real model's layer at the same relative
  depth (``QWEN397_GINI``: the published per-layer Gini of the 397B's expert choices, mapped to a skew by
  ``GINI_TO_SKEW``, measured on this construction);
- each layer's post-attention norm weight (the scale of the MoE block's input, channel by channel) is
  ``1 + layer_mix * g_layer`` with ``g_layer`` fresh per layer, so the next layer's router applied to this
  layer's input (the engine's prefetch prediction) recalls only part of that layer's choice, as on the
  real model (66-88 % reported for early routing on a Qwen MoE, ~53 % for flash-moe's);
- every other matrix is small (``gain``), so the residual stream stays close to the embedding and the
  routing is governed by the terms above.

``Routing()``'s defaults were calibrated (docs/PERFORMANCE.md, "Routing") against the statistics published
for the real model at its 512 experts per layer and 10 per token; the benchmark measures them again in
every run (reuse between consecutive tokens, share of a layer's experts touched over 30 tokens, LRU hit
rates, next-layer prediction recall) and reports them next to the published ranges.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List

import numpy as np

from ..flash_layout import (
    EXPERTS_DIR, MANIFEST_NAME, RESIDENT_WEIGHTS_NAME, ExpertLayer, ExpertQuantization, Manifest, RecordLayout,
    expert_file_name, file_checksum, record_checksum,
)
from .checkpoint import TinySpec, _cast, hf_config
from .tokenizer import write_tokenizer

QWEN397_VOCAB = 248320
EXPERT_GAIN = 0.2


@dataclass(frozen=True)
class Routing:
    """How the synthetic routing is shaped (see the module docstring)."""

    slow: float = 0.5  # share of the embedding's variance in the slow walk
    rho: float = 0.9  # step correlation of the slow walk
    popularity: str = "qwen397"  # per-layer skew of expert popularity: QWEN397_GINI at the layer's depth
    shared: float = 0.15  # weight of the shared direction c in every embedding
    layer_mix: float = 0.25  # spread of each layer's post-attention norm weight around 1
    gain: float = 0.05  # spread of every other matrix, relative to 1/sqrt(fan_in)


# Published per-layer popularity of Qwen3.5-397B-A17B's routing at k=10 (Gini of the experts' choice counts;
# shared/CONTEXT.md): (first layer, last layer, Gini) over its 60 layers; mean 0.38.
QWEN397_GINI = ((0, 3, 0.50), (4, 18, 0.23), (19, 24, 0.35), (25, 29, 0.50), (30, 57, 0.40), (58, 59, 0.50))
# Gini of 3,000 tokens' choices (k=10 of 512) against the popularity skew, measured on this construction
# with ``shared`` 0.15; a Gini below the first point gets skew 0.
GINI_TO_SKEW = ((0.25, 0.0), (0.31, 1.0), (0.42, 2.0), (0.54, 3.0))


def layer_ginis(layers: int) -> List[float]:
    """The 397B's published Gini at the relative depth of each of ``layers`` layers."""
    depths = [round(layer * 59 / max(1, layers - 1)) for layer in range(layers)]
    return [next(g for first, last, g in QWEN397_GINI if first <= d <= last) for d in depths]


def layer_skews(layers: int) -> List[float]:
    """Each layer's popularity skew: the 397B's Gini at the same relative depth, mapped by GINI_TO_SKEW."""
    return [float(np.interp(gini, *zip(*GINI_TO_SKEW))) for gini in layer_ginis(layers)]


def qwen397_spec(layers: int, experts_per_token: int = 10, experts: int = 512) -> TinySpec:
    """Qwen3.5-397B-A17B's real dimensions, with ``layers`` decoder layers of ``experts`` experts."""
    return TinySpec(model_type="qwen3_5_moe", num_hidden_layers=layers, hidden_size=4096, num_experts=experts,
                    num_experts_per_tok=experts_per_token, moe_intermediate_size=1024,
                    shared_expert_intermediate_size=1024, vocab_size=QWEN397_VOCAB, dtype="bfloat16",
                    num_attention_heads=32, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
                    linear_num_value_heads=64, linear_key_head_dim=128, linear_value_head_dim=128)


def _scales_for(in_dims: int, bits: int, gain: float):
    """Scale and bias giving uniform zero-mean weights of std gain/sqrt(in_dims) from uniform codes."""
    levels = 2 ** bits - 1
    scale = gain / np.sqrt(in_dims) * np.sqrt(12.0) / levels
    return scale, -scale * levels / 2


def write_expert_file(path: Path, layout: RecordLayout, quant: ExpertQuantization, num_experts: int,
                      rng: np.random.Generator, gain: float, progress=None) -> list:
    """Random records for one layer; returns their checksums."""
    checksums = []
    with open(path, "wb") as f:
        for _ in range(num_experts):
            record = np.zeros(layout.record_size, dtype=np.uint8)
            for part in layout.parts:
                view = record[part.offset:part.offset + part.nbytes]
                if part.name.endswith(".weight"):
                    view.view(np.uint32)[:] = rng.integers(0, 2 ** 32, part.nbytes // 4, dtype=np.uint32)
                else:
                    in_dims = part.shape[-1] * quant.group_size
                    scale, bias = _scales_for(in_dims, quant.bits, gain)
                    value = scale if part.name.endswith(".scales") else bias
                    jitter = 1 + 0.1 * rng.standard_normal(part.nbytes // 2).astype(np.float32)
                    view.view(np.uint16)[:] = _cast(value * jitter, "bfloat16")[0]
            f.write(record)  # the array's own buffer: no copy of the record
            checksums.append(record_checksum(record))
            if progress is not None:
                progress.update(layout.record_size)
    return checksums


def _resident_value(key: str, array, quantized: set, routing: Routing, rng, shaped: dict):
    """The synthetic value of one resident parameter (numpy, in the parameter's storage dtype).

    ``shaped`` holds the routing-shaping rows (module -> {weight, scales, biases}) that go first.
    """
    import mlx.core as mx

    shape, dtype = tuple(array.shape), array.dtype
    module, name = key.rsplit(".", 1)
    if module in shaped and shaped[module][name].shape == shape:
        return shaped[module][name]
    if name == "weight" and module in quantized:
        value = rng.integers(0, 2 ** 32, shape, dtype=np.uint32)
    elif name in ("scales", "biases"):
        gain = 1.0 if module.endswith("lm_head") else routing.gain
        scale, bias = _scales_for(shape[-1] * 64, 4, gain)
        value = np.full(shape, scale if name == "scales" else bias, dtype=np.float32)
    elif name == "A_log":
        return np.log(rng.uniform(1, 16, shape)).astype(np.float32)
    elif key.endswith("conv1d.weight"):
        value = 0.1 * rng.standard_normal(shape).astype(np.float32)
    elif key.endswith("post_attention_layernorm.weight"):
        value = 1 + routing.layer_mix * rng.standard_normal(shape).astype(np.float32)
    elif name == "dt_bias" or key.endswith("norm.weight"):
        value = np.ones(shape, dtype=np.float32)
    else:
        value = routing.gain * rng.standard_normal(shape).astype(np.float32) / np.sqrt(shape[-1])
    if value.dtype != np.uint32:
        value = _cast(value, "bfloat16")[0] if dtype == mx.bfloat16 else value.astype(np.float32)
    if module in shaped:  # the embedding: its first rows are shaped, the rest stay random
        rows = shaped[module][name]
        value[:rows.shape[0]] = rows
    return value


def _quantize_np(w: np.ndarray, bits: int, group_size: int = 64) -> dict:
    import mlx.core as mx

    q = mx.quantize(mx.array(w).astype(mx.bfloat16), group_size=group_size, bits=bits)
    mx.eval(q)
    return {name: np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)
            for name, a in zip(("weight", "scales", "biases"), q)}


def write_synthetic_model(out: Path, layers: int = 4, bits: int = 4, group_size: int = 64,
                          routing: Routing = Routing(), used_tokens: int = 4096, seed: int = 0,
                          experts_per_layer: int = 512, expert_files: bool = True, progress=None) -> Path:
    """Write (or reuse, when one with the same settings exists) a synthetic prepared model at ``out``.

    ``expert_files=False`` leaves the expert files empty (sparse, of the right size): for measuring the
    routing alone, which never reads them."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from ..conversion.resident import _cast, _quantize
    from ..conversion.safetensors_io import SafetensorsWriter
    from ..engine.mlx_model import build_model, no_experts

    out = Path(out)
    experts = {"layers": layers, "bits": bits, "group_size": group_size, "seed": seed,
               "experts_per_layer": experts_per_layer, "written": expert_files}
    settings = {"synthetic": True, "experts": experts, "routing": asdict(routing), "used_tokens": used_tokens}
    old = Manifest.load(out) if (out / MANIFEST_NAME).exists() else None
    if old is not None and old.settings == settings:
        return out
    keep_experts = old is not None and old.settings.get("experts") == experts
    if not keep_experts:
        shutil.rmtree(out, ignore_errors=True)
    (out / EXPERTS_DIR).mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    spec = qwen397_spec(layers, experts=experts_per_layer)
    config = hf_config(spec, QWEN397_VOCAB)
    hidden, num_experts = spec.hidden_size, spec.num_experts

    # Routing-shaping tensors: embeddings (AR(1) walk + shared direction) and router rows (+ popularity).
    c = rng.standard_normal(hidden).astype(np.float32)
    c /= np.linalg.norm(c) / np.sqrt(hidden)
    walk = np.empty((used_tokens, hidden), dtype=np.float32)
    walk[0] = rng.standard_normal(hidden)
    for t in range(1, used_tokens):
        walk[t] = routing.rho * walk[t - 1] + np.sqrt(1 - routing.rho ** 2) * rng.standard_normal(hidden)
    walk = (np.sqrt(routing.slow) * walk + np.sqrt(1 - routing.slow) * rng.standard_normal(walk.shape)
            + routing.shared * c)
    shaped = {"language_model.model.embed_tokens": _quantize_np(walk.astype(np.float32), 4)}
    del walk

    model = build_model(config, no_experts)
    _cast(model, "bfloat16")
    model, out_config = _quantize(model, config, 4, 64, model.quant_predicate)
    params = dict(tree_flatten(model.parameters()))
    quantized = {k.rsplit(".", 1)[0] for k in params if k.endswith(".scales")}
    skews = layer_skews(layers)
    for k in params:
        if k.endswith("mlp.gate.weight"):
            w = rng.standard_normal((num_experts, hidden)).astype(np.float32) / np.sqrt(hidden)
            layer = int(k.split(".layers.")[1].split(".")[0])
            beta = skews[layer] * rng.standard_normal(num_experts).astype(np.float32)
            w += np.outer(beta, c) / hidden
            shaped[k.rsplit(".", 1)[0]] = _quantize_np(w, 8)

    names = {mx.bfloat16: "bfloat16", mx.float32: "float32", mx.uint32: "uint32"}
    keys = sorted(params)
    writer = SafetensorsWriter(out / RESIDENT_WEIGHTS_NAME,
                               [(k, names[params[k].dtype], tuple(params[k].shape)) for k in keys],
                               metadata={"format": "mlx"})
    for k in keys:
        writer.write(k, np.ascontiguousarray(
            _resident_value(k, params[k], quantized, routing, rng, shaped)).reshape(-1).view(np.uint8))
    writer.close()
    del params, model

    from mlx_lm.utils import save_config

    save_config(dict(out_config), out / "config.json")
    write_tokenizer(out, "tiny")
    quant = ExpertQuantization(bits, group_size)
    layout = RecordLayout.for_expert(hidden, spec.moe_intermediate_size, quant, "bfloat16")
    expert_layers = []
    for layer in range(layers):
        entry = ExpertLayer(layer, expert_file_name(layer), num_experts, quant, layout)
        if keep_experts:
            entry.checksums = old.layer(layer).checksums
        elif not expert_files:
            with open(out / entry.file, "wb") as f:
                f.truncate(entry.file_size)
        else:
            entry.checksums = write_expert_file(out / entry.file, layout, quant, num_experts,
                                                np.random.default_rng([seed, layer]), EXPERT_GAIN, progress)
        expert_layers.append(entry)
    size = (out / RESIDENT_WEIGHTS_NAME).stat().st_size
    Manifest(name=out.name, source="synthetic", revision=None, model_type="qwen3_5_moe", config=out_config,
             experts_per_token=10, expert_layers=expert_layers, resident_quantization=out_config["quantization"],
             resident_files=[{"file": RESIDENT_WEIGHTS_NAME, "bytes": size,
                              "checksum": file_checksum(out / RESIDENT_WEIGHTS_NAME)}],
             settings=settings).write(out)
    return out
