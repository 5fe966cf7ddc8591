"""What the keep-alive engine is worth: `llm` commands in a row, and two at once, with `-o keep_alive 0`
(every command loads the model, its bank starts empty) against the shared engine.

For each way: the 1st, 2nd and 3rd `llm -m` commands in a row (different prompts of the same length) and an
`llm -c`: wall time of the command, time to its first byte of output, bytes read from the expert files (the
bank's count, logged by llm in response_json), prompt tokens taken from the prompt cache and where from; then
two commands started at once: each one's wall time, the banks (one shared, or one per process) and peak
memory (max RSS of each llm process with keep_alive 0; the engine's own max RSS otherwise).

    python benchmarks/keep_alive.py --demo                       # the random-weight demo, any machine
    python benchmarks/keep_alive.py --model qwen397              # a prepared model of yours
    python benchmarks/keep_alive.py --synthetic-layers 8 --synthetic-experts 512 --models-dir /data/bench

The commands run in a fresh llm user directory (its logs.db is read afterwards) with the model registered
there; engines started here are stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPTS = ["Write a short story about a fox who learns to read.",
           "Write a short story about an owl who learns to swim.",
           "Write a short story about a cat who learns to sing."]
FOLLOW_UP = "Now tell the same story in two sentences."
LLM = str(Path(sys.executable).with_name("llm"))


def command(args, options, env):
    """Run one llm command: wall seconds, seconds to the first byte of stdout, the child's max RSS."""
    started = time.perf_counter()
    process = subprocess.Popen([LLM, *args, *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                               bufsize=0)
    first = None
    out = b""
    while True:
        chunk = os.read(process.stdout.fileno(), 4096)
        if not chunk:
            break
        if first is None:
            first = time.perf_counter() - started
        out += chunk
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    err = process.stderr.read().decode(errors="replace")
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"llm {' '.join(args)} failed ({code}): {err.strip()[-500:]}")
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"wall_s": round(wall, 3), "first_output_s": round(first, 3) if first else None, "client_max_rss": rss,
            "waited": "waiting for it" in err}


def last_rows(user_dir: Path, n: int):
    db = sqlite3.connect(user_dir / "logs.db")
    try:
        rows = db.execute("select input_tokens, output_tokens, response_json from turns order by id desc limit ?",
                          (n,)).fetchall()
    finally:
        db.close()
    out = []
    for input_tokens, output_tokens, response_json in reversed(rows):
        rj = json.loads(response_json or "{}")
        out.append({"input_tokens": input_tokens, "output_tokens": output_tokens, "bytes_read": rj.get("bytes_read"),
                    "prompt_tokens_cached": rj.get("prompt_tokens_cached"), "prompt_cache": rj.get("prompt_cache"),
                    "bank_gb": rj.get("bank_gb"), "generation_tps": rj.get("generation_tps")})
    return out


def engine_status(name):
    from llm_flash_moe.service import client

    return client.request(name, {"type": "status"})


