"""Match3 in both label variants (Sanford et al.'s and the distinct-position one), one tensor layer against one
matrix layer at equal parameter count, with the baselines of every row (majority class, pairwise rule).

    python scripts/run_match3.py --runs runs/match3v2 --out results/match3_v2   # CPU, two processes

Each run is `tensorattn train` with configs/match3_{tensor,softmax}.toml and `match3_n`, `match3_distinct`,
`seed` overrides; the modulus is the measured balanced one (`match3_m = 0`). Finished runs are skipped, so the
script resumes. Writes OUT.json (every run) and OUT.md (mean ± std over seeds, baselines, command).
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from tensorattn._io import atomic_write_json, atomic_write_text  # noqa: E402
from tensorattn.bench.harness import markdown_table, mean_std  # noqa: E402

CONFIGS = {"S": ROOT / "configs" / "match3_softmax.toml", "T": ROOT / "configs" / "match3_tensor.toml"}


def _run(job):
    name, model, n, distinct, seed, runs, steps = job
    out = Path(runs) / name
    summary = out / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("finished"):
        return name, json.loads(summary.read_text())
    from tensorattn.config import load_config
    from tensorattn.train import train

    cfg = load_config(str(CONFIGS[model]), [f"match3_n={n}", f"match3_distinct={str(distinct).lower()}",
                                            f"seed={seed}", f"out_dir={out}", "progress=false"]
                      + ([f"steps={steps}", f"eval_every={max(1, steps // 6)}"] if steps else []))
    return name, train(cfg)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="runs/match3v2")
    ap.add_argument("--out", default="results/match3_v2")
    ap.add_argument("--n", type=int, nargs="+", default=[6, 8, 10, 12])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=0, help="training steps (default: the configs' 600)")
    args = ap.parse_args(argv)
    jobs = [(f"{'distinct' if d else 'original'}_N{n}_{m}_seed{s}", m, n, d, s, args.runs, args.steps)
            for d in (False, True) for n in args.n for m in ("S", "T") for s in range(args.seeds)]
    with ProcessPoolExecutor(args.workers) as ex:
        results = dict(ex.map(_run, jobs))
    rows = []
    for d in (False, True):
        for n in args.n:
            row = {"variant": "distinct" if d else "original", "N": n}
            for m in ("S", "T"):
                accs = [results[f"{row['variant']}_N{n}_{m}_seed{s}"]["final"]["val_acc"] for s in range(args.seeds)]
                row[m] = accs
            info = results[f"{row['variant']}_N{n}_S_seed0"]["task_info"]
            row.update(m=info["match3_m"], positive_rate=info["positive_rate"], majority=info["majority"],
                       pairwise_rule=info["pairwise_rule"], params={m: results[f"{row['variant']}_N{n}_{m}_seed0"]
                                                                    ["params"] for m in ("S", "T")})
            rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python scripts/run_match3.py " + " ".join(argv if argv is not None else sys.argv[1:])
    atomic_write_json(str(out.with_suffix(".json")), {"command": cmd, "rows": rows})

    cells = [{"labels": r["variant"], "N": str(r["N"]), "M": str(r["m"]),
              "positive %": f"{100 * r['positive_rate']:.1f}",
              "majority %": f"{100 * r['majority']:.1f}", "pairwise rule %": f"{100 * r['pairwise_rule']:.1f}",
              "params S / T": f"{r['params']['S']} / {r['params']['T']}",
              "matrix (S) val acc %": mean_std(r["S"], scale=100), "tensor (T) val acc %": mean_std(r["T"], scale=100)}
             for r in rows]
    md = (f"Command: `{cmd}` (CPU; configs/match3_softmax.toml and match3_tensor.toml, {args.steps or 600} steps, "
          f"{args.seeds} seeds)\n\n" + markdown_table(cells, list(cells[0])))
    atomic_write_text(str(out.with_suffix(".md")), md)
    print(md, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
