#!/usr/bin/env bash
# One-GPU device check of rl_jax (train-step MFU, batch-1 decode vs the HBM roofline, greedy GPU == CPU), for a
# machine with one NVIDIA GPU (sized for an H200) and a CUDA-enabled jax already installed; no network needed,
# nothing is installed or fetched: rl_jax is imported from this tree (PYTHONPATH).
#
#   bash benchmarks/device_check.sh [--parts equality,train_dense,train_moe,decode_dense,decode_moe|all] [...]
#
# Results: $OUT/results.jsonl (one JSON line per part), $OUT/results.md (tables), $OUT/log.txt (everything
# printed); OUT defaults to ./device_check_out. Whole run bounded by DEVICE_CHECK_TIMEOUT seconds (default 450).
# Other settings: PYTHON (default python3), XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.85),
# JAX_COMPILATION_CACHE_DIR (default /tmp/rl_jax_device_check_jit_cache). Extra arguments go to
# benchmarks/device_check.py (--help lists them). Exit status: 0 ok, 1 a part failed or was skipped, 2 no GPU
# or rl_jax not importable, 3 the GPU's greedy tokens differ from the CPU's, 124 the overall timeout hit.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
OUT="${OUT:-$ROOT/device_check_out}"
mkdir -p "$OUT" || exit 2
export OUT
LIMIT="${DEVICE_CHECK_TIMEOUT:-450}"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # rl_jax (and its models/, sharding/) from this tree
export PYTHONUNBUFFERED=1
# GPU client settings; the CPU backend ignores them. Each part runs in its own process and takes this share.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.85}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/rl_jax_device_check_jit_cache}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"

set -o pipefail
timeout -k 15 "$LIMIT" "$PY" benchmarks/device_check.py --out "$OUT" --deadline "$((LIMIT - 20))" "$@" 2>&1 \
  | tee "$OUT/log.txt"
rc=${PIPESTATUS[0]}
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  echo "device_check: stopped at the ${LIMIT} s limit; results.md holds the parts that finished" | tee -a "$OUT/log.txt"
  if [ "$rc" -eq 137 ]; then  # killed before it could write the table itself
    "$PY" benchmarks/device_check.py --table --out "$OUT" 2>&1 | tee -a "$OUT/log.txt"
  fi
fi
exit "$rc"
