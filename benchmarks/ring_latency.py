"""The ring backend's latency for what a cluster sends per token: one MoE layer's all_sum (4,096 float32
values, 16 KB) and the per-call header (18 int32, 72 bytes, for 2 ranks), between the machines MLX's
launcher starts it on. Rank 0 prints one JSON line; plug ``moe_all_sum_us`` into docs/CLUSTER.md's projection.

    mlx.launch --hosts IP_OF_MAC_1,IP_OF_MAC_2 --backend ring -- python benchmarks/ring_latency.py [REPEATS]
"""

import json
import sys
import time

import mlx.core as mx
import numpy as np


def median_us(group, stream, array, repeats: int) -> dict:
    for _ in range(50):  # warm-up
        mx.eval(mx.distributed.all_sum(array, group=group, stream=stream))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(mx.distributed.all_sum(array, group=group, stream=stream))
        times.append((time.perf_counter() - start) * 1e6)
    return {"median": round(float(np.median(times)), 1), "p90": round(float(np.percentile(times, 90)), 1)}


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    group = mx.distributed.init(strict=True, backend="ring")
    stream = mx.new_stream(mx.cpu)
    moe = median_us(group, stream, mx.ones((4096,), dtype=mx.float32), repeats)
    header = median_us(group, stream, mx.ones((16 + group.size(),), dtype=mx.int32), repeats)
    if group.rank() == 0:
        print(json.dumps({"ranks": group.size(), "repeats": repeats, "moe_all_sum_us": moe, "header_us": header,
                          "per_token_60_layers_ms": round((60 * moe["median"] + header["median"]) / 1000, 2)}))


if __name__ == "__main__":
    main()
