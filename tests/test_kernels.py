"""The expert kernels' loader and their pure-MLX twin (CPU): the twin is mlx-lm's SwitchGLU."""

import re
from importlib import resources
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.switch_layers import SwitchGLU

from llm_flash_moe import kernels
from llm_flash_moe.flash_layout import ExpertQuantization

H, I, N = 256, 128, 6


def _quantized_glu(bits, group_size, seed=0):
    mx.random.seed(seed)
    glu = SwitchGLU(H, I, N)
    nn.quantize(glu, group_size=group_size, bits=bits)
    parts = {f"{p}.{k}": getattr(glu, p)[k] for p in ("gate_proj", "up_proj", "down_proj")
             for k in ("weight", "scales", "biases")}
    return glu, parts


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_twin_equals_switch_glu(bits, group_size, dtype):
    glu, parts = _quantized_glu(bits, group_size)
    assert parts["gate_proj.weight"].dtype == mx.uint32 and parts["gate_proj.weight"].shape == (N, I, H * bits // 32)
    quant = ExpertQuantization(bits, group_size)
    x = mx.random.normal((H,)).astype(dtype)
    experts = mx.array([4, 1, 5, 0], dtype=mx.uint32)  # as a router picks them: unsorted
    expected = glu(x[None], experts[None])[0]  # mlx-lm: [1, H] tokens, [1, k] indices -> [k, H]
    loaded = {name: a[experts] for name, a in parts.items()}  # what the store returns for those experts
    y = kernels.twin_glu(x, loaded, quant)
    assert y.shape == (4, H) and y.dtype == expected.dtype
    assert mx.array_equal(y, expected).item()

    scores = mx.softmax(mx.random.normal((4,)), axis=-1)
    block = (expected * scores[..., None]).sum(axis=-2)  # what mlx-lm's MoE block does next
    assert mx.array_equal(kernels.twin_glu(x, loaded, quant, scores), block).item()
    assert mx.array_equal(kernels.expert_glu(x[None, None], loaded, quant, scores), block).item()
    # the same experts addressed by slot in a bank that holds them all (the bank is the stacked experts)
    assert mx.array_equal(kernels.twin_glu(x, parts, quant, slots=experts), expected).item()
    assert mx.array_equal(kernels.expert_glu(x, parts, quant, scores, slots=experts), block).item()


def test_twin_on_store_shaped_bf16_parts_with_fp32_activations():
    """The store's parts keep their record dtypes (bf16 scales); activations may be fp32."""
    glu, parts = _quantized_glu(4, 64, seed=1)
    bf16 = {k: (v if v.dtype == mx.uint32 else v.astype(mx.bfloat16)) for k, v in parts.items()}
    x = mx.random.normal((H,))
    y = kernels.twin_glu(x, bf16, ExpertQuantization(4, 64))
    ref = kernels.twin_glu(x, {k: v.astype(mx.float32) if v.dtype == mx.bfloat16 else v for k, v in bf16.items()},
                           ExpertQuantization(4, 64))
    assert y.dtype == mx.float32
    assert mx.allclose(y, ref, rtol=1e-5, atol=1e-6).item()


def test_loader_picks_the_twin_on_cpu(monkeypatch):
    monkeypatch.delenv(kernels.ENV_KERNEL, raising=False)
    monkeypatch.delenv(kernels.ENV_METAL, raising=False)
    assert mx.default_device() == mx.cpu
    assert kernels.backend() == "twin"


def test_env_var_forces_the_twin(monkeypatch):
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    monkeypatch.delenv(kernels.ENV_KERNEL, raising=False)
    assert kernels.backend() == "cuda"
    monkeypatch.setenv(kernels.ENV_KERNEL, "twin")
    assert kernels.backend() == "twin"


def test_metal_kernel_is_opt_in_until_verified(monkeypatch):
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: False)
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.delenv(kernels.ENV_KERNEL, raising=False)
    monkeypatch.delenv(kernels.ENV_METAL, raising=False)
    assert kernels.backend() == ("metal" if kernels.METAL_VERIFIED else "twin")
    monkeypatch.setenv(kernels.ENV_METAL, "1")
    assert kernels.backend() == "metal"
    monkeypatch.setenv(kernels.ENV_KERNEL, "twin")
    assert kernels.backend() == "twin"


def test_unsupported_quantization_falls_back_to_the_twin():
    _, parts = _quantized_glu(4, 64)
    x = mx.zeros((H,))
    assert kernels.supported(x, parts, ExpertQuantization(4, 64))
    assert not kernels.supported(x, parts, SimpleNamespace(bits=6, group_size=64, mode="affine"))
    assert not kernels.supported(x, parts, ExpertQuantization(4, 32, mode="mxfp4"))


@pytest.mark.parametrize("backend", ["cuda", "metal"])
def test_kernel_sources_ship_in_the_package(backend):
    name = kernels.SOURCES[backend]
    assert resources.files("llm_flash_moe.kernels").joinpath(name).is_file()
    sections = kernels.kernel_sections(backend)
    assert set(sections) == {"header", "gate_up", "down"}
    for kernel, names in kernels._INPUTS.items():
        used = set(re.findall(r"\b\w+\b", sections[kernel]))
        assert set(names) <= used, (backend, kernel, set(names) - used)
        assert set(kernels._OUTPUTS[kernel]) <= used


def test_metal_mirrors_cuda_structure():
    """The Metal file keeps the CUDA file's helpers and loops (the mirror a Mac run verifies)."""
    cuda, metal = kernels.kernel_sections("cuda"), kernels.kernel_sections("metal")
    for helper in ("load_pack", "pack_dot", "load_vals", "warp_sum"):
        assert helper in cuda["header"] and helper in metal["header"]
    for kernel in ("gate_up", "down"):
        def loops(src):
            return re.findall(r"for \(int (\w+) = ", src)
        assert loops(cuda[kernel]) == loops(metal[kernel])
