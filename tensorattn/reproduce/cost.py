"""Section 2: wall time and peak memory against n for the exact and the fast method, forward and gradient."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .. import paper
from ..bench.harness import markdown_table
from ..bench.harness import loglog_slope
from .common import Report, Section, _plt, bounded_problem, timed


def cost_series(method: str, op: str, ns: Sequence[int], *, d: int, degree: int, seed: int, repeats: int,
                cap_s: float, device="cpu", rss0: Optional[int] = None) -> List[Dict[str, float]]:
    """Median time and peak memory of one method (exact/fast) and op (forward/gradient) over increasing n.

    Stops after the first call that takes longer than ``cap_s``. Memory: on CUDA the peak bytes allocated;
    on the CPU the growth of the process's peak resident set over ``rss0`` (n grows, so the high-water mark
    is set by the current n; coarse below a few MiB).
    """
    import resource

    cuda = torch.device(device).type == "cuda"
    if rss0 is None:
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = []
    for n in ns:
        As, E, Ws = bounded_problem(n, d, 1.0, seed=seed, device=device)
        kw = {} if method == "exact" else {"method": "fast", "degree": degree}
        fn = (lambda: paper.attention(*As, *Ws, **kw)) if op == "forward" else \
            (lambda: paper.loss_grad(*As, E, *Ws, **kw))
        try:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t, _ = timed(fn, device, repeats)
            if cuda:
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            else:
                peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024.0
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        res.append({"n": n, "s": t, "peak_mib": peak})
        if t > cap_s:
            break
    return res



def _cost_points(rep: Report, method: str, op: str, ns: Sequence[int]) -> List[Dict[str, float]]:
    """:func:`cost_series` in this process (CUDA, or ``cost_subprocess=False``), or in a fresh child process
    per method on the CPU so that each method's peak resident set is its own."""
    p, dev = rep.preset, rep.device
    kw = dict(d=p.cost_d, degree=p.cost_degree, seed=p.seed, repeats=p.repeats, cap_s=p.cost_time_cap_s)
    if torch.device(dev).type == "cuda" or not p.cost_subprocess:
        return cost_series(method, op, ns, device=dev, **kw)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]) + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    # the child's baseline: an interpreter with the child's modules imported
    rss0 = int(subprocess.run([sys.executable, "-c", "import resource, tensorattn.reproduce.cost_child; "
                               "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"], env=env,
                              capture_output=True, text=True, check=True).stdout.strip())
    cfg = dict(kw, method=method, op=op, ns=list(ns), rss0=rss0, threads=torch.get_num_threads())
    r = subprocess.run([sys.executable, "-m", "tensorattn.reproduce.cost_child", json.dumps(cfg)], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"cost measurement child failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def section_cost(rep: Report, progress) -> Section:
    from ..features import rank

    p = rep.preset
    k = rank(p.cost_d, p.cost_degree)
    s = Section("cost", "Cost: time and memory against n", {
        "d": p.cost_d, "degree": p.cost_degree, "rank k": k, "time cap per call (s)": p.cost_time_cap_s,
        "timing": f"median of {p.repeats} after a warm-up"})
    series = {}
    for method, ns in (("exact", p.cost_exact_n), ("fast", p.cost_fast_n)):
        for op in ("forward", "gradient"):
            series[(method, op)] = _cost_points(rep, method, op, ns)
            progress(f"cost {method} {op}")
    rows, slopes = [], {}
    for (method, op), pts in series.items():
        tail = pts[-4:] if method == "fast" else pts[-3:]  # asymptotic regime: the largest sizes
        slopes[(method, op)] = (loglog_slope([q["n"] for q in tail], [q["s"] for q in tail]),
                                loglog_slope([q["n"] for q in tail], [q["peak_mib"] for q in tail]))
        for q in pts:
            rows.append({"method": method, "op": op, "n": q["n"], "time (s)": q["s"], "peak memory (MiB)": q["peak_mib"]})
    s.tables.append(markdown_table(rows, ["method", "op", "n", "time (s)", "peak memory (MiB)"]))
    srows = [{"method": m, "op": o, "time slope": ts, "memory slope": ms, "largest n": series[(m, o)][-1]["n"]}
             for (m, o), (ts, ms) in slopes.items()]
    s.tables.append(markdown_table(srows, ["method", "op", "time slope", "memory slope", "largest n"]))
    mem_note = ("peak bytes allocated on the GPU" if torch.device(rep.device).type == "cuda" else
                "growth of the peak resident set of " + ("a fresh child process per method" if p.cost_subprocess
                                                         else "this process") + " (coarse below a few MiB)")
    s.text.append(f"Log-log slopes fitted over the largest sizes reached (theory: exact Θ(n³) time and O(n²) "
                  f"memory when streamed; fast n^(1+o(1)) time and O(n·k) memory). Memory is the {mem_note}.")
    # crossover of the gradient
    ex = {q["n"]: q["s"] for q in series[("exact", "gradient")]}
    fa = {q["n"]: q["s"] for q in series[("fast", "gradient")]}
    common = sorted(set(ex) & set(fa))
    faster = [n for n in common if fa[n] < ex[n]]
    if faster:
        s.text.append(f"The fast gradient is faster than the closed form from n = {faster[0]} on (of the sizes "
                      f"measured by both: {common}).")
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (method, op), pts in series.items():
        style = "-" if method == "fast" else "--"
        lab = f"{method} {op} (slope {slopes[(method, op)][0]:.2f})"
        axes[0].loglog([q["n"] for q in pts], [q["s"] for q in pts], style, marker="o", label=lab)
        axes[1].loglog([q["n"] for q in pts], [max(q["peak_mib"], 1e-3) for q in pts], style, marker="o",
                       label=f"{method} {op} (slope {slopes[(method, op)][1]:.2f})")
    axes[0].set(xlabel="n", ylabel="time (s)", title="wall time")
    axes[1].set(xlabel="n", ylabel="peak memory (MiB)", title="peak memory")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    s.figures.append(rep.figure("cost", fig))
    s.data = {"series": {f"{m}/{o}": v for (m, o), v in series.items()},
              "slopes": {f"{m}/{o}": {"time": a, "memory": b} for (m, o), (a, b) in slopes.items()}}
    return s
