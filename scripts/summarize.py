"""Tables (markdown), results/*.json and results/*.png from the experiment runs.

    PYTHONPATH=$PWD python scripts/summarize.py [--runs runs] [--kjv-runs runs] [--out results]

Reads each run's summary.json / metrics.jsonl (written by tensorattn.train), aggregates seeds as mean,
sample standard deviation and min-max, and for experiment (d) also measures how far the fast op's
gradients are from the exact ones on the trained exact models' weights.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from tensorattn._io import atomic_write_json, atomic_write_text
from tensorattn.distributed import read_checkpoint
from tensorattn.plot import plot, read_metrics


def _load(run: Path):
    s = json.loads((run / "summary.json").read_text())
    return s, read_metrics(run)  # lines that are not metrics records are skipped with a warning


def _agg(xs):
    xs = [float(x) for x in xs]
    sd = statistics.stdev(xs) if len(xs) > 1 else float("nan")
    return {"mean": statistics.fmean(xs), "std": sd, "min": min(xs), "max": max(xs), "n": len(xs), "values": xs}


def _fmt(a, digits=3, pct=False):
    f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.{digits}f}")
    return f"{f(a['mean'])} ± {f(a['std'])} ({f(a['min'])}–{f(a['max'])})"


def _at(rows, step, key):
    for r in rows:
        if r["step"] == step and key in r:
            return r[key]
    raise KeyError(f"{key} at step {step}")


def group(runs_dir: Path, prefix: str):
    runs = sorted(p for p in runs_dir.glob(f"{prefix}_seed*") if (p / "summary.json").exists())
    runs = [p for p in runs if json.loads((p / "summary.json").read_text())["finished"]]
    return runs, [_load(p) for p in runs]


def grad_agreement(run: Path, degrees=(2, 4), n_batches: int = 2):
    """Cosine similarity and relative error of the fast op's parameter gradient against the exact op's,
    on the weights of a trained exact (T) Match3 model and on its initialisation."""
    from tensorattn.config import TrainConfig
    from tensorattn.tasks import build_task

    cfg = TrainConfig(**{**json.loads((run / "config.json").read_text()), "progress": False})
    out = {}
    for when in ("init", "trained"):
        torch.manual_seed(cfg.seed)
        task = build_task(cfg)
        exact = task.build_model()
        if when == "trained":
            # weights_only: a run directory is not trusted to hold only what tensorattn wrote
            exact.load_state_dict(read_checkpoint(run / "ckpt.pt")["model"])
        batches = task.val[:n_batches]

        def grads(model):
            model.zero_grad()
            for b in batches:
                task.loss(model, b).backward()
            return torch.cat([p.grad.flatten() for p in model.parameters()])

        ge = grads(exact)
        # the score range decides how well a low-degree polynomial matches exp (docs/math.md#degree)
        attn = exact.blocks[0].attn
        with torch.no_grad():
            x = exact.blocks[0].ln1(exact.tok(batches[0][0]))
            q, k1, k2, _, _ = attn._project(x, None, None)
            sc = torch.einsum("bihd,bjhd,bkhd->bhijk", q, k1, k2) / q.shape[-1] ** 0.5
        out[f"{when}_max_abs_score"] = float(sc.abs().max())
        for g in degrees:
            pc = TrainConfig(**{**cfg.__dict__, "pattern": "P", "p_degree": g, "backend": "auto"})
            torch.manual_seed(cfg.seed)
            fast = build_task(pc).build_model()
            fast.load_state_dict(exact.state_dict())
            gf = grads(fast)
            out[f"{when}_degree{g}"] = {"cosine": float(torch.nn.functional.cosine_similarity(ge, gf, dim=0)),
                                        "rel_err": float((gf - ge).norm() / ge.norm())}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--kjv-runs", default=None)
    ap.add_argument("--out", default="results")
    args = ap.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    kjv_runs = Path(args.kjv_runs or args.runs)
    md = []

    # (a) Match3
    res_a = {}
    md += ["### (a) Match3", "", "| N | M | majority class | params | matrix (S) val acc % | tensor (T) val acc % | "
           "S acc @ step 300 | T acc @ step 300 | S tok/s | T tok/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n in (6, 8, 12):
        row = {}
        for k in ("S", "T"):
            dirs, loaded = group(runs, f"match3_N{n}_{k}")
            if not loaded:
                continue
            row[k] = {"final_val_acc": _agg([s["final"]["val_acc"] for s, _ in loaded]),
                      "val_acc_step300": _agg([_at(r, 300, "val_acc") for _, r in loaded]),
                      "final_val_loss": _agg([s["final"]["val_loss"] for s, _ in loaded]),
                      "tokens_per_s": _agg([s["tokens_per_s"] for s, _ in loaded]), "params": loaded[0][0]["params"],
                      "runs": [d.name for d in dirs]}
        if len(row) < 2:
            continue
        from tensorattn.data import match3_batch
        m = round(0.7 * n * n)
        g = torch.Generator().manual_seed(1234)
        ys = torch.cat([match3_batch(n, m, 64, g)[1] for _ in range(8)])  # the runs' validation set
        maj = max(ys.float().mean().item(), 1 - ys.float().mean().item())
        row["majority"], row["M"] = maj, m
        res_a[n] = row
        md.append(f"| {n} | {m} | {100 * maj:.1f} | {row['S']['params']} | {_fmt(row['S']['final_val_acc'], pct=True)} | "
                  f"{_fmt(row['T']['final_val_acc'], pct=True)} | {100 * row['S']['val_acc_step300']['mean']:.1f} | "
                  f"{100 * row['T']['val_acc_step300']['mean']:.1f} | {row['S']['tokens_per_s']['mean']:.0f} | "
                  f"{row['T']['tokens_per_s']['mean']:.0f} |")
        plot(sorted(runs.glob(f"match3_N{n}_[ST]_seed*")), ["train_loss", "val_acc"], out / f"match3_N{n}.png",
             title=f"Match3, N={n}, M={m}: one matrix (S) vs one tensor (T) layer, 3 seeds (mean, min-max)")
    atomic_write_json(out / "match3.json", res_a)

    # (c) multi-view
    res_c = {}
    md += ["", "### (c) UCI Multiple Features, three views (pix, fou, zer)", "",
           "| model | params | test accuracy % | test loss |", "|---|---|---|---|"]
    for mixer in ("tensor", "softmax", "concat"):
        dirs, loaded = group(runs, f"mfeat_{mixer}")
        if not loaded:
            continue
        res_c[mixer] = {"test_acc": _agg([s["final"]["test_acc"] for s, _ in loaded]),
                        "test_loss": _agg([s["final"]["val_loss"] for s, _ in loaded]),
                        "params": loaded[0][0]["params"], "runs": [d.name for d in dirs]}
        md.append(f"| {mixer} | {res_c[mixer]['params']} | {_fmt(res_c[mixer]['test_acc'], pct=True)} | "
                  f"{_fmt(res_c[mixer]['test_loss'])} |")
    if res_c:
        plot(sorted(runs.glob("mfeat_*_seed*")), ["train_loss", "test_loss", "test_acc"], out / "mfeat.png",
             title="UCI Multiple Features: cross-view tensor vs matrix cross-attention vs concat+MLP (3 seeds)")
    atomic_write_json(out / "mfeat.json", res_c)

    # (d) exact vs fast gradients
    res_d = {}
    md += ["", "### (d) exact vs fast (polynomial) tensor attention, Match3 N=8, same model and seeds", "",
           "| op | final val acc % | final val loss | tok/s (CPU) |", "|---|---|---|---|"]
    for name, prefix in (("exact (T)", "match3_N8_T"), ("poly degree 2", "match3_N8_P2"), ("poly degree 4", "match3_N8_P4")):
        dirs, loaded = group(runs, prefix)
        if not loaded:
            continue
        res_d[name] = {"final_val_acc": _agg([s["final"]["val_acc"] for s, _ in loaded]),
                       "final_val_loss": _agg([s["final"]["val_loss"] for s, _ in loaded]),
                       "tokens_per_s": _agg([s["tokens_per_s"] for s, _ in loaded]), "runs": [d.name for d in dirs]}
        md.append(f"| {name} | {_fmt(res_d[name]['final_val_acc'], pct=True)} | {_fmt(res_d[name]['final_val_loss'])} | "
                  f"{res_d[name]['tokens_per_s']['mean']:.0f} |")
    if len(res_d) > 1:
        plot(sorted(runs.glob("match3_N8_[TP]*_seed*")), ["train_loss", "val_loss", "val_acc"], out / "exact_vs_fast.png",
             title="Match3 N=8: the same tensor model trained with exact (T) and fast (P2, P4) attention, 3 seeds")
        agree = {}
        for d in sorted(runs.glob("match3_N8_T_seed*")):
            agree[d.name] = grad_agreement(d)
        res_d["gradient_agreement"] = agree
        md += ["", "| weights of the exact model | max abs score | degree | cosine(fast grad, exact grad) | "
               "‖fast − exact‖ / ‖exact‖ |", "|---|---|---|---|---|"]
        for when in ("init", "trained"):
            sc = _agg([a[f"{when}_max_abs_score"] for a in agree.values()])
            for g in (2, 4):
                k = f"{when}_degree{g}"
                cos = _agg([a[k]["cosine"] for a in agree.values()])
                rel = [a[k]["rel_err"] for a in agree.values()]
                md.append(f"| {when} | {sc['mean']:.3g} | {g} | {_fmt(cos, 4)} | "
                          f"{statistics.fmean(rel):.2g} ({min(rel):.2g}–{max(rel):.2g}) |")
    atomic_write_json(out / "exact_vs_fast.json", res_d)

    # (b) KJV
    res_b = {}
    md += ["", "### (b) KJV character LM (held-out books Ruth, Jonah, Mark, James)", "",
           "| model | params | tokens | val bits/char | train tok/s |", "|---|---|---|---|---|"]
    for name in ("S", "SSST_exact", "SSST_poly"):
        dirs, loaded = group(kjv_runs, f"kjv_{name}")
        if not loaded:
            continue
        res_b[name] = {"val_bpc": _agg([s["final"]["val_bpc"] for s, _ in loaded]),
                       "tokens_per_s": _agg([s["tokens_per_s"] for s, _ in loaded]), "params": loaded[0][0]["params"],
                       "tokens": loaded[0][0]["tokens"], "device": loaded[0][0]["machine"].get("device"),
                       "runs": [d.name for d in dirs]}
        md.append(f"| {name} | {res_b[name]['params']} | {res_b[name]['tokens']} | {_fmt(res_b[name]['val_bpc'])} | "
                  f"{_fmt(res_b[name]['tokens_per_s'], 0)} |")
    if res_b:
        plot(sorted(kjv_runs.glob("kjv_*_seed*")), ["train_loss", "val_bpc"], out / "kjv.png",
             title="KJV char-LM: SSSS vs SSST (exact, window 32) vs SSSP (fast), 3 seeds")
    atomic_write_json(out / "kjv.json", res_b)
    atomic_write_text(out / "tables.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
