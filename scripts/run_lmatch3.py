"""Long-range Match3 (task ``lmatch3``): fast tensor (P), windowed exact tensor (T) and softmax (S) layers at equal
parameter count and an equal wall-clock budget each, with the majority-class baseline.

    python scripts/run_lmatch3.py --device cuda --n 2048 --gap 512 --budget-s 300 --seeds 3 --out results/lmatch3_gpu

Every run is ``tensorattn train --config configs/lmatch3_fast.toml`` with the layer kind, its head dims (chosen
so that each attention layer has the same number of weights: ``6 * dim * H * 8`` for P with Dk 16, Dv 8, ``6 * dim
* H * 12`` for T, ``4 * dim * H * 18`` for S, all 13,824 at dim 48 and 4 heads), the sequence length and gap, the
seed and ``time_budget_s`` (each model trains until its budget of training steps is spent, its cosine schedule
over the budget; the first steps' compilation counts against it, a few seconds on a GPU). The window of T
(``--window``) is shorter than the gap, so T cannot see the evidence; that is
the point of the comparison. Finished runs are skipped (the script resumes). Writes OUT.json (every run) and
OUT.md (mean ± std of the final validation accuracy over seeds, steps reached, tokens/s, the baseline, the
command), atomically.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from tensorattn._io import atomic_write_json, atomic_write_text  # noqa: E402
from tensorattn.bench.harness import markdown_table, mean_std  # noqa: E402

CONFIG = ROOT / "configs" / "lmatch3_fast.toml"
# layer kind -> (pattern, overrides giving every attention layer 13,824 weights at dim 48, 4 heads)
MODELS = {"P": ["pattern=PP", "t_head_dim=8", "p_key_dim=16"],
          "T": ["pattern=TT", "t_head_dim=12"],
          "S": ["pattern=SS", "head_dim=18"]}
NAMES = {"P": "fast tensor (P)", "T": "windowed tensor (T)", "S": "softmax (S)"}


def _run(model: str, seed: int, args) -> dict:
    out = Path(args.runs) / f"{model}_seed{seed}"
    summary = out / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("finished"):
        return json.loads(summary.read_text())
    from tensorattn.config import load_config
    from tensorattn.train import train

    over = MODELS[model] + [f"device={args.device}", f"lmatch3_n={args.n}", f"lmatch3_gap={args.gap}",
                            f"time_budget_s={args.budget_s}", f"steps={args.max_steps}",
                            f"eval_every={args.eval_every}", f"log_every={args.eval_every}", f"window={args.window}",
                            f"seed={seed}", f"out_dir={out}", "progress=false"]
    return train(load_config(str(CONFIG), over))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n", type=int, default=2048, help="sequence length (lmatch3_n)")
    ap.add_argument("--gap", type=int, default=512, help="every mark at least this far before the query")
    ap.add_argument("--window", type=int, default=64, help="T's window (both streams); keep it below --gap")
    ap.add_argument("--budget-s", type=float, default=300.0, help="seconds of training steps per run")
    ap.add_argument("--max-steps", type=int, default=1_000_000, help="step cap (the budget should end first)")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--models", default="P,T,S")
    ap.add_argument("--runs", default="runs/lmatch3")
    ap.add_argument("--out", default="results/lmatch3")
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise SystemExit(f"--models: unknown {bad}; choose from {sorted(MODELS)}")
    if args.window >= args.gap:
        raise SystemExit(f"--window ({args.window}) must be below --gap ({args.gap}): the window must not see the "
                         "marks")
    results = {(m, s): _run(m, s, args) for m in models for s in range(args.seeds)}
    rows = []
    for m in models:
        rs = [results[(m, s)] for s in range(args.seeds)]
        accs = [r["final"]["val_acc"] for r in rs]
        rows.append(dict(model=NAMES[m], params=rs[0]["params"], val_acc=accs, steps=[r["step"] for r in rs],
                         tokens_per_s=statistics.mean(r["tokens_per_s"] for r in rs),
                         train_time_s=[r["train_time_s"] for r in rs], majority=rs[0]["task_info"]["majority"]))
    cmd = "python scripts/run_lmatch3.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(str(out.with_suffix(".json")), {"command": cmd, "rows": rows})

    cells = [{"model": r["model"], "params": f"{r['params']:,}", "val acc %": mean_std(r["val_acc"], scale=100),
              "majority %": f"{100 * r['majority']:.1f}", "steps reached": f"{min(r['steps']):,}–{max(r['steps']):,}",
              "tokens/s": f"{r['tokens_per_s']:.3g}"} for r in rows]
    md = (f"Command: `{cmd}` (configs/lmatch3_fast.toml; {args.seeds} seeds; {args.budget_s:g} s of training steps "
          f"per run; n = {args.n}, gap = {args.gap}, T's window {args.window})\n\n")
    md += markdown_table(cells, list(cells[0]))
    atomic_write_text(str(out.with_suffix(".md")), md)
    print(md, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
