"""The decode benchmark (same code as `llm flash-moe bench`): prints one JSON object.

    python benchmarks/bench.py --dir /fast/disk/bench [--layers 4] [--bits 2 4] [--experts 4 10]
"""

import argparse
import json
from pathlib import Path

from llm_flash_moe.benchmark import BenchOptions, run


def main():
    defaults = BenchOptions()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="where the synthetic models live (reused between runs)")
    parser.add_argument("--layers", type=int, default=defaults.layers)
    parser.add_argument("--bits", type=int, nargs="+", default=list(defaults.bits))
    parser.add_argument("--experts", type=int, nargs="+", default=list(defaults.experts))
    parser.add_argument("--tokens", type=int, default=defaults.tokens)
    parser.add_argument("--prompt-tokens", type=int, default=defaults.prompt_tokens)
    parser.add_argument("--read-threads", type=int, default=defaults.read_threads)
    parser.add_argument("--cache-gb", type=float, default=defaults.cache_gb)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    opts = BenchOptions(layers=args.layers, bits=tuple(args.bits), experts=tuple(args.experts),
                        tokens=args.tokens, prompt_tokens=args.prompt_tokens, directory=args.dir,
                        read_threads=args.read_threads, cache_gb=args.cache_gb)
    result = run(opts, log=lambda line: print(line, flush=True))
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
