#!/usr/bin/env bash
# The whole GPU check in one call (docs/benchmarks.md, shared design gpu.md):
#   info -> CUTLASS wheel -> build -> CUDA tests -> compute-sanitizer (memcheck, racecheck)
#   -> quick benchmark -> whole test suite (if time is left) -> results file + summary table (last).
# Everything goes under $OUT (default ./gpu_check_out): log.txt, junit.xml, junit_all.xml,
# memcheck.log, racecheck.log, the results JSON and bench.tar.gz (CSV, plots, profile, steps).
# Each step is time-boxed inside a total of GPU_CHECK_BUDGET_S (default 560 s: the device call allows
# 600); a failing step is recorded and the script goes on to the summary, then exits non-zero. No GPU
# visible: exit 2 at once.
#
#   bash scripts/gpu_check.sh            # on the GPU machine, from anywhere inside the checkout
set -u -o pipefail
SELF=$(readlink -f "$0")
cd "$(dirname "$SELF")/.."
REPO=$PWD
OUT=${OUT:-$REPO/gpu_check_out}
mkdir -p "$OUT"
if [ -z "${GPU_CHECK_TEED:-}" ]; then  # re-run self with all output copied to $OUT/log.txt
    GPU_CHECK_TEED=1 bash "$SELF" "$@" 2>&1 | tee "$OUT/log.txt"
    exit "${PIPESTATUS[0]}"
fi

PY=${PYTHON:-python3}
T0=$(date +%s)
TOTAL=${GPU_CHECK_BUDGET_S:-560}
BENCH_RESERVE=${GPU_CHECK_BENCH_S:-140}   # kept free for the benchmark until it has run
FINAL_RESERVE=25                          # kept free for the results file and the summary
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)  # scratch; $OUT returns at most 8 files
STEPS=$WORK/steps.tsv
: > "$STEPS"
FAILED=()
export PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH=$CUDA_HOME/bin:$PATH
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STEPS"; }

# step NAME MAX_SECONDS RESERVE_SECONDS CMD...: run CMD under timeout, record rc / seconds / status.
# An OPTIONAL=1 step (extra checks after the required ones) needs MIN_S seconds to start, and running
# out of time there is recorded as "incomplete", not as a failure; its real failures still count.
step() {
    local name=$1 max=$2 reserve=$3; shift 3
    local avail=$(( $(left) - reserve )) t min=${MIN_S:-15}
    t=$(( max < avail ? max : avail ))
    if (( t < min )); then
        echo "=== [$name] SKIPPED: out of time ($(left)s left)"
        record "$name" skipped 0 "skipped (out of time)"
        return 0
    fi
    echo "=== [$name] start (timeout ${t}s, $(left)s left)"
    local s rc status
    s=$(date +%s)
    timeout --kill-after=20 "$t" "$@"
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="timeout after ${t}s" ;;
        *) status="failed rc=$rc" ;;
    esac
    local code=$rc
    if [ -n "${OPTIONAL:-}" ] && { [ $rc -eq 124 ] || [ $rc -eq 137 ]; }; then
        code=incomplete; status="incomplete (out of time after ${t}s)"
    fi
    record "$name" "$code" "$(( $(date +%s) - s ))" "$status"
    echo "=== [$name] $status ($(( $(date +%s) - s ))s)"
    [ "$code" = 0 ] || [ "$code" = incomplete ] || FAILED+=("$name")
    return $rc
}

# The commit: what scripts/prepare_gpu_wheels.sh recorded beside the wheels right before the device call,
# else git. The recorded one comes first: the device machine gets a copy of the working tree, and a .git
# there can be stale (the 2026-11-27 second run reported the previous commit, "dirty").
COMMIT=""
DIRTY=""
if [ -f .whl/commit.env ]; then
    # shellcheck disable=SC1091
    . .whl/commit.env  # COMMIT=..., DIRTY=0|1
    GIT_HEAD=$(git rev-parse HEAD 2>/dev/null) || GIT_HEAD=""
    [ -n "$GIT_HEAD" ] && [ "$GIT_HEAD" != "$COMMIT" ] && \
        echo "NOTE: .git here is at $GIT_HEAD; using the commit recorded in .whl/commit.env ($COMMIT)"
