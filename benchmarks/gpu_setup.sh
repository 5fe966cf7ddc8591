#!/usr/bin/env bash
# On the `device` GPU machine (no network): install MLX's CUDA wheel (carried in two parts, already copied
# to /tmp/p/partaa and /tmp/p/partab by earlier calls), the pure-Python wheels in .whl/c, and this checkout,
# into /tmp/site. Then: export PYTHONPATH=/tmp/site MLX_PTX_CACHE_DIR=/tmp/ptx PYTHONUNBUFFERED=1
# Recipe and wheel list: shared/DEVICE.md (steering notes); reinstalls only the project when /tmp/site exists.
set -euo pipefail
if [ ! -d /tmp/site/mlx ]; then
  wheel=/tmp/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
  cat /tmp/p/partaa /tmp/p/partab > "$wheel"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/c/*.whl "$wheel"
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target /tmp/site . 2>&1 | grep -v WARNING || true
PYTHONPATH=/tmp/site python3 -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device(), "cuda", mx.cuda.is_available())'
