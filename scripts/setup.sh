#!/usr/bin/env bash
# Set up moe_ext on a fresh machine and run the main job (the quick benchmark suite).
#   bash scripts/setup.sh            # .venv with torch 2.14.1, build (CUDA if nvcc is found), quick bench
#   bash scripts/setup.sh --no-run   # set up and build only
# Environment: VENV (default .venv), TORCH_SPEC (default torch==2.14.1; torch==2.13.0 is the CPU-only
# build), MOE_EXT_CUDA (auto|1|0), TORCH_CUDA_ARCH_LIST (default "8.0;9.0a"), MAX_JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
run_main=1
[[ "${1:-}" == "--no-run" ]] && run_main=0

if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then
  export CUDA_HOME=/usr/local/cuda
fi
[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "$TORCH_SPEC" pybind11 ninja pytest numpy expecttest hypothesis matplotlib nbclient nbformat ipykernel
# CUTLASS headers for the grouped GEMM (the wheel's other dependencies are not needed).
"$PY" -m pip install -q --no-deps nvidia-cutlass==4.2.0.0
# Optional: transformers for the integration tests (they are skipped without it).
"$PY" -m pip install -q transformers==5.18.0 || echo "setup: transformers 5.18.0 not installed; its tests will be skipped"
MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip install -q --no-build-isolation -e .
"$PY" -c "import moe_ext; print('moe_ext', moe_ext.build_info())"

if (( run_main )); then
  "$PY" -m moe_ext.bench --quick --out bench_out
fi
