"""Experiment (b) on one GPU: the three KJV configs x seeds in one process, seed-major, under a deadline.

    PYTHONPATH=$PWD python3 scripts/run_kjv.py --runs runs --seeds 0 1 2 --deadline 420 [--pack OUT.tar.gz]

Seed-major order (all configs for seed 0, then seed 1, ...) means that if the deadline cuts the work short,
every config still has the same completed seeds. Before the real runs, each config takes 30 steps with the
requested backends; if that fails (a kernel that does not fit this GPU, say), the run falls back to the
pure-PyTorch backend and the fallback is recorded in ``backend_note.json``. The smoke also measures each
config's seconds per step (steps 10 to 30, after warm-up), and ``steps`` is lowered, equally for every
config (same tokens), so that all seeds fit before the deadline; the chosen value is recorded too. With ``--pack``, the metrics
and summaries (no checkpoints) are packed into one archive after every run, so they survive a timeout.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

from tensorattn._io import atomic_write_json
from tensorattn.config import load_config
from tensorattn.train import train

CONFIGS = {"S": "configs/kjv_softmax.toml", "SSST_exact": "configs/kjv_ssst_exact.toml",
           "SSST_poly": "configs/kjv_ssst_poly.toml"}


def pack(runs: Path, dest: Path) -> None:
    tmp = dest.with_suffix(".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for f in sorted(runs.glob("kjv_*/*")):
            if f.name in ("metrics.jsonl", "summary.json", "config.json"):  # not the checkpoints
                tar.add(f, arcname=str(f.relative_to(runs.parent)))
        note = runs / "backend_note.json"
        if note.exists():
            tar.add(note, arcname=str(note.relative_to(runs.parent)))
    tmp.replace(dest)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--deadline", type=float, default=420.0, help="seconds; no new run starts after it")
    ap.add_argument("--pack")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    t0 = time.time()
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    extra = {}
    notes = {}
    sec_per_step = {}
    for name, path in CONFIGS.items():  # smoke: 30 steps with the requested backends, timed after warm-up
        for attempt in ([], ["backend=torch", "p_backend=torch"]):
            tmp = tempfile.mkdtemp()
            try:
                train(load_config(path, [*args.overrides, *attempt, f"out_dir={tmp}", "steps=30", "eval_every=30",
                                         "eval_batches=1", "log_every=10", "warmup_steps=10", "progress=false",
                                         "resume=false"]))
                rows = {r["step"]: r for r in map(json.loads, open(f"{tmp}/metrics.jsonl"))}
                t = {k: rows[k]["tokens"] / rows[k]["tokens_per_s"] for k in (10, 30)}
                sec_per_step[name] = (t[30] - t[10]) / 20
                notes[name] = "requested backends ran" if not attempt else notes[name]
                extra[name] = attempt
                break
            except Exception:
                notes[name] = "fell back to backend=torch p_backend=torch: " + traceback.format_exc(limit=3)[-1500:]
                print(notes[name], file=sys.stderr)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    active = [n for n in CONFIGS if n in sec_per_step]  # a config that failed even on torch is reported, not run
    base = load_config(CONFIGS["S"], args.overrides)
    left = args.deadline - (time.time() - t0)
    # 15% for evaluation, 8 s per run for start-up and data
    per_step = sum(sec_per_step.values()) * 1.15
    steps = max(100, min(base.steps, int((left / len(args.seeds) - 8 * len(active)) / per_step)))
    notes["sec_per_step"] = sec_per_step
    notes["steps"] = steps
    atomic_write_json(runs / "backend_note.json", notes)
    print(f"smoke done in {time.time() - t0:.0f}s: {json.dumps(notes)[:2000]}", flush=True)
    for seed in args.seeds:
        for name in active:
            path = CONFIGS[name]
            if time.time() - t0 > args.deadline:
                print(f"deadline reached before {name} seed {seed}", flush=True)
                return 0
            cfg = load_config(path, [*args.overrides, *extra.get(name, []), f"seed={seed}", f"steps={steps}",
                                     f"out_dir={runs}/kjv_{name}_seed{seed}", "progress=false"])
            s = train(cfg)
            print(json.dumps({"run": f"kjv_{name}_seed{seed}", "tokens_per_s": round(s["tokens_per_s"]),
                              **s["final"], "elapsed": round(time.time() - t0)}), flush=True)
            if args.pack:
                pack(runs, Path(args.pack))
    return 0


if __name__ == "__main__":
    sys.exit(main())
