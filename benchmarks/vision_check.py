"""Images on a model of the 397B's shapes: the vision encoder's memory and time per image, and what an image
prompt's prefill reads.

    python benchmarks/vision_check.py --dir DIR [--layers 60] [--experts-per-layer 64] [--k 4] \
        [--images 448x448 1024x768 1920x1080] [--multi 4] [--bank-fraction 0.14] [--repeats 3]
    python benchmarks/vision_check.py --dir DIR --tiny --chunk 8   # the tiny test model, a check on any CPU

The language model is the bench's synthetic one (``synthetic/flash_model.py``: the 397B's per-layer shapes,
4-bit experts, written once under DIR and reused); this script adds a vision encoder of random bf16 weights
with the 397B's vision config (below) and a processor config, as ``prepare`` keeps them from the HF release.
Needs the ``vision`` extra. Prints one JSON object:

- ``encoder``: the encoder's parameter bytes, and the device memory it took when it loaded;
- ``images``, per image size: the image tokens it becomes, the encoder's time (median of ``--repeats`` after
  one warm-up) and its peak memory above what was resident before, and the prefill of a prompt holding it
  through the plugin's ``ImageTurn`` (layer by layer, one generated token); beside it a text prompt of as
  many random tokens;
- ``multi``: a prompt of ``--multi`` images of the largest size (several prompt chunks), through ``ImageTurn``
  and through mlx-vlm's own chunked prompt loop (``generate_step`` over the whole prompt, as image prompts ran
  before they were prefilled layer by layer), and a text prompt of as many tokens.

Every prefill starts from an empty bank of ``--bank-fraction`` of all experts (0.14: a 48 GB Mac's share of
the 397B at 4 bits, as the bench's prefill figure) with the expert files dropped from the page cache, and
reports expert records read, bytes, seconds, and the union of the experts requested (``vs_union``: records
read over that union; 1.0 is each expert read once per layer). The counts cover the prompt and its first
generated token: the prompt's last token is decoded alone, and mlx-vlm's loop also runs the generated token
through the model before handing it out (the text path puts that one off), so an image prompt's figures hold
two decoded tokens and a text prompt's one, whose experts a bank smaller than the union may read again.

``VISION_397B`` is the ``vision_config`` of Qwen/Qwen3.5-397B-A17B's config.json as vendored by
ai-dynamo/aiconfigurator (src/aiconfigurator/model_configs/Qwen--Qwen3.5-397B-A17B_config.json, commit
87fe4b0c7ef0004cbd45263de0be8aa89be5ebad), key for key. The 397B's own preprocessor_config.json was not found
in any public repository searched (GitHub code, issues, docs and pages for the model name, its config keys and
``"longest_edge": 16777216``); ``PROCESSOR_397B`` is the Qwen3.5 family's, as the public copies of other
Qwen3.5 / 3.6 releases' files give it (Qwen/Qwen3.5-2B-Base's preprocessor_config.json, printed in full in a
public session log, and the same ``size`` in Qwen/Qwen3.6-35B-A3B-FP8's). ``--vision-config FILE`` takes the
``vision_config`` of another config.json.
"""

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

VISION_397B = {"depth": 27, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1152, "in_channels": 3,
               "intermediate_size": 4304, "model_type": "qwen3_5_moe", "num_heads": 16, "num_position_embeddings": 2304,
               "out_hidden_size": 4096, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2}
PROCESSOR_397B = {"image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Qwen2VLImageProcessorFast",
                  "image_std": [0.5, 0.5, 0.5], "merge_size": 2, "patch_size": 16, "processor_class": "Qwen3VLProcessor",
                  "size": {"longest_edge": 16777216, "shortest_edge": 65536}, "temporal_patch_size": 2}


