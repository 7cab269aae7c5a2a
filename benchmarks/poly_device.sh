#!/usr/bin/env bash
# One GPU call for `tensorattn bench poly`: installs the peer wheels carried in .whl (fla-core, power-attention,
# vidrial), prints the machine and versions, then runs the benchmark with its report and log in $OUT.
#
# Run from the repository root on the GPU machine (the device tool: carry [".whl"], command
# `bash benchmarks/poly_device.sh`). Without .whl the peers fla and power-attention show as "unavailable" rows.
#
# Environment (all optional):
#   OUT               output folder (the device tool sets it; else out/poly_device)
#   POLY_T            sequence lengths, space-separated (default: the benchmark's, 16384..1048576 and 4194304)
#   POLY_DK           feature sizes Dk (default "16 64")
#   POLY_BUDGET_S     no measurement starts after this many seconds (default 400)
#   POLY_MAX_CALL_S   a job stops where its next call is predicted longer than this (default 4)
#   POLY_TIMEOUT_S    hard limit on the benchmark process (default 540; the report is rewritten after every T,
#                     so a run stopped by it still leaves the lengths done)
#   POLY_NAME         report stem (default bench_poly)
#   POLY_ARGS         more arguments for the benchmark, e.g. "--no-power --sdpa-max-T 65536 --no-errors"
#   POLY_PYTEST       1: first run tests/test_poly_triton.py on the GPU (log: $OUT/pytest_poly_triton.log)
#   POLY_SITE         where the wheels are installed (default /tmp/site)
#   POLY_POWER_AUTOTUNE  1: let power-attention autotune all its kernels (about 250 Triton compiles at the first
#                     length, minutes); default 0 sets TRITON_NO_AUTOTUNE=1, which only power-attention reads: its
#                     update_state / query_state kernels take their first valid config (the report notes it)
# Files in $OUT: NAME.json, NAME.md, NAME.png, NAME_run.log (+ pytest_poly_triton.log): at most 5.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-out/poly_device}
NAME=${POLY_NAME:-bench_poly}
DK=${POLY_DK:-16 64}
BUDGET_S=${POLY_BUDGET_S:-400}
MAX_CALL_S=${POLY_MAX_CALL_S:-4}
TIMEOUT_S=${POLY_TIMEOUT_S:-540}
SITE=${POLY_SITE:-/tmp/site}
export PYTHONUNBUFFERED=1
if [ "${POLY_POWER_AUTOTUNE:-0}" != 1 ]; then export TRITON_NO_AUTOTUNE=1; fi
mkdir -p "$OUT"
LOG="$OUT/${NAME}_run.log"
: >"$LOG"

{
  echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) poly_device.sh in $(pwd)"
  if ls .whl/*.whl >/dev/null 2>&1; then
    ls -l .whl/*.whl
    # power-attention imports vidrial, whose jit/compiler.py runs `git clone cutlass` at import unless
    # <site>/cutlass exists (it looks at Path(vidrial/jit/compiler.py).parent.parent.parent / 'cutlass'); the
    # benchmark uses power-attention's Triton kernels only, so an empty folder does.
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        && mkdir -p "$SITE/cutlass"; then
      export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
      echo "peer wheels installed into $SITE"
    else
      echo "peer wheel install FAILED: the peers will show as unavailable"
    fi
  else
    echo "no .whl/*.whl: fla and power-attention will show as unavailable"
  fi
  nvidia-smi -L || echo "nvidia-smi failed"
  python3 - <<'EOF'
import sys
import torch
try:
    import triton
    tv = triton.__version__
except Exception as e:  # noqa: BLE001
    tv = f"unavailable ({e})"
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "| triton", tv)
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
from importlib.metadata import version
for d in ("fla-core", "power-attention", "vidrial", "numpy", "einops"):
    try:
        print(f"  {d} {version(d)}")
    except Exception:  # noqa: BLE001
        print(f"  {d} not installed")
EOF
} 2>&1 | tee -a "$LOG"
# the block above ran in a pipeline's subshell: its export is gone, so put the installed peers on the path here
if [ -d "$SITE/cutlass" ]; then export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"; fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"

if [ "${POLY_PYTEST:-0}" = 1 ]; then
  echo "== pytest tests/test_poly_triton.py" | tee -a "$LOG"
  timeout -k 10 240 python3 -m pytest -q -x tests/test_poly_triton.py -p no:cacheprovider \
    >"$OUT/pytest_poly_triton.log" 2>&1
  echo "pytest rc=$? (log: pytest_poly_triton.log)" | tee -a "$LOG"
  tail -3 "$OUT/pytest_poly_triton.log" | tee -a "$LOG"
fi

T_ARGS=()
if [ -n "${POLY_T:-}" ]; then
  # shellcheck disable=SC2206
  T_ARGS=(--T $POLY_T)
fi
# shellcheck disable=SC2206
EXTRA=(${POLY_ARGS:-})
# shellcheck disable=SC2206
CMD=(python3 -m tensorattn bench poly --out "$OUT" --name "$NAME" "${T_ARGS[@]}" --dk $DK
     --budget-s "$BUDGET_S" --max-call-s "$MAX_CALL_S" "${EXTRA[@]}")
echo "== $(date -u +%H:%M:%S) ${CMD[*]}" | tee -a "$LOG"
timeout -k 15 "$TIMEOUT_S" "${CMD[@]}" 2>&1 | tee -a "$LOG"
rc=$?
echo "== $(date -u +%H:%M:%S) bench poly rc=$rc$([ "$rc" = 124 ] && echo ' (stopped by POLY_TIMEOUT_S; the report holds the lengths done)')" | tee -a "$LOG"
ls -l "$OUT" | tee -a "$LOG"
exit "$rc"
