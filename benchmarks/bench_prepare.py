"""Conversion throughput and peak memory of `prepare`, against the disk's raw write speed in the same run.

Builds a synthetic bf16 HF checkpoint with the 397B's real per-layer shapes (hidden 4096, expert
intermediate 1024, the real attention and DeltaNet dimensions; fewer experts and a small vocabulary
keep it to a few GB), converts it in a child process (so its peak RSS is the converter's alone), and
writes a file of the same size with plain large sequential writes for comparison. Prints one JSON object.

    python benchmarks/bench_prepare.py --dir /path/on/the/disk/to/test [--experts 16] [--bits 4]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONVERT = """
import sys, time
from pathlib import Path
from llm_flash_moe.conversion.prepare import PrepareOptions, prepare
start = time.perf_counter()
prepare(PrepareOptions(source=sys.argv[1], name="bench-prepare", output=Path(sys.argv[2]), bits=int(sys.argv[3])),
        echo=lambda _: None)
print(time.perf_counter() - start)
"""


def raw_write_gbps(path: Path, nbytes: int, chunk: int = 64 << 20) -> float:
    block = os.urandom(chunk)
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    written = 0
    while written < nbytes:
        written += os.write(fd, block)
    os.fsync(fd)
    os.close(fd)
    elapsed = time.perf_counter() - start
    path.unlink()
    return written / elapsed / 1e9


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main():
    from llm_flash_moe.synthetic.checkpoint import TinySpec, write_hf_checkpoint
    from llm_flash_moe.synthetic.flash_model import qwen397_spec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--bits", type=int, default=4)
    args = parser.parse_args()

    real = qwen397_spec(args.layers)
    spec = TinySpec(**{**real.__dict__, "num_experts": args.experts, "num_experts_per_tok": 4, "vocab_size": 8192})
    source, output = args.dir / "source", args.dir / "prepared"
    if not (source / "config.json").exists():
        write_hf_checkpoint(source, spec, expert_layout="fused", num_shards=4, include_extras=False)
    shutil.rmtree(output, ignore_errors=True)
    env = {**os.environ, "LLM_USER_PATH": str(args.dir / "llm"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    seconds = float(subprocess.run([sys.executable, "-c", CONVERT, str(source), str(output), str(args.bits)],
                                   env=env, check=True, capture_output=True, text=True).stdout.split()[-1])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    out_bytes, in_bytes = dir_bytes(output), dir_bytes(source)
    write = raw_write_gbps(args.dir / "raw-write-test", out_bytes)
    largest = max(p.stat().st_size for p in source.glob("*.safetensors"))
    print(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "experts_per_layer": args.experts, "layers": args.layers,
        "bits": args.bits, "source_gb": round(in_bytes / 1e9, 2), "output_gb": round(out_bytes / 1e9, 2),
        "seconds": round(seconds, 1), "source_read_gbps": round(in_bytes / seconds / 1e9, 3),
        "output_write_gbps": round(out_bytes / seconds / 1e9, 3), "raw_write_gbps": round(write, 3),
        "ratio_vs_raw_write": round(out_bytes / seconds / 1e9 / write, 3),
        "peak_rss_gb": round(peak / 1e9, 2), "largest_source_shard_gb": round(largest / 1e9, 2),
    }, indent=1))


if __name__ == "__main__":
    main()
