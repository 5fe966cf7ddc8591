"""`llm flash-moe eval` and the quality levers it measures: experts per token and (per-layer) expert bits.

The exactness tests use the tiny random checkpoints and mlx-lm itself on the same weights; the quality
tests use tests/data/trained-moe, a tiny model of the real architecture trained on real English text
(llm_flash_moe/synthetic/trained.py), scored on text it never saw (tests/data/heldout.txt).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from click.testing import CliRunner
from llm.cli import cli

from llm_flash_moe import registry
from llm_flash_moe.conversion.prepare import PrepareOptions, prepare
from llm_flash_moe.engine.loader import load_flash_model
from llm_flash_moe.errors import FlashMoeError
from llm_flash_moe.measure.evaluate import Configuration, evaluate, native_experts_per_token, windows_of
from llm_flash_moe.flash_layout import BitsRule, Manifest, canonical_bits
from llm_flash_moe.engine.mlx_model import moe_blocks

DATA = Path(__file__).resolve().parent / "data"
TRAINED = DATA / "trained-moe"
HELDOUT = DATA / "heldout.txt"
TEXT = ("The quick brown fox jumps over the lazy dog. A mixture of experts model routes every token "
        "to a few experts out of many, so only a small part of the weights is read for each token. ") * 3


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def one_line_error(result) -> str:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines()
             if line.strip() and not line.startswith("Evaluating ")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def mlx_lm_scores(model, ids, window, ref_model=None):
    """Direct computation with mlx-lm: (perplexity, top-1 agreement with ref_model, mean KL(ref || model))."""
    nll = agree = kl = 0.0
    n = 0
    for chunk in windows_of(ids, window):
        x = mx.array(chunk)[None]
        lp = nn.log_softmax(model(x)[0, :-1].astype(mx.float32), axis=-1)
        nll -= float(mx.take_along_axis(lp, mx.array(chunk[1:])[:, None], axis=-1).sum())
        if ref_model is not None:
            rp = nn.log_softmax(ref_model(x)[0, :-1].astype(mx.float32), axis=-1)
            agree += float((mx.argmax(lp, -1) == mx.argmax(rp, -1)).sum())
            kl += float((mx.exp(rp) * (rp - lp)).sum())
        n += len(chunk) - 1
    return math.exp(nll / n), agree / n, kl / n


def rel(a, b) -> float:
    return abs(a - b) / abs(b)


# ------------------------------------------------------------------------------ exactness


def test_perplexity_agreement_and_kl_equal_a_direct_mlx_lm_computation(models):
    hf = models.hf("bfloat16")
    reference, tokenizer = mlx_lm.load(str(models.reference(hf, bits=4)))
    flash = load_flash_model(models.prepared(hf, bits=4), compute="model")  # bit-identical to mlx-lm
    native = native_experts_per_token(flash.manifest)
    assert native == 2 == flash.experts_per_token
    ids = tokenizer.encode(TEXT)
    window = 24
    report = evaluate([Configuration("m", flash, 1), Configuration("m", flash, native)],
                      Configuration("m", flash, native), ids, window=window)
    ref_row, k1 = report.results  # the native setting is the reference: listed once
    assert ref_row.reference and ref_row.experts_per_token == native and not k1.reference
    assert report.windows == math.ceil(len(ids) / window) and ref_row.scored == len(ids) - report.windows

    ppl_native, _, _ = mlx_lm_scores(reference, ids, window)
    assert rel(ref_row.perplexity, ppl_native) <= 1e-4
    native_model, _ = mlx_lm.load(str(models.reference(hf, bits=4)))
    for _, block in moe_blocks(reference):
        block.top_k = 1  # mlx-lm with one expert per token
    ppl_1, agree_1, kl_1 = mlx_lm_scores(reference, ids, window, ref_model=native_model)
    assert rel(k1.perplexity, ppl_1) <= 1e-4
    assert k1.top1_agreement == pytest.approx(agree_1, abs=1e-9)
    assert rel(k1.kl_mean, kl_1) <= 1e-3
    assert k1.perplexity > ref_row.perplexity * 1.01 and k1.top1_agreement < 1 and k1.kl_mean > 0.001
    # the experts were streamed: the reads are counted, one expert fewer per token reads less
    assert 0 < k1.bytes_read < ref_row.bytes_read
    assert ref_row.as_dict()["bytes_read_per_token"] > 0


def test_float32_default_equals_mlx_lm_cast_to_float32(models):
    from llm_flash_moe.engine.mlx_model import cast_floats

    hf = models.hf("bfloat16")
    reference, tokenizer = mlx_lm.load(str(models.reference(hf, bits=4)))
    cast_floats(reference, mx.float32)
    flash = load_flash_model(models.prepared(hf, bits=4))  # compute="auto": float32 on the CPU
    ids = tokenizer.encode(TEXT)
    report = evaluate([], Configuration("m", flash, 2), ids, window=32)
    assert rel(report.reference.perplexity, mlx_lm_scores(reference, ids, 32)[0]) <= 1e-4


def test_agreement_with_itself_is_one_and_kl_zero(models):
    prepared = models.prepared(models.hf("bfloat16"), bits=4)
    a, b = load_flash_model(prepared), load_flash_model(prepared)  # computed twice, independently
    ids = a.tokenizer.encode(TEXT)
    report = evaluate([Configuration("b", b, 2)], Configuration("a", a, 2), ids, window=32)
    ref, same = report.results
    assert same.top1_agreement == 1.0 and same.kl_mean == 0.0
    assert same.perplexity == ref.perplexity
    assert ref.top1_agreement == 1.0 and ref.kl_mean == 0.0


def test_windows():
    assert windows_of(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert windows_of(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a 1-token window scores nothing
    with pytest.raises(FlashMoeError):
        windows_of([1, 2, 3], 1)


# ------------------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text(TEXT)
    return path


def test_eval_command_json(models, text_file):
    prepared = models.prepared(models.hf("bfloat16"), bits=4)
    name = Manifest.load(prepared).name
    result = run("flash-moe", "eval", name + "-flash", "--text", str(text_file), "--experts", "2",
                 "--experts", "1", "--window", "32", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["text"] == str(text_file) and data["window"] == 32
    assert data["reference"] == {"model": name, "bits": "4", "experts_per_token": 2}
    rows = {r["experts_per_token"]: r for r in data["results"]}
    assert rows[2]["reference"] and rows[2]["top1_agreement"] == 1.0 and rows[2]["kl_mean"] == 0.0
    assert not rows[1]["reference"] and rows[1]["kl_mean"] > 0 and rows[1]["perplexity"] > rows[2]["perplexity"]
    for row in rows.values():
        assert row["bytes_read"] > 0 and row["expert_reads"] > 0 and row["scored_tokens"] == data["scored_tokens"]
    assert "Evaluating" in result.stderr  # the progress bar


def test_eval_command_table_and_max_tokens(models, text_file):
    prepared = models.prepared(models.hf("bfloat16"), bits=4)
    name = Manifest.load(prepared).name
    result = run("flash-moe", "eval", name, "--text", str(text_file), "--experts", "1", "--max-tokens", "40",
                 "--window", "16")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "sample.txt: 40 tokens in 3 windows of up to 16; reference: " in out
    assert "perplexity" in out and "top-1 agree" in out and "KL nats/token" in out
    assert "2 (ref)" in out and "%" in out


def test_eval_against_another_copy(models, text_file):
    hf = models.hf("bfloat16")
    four, two = models.prepared(hf, bits=4), models.prepared(hf, bits=2)
    result = run("flash-moe", "eval", Manifest.load(two).name, "--against", Manifest.load(four).name,
                 "--text", str(text_file), "--window", "32", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    ref, low = data["results"]
    assert ref["reference"] and ref["bits"] == "4" and low["bits"] == "2"
    assert low["top1_agreement"] < 1 and low["kl_mean"] > 0


def test_eval_errors_are_one_line(models, text_file, tmp_path):
    prepared = models.prepared(models.hf("bfloat16"), bits=4)
    name = Manifest.load(prepared).name
    missing = run("flash-moe", "eval", "nope", "--text", str(text_file))
    assert "no prepared model named 'nope'" in one_line_error(missing)
    assert "--experts must be between 1 and 8, not 9" in one_line_error(
        run("flash-moe", "eval", name, "--text", str(text_file), "--experts", "9"))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    assert "is not UTF-8 text" in one_line_error(run("flash-moe", "eval", name, "--text", str(binary)))
    other = models.prepared(models.hf("bfloat16", vocab_size=640), bits=4)  # another model, same tokenizer
    assert f"{name} and {Manifest.load(other).name} are not copies of the same model (vocab_size 512 and 640)" in \
        one_line_error(run("flash-moe", "eval", name, "--against", Manifest.load(other).name, "--text", str(text_file)))


# ------------------------------------------------------------------------------ per-layer bits


def test_bits_rule_syntax():
    layers = list(range(60))
    assert BitsRule.parse("3").resolve(layers) == dict.fromkeys(layers, 3)
    mixed = BitsRule.parse("3,first=4,last=4").resolve(layers)
    assert mixed == BitsRule.parse("3,0=4,-1=4").resolve(layers) == {**dict.fromkeys(layers, 3), 0: 4, 59: 4}
    assert canonical_bits(mixed) == "3,0=4,59=4"
    ranged = BitsRule.parse("4,10..49=3,-2..-1=8").resolve(layers)
    assert [ranged[i] for i in (0, 9, 10, 49, 50, 57, 58, 59)] == [4, 4, 3, 3, 4, 4, 8, 8]
    for rule in (mixed, ranged, dict.fromkeys(layers, 2)):
        assert BitsRule.parse(canonical_bits(rule)).resolve(layers) == rule
    assert canonical_bits(dict.fromkeys(layers, 2)) == 2
    for bad, message in (("5", "must be one of 2, 3, 4, 8, not 5"), ("3,0=6", "not 6"), ("x", "not a bit width"),
                         ("3,a=4", "cannot read 'a=4'"), ("3,4", "cannot read '4'")):
        with pytest.raises(FlashMoeError, match=message):
            BitsRule.parse(bad)
    with pytest.raises(FlashMoeError, match="layer 60 names no layer with experts; .* are 0..59"):
        BitsRule.parse("3,60=4").resolve(layers)


def mlx_lm_mixed_reference(hf: Path, out: Path, bits_by_layer: dict) -> Path:
    """mlx-lm's own converter with each layer's experts at its own bits (our conversion's recipe otherwise)."""
    from mlx_lm import convert

    def predicate(path, module):
        if ".switch_mlp." in path:
            layer = int(path.split(".layers.")[1].split(".")[0])
            return {"group_size": 64, "bits": bits_by_layer[layer], "mode": "affine"}
        if path.endswith("mlp.gate") or path.endswith("shared_expert_gate"):
            return {"group_size": 64, "bits": 8}
        return True

    convert(str(hf), str(out), quantize=True, q_bits=4, q_group_size=64, quant_predicate=predicate)
    return out


def test_mixed_precision_prepare_store_and_engine_equal_mlx_lm(models, tmp_path):
    hf = models.hf("bfloat16")
    prepared = models.prepared(hf, bits="2,first=4,last=8")
    manifest = Manifest.load(prepared)
    bits = {layer.layer: layer.quantization.bits for layer in manifest.expert_layers}
    assert bits == {0: 4, 1: 2, 2: 2, 3: 8}
    assert manifest.settings["bits"] == "2,0=4,3=8" and manifest.bits == "2/4/8"
    sizes = {layer.layer: layer.layout.record_size for layer in manifest.expert_layers}
    assert len({layer.layout for layer in manifest.expert_layers}) == 3  # (tiny: all round up to 16 KiB)

    reference, tokenizer = mlx_lm.load(str(mlx_lm_mixed_reference(hf, tmp_path / "ref", bits)))
    flash = load_flash_model(prepared, compute="model")
    ids = tokenizer.encode(TEXT)
    x = mx.array(ids)[None]
    logits, expected = flash.model(x), reference(x)
    assert mx.array_equal(logits, expected)  # compute="model": bit-identical, as the README promises
    tokens = [r.token for r in mlx_lm.stream_generate(flash.model, flash.tokenizer, ids, max_tokens=8)]
    assert tokens == [r.token for r in mlx_lm.stream_generate(reference, tokenizer, ids, max_tokens=8)]

    # the rule is recorded canonically: another spelling of it is the same model, another rule is not
    out = prepare(PrepareOptions(source=str(hf), name=manifest.name, output=prepared, bits="2,0=4,-1=8"),
                  echo=lambda _: None)
    assert out.settings == manifest.settings
    with pytest.raises(FlashMoeError, match="already holds a different model"):
        prepare(PrepareOptions(source=str(hf), name=manifest.name, output=prepared, bits=2), echo=lambda _: None)
    from llm_flash_moe.plugin.cli import repair_command

    assert "--bits 2,0=4,3=8 " in repair_command(manifest, prepared)
    info = json.loads(run("flash-moe", "info", manifest.name, "--json").stdout)
    assert info["expert_bits"] == "2/4/8" and info["settings"]["bits"] == "2,0=4,3=8"
    assert info["read_per_token_bytes"] == sum(sizes.values()) * manifest.experts_per_token


def test_prepare_bits_rule_on_the_command_line(models, tmp_path):
    hf = models.hf("bfloat16")
    result = run("flash-moe", "prepare", str(hf), "--name", "rule", "--output", str(tmp_path / "rule"),
                 "--bits", "3,last=4")
    assert result.exit_code == 0, result.output
    manifest = Manifest.load(tmp_path / "rule")
    assert [layer.quantization.bits for layer in manifest.expert_layers] == [3, 3, 3, 4]
    bad = run("flash-moe", "prepare", str(hf), "--name", "bad", "--bits", "3,first=5")
    assert bad.exit_code == 2 and "Invalid value for '--bits': must be one of 2, 3, 4, 8, not 5" in bad.output
    gone = run("flash-moe", "prepare", str(hf), "--name", "bad", "--output", str(tmp_path / "bad"),
               "--bits", "3,9=4")
    assert "layer 9 names no layer with experts; this model's expert layers are 0..3" in one_line_error(gone)
    assert "bad" not in registry.registered()


# ------------------------------------------------------------------------------ the trained model


HELDOUT_TOKENS = 1024


def test_trained_model_lower_bits_and_fewer_experts_raise_perplexity(models):
    """Measured (1,024 held-out tokens, windows of 64): 4-bit 7.55; 3-bit +1.5%; 2-bit +6.1%; 4-bit with 2 of
    its 4 experts per token +2.9%, with 3 +0.3%. The thresholds leave room for other CPUs' rounding."""
    four, three, two = (load_flash_model(models.prepared(TRAINED, bits=b)) for b in (4, 3, 2))
    native = native_experts_per_token(four.manifest)
    assert native == four.experts_per_token == 4
    heldout_ids = four.tokenizer.encode(HELDOUT.read_text())[:HELDOUT_TOKENS]
    report = evaluate([Configuration("trained", four, 2), Configuration("trained", three, native),
                       Configuration("trained", two, native)], Configuration("trained", four, native),
                      heldout_ids, window=64)
    r = {(r.bits, r.experts_per_token): r for r in report.results}
    ppl = {key: result.perplexity for key, result in r.items()}
    assert ppl[("4", 4)] < 10  # it learned the language: a uniform guess over its 433 tokens is 433
    assert ppl[("2", 4)] > ppl[("3", 4)] * 1.02 > ppl[("4", 4)] * 1.02  # lower bits: measurably worse
    assert ppl[("4", 2)] > ppl[("4", 4)] * 1.015  # fewer experts: measurably worse
    assert r[("2", 4)].kl_mean > r[("3", 4)].kl_mean > 0.005
    assert r[("2", 4)].top1_agreement < r[("3", 4)].top1_agreement < 0.97
    assert r[("4", 2)].kl_mean > 0.01 and r[("4", 2)].top1_agreement < 0.95


def test_training_script_writes_what_mlx_lm_loads(tmp_path):
    """trained.py's export (mlx-lm's sanitize, inverted) gives back the model it trained, and the shipped
    checkpoint is that script's architecture."""
    from llm_flash_moe.engine.mlx_model import cast_floats
    from llm_flash_moe.synthetic.trained import TRAINED_SPEC, hf_config_for, new_model, write_checkpoint

    model = new_model(TRAINED_SPEC, seed=1)
    out = write_checkpoint(model, tmp_path / "export", (TRAINED / "tokenizer.json").read_text(), dtype="float32")
    loaded, tokenizer = mlx_lm.load(str(out))
    x = mx.array(tokenizer.encode(HELDOUT.read_text()[:400]))[None]
    assert mx.array_equal(loaded(x), model(x))
    shipped = json.loads((TRAINED / "config.json").read_text())
    assert shipped == hf_config_for(TRAINED_SPEC)
    reference, _ = mlx_lm.load(str(TRAINED))
    cast_floats(reference, mx.float32)
    assert math.exp(float(nn.losses.cross_entropy(reference(x[:, :-1]), x[:, 1:]).mean())) < 20
