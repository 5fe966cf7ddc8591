"""Images (`llm -a`): prepare keeps the vision encoder, image prompts run through the streaming engine and
give mlx-vlm's own tokens, the prompt cache tells images apart, bad images fail in one line.

The model is a tiny random Qwen3.5-MoE (float32: mlx-vlm's DeltaNet prefill needs fp32 on the CPU) with a
tiny vision encoder under the HF release's key names (conftest's ``vision_model``, also used through the engine
by tests/test_service.py). The reference is mlx-vlm itself, loading mlx-lm's own
conversion of the same checkpoint plus the same vision tensors: the same weights as the prepared model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import llm
from llm.cli import cli

from conftest import logged_turns, record_reads
from llm_flash_moe.engine import prefill as prefill_module
from llm_flash_moe.engine import prompt_cache, vision
from llm_flash_moe import registry

mx = pytest.importorskip("mlx.core")
mlx_vlm = pytest.importorskip("mlx_vlm")
pytest.importorskip("PIL.Image")

NAME, MODEL = "vis", "vis-flash"
GREEDY = ["-o", "temperature", "0", "-o", "thinking", "0", "-o", "max_tokens", "10"]


@pytest.fixture(scope="session")
def reference(models, vision_source, vision_model, tmp_path_factory):
    """mlx-vlm's own model and processor on the prepared model's weights: mlx-lm's conversion of the same
    checkpoint (the recipe prepare follows) with the prepared vision tensors, loaded by ``mlx_vlm.load``."""
    out = tmp_path_factory.mktemp("vision-ref") / "ref"
    shutil.copytree(models.reference(vision_source), out)
    shutil.copy(vision_model / "vision.safetensors", out)
    shutil.copy(vision_source / "preprocessor_config.json", out)
    config = json.loads((out / "config.json").read_text())
    config["vision_config"] = json.loads((vision_source / "config.json").read_text())["vision_config"]
    (out / "config.json").write_text(json.dumps(config))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"].update({k: "vision.safetensors" for k in mx.load(str(out / "vision.safetensors"))})
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return mlx_vlm.load(str(out))


@pytest.fixture
def user(llm_user, monkeypatch, vision_model, tiny_model) -> Path:
    monkeypatch.delenv(prompt_cache.DISK_ENV, raising=False)
    registry.register(NAME, vision_model)
    registry.register("tiny", tiny_model)  # text only
    prompt_cache.MEMORY.clear()
    yield llm_user
    prompt_cache.MEMORY.clear()


@pytest.fixture
def turns(monkeypatch) -> list:
    """Every image turn the plugin runs, with the tokens it generated."""
    calls = []
    real = vision.ImageTurn.steps

    def steps(turn, max_tokens, sampler):
        calls.append(turn)
        yield from real(turn, max_tokens, sampler)

    monkeypatch.setattr(vision.ImageTurn, "steps", steps)
    return calls


def run(*args):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def logged(user_dir: Path) -> list:
    rows = logged_turns(user_dir)
    for row in rows:
        row["response_json"] = json.loads(row["response_json"])
    return rows


def reference_tokens(reference, images, text, n=10) -> list:
    model, processor = reference
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]}],
        add_generation_prompt=True, tokenize=False, enable_thinking=False)
    tokens = [r.token for r in mlx_vlm.stream_generate(model, processor, prompt, image=[str(i) for i in images],
                                                      max_tokens=n, temperature=0.0)]
    return tokens[:n]  # mlx-vlm repeats the last token in its closing result


# ------------------------------------------------------------------------------ prepare


def test_prepare_keeps_the_vision_encoder_verified_and_info_says_so(user, vision_source, vision_model, tiny_model):
    from llm_flash_moe.flash_layout import Manifest
    from llm_flash_moe.verify import verify_model

    manifest = Manifest.load(vision_model)
    assert manifest.vision == {"file": "vision.safetensors", "tensors": 21}
    entry = next(f for f in manifest.resident_files if f["file"] == "vision.safetensors")
    assert entry["bytes"] == (vision_model / "vision.safetensors").stat().st_size and entry["checksum"]
    source = mx.load(str(vision_source / "model.safetensors"))
    kept = mx.load(str(vision_model / "vision.safetensors"))
    assert set(kept) == {k for k in source if k.startswith("model.visual.")}
    assert all(mx.array_equal(kept[k], source[k]).item() and kept[k].dtype == source[k].dtype for k in kept)
    assert "vision_config" in json.loads((vision_model / "config.json").read_text())
    assert (vision_model / "preprocessor_config.json").exists()
    assert verify_model(vision_model, manifest).ok
    path = vision_model / "vision.safetensors"
    original = path.read_bytes()
    path.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))  # damage the encoder: verify names it
    try:
        report = verify_model(vision_model, manifest)
        assert not report.ok and any("vision.safetensors" in p for p in report.problems)
    finally:
        path.write_bytes(original)
    assert "text and images" in run("flash-moe", "info", NAME)
    assert Manifest.load(tiny_model).vision is None
    assert "text only" in run("flash-moe", "info", "tiny")


# ------------------------------------------------------------------------------ faithful to mlx-vlm


@pytest.mark.parametrize("names", [("a",), ("a", "c")], ids=["one image", "two images"])
def test_greedy_tokens_identical_to_mlx_vlm(user, turns, reference, pictures, names):
    images = [pictures[n] for n in names]
    args = sum((["-a", str(i)] for i in images), [])
    run("-m", MODEL, *args, *GREEDY, "What is in the picture?")
    expected = reference_tokens(reference, images, "What is in the picture?")
    assert len(set(expected)) > 3  # a real test: not one token repeated
    (turn,) = turns
    assert turn.generated == expected
    assert len(turn.images.spans) == len(images)
    row = logged(user)[-1]
    assert row["input_tokens"] == len(turn.prompt_ids) and row["response_json"]["prompt_tokens_processed"] > 0


def test_model_compute_logits_bit_identical_to_mlx_vlm(vision_model, reference, pictures):
    """With compute="model" the image prompt's logits equal mlx-vlm's to the bit (its model, our MoE blocks)."""
    from llm_flash_moe.plugin.chat import render_prompt
    from llm_flash_moe.engine.loader import load_flash_model

    flash = load_flash_model(vision_model, compute="model")
    try:
        text = render_prompt(flash.tokenizer, [{"role": "user", "content": [
            {"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare them."}]}], False)
        images = vision.for_prompt(flash, MODEL, text, [llm.Attachment(path=str(pictures["a"])),
                                                        llm.Attachment(path=str(pictures["d"]))])
        ids = mx.array(images.input_ids)[None]

        def logits(model):
            model.language_model._position_ids = model.language_model._rope_deltas = None
            emb = model.get_input_embeddings(ids, images.pixel_values, image_grid_thw=images.grid_thw)
            return model.language_model(ids, inputs_embeds=emb.inputs_embeds, cache=model.language_model.make_cache(),
                                        position_ids=emb.position_ids, rope_deltas=emb.rope_deltas).logits

        ours, theirs = logits(vision.vision_model(flash).model), logits(reference[0])
        assert ours.shape == theirs.shape and mx.array_equal(ours, theirs).item()
        assert flash.bank.stats.reads > 0  # the experts came through the bank, not from mlx-vlm's model
    finally:
        flash.close()


# ------------------------------------------------------------------------------ the prompt, layer by layer

CHUNK = 8  # small chunks: an image prompt of the tiny model spans several, and its images straddle them


def greedy(logprobs):
    return mx.argmax(logprobs, axis=-1)


def image_prompt(flash, names, pictures) -> vision.Images:
    from llm_flash_moe.plugin.chat import render_prompt

    text = render_prompt(flash.tokenizer, [{"role": "user", "content": [{"type": "image"} for _ in names] + [
        {"type": "text", "text": "Compare them."}]}], False)
    return vision.for_prompt(flash, MODEL, text, [llm.Attachment(path=str(pictures[n])) for n in names])


def mlx_vlm_loop(model, images, start=0, caches=None, **kwargs):
    """mlx-vlm's own prompt and generation loop (``generate_step``, CHUNK-token prefill steps, greedy) on
    ``model`` over the prompt's tokens from ``start``, continuing ``caches`` (mlx-lm caches holding the state
    at ``start``, as the prompt cache keeps it) with the whole prompt's positions: (its caches, the loop)."""
    from mlx_vlm.generate import generate_step

    lm = model.language_model
    lm._position_ids = lm._rope_deltas = None
    ids = mx.array(images.input_ids)[None]
    if caches is not None:
        positions, deltas = lm.get_rope_index(ids, images.grid_thw, None, None)
        kwargs.update(position_ids=positions, rope_deltas=deltas)
    pixels, grid = images.between(start, ids.shape[1])
    cache = lm.make_cache() if caches is None else vision.to_vlm_caches(caches)
    return cache, generate_step(ids[:, start:], model, pixels, None, sampler=greedy, prompt_cache=cache,
                                prefill_step_size=CHUNK, image_grid_thw=grid, **kwargs)


