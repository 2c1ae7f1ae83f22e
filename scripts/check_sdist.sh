#!/usr/bin/env bash
# Packaging check: build the sdist, install it (CPU-only build, non-editable) into a scratch folder and
# use the installed copy from outside the source tree. Catches a source distribution that lacks what
# CMakeLists.txt compiles, and a package that only works from its checkout.
#   bash scripts/check_sdist.sh [python]      (default .venv/bin/python; needs torch installed)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute, symlink kept (a venv's python)
WORK=$(mktemp -d /tmp/moe_ext_sdist.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

"$PY" -m pip install -q build wheel
"$PY" -m build --sdist --no-isolation -o "$WORK/dist" . >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
SDIST=$(ls "$WORK"/dist/moe_ext-*.tar.gz)
LISTING=$(tar tzf "$SDIST")
for f in CMakeLists.txt csrc/ops.cpp csrc/common/routing.h csrc/cuda/gemm/sm90_grouped.cuh tests/activation_ref.py; do
  grep -qx "moe_ext-[^/]*/$f" <<<"$LISTING" || { echo "check_sdist: $f missing from $(basename "$SDIST")"; exit 1; }
done
MOE_EXT_CUDA=0 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip install -q --no-build-isolation --no-deps \
  --target "$WORK/site" "$SDIST"
cd "$WORK"
PYTHONPATH="$WORK/site" "$PY" - <<'PY'
import os, torch, moe_ext
assert os.path.dirname(moe_ext.__file__).startswith(os.environ["PYTHONPATH"]), moe_ext.__file__
from moe_ext import reference
torch.manual_seed(0)
T, H, F, E, k = 9, 24, 16, 5, 2
x, logits = torch.randn(T, H, dtype=torch.float64), torch.randn(T, E, dtype=torch.float64)
w1, w2 = torch.randn(E, 2 * F, H, dtype=torch.float64), torch.randn(E, H, F, dtype=torch.float64)
y = moe_ext.fused_moe(x, w1, w2, logits, topk=k)
ref = reference.moe(x, logits, w1, w2, k)
assert torch.allclose(y, ref, rtol=1e-10, atol=1e-10), (y - ref).abs().max()
print("check_sdist: installed", moe_ext.__file__, moe_ext.build_info()["cuda"], tuple(y.shape))
PY
echo "check_sdist: OK ($(basename "$SDIST"))"
