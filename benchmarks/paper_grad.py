"""Closed-form gradient (Lemma 3.1, Θ(n³d)) against the paper's fast gradient (Algorithm 1, n^{1+o(1)}) on the CPU.

For n = 16, 32, ..., n_max (powers of two), d in --ds and degree g in --gs it times
``tensorattn.paper.loss_grad(method="closed_form")`` (independent of g; run until a call would pass
--cap-s) and ``tensorattn.fast.fast_loss_grad(degree=g)`` through ``tensorattn.bench.harness.time_fn``
(warm-up, median and p20/p80 spread), fits log-log slopes of time against n (expect about 3 and 1),
and writes ``<out>.json``, ``<out>.md`` (via ``tensorattn.bench.harness.write_report``) and ``<out>.png``.

Memory per point, two figures:
* ``rss_mib``: measured growth of the peak resident set during one call, in a fresh subprocess
  (``--rss``, default on; only for points whose call took < --rss-max-s, NaN otherwise);
* ``model_mib``: the largest intermediates counted analytically (float64): closed form
  ``8·(n²d + 5·bq·n²)`` bytes (the value matrix h and ~5 [bq, n²] blocks, bq = max(1, min(n, 2²²/n²))),
  fast ``8·(10·n·d + 3·rows·k)`` (Q, K, V and their float64 copies, ~3 feature blocks of rows × k,
  rows = max(64, 2²⁰/k)).

Full run:   python benchmarks/paper_grad.py
Small run:  python benchmarks/paper_grad.py --n-max 1024 --ds 4 --gs 2 --cap-s 2
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tensorattn import fast, paper  # noqa: E402
from tensorattn.bench.harness import guarded, loglog_slope, machine_info, time_fn, write_report  # noqa: E402
from tensorattn.fast import fast_loss_grad  # noqa: E402
from tensorattn.features import rank  # noqa: E402


def make_problem(n: int, d: int, seed: int = 0):
    """Bounded float64 inputs: logits stay within about ±1 (the bounded regime of the paper)."""
    g = torch.Generator().manual_seed(seed)
    A = [torch.randn(n, d, generator=g, dtype=torch.float64) * 0.5 for _ in range(5)]
    W = [torch.randn(d, d, generator=g, dtype=torch.float64) * (0.8 / math.sqrt(d)) for _ in range(5)]
    E = torch.randn(n, d, generator=g, dtype=torch.float64)
    return A, E, W


def call(method: str, n: int, d: int, g: int):
    A, E, W = make_problem(n, d)
    if method == "closed_form":
        return lambda: paper.loss_grad(*A, E, *W, method="closed_form")
    return lambda: fast_loss_grad(*A, E, *W, degree=g)


def model_mib(method: str, n: int, d: int, g: int) -> float:
    if method == "closed_form":
        bq = max(1, min(n, paper._ROW_ELEMS // (n * n)))  # the query rows paper.loss_grad streams at once
        return 8 * (n * n * d + 5 * bq * n * n) / 2**20
    k = rank(d, g)
    rows = max(64, fast._CHUNK_ELEMS // k)
    return 8 * (10 * n * d + 3 * min(rows, n) * k) / 2**20


def _status_kib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return float(line.split()[1])
    raise KeyError(key)


def worker(method: str, n: int, d: int, g: int) -> None:
    """Subprocess: build the inputs, then report the peak-RSS growth of one call (MiB) as JSON.

    The peak (VmHWM) is reset after the inputs are built (``/proc/self/clear_refs``), so the import
    of torch and the inputs do not count; a tiny warm-up call first loads lazily initialised libraries.
    """
    torch.set_num_threads(1)
    call(method, 16, d, g)()
    fn = call(method, n, d, g)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set to the current one
    before = _status_kib("VmRSS")
    fn()
    print(json.dumps({"rss_mib": max(0.0, (_status_kib("VmHWM") - before) / 1024)}))


def rss_point(method: str, n: int, d: int, g: int) -> float:
    try:
        out = subprocess.run([sys.executable, __file__, "--worker", method, str(n), str(d), str(g)],
                             capture_output=True, text=True, timeout=600, check=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        return float(json.loads(out.stdout.strip().splitlines()[-1])["rss_mib"])
    except Exception:  # a crashed or killed worker (e.g. OOM) is a missing figure, not a crash
        return float("nan")


def measure(method: str, n: int, d: int, g: int, args) -> dict:
    fn = call(method, n, d, g)

    def run():
        t0 = time.perf_counter()
        fn()  # doubles as the warm-up
        probe = time.perf_counter() - t0
        if probe > 2.0:  # slow point: one more call, no further repeats
            r = time_fn(fn, warmup=0, rep=1)
        else:
            r = time_fn(fn, warmup=1, rep=args.rep, max_time_s=5.0)
        return r

    r = guarded(run)
    row = {"method": method, "d": d, "g": g if method == "fast" else "-", "n": n,
           "k": rank(d, g) if method == "fast" else "-", "ms": r["ms"], "ms_p20": r.get("ms_p20", float("nan")),
           "ms_p80": r.get("ms_p80", float("nan")), "reps": r.get("reps", 0), "model_mib": model_mib(method, n, d, g)}
    row["rss_mib"] = rss_point(method, n, d, g) if (args.rss and r["ms"] / 1e3 < args.rss_max_s) else float("nan")
    return row


def slope(rows, n_min: int) -> float:
    """The measured time exponent over the rows with ``n >= n_min``."""
    tail = [r for r in rows if r["n"] >= n_min]
    return loglog_slope([r["n"] for r in tail], [r["ms"] for r in tail])


def plot(rows, path: Path, ds) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(ds), figsize=(5.5 * len(ds), 8), squeeze=False)
    for col, d in enumerate(ds):
        series = {}
        for r in rows:
            if r["d"] == d:
                series.setdefault((r["method"], r["g"]), []).append(r)
        for (method, g), rs in sorted(series.items(), key=lambda kv: str(kv[0])):
            rs = sorted(rs, key=lambda r: r["n"])
            label = "closed form (Lemma 3.1)" if method == "closed_form" else f"fast, g={g} (k={rs[0]['k']})"
            style = "k-o" if method == "closed_form" else "-s"
            axes[0][col].loglog([r["n"] for r in rs], [r["ms"] / 1e3 for r in rs], style, label=label, ms=3)
            axes[1][col].loglog([r["n"] for r in rs], [r["model_mib"] for r in rs], style, label=label, ms=3)
        axes[0][col].set_title(f"loss gradient dLoss/dX, d = {d}, CPU float64")
        axes[0][col].set_ylabel("wall time per call (s)")
        axes[1][col].set_ylabel("largest intermediates, counted (MiB)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xlabel("n (sequence length)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-min", type=int, default=16)
    p.add_argument("--n-max", type=int, default=65536)
    p.add_argument("--ds", type=int, nargs="+", default=[4, 8])
    p.add_argument("--gs", type=int, nargs="+", default=[2, 4, 6])
    p.add_argument("--cap-s", type=float, default=20.0, help="stop a method once a call would take longer (s)")
    p.add_argument("--fast-cap-s", type=float, default=60.0, help="the same cap for the fast gradient (s)")
    p.add_argument("--rep", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rss", action=argparse.BooleanOptionalAction, default=True,
                   help="measure peak-RSS growth per point in a fresh subprocess")
    p.add_argument("--rss-max-s", type=float, default=3.0, help="skip the RSS subprocess for slower points")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "paper_grad"))
    p.add_argument("--worker", nargs=4, metavar=("METHOD", "N", "D", "G"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker[0], *map(int, args.worker[1:]))
        return 0
    torch.set_num_threads(args.threads)
    ns = [n for n in (2**i for i in range(4, 40)) if args.n_min <= n <= args.n_max]
    rows = []
    for d in args.ds:
        for method, g in [("closed_form", 0)] + [("fast", g) for g in args.gs]:
            last = None
            for n in ns:
                if last is not None and (last["ms"] != last["ms"] or  # OOM: larger n will not fit either
                                         last["ms"] / 1e3 * (n / last["n"]) ** (3 if method == "closed_form" else 1)
                                         > (args.cap_s if method == "closed_form" else args.fast_cap_s)):
                    break
                row = measure(method, n, d, g, args)
                rows.append(row)
                last = row
                print(f"{method:11s} d={d} g={row['g']} n={n:6d}: {row['ms']:10.2f} ms  "
                      f"model {row['model_mib']:.1f} MiB  rss {row['rss_mib']:.1f} MiB", flush=True)
    fits = []
    for d in args.ds:
        for method, g in [("closed_form", "-")] + [("fast", g) for g in args.gs]:
            rs = [r for r in rows if r["d"] == d and r["method"] == method and r["g"] == g]
            if not rs:
                continue
            n_top = max(r["n"] for r in rs)
            n_fit = 64 if method == "closed_form" else 2048
            fits.append({"method": method, "d": d, "g": g, "n_fit_from": n_fit, "largest_n": n_top,
                         "slope": slope(rs, n_fit),
                         "ms_at_largest_n": next(r["ms"] for r in rs if r["n"] == n_top)})
    out = Path(args.out)
    cmd = "python benchmarks/paper_grad.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {**machine_info("cpu"), "command": cmd.strip(), "cap_s": args.cap_s, "threads": args.threads,
            "dtype": "float64", "fits": fits,
            "memory_note": "model_mib: counted largest intermediates (see the module docstring); rss_mib: "
                           "peak-RSS growth of one call in a fresh subprocess (NaN: not measured)"}
    fit_table = ["| method | d | g | fit from n | largest n | log-log slope | ms at largest n |",
                 "|---|---|---|---|---|---|---|"]
    for f in fits:
        fit_table.append(f"| {f['method']} | {f['d']} | {f['g']} | {f['n_fit_from']} | {f['largest_n']} | "
                         f"{f['slope']:.2f} | {f['ms_at_largest_n']:.1f} |")
    notes = ("## Fitted log-log slopes (time ~ n^slope)\n\n" + "\n".join(fit_table) +
             f"\n\nThe closed form stops once its next call would pass {args.cap_s:g} s (fast: {args.fast_cap_s:g} s). model_mib counts the "
             "largest intermediates analytically; rss_mib is measured in a fresh subprocess (NaN where skipped). "
             f"Plot: {out.name}.png (same command).")
    write_report(out, title="Closed-form vs fast loss gradient (CPU, float64)", rows=rows,
                 columns=["method", "d", "g", "k", "n", "ms", "ms_p20", "ms_p80", "reps", "model_mib", "rss_mib"],
                 meta=meta, notes=notes)
    plot(rows, out.with_suffix(".png"), args.ds)
    print("\n".join(fit_table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
