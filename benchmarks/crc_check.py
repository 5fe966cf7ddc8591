"""What checking every expert record's CRC-32 as it is read costs, against the time of a disk-bound token.

    python benchmarks/crc_check.py [--dir DIR] [--layers 8] [--experts 32] [--experts-per-token 4] [--tokens 16]
                                   [--threads 8] [--bits 4] [--disk-gbps 1.4 5 17]

Writes ``--layers`` expert files of ``--experts`` random records of Qwen3.5-397B's record layout (hidden 4096,
expert width 1024, ``--bits``, group 64) into DIR (a temporary directory on the disk to measure by default),
then reads ``--tokens`` tokens' worth of records (``--experts-per-token`` random experts per layer, every
layer's records at once, in pieces on ``--threads`` read threads, exactly as the expert bank does: bank_pool's
Pool and Readers) with the check off and on, from the page cache (warm: the worst case for the check, reads
cost nothing) and, where the page cache can be dropped (Linux), from the disk (cold). Also: zlib.crc32's own
throughput on one thread and on ``--threads``, and from it the check's share of a disk-bound token at each
``--disk-gbps`` if none of it overlapped the reads (an upper bound). Prints one JSON object.
"""

import argparse
import json
import os
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from llm_flash_moe.bank.bank_pool import Pool, Readers, RecordRead, drop_from_page_cache
from llm_flash_moe.flash_layout import ExpertQuantization, RecordLayout, record_checksum


def write_layers(directory: Path, layout: RecordLayout, layers: int, experts: int, rng) -> list:
    """Expert files of random records; returns each layer's record checksums."""
    checksums = []
    for layer in range(layers):
        crcs = []
        with open(directory / f"layer-{layer:03d}.bin", "wb") as f:
            for _ in range(experts):
                record = rng.integers(0, 256, layout.record_size, dtype=np.uint8).tobytes()
                crcs.append(record_checksum(record))
                f.write(record)
        checksums.append(crcs)
    return checksums


def decode(pools, fds, checksums, picks, readers, layout) -> float:
    """Seconds to read every token's records (``picks``: per token, per layer, the experts), the bank's way."""
    start = time.perf_counter()
    for token in picks:
        for layer, experts in enumerate(token):
            pool = pools[layer]
            reads = []
            for slot, e in enumerate(experts):
                futures = [readers.submit(Readers.URGENT, pool.read, fds[layer], e * layout.record_size, slot, i)
                           for i in range(len(pool.pieces))]

                def check(pool=pool, slot=slot, expected=checksums[layer][e]):
                    if pool.record_checksum(slot) != expected:
                        raise SystemExit("crc_check: a record read back with another checksum")

                reads.append(RecordRead(futures, check if pool.checking else None))
            for read in reads:
                read.result()
    return time.perf_counter() - start


def crc_rate(threads: int, piece: int = 1 << 20, total: int = 512 << 20) -> float:
    """zlib.crc32 GB/s over 1 MiB pieces on ``threads`` threads."""
    data = np.random.default_rng(1).integers(0, 256, piece, dtype=np.uint8).tobytes()
    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        list(pool.map(zlib.crc32, [data] * (total // piece)))
        return total / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--experts-per-token", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--disk-gbps", type=float, nargs="+", default=[1.4, 5.0, 17.0])
    args = parser.parse_args()
    layout = RecordLayout.for_expert(4096, 1024, ExpertQuantization(args.bits, 64), "bfloat16")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="crc-check-") as tmp:
        directory = Path(tmp)
        print(f"writing {args.layers} x {args.experts} records of {layout.record_size:,} bytes...", file=sys.stderr)
        checksums = write_layers(directory, layout, args.layers, args.experts, rng)
        files = [directory / f"layer-{layer:03d}.bin" for layer in range(args.layers)]
        fds = [os.open(f, os.O_RDONLY) for f in files]
        picks = [[rng.choice(args.experts, args.experts_per_token, replace=False).tolist()
                  for _ in range(args.layers)] for _ in range(args.tokens)]
        per_token = args.layers * args.experts_per_token * layout.record_size
        out = {"record_bytes": layout.record_size, "layers": args.layers, "experts_per_token": args.experts_per_token,
               "tokens": args.tokens, "read_threads": args.threads, "bytes_per_token": per_token,
               "cpu_count": os.cpu_count(), "zlib": zlib.ZLIB_RUNTIME_VERSION}
        readers = Readers(args.threads)
        try:
            pools = {check: [Pool(layout, args.experts_per_token, None, check=check) for _ in range(args.layers)]
                     for check in (False, True)}
            for kind in ("warm", "cold"):
                for check in (False, True):
                    if kind == "warm":
                        decode(pools[check], fds, checksums, picks, readers, layout)  # into the page cache
                    elif not drop_from_page_cache(files):
                        out["cold"] = "the page cache cannot be dropped here (Linux only)"
                        break
                    seconds = decode(pools[check], fds, checksums, picks, readers, layout)
                    key = f"{kind}_{'check' if check else 'no_check'}_ms_per_token"
                    out[key] = round(seconds / args.tokens * 1e3, 2)
                    print(f"{key}: {out[key]}", file=sys.stderr, flush=True)
                else:
                    added = out[f"{kind}_check_ms_per_token"] - out[f"{kind}_no_check_ms_per_token"]
                    out[f"{kind}_added_percent"] = round(100 * added / out[f"{kind}_no_check_ms_per_token"], 1)
        finally:
            readers.shutdown()
            for fd in fds:
                os.close(fd)
    out["crc_gbps_1_thread"] = round(crc_rate(1), 2)
    out[f"crc_gbps_{args.threads}_threads"] = parallel = round(crc_rate(args.threads), 2)
    # the check's time if none of it overlapped the reads, as a share of a token that reads at disk speed
    out["upper_bound_percent_of_disk_token"] = {str(gbps): round(100 * gbps / parallel, 1) for gbps in args.disk_gbps}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