elif COMMIT=$(git rev-parse HEAD 2>/dev/null); then
    [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && DIRTY=1 || DIRTY=0
else
    COMMIT=""
fi
echo "=== GPU check of ${COMMIT:-an unknown commit}${DIRTY:+ (dirty=$DIRTY)} at $(date -u +%FT%TZ)"
nvidia-smi || echo "nvidia-smi failed"
if ! $PY - "$WORK/device.txt" <<'EOF'
import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuda available: {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    sys.exit(1)
p = torch.cuda.get_device_properties(0)
print(f"device: {torch.cuda.get_device_name()} sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
      f"{p.total_memory / 2**30:.1f} GiB")
with open(sys.argv[1], "w") as f:  # for the results file, which must not depend on the GPU answering later
    f.write(torch.cuda.get_device_name())
EOF
then
    echo "################################################################"
    echo "### FAIL: NO GPU VISIBLE - nothing was checked on a GPU.      ###"
    echo "################################################################"
    record info 2 0 "no GPU visible"
    exit 2
fi
record info 0 0 ok
command -v nvcc >/dev/null && nvcc --version | tail -2

# CUTLASS headers travel as the nvidia-cutlass wheel in .whl/ (scripts/prepare_gpu_wheels.sh).
WANT_CUTLASS=0
if ls .whl/*.whl >/dev/null 2>&1; then
    WANT_CUTLASS=1
    step cutlass_wheel 60 $(( BENCH_RESERVE + FINAL_RESERVE )) \
        $PY -m pip install -q --no-deps --no-index --target /tmp/site .whl/*.whl
    export PYTHONPATH=$PYTHONPATH:/tmp/site
else
    echo "NOTE: no .whl/*.whl here (run scripts/prepare_gpu_wheels.sh and carry .whl): CUTLASS kernels cannot build"
    record cutlass_wheel missing 0 "no wheel in .whl/"
fi

step build 300 $(( BENCH_RESERVE + FINAL_RESERVE )) env MOE_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 \
    MOE_EXT_BUILD_DIR="$REPO/build/gpu" $PY setup.py build_ext --inplace
step build_info 30 $(( BENCH_RESERVE + FINAL_RESERVE )) $PY -c "
import sys, moe_ext
info = moe_ext.build_info(); print('build_info:', info)
if not info['cuda']:
    sys.exit('moe_ext was built WITHOUT its CUDA kernels')
if $WANT_CUTLASS and not info['cutlass']:
    sys.exit('moe_ext was built WITHOUT CUTLASS although its wheel was carried: the 16-bit grouped GEMM is missing')"

# Four pytest workers share the GPU when pytest-xdist is there (the device image has it): the CPU-side
# references are most of the tests' time. With workers, pytest-timeout may end a hung test by ending
# its worker, which xdist reports as that test's failure and replaces, so one hang costs one test.
# Run 2 took 94 s for 1040 tests; 1505 now, among them random-argument tests (test_kernel_fuzz.py,
# test_op_argument_fuzz.py): about 150 s expected, so up to 200 s.
XDIST=0; TIMEOUT=()
if $PY -c "import xdist" 2>/dev/null; then XDIST=1; fi
if [ $XDIST = 1 ] && $PY -c "import pytest_timeout" 2>/dev/null; then TIMEOUT=(--timeout 90 --timeout-method thread); fi
par() {  # par N: pytest arguments for N workers (none without xdist)
    if [ $XDIST = 1 ]; then echo "-n $1 ${TIMEOUT[*]}"; fi
}
read -ra PAR <<< "$(par 4)"
step tests_cuda 200 $(( BENCH_RESERVE + FINAL_RESERVE )) $PY -m pytest -m cuda tests -q -rs -p no:cacheprovider \
    "${PAR[@]}" --junitxml="$OUT/junit.xml"

# compute-sanitizer on a small selection. PyTorch's caching allocator would hide out-of-bounds
# accesses inside its pooled blocks, so caching is off under the sanitizer.
sanitize() {  # sanitize TOOL: the smoke script plus the small CUDA tests that exist
    local tool=$1 sel=() rc=0 extra=()
    [ "$tool" = racecheck ] && extra=(--racecheck-report hazard)
    for f in tests/test_cuda_routing.py tests/test_cuda_grouped_gemm.py tests/test_cuda_activation.py tests/test_capacity.py \
             tests/test_kernel_fuzz.py; do
        if [ -f "$f" ]; then sel+=("$f"); else echo "NOTE: $f does not exist (yet): not in the $tool selection"; fi
    done
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" "${extra[@]}" --error-exitcode 1 \
        $PY scripts/cuda_smoke.py || rc=1
    if [ ${#sel[@]} -gt 0 ]; then
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" "${extra[@]}" --error-exitcode 1 \
            $PY -m pytest "${sel[@]}" -q -m cuda -k "$SANITIZE_K" -p no:cacheprovider
        local prc=$?
        if [ $prc -eq 5 ]; then echo "NOTE: no test matched -k '$SANITIZE_K' in ${sel[*]}"; elif [ $prc -ne 0 ]; then rc=1; fi
    fi
    # gpu_results.py counts a log without this line as incomplete (the step was cut short).
    echo "SANITIZE-DONE tool=$tool rc=$rc"
    return $rc
}
# Small, edge-case tests of every CUDA op (the sanitizer slows kernels by 10-100x): 69 tests. Only the
# smallest of the grouped GEMM's most_empty shapes (fp32 / fp16 / bf16, so CUTLASS and the simple kernel),
# and the smallest shape of each sm_90a tile in each form.
SANITIZE_K=${SANITIZE_K:-"(empty and not most_empty and not large) or edge or ties or no_rows or unreferenced \
or (most_empty and 256x4 and not sm90_tile) or (misaligned and (silu or swigluoai) and (36 or 37)) or swigluoai_limits or (reroute_cuda and (37-7-3 or 70-13000)) \
or (tf32 and 300x6) or (sm90_tile and 256x4 and uniform and bf16) or few_tokens_wide_rows \
or (block_and_grid_routing and 256) or out_of_range_rows_many_tokens"}
export -f sanitize
export PY SANITIZE_K
if command -v compute-sanitizer >/dev/null; then
    step memcheck 100 $(( BENCH_RESERVE + FINAL_RESERVE )) bash -c "set -o pipefail; sanitize memcheck 2>&1 | tee '$OUT/memcheck.log'"
else
    echo "NOTE: compute-sanitizer not on PATH"; record memcheck missing 0 "compute-sanitizer not found"
fi

BENCH_DIR=/tmp/moe_ext_bench
rm -rf "$BENCH_DIR"
step bench_quick 150 "$FINAL_RESERVE" $PY -m moe_ext.bench --device cuda --quick --profile --out "$BENCH_DIR"

# The kernel issues' own goal points (gating latency grid, permute/unpermute bandwidth, grouped GEMM
# at Mixtral 8192 tokens and decode sizes); rows land in the benchmark folder (bench.tar.gz).
OPTIONAL=1 MIN_S=40 step bench_kernels 120 "$FINAL_RESERVE" bash -c "mkdir -p '$BENCH_DIR' && \
    $PY bench/routing_kernels.py '$BENCH_DIR/routing_kernels.json' && \
    $PY bench/gemm_kernels.py --quick --out '$BENCH_DIR/gemm_kernels.json'"

# DeepSeek-V3 gating, one warp-kernel launch under ncu (bench/NOTES.md, gating entries). --clock-control
# none: ncu otherwise locks the clocks to base (run 2's report ran at 1.59 GHz), and card settings stay
# as they are (shared design gpu.md).
if command -v ncu >/dev/null; then
    OPTIONAL=1 MIN_S=30 step ncu_gating 45 "$FINAL_RESERVE" bash -c "mkdir -p '$BENCH_DIR' && ncu --clock-control none --section SpeedOfLight \
        --section WarpStateStats --section SchedulerStats --section LaunchStats --section Occupancy \
        -k regex:gate_warp_kernel -c 1 $PY -c \"
import torch, moe_ext
g = torch.Generator(device='cuda').manual_seed(0)
x = torch.randn(16, 256, device='cuda', generator=g)
torch.ops.moe_ext.topk_gating(x, 8, 'sigmoid', 'softmax_topk', True, torch.zeros(256, device='cuda'), 8, 4, 2.5)
torch.cuda.synchronize()\" > '$BENCH_DIR/ncu_gating.txt' 2>&1"
fi
if command -v compute-sanitizer >/dev/null; then
    OPTIONAL=1 MIN_S=40 step racecheck 80 "$FINAL_RESERVE" bash -c "set -o pipefail; sanitize racecheck 2>&1 | tee '$OUT/racecheck.log'"
fi
# The CPU tests on the device machine's Python and torch (the CUDA ones ran above). No GPU to share
# here: eight workers of two OpenMP threads each use the 16 cores (run 2's four workers, each with
# threads for every core, did not finish in the step's 120 s). Not the `emu` tests (the CUDA kernels
# under the CPU emulation): CI runs them, and here the kernels have just run for real.
read -ra CPU_PAR <<< "$(par 8)"
OPTIONAL=1 MIN_S=40 step tests_cpu 120 "$FINAL_RESERVE" env OMP_NUM_THREADS=2 $PY -m pytest -m "not cuda and not emu" \
    tests -q -rs -p no:cacheprovider "${CPU_PAR[@]}" --junitxml="$OUT/junit_all.xml"

cp "$STEPS" "$BENCH_DIR/" 2>/dev/null
tar -czf "$OUT/bench.tar.gz" -C "$(dirname "$BENCH_DIR")" "$(basename "$BENCH_DIR")" 2>/dev/null \
    || echo "NOTE: no benchmark output to pack"
echo "=== total $(( $(date +%s) - T0 ))s; failed steps: ${FAILED[*]:-none}"
echo
SAN=()
[ -f "$OUT/memcheck.log" ] && SAN+=(--sanitizer "memcheck=$OUT/memcheck.log")
[ -f "$OUT/racecheck.log" ] && SAN+=(--sanitizer "racecheck=$OUT/racecheck.log")
META=(--device "$(cat "$WORK/device.txt" 2>/dev/null || echo unknown)")
[ -n "$COMMIT" ] && META+=(--commit "$COMMIT")
[ -n "$DIRTY" ] && META+=(--dirty "$DIRTY")
timeout 60 $PY scripts/gpu_results.py --junit "$OUT/junit.xml" --junit-all "$OUT/junit_all.xml" \
    --bench "$BENCH_DIR/results.json" "${SAN[@]}" --steps "$STEPS" "${META[@]}" \
    --results-dir "$REPO/bench/results" --copy-to "$OUT"
RES=$?
# The results writer decides (a sanitizer the device refuses is "unsupported", not a failure).
if [ $RES -ne 0 ]; then
    exit 1
fi
exit 0