def layer_major(flash, images, end):
    """The image prompt's tokens [0, end) through ``prefill.image_prefill`` with CHUNK-token chunks: its caches."""
    vlm = vision.vision_model(flash)
    lm = vlm.model.language_model
    ids = mx.array(images.input_ids)[None]
    positions, _ = lm.get_rope_index(ids, images.grid_thw, None, None)
    cache = lm.make_cache()
    prefill_module.image_prefill(vlm.model, cache, ids, images, positions, 0, end, chunk=CHUNK)
    return cache


def test_image_prefill_layer_major_caches_bit_identical_to_mlx_vlm_chunked_prefill(vision_model, reference, pictures):
    """The prompt but its last token, layer by layer, leaves every layer's cache (KV and DeltaNet states)
    equal to the bit to what mlx-vlm's own chunked prompt loop leaves (its model, its MoE), with images that
    straddle chunk boundaries."""
    from mlx.utils import tree_flatten

    from llm_flash_moe.engine.loader import load_flash_model

    flash = load_flash_model(vision_model, compute="model", prefetch=False)
    try:
        images = image_prompt(flash, ["a", "c"], pictures)
        n = len(images.input_ids)
        assert n > 4 * CHUNK
        assert sum(start // CHUNK != (end - 1) // CHUNK for start, end in images.spans) == 2  # both straddle
        ours = prompt_cache.freeze(vision.to_lm_caches(layer_major(flash, images, n - 1)))
        assert flash.bank.stats.reads > 0  # the experts came through the bank

        kept = {}  # mlx-vlm's state after its chunks over all but the last token (its checkpoint hook)
        _, loop = mlx_vlm_loop(reference[0], images, max_tokens=1, prompt_cache_checkpoint_len=n - 1,
                               prompt_cache_checkpoint=lambda k, c: kept.update({k: prompt_cache.freeze(
                                   vision.to_lm_caches(c))}))
        next(loop)
        theirs = kept[n - 1]
        assert [type(c) for c in ours] == [type(c) for c in theirs]
        assert [c.offset for c in ours if hasattr(c, "offset")] == [n - 1] * sum(hasattr(c, "offset") for c in ours)
        ours, theirs = tree_flatten([c.state for c in ours]), tree_flatten([c.state for c in theirs])
        assert [name for name, _ in ours] == [name for name, _ in theirs]
        arrays = [(a, b) for (_, a), (_, b) in zip(ours, theirs) if isinstance(a, mx.array)]
        assert len(arrays) > len(flash.model.layers)
        assert all(a.shape == b.shape and a.dtype == b.dtype and mx.array_equal(a, b).item() for a, b in arrays)
        assert [a for _, a in ours if not isinstance(a, mx.array)] == [b for _, b in theirs if not isinstance(b, mx.array)]
    finally:
        flash.close()


def test_image_prompt_reads_each_expert_once_per_layer(vision_model, pictures):
    """mlx-vlm's chunked prompt loop reads an expert again in each chunk that needs it (a bank of one layer's
    experts); the layer-major image prefill reads each once per layer: the union of what the prompt routes to."""
    from llm_flash_moe.engine.loader import load_flash_model

    flash = load_flash_model(vision_model, compute="model", prefetch=False)
    try:
        flash.bank.min_slots = flash.manifest.num_experts
        flash.bank.resize(0)
        images = image_prompt(flash, ["a", "c"], pictures)
        reads = record_reads(flash.bank)
        _, loop = mlx_vlm_loop(vision.vision_model(flash).model, images, max_tokens=0)
        for _ in loop:
            pass
        chunked = sum(reads.values())
        assert max(reads.values()) > 1

        flash.bank.clear()
        reads.clear()
        trace = []
        flash.bank.trace = lambda layer, experts: trace.append((layer, experts.tolist()))
        layer_major(flash, images, len(images.input_ids))
        assert max(reads.values()) == 1
        union = {(layer, e) for layer, experts in trace for e in experts}
        assert set(reads) == union and len({layer for layer, _ in union}) == len(flash.manifest.expert_layers)
        assert sum(reads.values()) < chunked
    finally:
        flash.close()


def test_image_turns_and_a_follow_up_with_a_new_image_answer_as_mlx_vlm(user, turns, reference, pictures,
                                                                         monkeypatch):
    """With CHUNK-token chunks, an image prompt and a `-c` follow-up adding an image (continuing the prompt
    cache's state) each give, token for token, what mlx-vlm's own loop gives from the same state with the
    same chunk boundaries, with the same log-probabilities to the bit; mlx-vlm's loop is handed only the last
    prompt token (the rest went layer by layer)."""
    import importlib

    vlm_generate = importlib.import_module("mlx_vlm.generate")  # the package (mlx_vlm.generate is a function)
    monkeypatch.setattr(prefill_module, "CHUNK_TOKENS", CHUNK)
    handed, real_step = [], vlm_generate.generate_step

    def generate_step(input_ids, *args, **kwargs):
        handed.append(input_ids.shape[1])
        return real_step(input_ids, *args, **kwargs)

    monkeypatch.setattr(vlm_generate, "generate_step", generate_step)
    logprobs, real_steps = {}, vision.ImageTurn.steps  # each turn's log-probabilities, step by step

    def steps(turn, max_tokens, sampler):
        for response in real_steps(turn, max_tokens, sampler):
            logprobs.setdefault(id(turn), []).append(response.logprobs)
            yield response

    monkeypatch.setattr(vision.ImageTurn, "steps", steps)
    states, real_caches = [], vision.to_vlm_caches
    monkeypatch.setattr(vision, "to_vlm_caches", lambda caches: states.append(prompt_cache.freeze(caches))
                        or real_caches(caches))
    run("-m", MODEL, "-a", str(pictures["a"]), "-a", str(pictures["c"]), *GREEDY, "Compare them.")
    run("-c", "-a", str(pictures["d"]), *GREEDY, "And this one?")
    first, follow = turns
    assert handed == [1, 1]
    assert first.cached == 0 and len(states) == 1  # the follow-up continued a state; the new image was not in it
    assert follow.cached >= first.images.spans[-1][1] and follow.images.spans[-1][0] >= follow.cached
    assert len(follow.prompt_ids) - follow.cached > 2 * CHUNK
    for turn, caches in ((first, None), (follow, states[0])):
        split = {}
        if turn.checkpoint is not None and turn.cached < turn.checkpoint:  # where our prefill splits the prompt
            split = {"prompt_cache_checkpoint_len": turn.checkpoint - turn.cached,
                     "prompt_cache_checkpoint": lambda *_: None}
        _, loop = mlx_vlm_loop(reference[0], turn.images, turn.cached, caches, max_tokens=10, **split)
        want = list(loop)
        assert len({int(token) for token, _ in want}) > 3 and len(turn.generated) > 3
        assert turn.generated == [int(token) for token, _ in want[:len(turn.generated)]]
        assert all(mx.array_equal(ours, theirs).item() for ours, (_, theirs) in zip(logprobs[id(turn)], want))


# ------------------------------------------------------------------------------ the prompt cache


def test_follow_ups_reuse_the_image_state_and_another_image_never_does(user, turns, reference, pictures):
    run("-m", MODEL, "-a", str(pictures["a"]), *GREEDY, "What is in the picture?")
    first = turns[-1]
    run("-c", *GREEDY, "And the colours?")  # llm -c: the earlier image comes back from logs.db
    follow = turns[-1]
    assert follow.images.digests == first.images.digests
    assert follow.cached >= first.images.spans[0][1]  # the state holding the image was reused
    run("-c", "-a", str(pictures["c"]), *GREEDY, "And this one?")  # a new image in a follow-up
    third = turns[-1]
    assert len(third.images.spans) == 2 and third.cached >= follow.cached
    assert third.images.spans[1][0] >= third.cached  # only the new image was encoded and processed
    rows = logged(user)
    assert [r["response_json"]["prompt_tokens_cached"] for r in rows] == [0, follow.cached, third.cached]

    # Another picture of the same size gives the same token ids: it must not continue picture a's state.
    run("-m", MODEL, "-a", str(pictures["b"]), *GREEDY, "What is in the picture?")
    other = turns[-1]
    assert other.prompt_ids == first.prompt_ids and other.images.digests != first.images.digests
    assert other.cached <= other.images.spans[0][0]
    assert other.generated == reference_tokens(reference, [pictures["b"]], "What is in the picture?")


def test_async_and_python_api(user, turns, pictures):
    import asyncio

    model = llm.get_model(MODEL)
    text = model.prompt("Describe it.", attachments=[llm.Attachment(path=str(pictures["d"]))],
                        temperature=0, thinking=False, max_tokens=6).text()
    sync_tokens = turns[-1].generated

    async def go():
        response = llm.get_async_model(MODEL).prompt("Describe it.", attachments=[llm.Attachment(
            path=str(pictures["d"]))], temperature=0, thinking=False, max_tokens=6, prompt_cache=False)
        return await response.text()

    assert asyncio.run(go()) == text and turns[-1].generated == sync_tokens


# ------------------------------------------------------------------------------ bad input


def fails(user_dir, *args) -> str:
    before = len(logged_turns(user_dir))
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert len(logged_turns(user_dir)) == before  # nothing logged as a success
    return lines[0]


def test_bad_images_fail_in_one_line_and_log_nothing(user, pictures, monkeypatch):
    assert "cannot read the image" in fails(user, "-m", MODEL, "-a", str(pictures["broken"]), "hi")
    assert "text/plain" in fails(user, "-m", MODEL, "-a", str(pictures["text"]), "hi")
    assert "without a vision encoder" in fails(user, "-m", "tiny-flash", "-a", str(pictures["a"]), "hi")
    from llm_flash_moe.bank import memory

    monkeypatch.setattr(memory, "bank_memory", lambda: (10_000, 10**9))
    assert "attach a smaller image" in fails(user, "-m", MODEL, "-a", str(pictures["a"]), "hi")


def test_without_mlx_vlm_the_error_names_the_extra(user, pictures, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mlx_vlm", None)  # import mlx_vlm raises ImportError
    assert "[vision]" in fails(user, "-m", MODEL, "-a", str(pictures["a"]), "hi")


def test_expand_and_key_ids():
    assert vision.expand([1, 9, 2, 9, 3], 9, [3, 1]) == [1, 9, 9, 9, 2, 9, 3]
    a = vision.Images([5, 9, 9, 9, 6], None, None, ["ab" * 32], [(1, 4)], [12], 9)
    b = vision.Images([5, 9, 9, 9, 6], None, None, ["cd" * 32], [(1, 4)], [12], 9)
    assert a.key_ids()[0] == 5 and a.key_ids()[4] == 6 and all(t < 0 for t in a.key_ids()[1:4])
    assert a.key_ids() != b.key_ids()
    assert a.splits(2) and not a.splits(1) and not a.splits(4)


def test_the_encoder_memory_estimate_covers_what_the_h100_measured():
    # benchmarks/vision_check.py on the H100, the 397B's encoder config (docs/PERFORMANCE.md): 0.29 GB above the
    # resident weights for 448x448 (784 patches), 12.4 GB for 1920x1080 (8,160); the refusal must not let through
    # an image whose encoding needs more than it estimates, nor refuse by more than half again
    from llm_flash_moe.engine.vision_memory import encoder_working_bytes

    config = {"num_heads": 16, "intermediate_size": 4304}
    for patches, measured in ((784, 294_127_016), (8160, 12_421_413_048)):
        estimate = encoder_working_bytes(config, [patches], fused=False)
        assert measured <= estimate <= 1.5 * measured
        # Metal's fused attention keeps no scores: the same picture is estimated well under CUDA's figure
        assert encoder_working_bytes(config, [patches], fused=True) < min(estimate, 10**9)


def test_a_picture_too_large_is_refused_with_the_size_that_fits(monkeypatch):
    import re
    from types import SimpleNamespace

    from llm_flash_moe.bank import memory
    from llm_flash_moe.engine import vision_memory
    from llm_flash_moe.errors import FlashMoeError

    config = {"num_heads": 16, "intermediate_size": 4304, "patch_size": 16}
    flash = SimpleNamespace(manifest=SimpleNamespace(config={"vision_config": config}))
    free = 4 * 10**9
    monkeypatch.setattr(memory, "bank_memory", lambda: (free, 10**10))
    with pytest.raises(FlashMoeError) as refused:  # a 1920x1080 picture on the CPU backend (attention not fused)
        vision_memory.check(flash, SimpleNamespace(patches=[8160]))
    megapixels = float(re.search(r"up to about ([0-9.]+) megapixels fits now", str(refused.value)).group(1))
    fits = round(megapixels * 1e6 / 256)
    assert vision_memory.encoder_working_bytes(config, [fits - 20], False) <= free
    assert vision_memory.encoder_working_bytes(config, [fits + 20], False) > free
    vision_memory.check(flash, SimpleNamespace(patches=[fits - 20]))  # what it names passes
