#!/usr/bin/env bash
# The disk-bound path on the `device` GPU machine (docs/PERFORMANCE.md, "On new tokens at 512 experts"):
#   bash benchmarks/fresh_tokens_gpu.sh decode 4     # k=4: banks of 1, 0.14, 0.25, read-ahead on and off
#   bash benchmarks/fresh_tokens_gpu.sh decode 10    # k=10
#   bash benchmarks/fresh_tokens_gpu.sh prefill      # 2k / 8k / 32k-token prompts, layer by layer vs chunked
# after benchmarks/gpu_setup.sh; writes JSON and logs under $OUT (or /tmp/out).
set -euo pipefail
export PYTHONPATH=/tmp/site MLX_PTX_CACHE_DIR=/tmp/ptx PYTHONUNBUFFERED=1 LLM_USER_PATH=/tmp/llmuser
out=${OUT:-/tmp/out}; mkdir -p "$out" /tmp/llmuser
cd /tmp  # the installed package, not the checkout's (conversion/ installs as llm_flash_moe.conversion)
common=(--layers 8 --experts-per-layer 512 --bits 4 --dir /tmp/rb --calibration-layers 0)
case "$1" in
  decode)
    python3 -m llm flash-moe bench "${common[@]}" --experts "$2" --bank-fraction 1 --bank-fraction 0.14 \
      --bank-fraction 0.25 --memory-limit 16 --tokens 64 --warmup-tokens 48 --repeats 2 --prompt-tokens 0 \
      > "$out/decode-k$2.json" 2> >(tee "$out/decode-k$2.log" >&2) ;;
  prefill)
    python3 -m llm flash-moe bench "${common[@]}" --experts 10 --bank-fraction 0.14 --read-ahead off \
      --prefill-only --prompt-tokens 2048 --prompt-tokens 8192 --prompt-tokens 32768 \
      > "$out/prefill.json" 2> >(tee "$out/prefill.log" >&2) ;;
esac