def one_way(name, keep_alive, options, user_dir, env):
    env = dict(env, LLM_FLASH_MOE_KEEP_ALIVE=str(keep_alive))
    subprocess.run([LLM, "flash-moe", "stop"], env=env, capture_output=True)
    shutil.rmtree(user_dir / "flash-moe" / "prompt-cache", ignore_errors=True)  # each way starts with none
    model = f"{name}-flash"
    runs = []
    for i, prompt in enumerate(PROMPTS):
        result = command(["-m", model, prompt], options, env)
        runs.append(dict(result, step=f"llm -m #{i + 1}", **last_rows(user_dir, 1)[0]))
        print(f"  keep_alive={keep_alive} {runs[-1]}", flush=True)
    result = command(["-c", FOLLOW_UP], options, env)
    runs.append(dict(result, step="llm -c", **last_rows(user_dir, 1)[0]))
    print(f"  keep_alive={keep_alive} {runs[-1]}", flush=True)
    # Two commands at once.
    pair = [None, None]
    threads = [threading.Thread(target=lambda i=i: pair.__setitem__(i, command(["-m", model, PROMPTS[i]], options, env)))
               for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    logged = last_rows(user_dir, 2)  # in the order they finished
    status = engine_status(name) if keep_alive else None
    concurrent = {"commands": pair, "logged": logged, "engine_pid": status and status["pid"],
                  "engine_max_rss": status and status["peak_rss_bytes"],
                  "banks_gb": [r["bank_gb"] for r in logged] if not keep_alive else [status and round(status["bank_bytes"] / 1e9, 6)]}
    print(f"  keep_alive={keep_alive} two at once: {concurrent}", flush=True)
    subprocess.run([LLM, "flash-moe", "stop"], env=env, capture_output=True)
    return {"keep_alive": keep_alive, "in_a_row": runs, "two_at_once": concurrent}


def table(results) -> str:
    lines = ["| way | command | wall s | first output s | bytes read | cached prompt tokens | output tokens |",
             "|---|---|---|---|---|---|---|"]
    for way in results["ways"]:
        label = "in process (keep_alive 0)" if not way["keep_alive"] else "engine"
        for run in way["in_a_row"]:
            lines.append(f"| {label} | {run['step']} | {run['wall_s']:.2f} | {run['first_output_s'] or 0:.2f} | "
                         f"{run['bytes_read']:,} | {run['prompt_tokens_cached']} ({run['prompt_cache'] or '-'}) | "
                         f"{run['output_tokens']} |")
    lines += ["", "| way | two at once: wall s | banks GB | peak memory |", "|---|---|---|---|"]
    for way in results["ways"]:
        pair = way["two_at_once"]
        walls = " / ".join(f"{c['wall_s']:.2f}" for c in pair["commands"])
        if way["keep_alive"]:
            peak = f"engine {pair['engine_max_rss'] / 1e9:.2f} GB + clients " + " / ".join(
                f"{c['client_max_rss'] / 1e9:.2f}" for c in pair["commands"])
            label = "engine"
        else:
            peak = " + ".join(f"{c['client_max_rss'] / 1e9:.2f}" for c in pair["commands"]) + " GB (two processes)"
            label = "in process (keep_alive 0)"
        lines.append(f"| {label} | {walls} | {' + '.join(str(b) for b in pair['banks_gb'])} | {peak} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--demo", action="store_true", help="the random-weight demo model (built here, offline)")
    which.add_argument("--model", help="a model prepared in your llm user directory")
    which.add_argument("--synthetic-layers", type=int, help="a synthetic model of the 397B's shapes, this deep")
    parser.add_argument("--synthetic-experts", type=int, default=512, help="experts per layer (synthetic)")
    parser.add_argument("--models-dir", type=Path, help="where the synthetic model is built once and reused")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--experts", type=int, help="-o experts (default: the model's)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--build-only", action="store_true", help="build the synthetic model, measure nothing")
    parser.add_argument("--way", choices=["both", "process", "engine"], default="both",
                        help="measure keep_alive 0 (process), the engine, or both (to split a long run)")
    parser.add_argument("--user-dir", type=Path, help="the llm user directory to run in (default: a new one)")
    args = parser.parse_args()

    options = ["-o", "max_tokens", str(args.max_tokens), "-o", "thinking", "false", "-o", "seed", "1"]
    if args.experts:
        options += ["-o", "experts", str(args.experts)]
    model_dir = None
    if args.model:
        from llm_flash_moe import registry

        model_dir, name = registry.model_dir(args.model), args.model
    user_dir = args.user_dir or Path(tempfile.mkdtemp(prefix="keep-alive-bench-"))
    user_dir.mkdir(parents=True, exist_ok=True)
    os.environ["LLM_USER_PATH"] = str(user_dir)
    env = dict(os.environ, LLM_USER_PATH=str(user_dir))
    from llm_flash_moe import registry

    if args.demo:
        subprocess.run([LLM, "flash-moe", "prepare", "--demo"], env=env, check=True, capture_output=True)
        name = "demo"
    elif args.synthetic_layers:
        from llm_flash_moe.measure.benchmark import synthetic_model_dir
        from llm_flash_moe.synthetic.flash_model import write_synthetic_model

        directory = args.models_dir or Path(tempfile.gettempdir()) / "flash-moe-bench"
        model_dir = synthetic_model_dir(directory, args.synthetic_layers, args.synthetic_experts, 4)
        print(f"synthetic model {model_dir} (built once, reused)", flush=True)
        write_synthetic_model(model_dir, layers=args.synthetic_layers, bits=4, experts_per_layer=args.synthetic_experts)
        name = "synthetic"
        if args.build_only:
            return 0
    if model_dir is not None:
        registry.register(name, model_dir)
    import llm_flash_moe

    commit = subprocess.run(["git", "-C", str(Path(llm_flash_moe.__file__).parent), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
               "cpus": os.cpu_count(), "commit": commit, "model": name, "options": options, "ways": []}
    for keep_alive in {"both": (0, 600), "process": (0,), "engine": (600,)}[args.way]:
        print(f"keep_alive {keep_alive}:", flush=True)
        results["ways"].append(one_way(name, keep_alive, options, user_dir, env))
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