def add_vision(model_dir: Path, vision_config: dict, processor: dict) -> None:
    """Give a synthetic prepared model a random bf16 vision encoder under the HF release's names."""
    from llm_flash_moe.conversion.resident import write_resident
    from llm_flash_moe.flash_layout import VISION_WEIGHTS_NAME, Manifest
    from llm_flash_moe.synthetic.checkpoint import TinySpec, _Gen, _vision_tower
    from llm_flash_moe.synthetic.tokenizer import special_token_ids

    import mlx.core as mx

    manifest = Manifest.load(model_dir)
    if manifest.vision and manifest.config.get("vision_config") == vision_config:
        return
    gen = _Gen(TinySpec())
    _vision_tower(gen, vision_config)
    params = {k: mx.array(v).astype(mx.bfloat16) for k, v in gen.out.items()}
    del gen

    class Quiet:
        n, total = 0, 0

        def update(self, _):
            pass

    size, checksum = write_resident(params, model_dir / VISION_WEIGHTS_NAME, Quiet())
    ids = special_token_ids("tiny")  # the synthetic model's tokenizer
    config = dict(manifest.config, vision_config=vision_config, image_token_id=ids["<|image_pad|>"],
                  video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                  vision_end_token_id=ids["<|vision_end|>"])
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    (model_dir / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    files = [f for f in manifest.resident_files if f["file"] != VISION_WEIGHTS_NAME]
    files.append({"file": VISION_WEIGHTS_NAME, "bytes": size, "checksum": checksum})
    replace(manifest, config=config, resident_files=files,
            vision={"file": VISION_WEIGHTS_NAME, "tensors": len(params)}).write(model_dir)


def tiny_model(directory: Path) -> Path:
    from llm_flash_moe.conversion.prepare import PrepareOptions, prepare
    from llm_flash_moe.synthetic.checkpoint import TinySpec, write_hf_checkpoint

    out = directory / "tiny-vision"
    if not (out / "manifest.json").exists():
        source = write_hf_checkpoint(directory / "tiny-vision-hf", TinySpec(dtype="float32"), vision=True)
        prepare(PrepareOptions(source=str(source), name="tiny-vision", output=out), echo=lambda _: None)
    return out


class Picture:
    """An llm Attachment stand-in: random pixels of one size, as PNG bytes."""

    def __init__(self, width: int, height: int, seed: int = 0):
        import io

        from PIL import Image

        buffer = io.BytesIO()
        pixels = (np.random.default_rng([width * height, seed]).random((height, width, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(buffer, format="PNG")
        self.content, self.path, self.url = buffer.getvalue(), f"{width}x{height}.png", None

    def content_bytes(self) -> bytes:
        return self.content


def prefill(flash, tokens: int, run) -> dict:
    """Records and bytes read, the union of the experts requested, and seconds, for ``run()`` (a prompt of
    ``tokens`` tokens and one generated token), from an empty bank and the expert files out of the page cache."""
    import mlx.core as mx

    from llm_flash_moe.bank.bank_pool import drop_from_page_cache
    from llm_flash_moe.measure.benchmark import Requests

    flash.bank.clear()
    drop_from_page_cache([flash.directory / layer.file for layer in flash.manifest.expert_layers])
    requests = Requests(flash.bank)
    before = replace(flash.bank.stats)
    started = time.perf_counter()
    run()
    mx.eval(mx.zeros(1))
    seconds = time.perf_counter() - started
    flash.bank.trace = None
    stats = flash.bank.stats.since(before)
    union = len({(layer, e) for layer, experts in requests.calls for e in experts})
    return {"tokens": tokens, "records_read": stats.reads, "union_records": union,
            "vs_union": round(stats.reads / union, 3) if union else None, "bytes_read": stats.bytes_read,
            "seconds": round(seconds, 3)}


def image_turn(flash, images):
    """The plugin's path: ``ImageTurn`` (the prompt layer by layer), one generated token."""
    from mlx_lm.sample_utils import make_sampler

    from llm_flash_moe.engine import vision

    def run():
        for _ in vision.ImageTurn(flash, images.input_ids, images).steps(1, make_sampler(0.0)):
            pass

    return prefill(flash, len(images.input_ids), run)


def mlx_vlm_chunked(flash, images, chunk: int):
    """mlx-vlm's own prompt loop over the same engine: ``generate_step`` on the whole prompt, ``chunk``-token
    prefill steps, one generated token (how image prompts ran before the layer-major prefill)."""
    import mlx.core as mx
    from mlx_vlm.generate import generate_step

    from llm_flash_moe.engine import vision

    model = vision.vision_model(flash).model
    lm = model.language_model

    def run():
        lm._position_ids = lm._rope_deltas = None
        for _ in generate_step(mx.array(images.input_ids)[None], model, images.pixel_values, None, max_tokens=1,
                               sampler=lambda lp: mx.argmax(lp, axis=-1), prompt_cache=lm.make_cache(),
                               prefill_step_size=chunk, image_grid_thw=images.grid_thw):
            pass

    return prefill(flash, len(images.input_ids), run)


def text_turn(flash, tokens: int):
    """A text prompt of ``tokens`` tokens through the plugin's ``Turn`` (also layer by layer)."""
    from mlx_lm.sample_utils import make_sampler

    from llm_flash_moe.engine.session import Turn

    # random ids (a fixed seed per length): a repeated word would route every token to the same experts
    vocab = min(flash.tokenizer.vocab_size, flash.model.model.embed_tokens.weight.shape[0])  # no special tokens
    ids = np.random.default_rng(tokens).integers(0, vocab, tokens).tolist()

    def run():
        for _ in Turn(flash, ids).steps(1, make_sampler(0.0)):
            pass

    return prefill(flash, tokens, run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="where the synthetic model is written (reused)")
    parser.add_argument("--layers", type=int, default=60)
    parser.add_argument("--experts-per-layer", type=int, default=64)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--k", type=int, default=4, help="experts per token")
    parser.add_argument("--images", nargs="+", default=["448x448", "1024x768", "1920x1080"])
    parser.add_argument("--multi", type=int, default=4,
                        help="images of the largest size in one prompt for the layer-major / chunked comparison (0: none)")
    parser.add_argument("--bank-fraction", type=float, default=0.14, help="the expert bank's share of all experts")
    parser.add_argument("--chunk", type=int, default=None,
                        help="prompt chunk of both prompt loops (default mlx's 2048; small values show the chunked "
                             "loop's re-reads on the tiny model)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vision-config", type=Path, help="a config.json whose vision_config to use")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model instead (a CPU check)")
    args = parser.parse_args()

    import mlx.core as mx

    from llm_flash_moe.engine import prefill as prefill_module
    from llm_flash_moe.engine import vision
    from llm_flash_moe.engine.loader import all_experts_bytes, load_flash_model
    from llm_flash_moe.plugin.chat import render_prompt

    args.dir.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        model_dir = tiny_model(args.dir)
    else:
        from llm_flash_moe.synthetic.flash_model import write_synthetic_model

        model_dir = args.dir / f"qwen397-vision-{args.layers}l-{args.experts_per_layer}e-{args.bits}b"
        write_synthetic_model(model_dir, layers=args.layers, bits=args.bits, experts_per_layer=args.experts_per_layer)
        config = VISION_397B
        if args.vision_config:
            config = json.loads(args.vision_config.read_text())["vision_config"]
        add_vision(model_dir, config, PROCESSOR_397B)
    if args.chunk:
        prefill_module.CHUNK_TOKENS = args.chunk
    chunk = prefill_module.CHUNK_TOKENS
    from llm_flash_moe.flash_layout import Manifest

    manifest = Manifest.load(model_dir)
    flash = load_flash_model(model_dir, experts_per_token=args.k,
                             bank_bytes=int(round(args.bank_fraction * all_experts_bytes(manifest))))
    out = {"model": str(model_dir), "device": str(mx.default_device()), "layers": len(manifest.expert_layers),
           "experts_per_layer": manifest.num_experts, "experts_per_token": args.k, "bank_fraction": args.bank_fraction,
           "bank_slots": flash.bank.slots, "prompt_chunk": chunk, "vision_config": manifest.config["vision_config"]}
    mx.synchronize()
    active = mx.get_active_memory()
    started = time.perf_counter()
    vlm = vision.vision_model(flash)
    mx.synchronize()
    out["encoder"] = {"parameter_bytes": vlm.vision_bytes, "load_seconds": round(time.perf_counter() - started, 3),
                      "device_memory_bytes": mx.get_active_memory() - active}

    def prompt(pictures):
        text = render_prompt(flash.tokenizer, [{"role": "user", "content": [{"type": "image"} for _ in pictures] + [
            {"type": "text", "text": "Describe these pictures in detail."}]}], False)
        return vision.for_prompt(flash, "bench", text, pictures)

    out["images"] = []
    for size in args.images:
        width, height = (int(v) for v in size.split("x"))
        images = prompt([Picture(width, height)])
        encoder = vlm.model.vision_tower
        times = []
        mx.synchronize()
        resident = mx.get_active_memory()
        mx.reset_peak_memory()
        for _ in range(args.repeats + 1):
            started = time.perf_counter()
            mx.eval(encoder(images.pixel_values.astype(encoder.patch_embed.proj.weight.dtype), images.grid_thw)[0])
            times.append(time.perf_counter() - started)
        row = {"image": size, "grid_thw": images.grid_thw.tolist()[0], "image_tokens": images.counts[0],
               "prompt_tokens": len(images.input_ids), "encode_seconds": round(statistics.median(times[1:]), 4),
               "encode_peak_bytes_above_resident": mx.get_peak_memory() - resident, "image_prompt": image_turn(flash, images),
               "text_prompt": text_turn(flash, len(images.input_ids))}
        out["images"].append(row)
        print(json.dumps(row), flush=True)
    if args.multi:
        width, height = max((tuple(int(v) for v in size.split("x")) for size in args.images), key=lambda s: s[0] * s[1])
        images = prompt([Picture(width, height, seed) for seed in range(args.multi)])
        out["multi"] = {"images": args.multi, "image": f"{width}x{height}", "image_tokens": sum(images.counts),
                        "prompt_tokens": len(images.input_ids),
                        "prompt_chunks": -(-(len(images.input_ids) - 1) // chunk),
                        "image_prompt_layer_major": image_turn(flash, images),
                        "image_prompt_mlx_vlm_chunked": mlx_vlm_chunked(flash, images, chunk),
                        "text_prompt": text_turn(flash, len(images.input_ids))}
        print(json.dumps(out["multi"]), flush=True)
    flash.close()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
