"""Check and time the Metal expert kernels against their pure-MLX twin (run on an Apple-silicon Mac).

    python benchmarks/metal_check.py [--quick]

The same checks and timings as benchmarks/cuda_check.py (see its docstring), on the Metal backend:
every bits in (2, 3, 4, 8) x group size in (32, 64, 128) against the twin on the CPU stream, outputs
poisoned with NaN, pass at 1e-3 relative; then ms per layer for the twin and the kernel at the 397B's
shapes (k 4 and 10, 4-bit and 2-bit), and expert bytes per second against the measured copy and read
bandwidth. Prints one JSON object: please add it to docs/PERFORMANCE.md (## Kernels) with the Mac's
model; once it passes, llm_flash_moe.kernels.METAL_VERIFIED can become True (until then the engine
uses the twin on Metal unless LLM_FLASH_MOE_METAL_KERNEL=1).
"""

import importlib.util
import sys
from pathlib import Path

import mlx.core as mx

if __name__ == "__main__":
    if not mx.metal.is_available():
        sys.exit("metal_check.py needs MLX's Metal backend (an Apple-silicon Mac)")
    spec = importlib.util.spec_from_file_location("cuda_check", Path(__file__).with_name("cuda_check.py"))
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    check.main("metal")
