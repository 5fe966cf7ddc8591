"""Check and time the Metal expert kernels, and time the expert bank's hits and misses (an Apple-silicon Mac).

    python benchmarks/metal_check.py [--quick] [--no-bank] [--dir /fast/disk/flash-moe-bench]

1. The same checks and timings as benchmarks/cuda_check.py (see its docstring), on the Metal backend:
   every bits in (2, 3, 4, 8) x group size in (32, 64, 128) against the twin on the CPU stream, experts
   picked by slot from a bank, outputs poisoned with NaN, pass at 1e-3 relative; then ms per layer for the
   twin and the kernel at the 397B's shapes (k 4 and 10, 4-bit and 2-bit).
2. The expert bank on this Mac's unified memory and SSD (``llm flash-moe bench`` on a 4-layer model of
   the 397B's shapes with 64 experts per layer, 1.8 GB at 4 bits, built once in ``--dir``): a bank of every
   expert (every layer a hit; then filled: no host synchronization) against a bank of a third of them
   (misses read from the SSD, dropped from the page cache with F_NOCACHE), with mlx-lm's time with every
   expert resident, the sync floor and the SSD's cold bandwidth beside them. ``--no-bank`` skips it.

Prints one JSON object: please add it to docs/PERFORMANCE.md (## Kernels, ## Decode) with the Mac's model;
once the kernel checks pass, llm_flash_moe.kernels.METAL_VERIFIED can become True (until then the engine
uses the twin on Metal unless LLM_FLASH_MOE_METAL_KERNEL=1).
"""

import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import mlx.core as mx


def bank_timings(directory: Path) -> dict:
    from llm_flash_moe.measure.benchmark import BenchOptions, run

    opts = BenchOptions(layers=4, experts_per_layer=64, bits=(4,), experts=(4,), tokens=16, repeats=3,
                        prompt_tokens=(), calibration_layers=0, directory=directory)
    return run(opts, log=lambda line: print(line, file=sys.stderr, flush=True))


if __name__ == "__main__":
    if not mx.metal.is_available():
        sys.exit("metal_check.py needs MLX's Metal backend (an Apple-silicon Mac)")
    spec = importlib.util.spec_from_file_location("cuda_check", Path(__file__).with_name("cuda_check.py"))
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    check.main("metal")  # prints the kernels' JSON
    if "--no-bank" not in sys.argv:
        where = sys.argv[sys.argv.index("--dir") + 1] if "--dir" in sys.argv else tempfile.mkdtemp(prefix="flash-moe-")
        print(json.dumps({"bank": bank_timings(Path(where))}))
