"""How this machine's disk reads expert records cold: GB/s by requests in flight and piece size.

    python benchmarks/disk_check.py MODEL_DIR [--records 48] [--threads 1 2 4 8 16] [--pieces-kb 0 4096 1024 256]

MODEL_DIR is a prepared model (or the bench's synthetic one). For each piece size (0 = whole records) and
each thread count, ``--records`` records chosen at random (a fresh set for every setting, across the layer
files) are read with the page cache dropped first, one record at a time as a layer's single miss would be:
its pieces spread over the threads, the next record started when the last one is done. This is the case the
expert bank's ``bank_pool.READ_PIECE_BYTES`` is for (docs/PERFORMANCE.md). Linux only (the page cache has to be
dropped). Prints one JSON object.
"""

import argparse
import json
import mmap
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from llm_flash_moe.bank.bank_pool import drop_from_page_cache, pieces
from llm_flash_moe.flash_layout import Manifest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--records", type=int, default=48)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--pieces-kb", type=int, nargs="+", default=[0, 4096, 1024, 256])
    args = parser.parse_args()
    manifest = Manifest.load(args.model_dir)
    layers = manifest.expert_layers
    files = [args.model_dir / l.file for l in layers]
    size = layers[0].layout.record_size
    fds = [os.open(f, os.O_RDONLY) for f in files]
    buffer = mmap.mmap(-1, size)
    rng = np.random.default_rng(0)
    out = {"record_bytes": size, "records_per_setting": args.records, "gbps": {}}
    for piece_kb in args.pieces_kb:
        ranges = pieces(size, piece_kb * 1024 or size)
        for threads in args.threads:
            if not drop_from_page_cache(files):
                sys.exit("disk_check: the page cache cannot be dropped on this system (Linux only)")
            picks = [(int(rng.integers(len(fds))), int(rng.integers(layers[0].num_experts))) for _ in range(args.records)]
            with ThreadPoolExecutor(threads) as pool:
                start = time.perf_counter()
                for f, e in picks:
                    list(pool.map(lambda r: os.preadv(fds[f], [memoryview(buffer)[r[0]:r[1]]], e * size + r[0]), ranges))
                seconds = time.perf_counter() - start
            key = f"{'whole' if not piece_kb else f'{piece_kb}KB'} x{threads}"
            out["gbps"][key] = round(args.records * size / seconds / 1e9, 3)
            print(f"{key}: {out['gbps'][key]} GB/s", file=sys.stderr, flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
