"""The decode benchmark: the same command as `llm flash-moe bench` (same options), without llm.

    python benchmarks/bench.py --dir /fast/disk/bench [--layers 4] [--bits 4 --bits 2] [--experts 4 --experts 10]
"""

from llm_flash_moe.plugin.bench_cli import bench

if __name__ == "__main__":
    bench()
