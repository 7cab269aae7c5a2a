#!/usr/bin/env bash
# Experiments (a) Match3, (c) UCI Multiple Features and (d) exact vs fast gradients, on one CPU thread.
# Usage: bash scripts/run_cpu_experiments.sh [RUNS_DIR]   (default runs/); then python scripts/summarize.py
# Each run is resumable: rerunning the script skips finished runs and continues interrupted ones.
set -euo pipefail
RUNS=${1:-runs}
export OMP_NUM_THREADS=1
T="python -m tensorattn train"
run() {  # run NAME CONFIG [key=value ...]
  local name=$1 cfg=$2; shift 2
  if [ -f "$RUNS/$name/summary.json" ] && grep -q '"finished": true' "$RUNS/$name/summary.json"; then return; fi
  $T --config "$cfg" out_dir="$RUNS/$name" progress=false "$@"
}
for seed in 0 1 2; do
  for mixer in tensor softmax concat; do run "mfeat_${mixer}_seed$seed" "configs/mfeat_$mixer.toml" seed=$seed; done
done
for n in 6 8 12; do
  for seed in 0 1 2; do
    run "match3_N${n}_S_seed$seed" configs/match3_softmax.toml match3_n=$n seed=$seed
    run "match3_N${n}_T_seed$seed" configs/match3_tensor.toml match3_n=$n seed=$seed
  done
done
for deg in 2 4; do
  for seed in 0 1 2; do run "match3_N8_P${deg}_seed$seed" configs/match3_poly.toml match3_n=8 p_degree=$deg seed=$seed; done
done
