#!/usr/bin/env bash
# Download the wheels the GPU machine lacks into .whl/ (ignored by git; carry it to the device:
# run(..., carry=[".whl"])). The GPU machine has no network; scripts/gpu_check.sh installs them with
#   pip install -q --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
EXCLUDE=$(git rev-parse --git-path info/exclude)
grep -qxF '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >> "$EXCLUDE"
PY=${PYTHON:-python3}
# nvidia-cutlass is pure Python + headers (py3-none-any): one wheel serves Python 3.11 here and 3.12 there.
$PY -m pip download --no-deps nvidia-cutlass==4.2.0.0 -d .whl
# The device machine gets a copy of the working tree without .git: record which commit it is (run this
# right before the device call, after the last commit) for gpu_check.sh's results file.
dirty=0
[ -n "$(git status --porcelain --untracked-files=no)" ] && dirty=1
printf 'COMMIT=%s\nDIRTY=%s\n' "$(git rev-parse HEAD)" "$dirty" > .whl/commit.env
ls -la .whl
cat .whl/commit.env
