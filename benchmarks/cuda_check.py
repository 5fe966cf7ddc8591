"""Check and time the CUDA expert kernels against their pure-MLX twin (run on a CUDA machine).

    MLX_PTX_CACHE_DIR=/tmp/mlxptx python benchmarks/cuda_check.py [--quick]

(benchmarks/metal_check.py runs the same on a Mac.)

Needs only mlx (CUDA build) and numpy; loads kernels/ from this checkout by path. Prints one JSON
object (also written to $OUT/cuda_check.json when OUT is set, after every stage).

1. Correctness, every bits in (2, 3, 4, 8) x group size in (32, 64, 128), fresh random records at
   the 397B's shapes (H 4096, I 1024) in a bank of 7 slots, k 4 of them chosen in a random order: the
   kernel's per-expert outputs and weighted sum, with both outputs and the intermediate poisoned with
   NaN before launch, against the twin run on the CPU stream; pass = finite everywhere and
   max|kernel - twin| / max|twin| <= 1e-3 (fp32 activations). ``--check-only`` checks group 64 only and stops after this.
2. Timing at the 397B's shapes (group 64, bf16 activations and scales), 16 layers chained without a
   sync, each layer with its own expert buffers: the twin (3 gather_qmm + SwiGLU, then the block's
   weighted sum), the kernel returning per-expert outputs (+ the same weighted sum) and the kernel
   returning the weighted sum; ms per layer and expert bytes per second against the card's
   measured device-to-device copy and read bandwidth. Rows per warp are swept first. Also one call
   over 64 experts, where the per-launch overheads vanish: the kernels' own bandwidth.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("MLX_PTX_CACHE_DIR", "/tmp/mlxptx")

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

H, I = 4096, 1024
LAYERS = 16
QUICK = "--quick" in sys.argv
CHECK_ONLY = "--check-only" in sys.argv
RESULT: dict = {}
BACKEND = "cuda"  # benchmarks/metal_check.py runs the same checks with "metal"


def load_kernels():
    root = Path(__file__).resolve().parents[1] / "kernels"
    spec = importlib.util.spec_from_file_location("flash_moe_kernels", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


K = load_kernels()


class Quant:
    def __init__(self, bits, group_size):
        self.bits, self.group_size, self.mode = bits, group_size, "affine"


def save():
    out = os.environ.get("OUT")
    if out:
        Path(out, f"{BACKEND}_check.json").write_text(json.dumps(RESULT, indent=1))


def random_words(shape):
    """Uniform random uint32 words (two 16-bit halves: randint's low bits are not random)."""
    hi, lo = (mx.random.randint(0, 1 << 16, shape).astype(mx.uint32) for _ in range(2))
    return (hi << 16) | lo


def random_parts(n, bits, gs, dtype=mx.bfloat16):
    """Fresh random expert records (as the store returns them): every q pattern, sane weights."""
    levels = 2 ** bits - 1
    parts = {}
    for proj, (rows, cols) in {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}.items():
        parts[f"{proj}.weight"] = random_words((n, rows, cols * bits // 32))
        scale = mx.random.uniform(0.5, 1.5, (n, rows, cols // gs)) * (0.04 / levels)
        parts[f"{proj}.scales"] = scale.astype(dtype)
        parts[f"{proj}.biases"] = (-scale * levels / 2 + 0.002 * mx.random.normal(scale.shape)).astype(dtype)
    mx.eval(parts)
    return parts


def expert_bytes(parts):
    return sum(a.nbytes for a in parts.values())


def rel_err(a, b):
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def check_correctness():
    out = {}
    k, bank = 4, 7
    for bits in (2, 3, 4, 8):
        for gs in (64,) if CHECK_ONLY else (32, 64, 128):
            parts, quant = random_parts(bank, bits, gs), Quant(bits, gs)
            slots = mx.array(np.random.default_rng(bits * gs).permutation(bank)[:k].astype(np.uint32))
            x = mx.random.normal((H,))
            scores = mx.softmax(mx.random.normal((k,)), axis=-1)
            with mx.stream(mx.cpu):
                ref = K.twin_glu(x, parts, quant, slots=slots)
                ref_sum = K.twin_glu(x, parts, quant, scores, slots=slots)
                mx.eval(ref, ref_sum)
            t0 = time.perf_counter()
            y = K.kernel_glu(x, parts, quant, slots=slots, backend=BACKEND, init_value=float("nan"))
            y_sum = K.kernel_glu(x, parts, quant, scores, slots=slots, backend=BACKEND, init_value=float("nan"))
            mx.eval(y, y_sum)
            compile_s = time.perf_counter() - t0
            finite = bool(np.isfinite(np.array(y)).all() and np.isfinite(np.array(y_sum)).all())
            e1, e2 = rel_err(y, ref), rel_err(y_sum, ref_sum)
            out[f"{bits}bit_g{gs}"] = {"finite": finite, "rel_err_per_expert": e1, "rel_err_weighted": e2,
                                       "pass": finite and e1 <= 1e-3 and e2 <= 1e-3,
                                       "first_call_s": round(compile_s, 2)}
            RESULT["correctness"] = out
            save()
            print(f"check {bits}-bit g{gs}: {out[f'{bits}bit_g{gs}']}", file=sys.stderr, flush=True)
    return out


def bandwidth():
    a = mx.random.uniform(shape=(256 * 1024 * 1024,))  # 1 GiB fp32
    mx.eval(a)
    res = {}
    for name, fn, moved in (("copy", lambda: a + 1.0, 2 * a.nbytes), ("read", lambda: mx.sum(a), a.nbytes)):
        for _ in range(3):
            mx.eval(fn())
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            mx.eval(fn())
            times.append(time.perf_counter() - t0)
        res[f"{name}_GBps"] = round(moved / statistics.median(times) / 1e9, 1)
    res["note"] = "copy: a + 1 over 1 GiB fp32, bytes read + written; read: sum over 1 GiB"
    return res


def timed(fn, reps):
    for _ in range(2):
        mx.eval(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / LAYERS * 1e3  # ms per layer


def chain(layer_fn, layers, x):
    for parts in layers:
        x = layer_fn(x, parts)
    return x


def throughput(bw):
    """One call over 64 experts: the kernels' own bandwidth, per-launch overheads amortized."""
    out = {}
    for bits in (4, 2):
        quant, n = Quant(bits, 64), 64
        parts = random_parts(n, bits, 64)
        x = mx.random.normal((H,)).astype(mx.bfloat16)
        scores = mx.softmax(mx.random.normal((n,)), axis=-1)
        nbytes = expert_bytes(parts)
        for name, fn in (("twin", lambda: (K.twin_glu(x, parts, quant) * scores[:, None]).sum(axis=0)),
                         ("kernel", lambda: K.kernel_glu(x, parts, quant, scores, backend=BACKEND))):
            ms = timed(fn, 20) * LAYERS  # timed() divides by LAYERS
            out[f"{bits}bit_n64_{name}_ms"] = round(ms, 4)
            out[f"{bits}bit_n64_{name}_GBps"] = round(nbytes / (ms * 1e-3) / 1e9, 1)
        out[f"{bits}bit_n64_kernel_vs_read"] = round(out[f"{bits}bit_n64_kernel_GBps"] / bw["read_GBps"], 3)
        RESULT["throughput_n64"] = out
        save()
    return out


def benchmark(bw):
    table, sweep, checks = [], {}, {}
    reps = 10 if QUICK else 30
    for bits in (4, 2):
        quant = Quant(bits, 64)
        for k in (4, 10):
            layers = [random_parts(k, bits, 64) for _ in range(LAYERS)]
            x0 = mx.random.normal((H,)).astype(mx.bfloat16)
            scores = mx.softmax(mx.random.normal((k,)), axis=-1).astype(mx.bfloat16)
            nbytes = expert_bytes(layers[0])

            def block_sum(y):
                return (y * scores[:, None]).sum(axis=0)

            # rows per warp: (gate_up, down) for the fused-sum kernel
            grid = [(4, 4)] if QUICK else [(2, 4), (4, 2), (4, 4), (4, 8), (8, 8)]
            best = None
            for rows in grid:
                def fused(x, p):
                    return K.kernel_glu(x, p, quant, scores, backend=BACKEND, rows=rows)
                ms = timed(lambda: chain(fused, layers, x0), reps)
                sweep[f"{bits}bit_k{k}_rows{rows[0]}x{rows[1]}"] = round(ms, 4)
                if best is None or ms < best[1]:
                    best = (rows, ms)
            rows = best[0]
            variants = {
                "twin": lambda x, p: block_sum(K.twin_glu(x, p, quant)),
                "kernel_per_expert": lambda x, p: block_sum(K.kernel_glu(x, p, quant, backend=BACKEND, rows=rows)),
                "kernel_weighted": lambda x, p: K.kernel_glu(x, p, quant, scores, backend=BACKEND, rows=rows),
            }
            row = {"bits": bits, "k": k, "group_size": 64, "expert_bytes_per_layer": nbytes, "rows": list(rows)}
            for name, fn in variants.items():
                ms = timed(lambda: chain(fn, layers, x0), reps)
                row[f"{name}_ms"] = round(ms, 4)
                row[f"{name}_GBps"] = round(nbytes / (ms * 1e-3) / 1e9, 1)
            row["kernel_weighted_vs_copy"] = round(row["kernel_weighted_GBps"] / bw["copy_GBps"], 3)
            row["kernel_weighted_vs_read"] = round(row["kernel_weighted_GBps"] / bw["read_GBps"], 3)
            row["speedup_weighted_vs_twin"] = round(row["twin_ms"] / row["kernel_weighted_ms"], 2)
            # bf16 agreement of the timed configuration against the GPU twin (which rounds to bf16
            # between the projections, so the bound is loose)
            p = layers[0]
            ref = K.twin_glu(x0, p, quant)
            got = K.kernel_glu(x0, p, quant, backend=BACKEND, rows=rows, init_value=float("nan"))
            got_sum = K.kernel_glu(x0, p, quant, scores, backend=BACKEND, rows=rows)
            checks[f"{bits}bit_k{k}"] = {"rel_err_bf16_vs_gpu_twin": rel_err(got, ref),
                                         "rel_err_weighted_bf16": rel_err(got_sum, block_sum(ref)),
                                         "finite": bool(np.isfinite(np.array(got.astype(mx.float32))).all())}
            table.append(row)
            RESULT.update(timing=table, rows_sweep=sweep, bf16_checks=checks)
            save()
            print(f"timing: {row}", file=sys.stderr, flush=True)
            del layers
    return table


def device_name():
    if BACKEND == "cuda":
        try:
            return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                   "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
        except OSError:
            return "unknown"
    try:
        return str(mx.device_info())
    except Exception:  # noqa: BLE001 - only a label
        return "unknown"


def main(backend="cuda"):
    global BACKEND
    BACKEND = backend
    t_start = time.perf_counter()
    RESULT.update(backend=backend, mlx=mx.__version__, gpu=device_name(),
                  date=time.strftime("%Y-%m-%d"), quick=QUICK)
    mx.random.seed(0)
    check_correctness()
    RESULT["all_correct"] = all(v["pass"] for v in RESULT["correctness"].values())
    if CHECK_ONLY:
        save()
        print(json.dumps(RESULT))
        return
    RESULT["bandwidth"] = bw = bandwidth()
    save()
    print(f"bandwidth: {bw}", file=sys.stderr, flush=True)
    throughput(bw)
    benchmark(bw)
    RESULT["all_correct"] = all(v["pass"] for v in RESULT["correctness"].values())
    RESULT["wall_s"] = round(time.perf_counter() - t_start, 1)
    save()
    print(json.dumps(RESULT))


if __name__ == "__main__":
    main()
