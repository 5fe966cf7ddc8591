"""Per-token time of constrained (``--schema``) against free decoding, through the llm plugin.

Runs the same prompt on a prepared model through ``llm.get_model(...)``, free and with a schema, for
exactly ``--tokens`` generated tokens each (the schema's answer is longer than that, so both runs stop at
max_tokens; the constrained run's cut-off error is expected and ignored), alternating the two for
``--repeats`` rounds after one warm-up each. Prints one JSON object: median ms per generated token of each
(mlx-lm's generation_tps, so prompt processing is excluded), the constrained runs' own mask time, and the
whole logits processor alone (mask, applying it to the logits in MLX, evaluated), without the model: on
random logits, each step's token the highest one the mask allows.

    llm flash-moe prepare --demo
    python benchmarks/constrained_decoding.py --model demo [--experts 1] [--tokens 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics

# A long answer in which nearly every token of the vocabulary is allowed most of the time (the costly case
# for the mask), and which cannot end before max_tokens.
SCHEMA = {"type": "object",
          "properties": {"notes": {"type": "array", "items": {"type": "string"}, "minItems": 10_000}},
          "required": ["notes"]}


def run(model, schema, args) -> dict:
    import llm

    options = {"max_tokens": args.tokens, "thinking": False, "seed": 0, "prompt_cache": False}
    if args.experts:
        options["experts"] = args.experts
    response = model.prompt("Write notes about mixture-of-experts models.", schema=schema, **options)
    try:
        response.text()
    except llm.ModelError as e:  # the constrained answer is cut off by max_tokens, by design
        if "cut off" not in str(e):
            raise
    usage = response.response_json
    return {"ms_per_token": 1e3 / usage["generation_tps"], "tokens": usage["generation_tokens"],
            "mask_ms_per_token": usage.get("mask_ms_per_token")}


def processor_alone(model_name: str, steps: int) -> float:
    """Median ms per token of the logits processor on its own: mask + application, evaluated."""
    import time

    import mlx.core as mx

    from llm_flash_moe.plugin import constrained, models as plugin
    from llm_flash_moe import registry
    from llm_flash_moe.plugin.settings import vocab_size

    flash = plugin.load(registry.model_dir(model_name))
    width = vocab_size(flash.manifest.config) or len(flash.tokenizer)
    constraint = constrained.for_response(flash.tokenizer, flash.directory, width, SCHEMA, None, False)
    tokens = mx.array([0], dtype=mx.uint32)  # the prompt (the processor never reads it)
    times = []
    for step in range(steps):
        logits = mx.random.normal((1, width))
        mx.eval(logits, tokens)
        started = time.perf_counter()
        masked = constraint(tokens, logits)
        mx.eval(masked)
        times.append((time.perf_counter() - started) * 1e3)
        tokens = mx.concatenate([tokens, mx.argmax(masked, axis=-1).astype(mx.uint32)])
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="a prepared model's name")
    parser.add_argument("--experts", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import llm

    model = llm.get_model(args.model + "-flash")
    run(model, None, args), run(model, SCHEMA, args)  # warm-up: load, page cache, llguidance's tokenizer
    free, constrained = [], []
    for _ in range(args.repeats):
        free.append(run(model, None, args))
        constrained.append(run(model, SCHEMA, args))

    def median(rows, key):
        return round(statistics.median(r[key] for r in rows), 3)

    print(json.dumps({
        "model": args.model, "experts": args.experts, "tokens": args.tokens, "repeats": args.repeats,
        "machine": platform.machine(),
        "free_ms_per_token": median(free, "ms_per_token"),
        "constrained_ms_per_token": median(constrained, "ms_per_token"),
        "constrained_mask_ms_per_token": median(constrained, "mask_ms_per_token"),
        "processor_alone_ms_per_token": round(processor_alone(args.model, args.tokens), 3),
        "free_runs": free, "constrained_runs": constrained,
    }, indent=2))


if __name__ == "__main__":
    main()
