"""Images on a model of the 397B's shapes: the vision encoder's memory and time per image, and what an image
prompt's prefill reads.

    python benchmarks/vision_check.py --dir DIR [--layers 60] [--experts-per-layer 64] [--k 4] \
        [--images 448x448 1024x768 1920x1080] [--repeats 3]
    python benchmarks/vision_check.py --dir DIR --tiny        # the tiny test model, a check on any CPU

The language model is the bench's synthetic one (``synthetic/flash_model.py``: the 397B's per-layer shapes,
4-bit experts, written once under DIR and reused); this script adds a vision encoder of random bf16 weights
with the shapes below and a processor config, as ``prepare`` keeps them from the HF release. Needs the
``vision`` extra. Prints one JSON object:

- ``encoder``: the encoder's parameter bytes, and the device memory it took when it loaded;
- per image size: the image tokens it becomes, the encoder's time (median of ``--repeats`` after one warm-up)
  and peak memory, and the prefill of a prompt holding it (through the plugin's ``ImageTurn``, one generated
  token, a bank that holds every expert and starts empty): expert records read, bytes, seconds; beside it the
  same for a text prompt of as many tokens.

The 397B's vision config (``VISION_397B``) is not in this repository: the values are those two public
reimplementations of Qwen3.5 give for the 397B (depth 27, width 1152, 16 heads, MLP 4304, 16-pixel patches merged
2 x 2 into the text width 4096, 2304 position embeddings), the Qwen3-VL encoder's. Check them against the
release's config.json when you have it (``--vision-config FILE`` takes its ``vision_config``).
"""

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

VISION_397B = {"deepstack_visual_indexes": [], "depth": 27, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1152,
               "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4304, "model_type": "qwen3_5_moe",
               "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 4096, "patch_size": 16,
               "spatial_merge_size": 2, "temporal_patch_size": 2}
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

    def __init__(self, width: int, height: int):
        import io

        from PIL import Image

        buffer = io.BytesIO()
        pixels = (np.random.default_rng(width * height).random((height, width, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(buffer, format="PNG")
        self.content, self.path, self.url = buffer.getvalue(), f"{width}x{height}.png", None

    def content_bytes(self) -> bytes:
        return self.content


def prefill(flash, turn) -> dict:
    """Records and bytes read, and seconds, for the turn's prompt plus one generated token, from an empty bank."""
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    flash.bank.resize(flash.bank.budget_bytes)  # empty
    before = replace(flash.bank.stats)
    started = time.perf_counter()
    for _ in turn.steps(1, make_sampler(0.0)):
        pass
    mx.eval(mx.zeros(1))
    stats = flash.bank.stats.since(before)
    return {"tokens": len(turn.prompt_ids), "records_read": stats.reads, "bytes_read": stats.bytes_read,
            "seconds": round(time.perf_counter() - started, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="where the synthetic model is written (reused)")
    parser.add_argument("--layers", type=int, default=60)
    parser.add_argument("--experts-per-layer", type=int, default=64)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--k", type=int, default=4, help="experts per token")
    parser.add_argument("--images", nargs="+", default=["448x448", "1024x768", "1920x1080"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vision-config", type=Path, help="a config.json whose vision_config to use")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model instead (a CPU check)")
    args = parser.parse_args()

    import mlx.core as mx

    from llm_flash_moe.engine import vision
    from llm_flash_moe.plugin.chat import render_prompt
    from llm_flash_moe.engine.loader import all_experts_bytes, load_flash_model
    from llm_flash_moe.engine.session import Turn

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
    from llm_flash_moe.flash_layout import Manifest

    manifest = Manifest.load(model_dir)
    flash = load_flash_model(model_dir, experts_per_token=args.k, bank_bytes=all_experts_bytes(manifest))
    out = {"model": str(model_dir), "device": str(mx.default_device()), "layers": len(manifest.expert_layers),
           "experts_per_layer": manifest.num_experts, "experts_per_token": args.k,
           "vision_config": manifest.config["vision_config"]}
    mx.synchronize()
    active = mx.get_active_memory()
    started = time.perf_counter()
    vlm = vision.vision_model(flash)
    mx.synchronize()
    out["encoder"] = {"parameter_bytes": vlm.vision_bytes, "load_seconds": round(time.perf_counter() - started, 3),
                      "device_memory_bytes": mx.get_active_memory() - active}
    text = render_prompt(flash.tokenizer, [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Describe this picture in detail."}]}], False)
    out["images"] = []
    for size in args.images:
        width, height = (int(v) for v in size.split("x"))
        images = vision.for_prompt(flash, "bench", text, [Picture(width, height)])
        encoder = vlm.model.vision_tower
        times = []
        mx.reset_peak_memory()
        for _ in range(args.repeats + 1):
            started = time.perf_counter()
            mx.eval(encoder(images.pixel_values.astype(encoder.patch_embed.proj.weight.dtype), images.grid_thw)[0])
            times.append(time.perf_counter() - started)
        row = {"image": size, "grid_thw": images.grid_thw.tolist()[0], "image_tokens": images.counts[0],
               "prompt_tokens": len(images.input_ids), "encode_seconds": round(statistics.median(times[1:]), 4),
               "encode_peak_memory_bytes": mx.get_peak_memory()}
        row["image_prompt"] = prefill(flash, vision.ImageTurn(flash, images.input_ids, images))
        text_ids = flash.tokenizer.encode("picture " * len(images.input_ids), add_special_tokens=False)
        row["text_prompt"] = prefill(flash, Turn(flash, text_ids[:len(images.input_ids)]))
        out["images"].append(row)
        print(json.dumps(row), flush=True)
    flash.close()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
