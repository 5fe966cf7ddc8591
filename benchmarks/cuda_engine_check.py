"""End-to-end check of the streaming engine on MLX's CUDA backend: the fused kernel path (with and without
prefetch) against the pure-MLX twin on the same prepared tiny model. Prints one JSON object; exit 1 on a
mismatch. Needs no llm install (the model is not registered).

    MLX_PTX_CACHE_DIR=/tmp/mlxptx python benchmarks/cuda_engine_check.py /tmp/cuda-check
"""

import json
import os
import sys
from pathlib import Path

import mlx.core as mx

from llm_flash_moe import kernels, registry
from llm_flash_moe.conversion.prepare import PrepareOptions, prepare
from llm_flash_moe.engine import load_flash_model
from llm_flash_moe.synthetic.checkpoint import TinySpec, write_hf_checkpoint

PROMPT = "The quick brown fox jumps over the lazy dog. " * 3


def run(model_dir: Path, prefetch: bool, twin: bool, tokens=None):
    """Logits of the prompt's last position and of 8 decoded tokens (greedy, or ``tokens`` if given)."""
    os.environ[kernels.ENV_KERNEL] = "twin" if twin else "auto"
    flash = load_flash_model(model_dir, prefetch=prefetch)
    ids = flash.tokenizer.encode(PROMPT)
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(flash.model)
    logits = [flash.model(mx.array(ids)[None], cache=cache)[0, -1]]
    chosen = []
    for i in range(8):  # one token at a time: the decode (kernel) path
        token = tokens[i] if tokens else mx.argmax(logits[-1]).item()
        chosen.append(token)
        logits.append(flash.model(mx.array([[token]]), cache=cache)[0, -1])
    out = mx.stack(logits).astype(mx.float32)
    mx.eval(out)
    flash.close()
    return out, chosen, kernels.backend()


def main(root: Path):
    registry.register = lambda *args, **kwargs: None  # no llm here: do not register
    spec = TinySpec(dtype=os.environ.get("CHECK_DTYPE", "bfloat16"), hidden_size=int(os.environ.get("CHECK_HIDDEN", 64)))
    hf = write_hf_checkpoint(root / "hf", spec)
    print("checkpoint written", flush=True)
    prepared = root / "prepared"
    prepare(PrepareOptions(source=str(hf), name="cuda-check", output=prepared), echo=lambda _: None)
    print("prepared", flush=True)
    reference, tokens, _ = run(prepared, prefetch=False, twin=True)
    print("twin done", flush=True)
    result = {"device": str(mx.default_device())}
    ok = True
    for prefetch in (False, True):
        out, _, backend = run(prepared, prefetch=prefetch, twin=False, tokens=tokens)
        err = float(mx.max(mx.abs(out - reference)) / mx.max(mx.abs(reference)))
        result[f"{backend}_prefetch_{prefetch}_max_rel_err"] = err
        ok &= err <= 2e-2 and bool(mx.all(mx.isfinite(out)))
    result["ok"] = ok
    print(json.dumps(result))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/cuda-check"))
