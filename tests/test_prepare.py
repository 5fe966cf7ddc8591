"""`prepare`: checkpoints -> flash layout, checked against mlx-lm's own converter on the same weights."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from llm_flash_moe import registry
from llm_flash_moe.conversion import experts as experts_module
from llm_flash_moe.conversion import prepare as prepare_module
from llm_flash_moe.conversion.prepare import PrepareOptions, prepare
from llm_flash_moe.engine.loader import load_resident_model
from llm_flash_moe.flash_layout import (
    MANIFEST_NAME, RECORD_ALIGNMENT, Manifest, record_checksum, split_record,
)


def load_all(directory: Path) -> dict:
    weights = {}
    for f in sorted(directory.glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    return weights


def expert_prefix(manifest: Manifest, layer: int) -> str:
    if manifest.model_type == "qwen3_5_moe":
        return f"language_model.model.layers.{layer}.mlp.switch_mlp"
    return f"model.layers.{layer}.mlp.switch_mlp"


def as_bytes(a: mx.array) -> np.ndarray:
    return np.array(a.view(mx.uint8)).reshape(-1)


def assert_records_equal(prepared: Path, expected: dict):
    """Every record, read back through the format module, equals ``expected`` (stacked mlx arrays) exactly."""
    manifest = Manifest.load(prepared)
    for layer in manifest.expert_layers:
        assert layer.layout.record_size % RECORD_ALIGNMENT == 0
        data = np.fromfile(prepared / layer.file, dtype=np.uint8)
        assert data.size == layer.num_experts * layer.layout.record_size
        prefix = expert_prefix(manifest, layer.layer)
        for e in range(layer.num_experts):
            record = data[e * layer.layout.record_size:(e + 1) * layer.layout.record_size]
            assert layer.checksums[e] == record_checksum(record.tobytes())
            for name, view in split_record(record, layer.layout).items():
                want = as_bytes(expected[f"{prefix}.{name}"][e])
                assert np.array_equal(view.reshape(-1).view(np.uint8), want), (layer.layer, e, name)


@pytest.mark.parametrize("bits,group_size,dtype", [
    (2, 64, "bfloat16"), (3, 64, "bfloat16"), (4, 64, "bfloat16"), (8, 64, "bfloat16"),
    (4, 32, "bfloat16"), (4, 64, "float32"),
])
def test_records_equal_mlx_lm_quantization(models, bits, group_size, dtype):
    hf = models.hf(dtype)
    prepared = models.prepared(hf, bits=bits, group_size=group_size)
    reference = load_all(models.reference(hf, bits=bits, group_size=group_size))
    assert_records_equal(prepared, reference)


def test_group_size_128(models):
    hf = models.hf("bfloat16", hidden_size=128, moe_intermediate_size=128)
    prepared = models.prepared(hf, bits=4, group_size=128)
    assert_records_equal(prepared, load_all(models.reference(hf, bits=4, group_size=128)))


def test_resident_weights_equal_mlx_lm_and_load_strictly(models):
    hf = models.hf("bfloat16")
    prepared = models.prepared(hf)
    reference = load_all(models.reference(hf))
    resident = load_all(prepared)
    assert set(resident) == {k for k in reference if ".switch_mlp." not in k}
    for key, value in resident.items():
        assert value.dtype == reference[key].dtype and mx.array_equal(value, reference[key]), key
    load_resident_model(prepared)  # mlx-lm's load_model with strict=True
    manifest = Manifest.load(prepared)
    assert manifest.resident_files[0]["bytes"] == (prepared / "model.safetensors").stat().st_size
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (prepared / name).exists()


def expert_files(directory: Path) -> dict:
    files = {p.relative_to(directory).as_posix(): p.read_bytes()
             for p in sorted(directory.rglob("*")) if p.is_file()}
    files.pop(MANIFEST_NAME)
    return files


@pytest.mark.parametrize("layout,shards", [("per_expert", 3), ("fused", 2)])
def test_expert_layouts_and_sharding_give_identical_files(models, layout, shards):
    single = models.prepared(models.hf("bfloat16"))
    other = models.prepared(models.hf("bfloat16", layout=layout, shards=shards))
    assert expert_files(other) == expert_files(single)
    a, b = Manifest.load(single), Manifest.load(other)
    assert [l.checksums for l in a.expert_layers] == [l.checksums for l in b.expert_layers]


def test_mlx_quantized_source_is_repacked_byte_for_byte(models):
    source = models.reference(models.hf("bfloat16"), bits=4, group_size=64)
    prepared = models.prepared(source, bits=4, group_size=64)
    original = load_all(source)
    assert_records_equal(prepared, original)
    resident = load_all(prepared)
    assert all(mx.array_equal(v, original[k]) for k, v in resident.items())
    load_resident_model(prepared)


def test_mlx_quantized_source_is_requantized_when_bits_differ(models):
    source = models.reference(models.hf("bfloat16"), bits=8, group_size=64)
    prepared = models.prepared(source, bits=4, group_size=32)
    original = load_all(source)
    expected = {}
    for key in original:
        if key.endswith(".switch_mlp.gate_proj.weight") or key.endswith(".switch_mlp.up_proj.weight") \
                or key.endswith(".switch_mlp.down_proj.weight"):
            prefix = key[: -len(".weight")]
            w = mx.dequantize(original[key], original[prefix + ".scales"], original[prefix + ".biases"],
                              group_size=64, bits=8)
            q, s, b = mx.quantize(w, group_size=32, bits=4)
            expected.update({prefix + ".weight": q, prefix + ".scales": s, prefix + ".biases": b})
    assert_records_equal(prepared, expected)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen3_next"])
def test_other_model_types(models, model_type):
    hf = models.hf("bfloat16", layout="per_expert", model_type=model_type)
    prepared = models.prepared(hf)
    assert_records_equal(prepared, load_all(models.reference(hf)))
    load_resident_model(prepared)


def test_resume_after_interruption_gives_identical_bytes(models, tmp_path, monkeypatch):
    hf = models.hf("bfloat16", layout="per_expert", shards=2)
    uninterrupted = models.prepared(hf)
    out = tmp_path / "resumed"
    options = PrepareOptions(source=str(hf), name="resumed", output=out)

    real_write, calls = experts_module.ExpertRecordWriter._write, {"n": 0}

    def crash_midway(self, *args):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt
        return real_write(self, *args)

    monkeypatch.setattr(experts_module.ExpertRecordWriter, "_write", crash_midway)
    monkeypatch.setattr(experts_module, "COMMIT_EVERY_BYTES", 1)  # journal every unit
    with pytest.raises(KeyboardInterrupt):
        prepare(options, echo=lambda _: None)
    assert not (out / MANIFEST_NAME).exists() and "resumed" not in registry.prepared()
    done_before = len((out / ".partial" / "journal.jsonl").read_text().splitlines())
    assert done_before >= 30

    real_resident = prepare_module.write_resident

    def crash_in_resident(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(experts_module.ExpertRecordWriter, "_write", real_write)
    monkeypatch.setattr(prepare_module, "write_resident", crash_in_resident)
    written = {"n": 0}

    def count_write(self, *args):
        written["n"] += 1
        return real_write(self, *args)

    monkeypatch.setattr(experts_module.ExpertRecordWriter, "_write", count_write)
    with pytest.raises(KeyboardInterrupt):
        prepare(options, echo=lambda _: None)
    total_units = sum(l.num_experts for l in Manifest.load(uninterrupted).expert_layers) * 3
    assert written["n"] == total_units - 39  # only what the first run had not finished

    monkeypatch.setattr(prepare_module, "write_resident", real_resident)
    written["n"] = 0
    prepare(options, echo=lambda _: None)
    assert written["n"] == 0  # the second run had finished every expert
    assert expert_files(out) == expert_files(uninterrupted)
    a, b = Manifest.load(out).to_json(), Manifest.load(uninterrupted).to_json()
    for d in (a, b):
        d.pop("name"), d["settings"].pop("name")
    assert a == b
    assert not (out / ".partial").exists()
    assert registry.prepared()["resumed"] == out.resolve()


def test_rerun_of_a_finished_model_is_a_no_op(models):
    hf = models.hf("bfloat16")
    prepared = models.prepared(hf)
    before = expert_files(prepared)
    name = Manifest.load(prepared).name
    prepare(PrepareOptions(source=str(hf), name=name, output=prepared), echo=lambda _: None)
    assert expert_files(prepared) == before


def test_record_layout_of_the_397b_at_4_bits():
    from llm_flash_moe.flash_layout import ExpertQuantization, RecordLayout

    layout = RecordLayout.for_expert(4096, 1024, ExpertQuantization(4, 64), "bfloat16")
    assert layout.record_size == 7_077_888  # CONTEXT.md: bytes per expert at 4 bits
    layout2 = RecordLayout.for_expert(4096, 1024, ExpertQuantization(2, 64), "bfloat16")
    assert layout2.record_size == 3_932_160
