"""Expert parallelism on one machine: the decode on 2 local ranks (ring over loopback) beside 1 rank.

    python benchmarks/bench_ranks.py OUT.json [--ranks 2] [--layers 60] [--experts-per-layer 64] [--experts 4]
        [--tokens 16] [--repeats 3] [--bank-fraction 1] [--dir /tmp/flash-moe-bench] [--build-only]

Builds the synthetic model of the 397B's shapes first (reused when one with the same settings is in --dir; a
build that is interrupted starts again), then runs ``llm flash-moe bench --ranks N`` on it, writes its JSON to
OUT.json and prints one summary line per rank. ``--build-only`` stops after the build (to split a long first
run in two commands).
"""

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--layers", type=int, default=60)
    parser.add_argument("--experts-per-layer", type=int, default=64)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--experts", type=int, action="append")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bank-fraction", type=float, default=1.0)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/flash-moe-bench"))
    parser.add_argument("--build-only", action="store_true")
    args = parser.parse_args()

    from llm_flash_moe.measure.benchmark import synthetic_model_dir
    from llm_flash_moe.measure.distributed_bench import ClusterBenchOptions, run
    from llm_flash_moe.synthetic.flash_model import write_synthetic_model

    model_dir = synthetic_model_dir(args.dir, args.layers, args.experts_per_layer, args.bits)
    start = time.perf_counter()
    write_synthetic_model(model_dir, layers=args.layers, bits=args.bits, experts_per_layer=args.experts_per_layer)
    print(f"model {model_dir}: ready after {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    if args.build_only:
        return
    opts = ClusterBenchOptions(ranks=args.ranks, layers=args.layers, experts_per_layer=args.experts_per_layer,
                               bits=args.bits, experts=tuple(args.experts or [4]), tokens=args.tokens,
                               repeats=args.repeats, bank_fraction=args.bank_fraction, directory=args.dir)
    result = run(opts, log=lambda line: print(line, file=sys.stderr, flush=True))
    args.out.write_text(json.dumps(result, indent=1))
    for r in result["results"]:
        one, many = r["one_rank"], r[f"{args.ranks}_ranks"]
        print(f"k={r['experts_per_token']}: 1 rank {one['ms_per_token']} ms/token warm, {one['first_pass_ms_per_token']} "
              f"cold, {one['bytes_read_per_token_first_pass'] / 1e6:.1f} MB/token cold | {args.ranks} ranks "
              f"{many['ms_per_token']} ms/token warm, {many['first_pass_ms_per_token']} cold")
        for p in many["per_rank"]:
            print(f"    rank {p['rank']}: {p['bytes_read_per_token_first_pass'] / 1e6:.1f} MB/token cold, "
                  f"{p['bytes_read_per_token'] / 1e6:.1f} warm, {p['moe_all_sums_per_token']:g} all_sums/token "
                  f"({p['all_sum_ms_per_token']} ms in them), {p['protocol_collectives_per_token']:g} protocol "
                  f"collectives ({p['protocol_bytes_per_token']:g} B), experts read but not owned: "
                  f"{p['held_not_owned']}")
    print(f"total {result['seconds']} s; JSON: {args.out}")


if __name__ == "__main__":
    main()
