"""``tensorattn reproduce``: the experiments the paper lacks, as one command that writes a report with plots.

Sections (each states its configuration, seed, device and versions):

1. correctness: the closed-form gradient against autograd; the fast forward and gradient against the exact
   ones at several degrees; orders 1, 2, 3 against the exact order-m reference;
2. cost: wall time and peak memory against n for the exact and the fast method, forward and gradient,
   with fitted log-log slopes;
3. approximation quality and the paper's threshold: error against the entry bound B at fixed n and degree;
   the degree and the rank needed for a target error as B grows, with the break-even rank of the fast method
   and the curve B³ = ln n; the measured time of the fast gradient against B next to the exact one;
4. order m: the same threshold for m = 1, 2, 3 key factors (logits bounded by B^(m+1));
5. head dimension: rank, time and error against d at a fixed target error, and what projecting keys to a
   small dimension buys;
6. training: gradient descent on the paper's objective (Definition 2.8) with the exact and the fast gradient
   from the same start.

``--preset quick`` is CPU-sized (a few minutes on 2 cores); ``--preset full`` is meant for a GPU. All
numerics are float64 (the paper's regime of exact arithmetic; the point is the algorithm, not the dtype).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import paper
from ._bench import _sync, fmt, machine_info, markdown_table, time_fn
from .check import max_errors as err
from ._io import atomic_write, atomic_write_json, atomic_write_text, remove_stale_temps

F64 = torch.float64


# ------------------------------------------------------------------------------------------------ presets
@dataclass
class Preset:
    name: str
    seed: int = 0
    # 1 correctness
    corr_n: int = 48
    corr_d: int = 4
    corr_degrees: Tuple[int, ...] = (2, 4, 6, 8)
    order_n: Tuple[int, ...] = (24, 16, 8)  # n for m = 1, 2, 3
    # 2 cost
    cost_d: int = 4
    cost_degree: int = 4
    cost_exact_n: Tuple[int, ...] = (32, 64, 128, 256, 384)
    cost_fast_n: Tuple[int, ...] = (16, 64, 256, 1024, 4096, 16384, 65536)
    cost_time_cap_s: float = 20.0
    cost_subprocess: bool = True  # CPU: one child process per method, so peak memory is its own
    # 3 threshold
    thr_n: int = 64
    thr_d: int = 4
    thr_degrees: Tuple[int, ...] = (2, 4, 8)
    thr_B: Tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
    thr_ns: Tuple[int, ...] = (10**3, 10**4, 10**6, 10**9)
    thr_time_n: int = 128
    thr_time_eps: float = 1e-4
    thr_time_B: Tuple[float, ...] = (0.5, 1.0, 1.25, 1.5, 1.75, 2.0)
    # 4 order
    ord_ns: Tuple[int, ...] = (10**3, 10**6, 10**9)
    ord_err_n: Tuple[int, ...] = (32, 16, 8)
    ord_err_B: Tuple[float, ...] = (0.5, 1.0, 1.5)
    # 5 head dim
    hd_ds: Tuple[int, ...] = (2, 4, 8, 16)
    hd_n: int = 128
    hd_eps: float = 1e-3
    hd_max_rank: int = 5000
    # 6 training
    tr_n: int = 48
    tr_d: int = 4
    tr_steps: int = 60
    tr_lr: float = 60.0  # the loss is small (outputs are averages over n² pairs), so steps must be large
    tr_B: float = 2.0  # entry bound of the starting weights; the teacher that defines E uses 1.5× that
    tr_degrees: Tuple[int, ...] = (2, 4, 8)
    repeats: int = 3


PRESETS = {
    "quick": Preset("quick"),
    "full": Preset("full", corr_n=96, cost_exact_n=(16, 32, 64, 128, 256, 512, 1024),
                   cost_fast_n=(16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576), cost_time_cap_s=30.0,
                   thr_n=128, thr_B=(0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5), thr_time_n=512,
                   thr_time_B=(0.5, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25), ord_err_n=(64, 32, 12),
                   ord_err_B=(0.5, 1.0, 1.5, 2.0), hd_n=1024, hd_eps=1e-3, hd_max_rank=80000,
                   tr_n=128, tr_steps=200, tr_degrees=(2, 4, 8), repeats=3),
    # test-sized: every section and figure, in seconds
    "tiny": Preset("tiny", corr_n=10, corr_degrees=(2, 4), order_n=(8, 6, 4), cost_exact_n=(8, 16),
                   cost_fast_n=(8, 16, 64), cost_time_cap_s=5.0, cost_subprocess=False, thr_n=12, thr_degrees=(2, 4),
                   thr_B=(0.5, 1.0), thr_ns=(10**3, 10**6), thr_time_n=16, thr_time_B=(0.5, 1.0),
                   ord_ns=(10**3, 10**6), ord_err_n=(8, 6, 4), ord_err_B=(0.5, 1.0), hd_ds=(2, 4), hd_n=16,
                   hd_max_rank=200, tr_n=8, tr_steps=4, tr_lr=2.0, tr_degrees=(2,), repeats=1),
}


# ------------------------------------------------------------------------------------------------ problems
def bounded_problem(n: int, d: int, B: float, *, seed: int, device, w_scale: float = 1.0):
    """Paper inputs with ``max |A_i W_i| == B`` exactly for each of Q, K1, K2, V1, V2 (the paper's bound).

    ``A_i`` are uniform in [-1, 1]; each ``W_i`` is a random matrix rescaled so that the product's largest
    entry is ``B``. ``E`` is a random target of the output's size.
    """
    g = torch.Generator().manual_seed(seed)
    As = [(torch.rand(n, d, generator=g, dtype=F64) * 2 - 1) for _ in range(5)]
    Ws = []
    for A in As:
        W = torch.randn(d, d, generator=g, dtype=F64) * w_scale
        W = W * (B / (A @ W).abs().max())
        Ws.append(W)
    E = torch.randn(n, d, generator=g, dtype=F64) * 0.1
    dev = torch.device(device)
    return [a.to(dev) for a in As], E.to(dev), [w.to(dev) for w in Ws]


def qkv_bounded(n: int, d: int, m: int, B: float, *, seed: int, device):
    """``q``, ``m`` keys and ``m`` values of shape ``[n, d]`` with entries uniform in ``[-B, B]``."""
    g = torch.Generator().manual_seed(seed)
    u = lambda: ((torch.rand(n, d, generator=g, dtype=F64) * 2 - 1) * B).to(device)  # noqa: E731
    return u(), [u() for _ in range(m)], [u() for _ in range(m)]


def naive_order_2d(q, keys, values, scale):
    """Exact order-m attention for ``[n, d]`` inputs, through the package reference."""
    from .naive import naive_order_attn

    o = naive_order_attn(q[None, :, None], [k[None, :, None] for k in keys], [v[None, :, None] for v in values],
                         scale=scale)
    return o[0, :, 0]


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log y against log x over the finite, positive points (NaN if < 2)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y and y > 0 and math.isfinite(y)]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx > 0 else float("nan")


def timed(fn: Callable[[], Any], device, repeats: int = 1) -> Tuple[float, Any]:
    """Median time of ``fn()`` in seconds over ``repeats`` calls after one warm-up call, and its result.

    The timing is :func:`tensorattn._bench.time_fn` (device events on CUDA), held to exactly ``repeats`` calls.
    """
    out = fn()  # the warm-up call also gives the result
    t = time_fn(fn, device=device, warmup=0, rep=repeats, max_time_s=math.inf)
    return t["ms"] / 1e3, out


# ------------------------------------------------------------------------------------------------ report
@dataclass
class Section:
    key: str
    title: str
    config: Dict[str, Any]
    text: List[str] = field(default_factory=list)
    tables: List[str] = field(default_factory=list)
    figures: List[str] = field(default_factory=list)
    data: Dict[str, Any] = field(default_factory=dict)


class Report:
    def __init__(self, out: Path, device: str, preset: Preset):
        self.out, self.device, self.preset = out, device, preset
        self.sections: List[Section] = []
        self.meta = machine_info(torch.device(device))

    def figure(self, name: str, fig) -> str:
        path = self.out / f"{name}.png"
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"), binary=True)
        import matplotlib.pyplot as plt

        plt.close(fig)
        return path.name

    def render(self, command: str) -> str:
        m = self.meta
        lines = ["# tensorattn reproduce: the experiments the paper lacks", "",
                 f"- command: `{command}`", f"- preset: {self.preset.name}, seed {self.preset.seed}",
                 f"- device: {m['device']}", f"- torch {m['torch']}, triton {m.get('triton')}, python {m['python']}",
                 f"- generated: {m['time_utc']}", "- arithmetic: float64 throughout", ""]
        lines += ["## Contents", ""] + [f"{i + 1}. {s.title}" for i, s in enumerate(self.sections)] + [""]
        for i, s in enumerate(self.sections):
            lines += [f"## {i + 1}. {s.title}", "",
                      "Configuration: " + ", ".join(f"{k}={v}" for k, v in s.config.items())
                      + f"; seed {self.preset.seed}; device {m['device']}; torch {m['torch']}, "
                      f"python {m['python']}.", ""]
            lines += s.text + [""]
            for t in s.tables:
                lines += [t, ""]
            for f in s.figures:
                lines += [f"![{f}]({f})", ""]
        return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------------------ sections
def section_correctness(rep: Report) -> Section:
    from .check import _autograd_grad
    from .fast import fast_order_attn

    p, dev = rep.preset, rep.device
    s = Section("correctness", "Correctness", {"n": p.corr_n, "d": p.corr_d, "degrees": p.corr_degrees,
                                               "entry bound B": 1.0})
    rows = []
    for n, d in [(6, 2), (10, 3), (p.corr_n // 2, p.corr_d)]:
        As, E, Ws = bounded_problem(n, d, 1.0, seed=p.seed, device=dev)
        g_ref, _ = _autograd_grad(As, E, Ws)
        a, r = err(paper.loss_grad(*As, E, *Ws), g_ref)
        rows.append({"what": f"closed-form dLoss/dX vs autograd (n={n}, d={d})", "max abs err": a, "rel err": r})
    As, E, Ws = bounded_problem(p.corr_n, p.corr_d, 1.0, seed=p.seed + 1, device=dev)
    o_ex = paper.attention(*As, *Ws)
    g_ex = paper.loss_grad(*As, E, *Ws)
    fwd_errs, grad_errs = [], []
    for g in p.corr_degrees:
        a, r = err(paper.attention(*As, *Ws, method="fast", degree=g), o_ex)
        fwd_errs.append(a)
        rows.append({"what": f"fast forward vs exact, degree {g}", "max abs err": a, "rel err": r})
        a, r = err(paper.loss_grad(*As, E, *Ws, method="fast", degree=g), g_ex)
        grad_errs.append(a)
        rows.append({"what": f"fast dLoss/dX vs closed form, degree {g}", "max abs err": a, "rel err": r})
    for m, n in zip((1, 2, 3), p.order_n):
        q, ks, vs = qkv_bounded(n, 4, m, 0.8, seed=p.seed + m, device=dev)
        ref = naive_order_2d(q, ks, vs, 0.25)
        for g in (4, 8):
            a, r = err(fast_order_attn(q, ks, vs, scale=0.25, degree=g), ref)
            rows.append({"what": f"order m={m}: fast (degree {g}) vs exact naive_order_attn (n={n})",
                         "max abs err": a, "rel err": r})
    s.tables.append(markdown_table(rows, ["what", "max abs err", "rel err"]))
    ratios = [a / b for a, b in zip(grad_errs, grad_errs[1:]) if b > 0]
    s.text.append(f"The closed-form gradient agrees with autograd to rounding. The fast gradient's error falls by "
                  f"a factor of {', '.join(fmt(x) for x in ratios)} per step of the degree "
                  f"({' → '.join(str(g) for g in p.corr_degrees)}); the polynomial method expects 25-100× per +2 when "
                  f"|logits| ≤ 1.")
    s.data = {"rows": rows, "grad_err_by_degree": dict(zip(p.corr_degrees, grad_errs)),
              "fwd_err_by_degree": dict(zip(p.corr_degrees, fwd_errs))}
    return s


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


_COST_CHILD = r"""
import json, sys, torch
from tensorattn.reproduce import cost_series
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg.pop("threads"))
print(json.dumps(cost_series(**cfg)))
"""


def _cost_points(rep: Report, method: str, op: str, ns: Sequence[int]) -> List[Dict[str, float]]:
    """:func:`cost_series` in this process (CUDA, or ``cost_subprocess=False``), or in a fresh child process
    per method on the CPU so that each method's peak resident set is its own."""
    p, dev = rep.preset, rep.device
    kw = dict(d=p.cost_d, degree=p.cost_degree, seed=p.seed, repeats=p.repeats, cap_s=p.cost_time_cap_s)
    if torch.device(dev).type == "cuda" or not p.cost_subprocess:
        return cost_series(method, op, ns, device=dev, **kw)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    # the child's baseline: an interpreter with torch and tensorattn imported
    rss0 = int(subprocess.run([sys.executable, "-c", "import resource, torch, tensorattn.paper; "
                               "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"], env=env,
                              capture_output=True, text=True, check=True).stdout.strip())
    cfg = dict(kw, method=method, op=op, ns=list(ns), rss0=rss0, threads=torch.get_num_threads())
    r = subprocess.run([sys.executable, "-c", _COST_CHILD, json.dumps(cfg)], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"cost measurement child failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def section_cost(rep: Report, progress) -> Section:
    from .features import rank

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
        slopes[(method, op)] = (slope([q["n"] for q in tail], [q["s"] for q in tail]),
                                slope([q["n"] for q in tail], [q["peak_mib"] for q in tail]))
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


def _taylor_bound_degree(radius: float, eps: float) -> int:
    """Smallest even g with R^(g+1) e^(2R) / (g+1)! <= eps: Taylor's remainder bound on the relative error of
    exp on [-R, R] in exact arithmetic (docs/math.md#degree). Used where float64 cannot measure the error any more."""
    g = 2
    while (g + 1) * math.log(max(radius, 1e-300)) + 2 * radius - math.lgamma(g + 2) > math.log(eps):
        g += 2
    return g


def _needed(radius: float, eps: float, d: int, family: str = "taylor") -> Tuple[int, int, bool]:
    """(degree, rank C(d+g, g), measured?) for a max relative error ``eps`` of exp on ``[-radius, radius]``.

    The degree is measured by :func:`tensorattn.features.degree_for` (float64 grid) where float64 can
    resolve it; for large radii (cancellation in float64) it falls back to Taylor's remainder bound, and the
    third element is False.
    """
    from .features import rank

    g, measured = _degree(radius, eps, family)
    if family == "taylor" and g % 2:
        g += 1  # odd Taylor degrees are refused (normaliser positivity)
    return g, rank(d, g), measured


_UNRESOLVED: Dict[Tuple[float, str], float] = {}  # smallest radius float64 could not resolve, per (eps, family)


@functools.lru_cache(maxsize=None)
def _degree(radius: float, eps: float, family: str) -> Tuple[int, bool]:
    from .features import degree_for

    # past the first radius where float64 fails, every larger one fails too: skip the search
    if radius < _UNRESOLVED.get((eps, family), math.inf):
        try:
            return degree_for(radius, eps, family), True
        except ValueError:
            _UNRESOLVED[(eps, family)] = min(radius, _UNRESOLVED.get((eps, family), math.inf))
    return _taylor_bound_degree(radius, eps), False


def section_threshold(rep: Report, progress) -> Section:
    p, dev = rep.preset, rep.device
    s = Section("threshold", "Approximation quality and the paper's threshold", {
        "n (error panel)": p.thr_n, "d": p.thr_d, "degrees": p.thr_degrees, "B": p.thr_B,
        "target error (degree panel)": "ε = 1/n", "n (degree panel)": p.thr_ns})
    plt = _plt()
    # (a) measured error against B
    rows, curves = [], {}
    for g in p.thr_degrees:
        fe, ge = [], []
        for B in p.thr_B:
            As, E, Ws = bounded_problem(p.thr_n, p.thr_d, B, seed=p.seed, device=dev)
            o_ex, g_ex = paper.attention(*As, *Ws), paper.loss_grad(*As, E, *Ws)
            _, fr = err(paper.attention(*As, *Ws, method="fast", degree=g), o_ex)
            _, gr = err(paper.loss_grad(*As, E, *Ws, method="fast", degree=g), g_ex)
            Q, K1, K2 = As[0] @ Ws[0], As[1] @ Ws[1], As[2] @ Ws[2]
            R = (torch.einsum("id,jd,kd->ijk", Q, K1, K2).abs().max() / p.thr_d).item()
            fe.append(fr)
            ge.append(gr)
            rows.append({"degree": g, "B": B, "B³": B ** 3, "max abs logit": R, "fwd rel err": fr, "grad rel err": gr})
        curves[g] = (fe, ge)
    progress("threshold errors")
    s.tables.append(markdown_table(rows, ["degree", "B", "B³", "max abs logit", "fwd rel err", "grad rel err"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for g, (fe, ge) in curves.items():
        axes[0].semilogy(p.thr_B, fe, marker="o", label=f"degree {g}")
        axes[1].semilogy(p.thr_B, ge, marker="o", label=f"degree {g}")
    b_star = math.log(p.thr_n) ** (1 / 3)
    for ax, t in zip(axes, ("forward", "gradient")):
        ax.axvline(b_star, color="k", ls=":", label=f"B = (ln n)^(1/3) = {b_star:.2f}")
        ax.set(xlabel="entry bound B", ylabel="relative error (max abs / max |exact|)",
               title=f"fast {t} vs exact, n = {p.thr_n}, d = {p.thr_d}")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    s.figures.append(rep.figure("threshold_error", fig))

    # (b) degree and rank needed for eps = 1/n against B (worst-case logit radius B³), with break-even rank.
    # Two head dims: the theory's d = ceil(log2 n) (d = O(log n)) and a fixed small d.
    Bs = [round(0.1 * i, 2) for i in range(2, 61)]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    brows, bound_note = [], []
    for n in p.thr_ns:
        eps = 1.0 / n
        b_th = math.log(n) ** (1 / 3)
        for d_kind, d in (("log2 n", max(2, math.ceil(math.log2(n)))), ("fixed", p.thr_d)):
            gs, ks, ms = zip(*[_needed(B ** 3, eps, d) for B in Bs])
            k_even = n * n / d  # fast n·k·d² = exact n³·d  <=>  k = n²/d
            cross = next((B for B, k in zip(Bs, ks) if k >= k_even), float("nan"))
            g_th, k_th, _ = _needed(b_th ** 3, eps, d)
            if d_kind == "log2 n":
                line = axes[0].plot(Bs, gs, label=f"n = {n:.0e}")[0]
                axes[1].semilogy(Bs, ks, color=line.get_color(), label=f"n = {n:.0e}, d = {d}")
                axes[1].axhline(k_even, color=line.get_color(), ls="--", lw=0.8)
                color = line.get_color()
            else:
                axes[2].semilogy(Bs, ks, color=color, label=f"n = {n:.0e}, d = {d}")
                axes[2].axhline(k_even, color=color, ls="--", lw=0.8)
            for ax in axes:
                ax.axvline(b_th, color=color, ls=":", lw=0.8)
            if cross == cross:  # mark where the fast method stops being cheaper
                axes[1 if d_kind == "log2 n" else 2].plot([cross], [k_even], "x", color=color, ms=10, mew=2)
            if not all(ms) and d_kind == "log2 n":
                b_meas = max((B for B, mm in zip(Bs, ms) if mm), default=float("nan"))
                bound_note.append(f"n = {n:.0e}: measured up to B = {b_meas}, Taylor bound beyond")
            brows.append({"n": n, "ε": eps, "d": d, "regime": "d = log2 n" if d_kind == "log2 n" else "fixed d", "(ln n)^(1/3)": b_th,
                          "degree at B=(ln n)^(1/3)": g_th, "rank at B=(ln n)^(1/3)": k_th,
                          "break-even rank n²/d": k_even, "B where k reaches n²/d": cross,
                          "ratio to (ln n)^(1/3)": cross / b_th})
    axes[0].set(xlabel="entry bound B", ylabel="Taylor degree g for ε = 1/n on [-B³, B³]",
                title="degree needed (dotted: B³ = ln n)")
    axes[1].set(xlabel="entry bound B", ylabel="rank k = C(d+g, g)",
                title="rank, d = ceil(log2 n) (dashed: break-even n²/d, x: crossing)")
    axes[2].set(xlabel="entry bound B", ylabel="rank k = C(d+g, g)",
                title=f"rank, fixed d = {p.thr_d} (dashed: break-even n²/d)")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    s.figures.append(rep.figure("threshold_degree", fig))
    s.tables.append(markdown_table(brows, list(brows[0].keys())))
    progress("threshold degree")

    # (c) measured: fast gradient time against B at fixed n and eps, with the exact time
    n = p.thr_time_n
    As, E, Ws = bounded_problem(n, p.thr_d, 1.0, seed=p.seed, device=dev)
    t_ex, _ = timed(lambda: paper.loss_grad(*As, E, *Ws), dev, p.repeats)
    trows = []
    for B in p.thr_time_B:
        As, E, Ws = bounded_problem(n, p.thr_d, B, seed=p.seed, device=dev)
        g, k, _ = _needed(B ** 3, p.thr_time_eps, p.thr_d)
        t_fa, gf = timed(lambda: paper.loss_grad(*As, E, *Ws, method="fast", degree=g), dev, p.repeats)
        _, r = err(gf, paper.loss_grad(*As, E, *Ws))
        trows.append({"B": B, "degree": g, "rank k": k, "fast grad (s)": t_fa, "exact grad (s)": t_ex,
                      "fast/exact": t_fa / t_ex, "rel err": r})
    s.tables.append(markdown_table(trows, list(trows[0].keys())))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy([r["B"] for r in trows], [r["fast grad (s)"] for r in trows], marker="o", label="fast gradient")
    ax.axhline(t_ex, color="k", ls="--", label="closed-form gradient (B-independent)")
    ax.axvline(math.log(n) ** (1 / 3), color="k", ls=":", label=f"B = (ln n)^(1/3)")
    ax.set(xlabel="entry bound B", ylabel="time (s)", title=f"n = {n}, d = {p.thr_d}, ε = {p.thr_time_eps:g}")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    s.figures.append(rep.figure("threshold_time", fig))
    progress("threshold time")
    cross_meas = next((r["B"] for r in trows if r["fast/exact"] >= 1), None)
    s.text += [
        "**(a)** At a fixed degree the error grows quickly with B: the logits fill [-B³, B³] and a fixed-degree "
        "polynomial loses accuracy once that interval passes about 1.",
        "**(b)** For a target ε = 1/n (the paper's 1/poly(n)), the Taylor degree needed on [-B³, B³] and the "
        "rank k = C(d+g, g) grow with B. The fast gradient costs about n·k·d² against n³·d for the closed form, "
        "so it stops being cheaper where k reaches n²/d (the dashed lines). The table gives the B where that "
        "happens for each n next to (ln n)^(1/3), the paper's threshold B = o(∛log n), once in the theory's "
        "regime d = ⌈log₂ n⌉ and once for a fixed small d. " + _crossing_sentence(brows) + " Degrees are measured on a "
        "float64 grid where float64 can resolve the error; past that (large B³, where the terms of the Taylor "
        "series cancel in float64) they come from Taylor's remainder bound R^(g+1)e^(2R)/(g+1)! <= ε"
        + (" (" + "; ".join(bound_note) + ")." if bound_note else "."),
        f"**(c)** Measured at n = {n}: the fast gradient with the degree needed for ε = {p.thr_time_eps:g} "
        + (f"becomes slower than the closed form at B ≈ {cross_meas} ((ln n)^(1/3) = {math.log(n) ** (1 / 3):.2f})."
           if cross_meas is not None else "stays faster than the closed form over the B measured."),
    ]
    s.data = {"error_rows": rows, "degree_rows": brows, "time_rows": trows}
    return s


def _crossing_sentence(rows) -> str:
    parts = []
    for kind in ("log2 n", "fixed"):
        rs = [r for r in rows if r["regime"] == ("d = log2 n" if kind == "log2 n" else "fixed d")]
        rat = [r["ratio to (ln n)^(1/3)"] for r in rs if r["ratio to (ln n)^(1/3)"] == r["ratio to (ln n)^(1/3)"]]
        missing = [f"{r['n']:.0e}" for r in rs if r["ratio to (ln n)^(1/3)"] != r["ratio to (ln n)^(1/3)"]]
        txt = (f"With d = {'⌈log₂ n⌉' if kind == 'log2 n' else str(rs[0]['d'])} the break-even B is "
               + (f"{min(rat):.2f}-{max(rat):.2f} times (ln n)^(1/3)" if rat else "beyond the B range plotted"))
        if missing and rat:
            txt += f" (beyond the range plotted for n = {', '.join(missing)})"
        parts.append(txt)
    return ". ".join(parts) + (". The crossing sits at a constant multiple of (ln n)^(1/3), as the theory predicts "
                               "for the d = O(log n) regime; with a fixed d the rank is only polynomial in the degree, "
                               "so the method stays subcubic well past the threshold (the hardness result needs "
                               "d = Θ(log n)).")


def section_order(rep: Report, progress) -> Section:
    from .fast import fast_order_attn

    p, dev = rep.preset, rep.device
    d = 4
    s = Section("order", "Order m: the threshold for m = 1, 2, 3 key factors", {
        "d (rank panel)": "ceil(log2 n)", "d (error panel)": d, "target error": "ε = 1/n", "n": p.ord_ns,
        "error panel n per m": p.ord_err_n, "error panel B": p.ord_err_B})
    s.text.append("Order m means m key factors: logits ⟨q, k1∘…∘km⟩·scale with m + 1 bounded factors, so with "
                  "entries ≤ B and scale 1/d they are bounded by B^(m+1) (m = 1: matrix attention, B² vs log n as "
                  "in Alman–Song; m = 2: tensor attention, B³ vs log n). The rank of the exact monomial features, "
                  "C(d+g, g), does not depend on m; the degree needed does, through the radius B^(m+1).")
    plt = _plt()
    Bs = [round(0.05 * i, 2) for i in range(4, 121)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    rows = []
    n_fig = p.ord_ns[-1]
    for m in (1, 2, 3):
        for n in p.ord_ns:
            dn = max(2, math.ceil(math.log2(n)))  # the theory's regime d = O(log n)
            ks = [_needed(B ** (m + 1), 1.0 / n, dn)[1] for B in Bs]
            cross = next((B for B, k in zip(Bs, ks) if k >= n * n / dn), float("nan"))
            b_th = math.log(n) ** (1 / (m + 1))
            rows.append({"m": m, "n": n, "d": dn, "(ln n)^(1/(m+1))": b_th, "B where k reaches n²/d": cross,
                         "ratio": cross / b_th})
            if n == n_fig:
                line = axes[0].semilogy(Bs, ks, label=f"m = {m}")[0]
                axes[0].axvline(b_th, color=line.get_color(), ls=":", lw=0.8)
                if cross == cross:
                    axes[0].plot([cross], [n * n / dn], "x", color=line.get_color(), ms=10, mew=2)
    d_fig = max(2, math.ceil(math.log2(n_fig)))
    axes[0].axhline(n_fig ** 2 / d_fig, color="k", ls="--", lw=0.8, label="break-even n²/d")
    axes[0].set(xlabel="entry bound B", ylabel="rank k for ε = 1/n",
                title=f"n = {n_fig:.0e}, d = {d_fig} (dotted: B^(m+1) = ln n; x: crossing)")
    s.tables.append(markdown_table(rows, list(rows[0].keys())))
    erows = []
    for m, n in zip((1, 2, 3), p.ord_err_n):
        es = []
        for B in p.ord_err_B:
            q, ks_, vs = qkv_bounded(n, d, m, B, seed=p.seed + m, device=dev)
            ref = naive_order_2d(q, ks_, vs, 1.0 / d)
            _, r = err(fast_order_attn(q, ks_, vs, scale=1.0 / d, degree=6), ref)
            es.append(r)
            erows.append({"m": m, "n": n, "B": B, "B^(m+1)": B ** (m + 1), "degree": 6, "rel err": r})
        axes[1].semilogy(p.ord_err_B, es, marker="o", label=f"m = {m} (n = {n})")
    axes[1].set(xlabel="entry bound B", ylabel="relative error, degree 6", title="measured fast vs exact")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    s.tables.append(markdown_table(erows, list(erows[0].keys())))
    s.figures.append(rep.figure("order", fig))
    rat = {m: [r["ratio"] for r in rows if r["m"] == m and r["ratio"] == r["ratio"]] for m in (1, 2, 3)}
    s.text.append("In the theory's regime d = ⌈log₂ n⌉ the fast method stops being cheaper than the exact one (rank "
                  "k reaches n²/d) at B = " + "; ".join(
                      f"{min(v):.2f}-{max(v):.2f}·(ln n)^(1/{m + 1}) for m = {m}" for m, v in rat.items() if v)
                  + ": the threshold scales like (ln n)^(1/(m+1)), so higher orders need smaller entries, as the "
                  "paper's higher-order remark says. The measured error at a fixed degree rises with B^(m+1).")
    s.data = {"rows": rows, "error_rows": erows}
    progress("order")
    return s


def section_headdim(rep: Report, progress) -> Section:
    from .features import rank

    p, dev = rep.preset, rep.device
    s = Section("headdim", "Head dimension", {"d": p.hd_ds, "n": p.hd_n, "target error": p.hd_eps,
                                              "logit radius": 1.0, "max rank measured": p.hd_max_rank})
    rows = []
    g = _needed(1.0, p.hd_eps, 1)[0]
    for d in p.hd_ds:
        k = rank(d, g)
        row = {"d": d, "degree": g, "rank k": k, "fast grad (s)": float("nan"), "exact grad (s)": float("nan"),
               "rel err": float("nan")}
        if k <= p.hd_max_rank:
            # entries scaled so that every logit is <= 1 in absolute value: B³ <= 1 with scale 1/d
            As, E, Ws = bounded_problem(p.hd_n, d, 1.0, seed=p.seed, device=dev)
            t_fa, gf = timed(lambda: paper.loss_grad(*As, E, *Ws, method="fast", degree=g), dev, 1)
            t_ex, ge = timed(lambda: paper.loss_grad(*As, E, *Ws), dev, 1)
            row.update({"fast grad (s)": t_fa, "exact grad (s)": t_ex, "rel err": err(gf, ge)[1]})
        rows.append(row)
        progress(f"head dim {d}")
    s.tables.append(markdown_table(rows, list(rows[0].keys())))
    prow = []
    for dm in (64, 128):
        for dk in (4, 8, 16, dm):
            prow.append({"model head dim": dm, "key dim Dk": dk, "degree": g, "rank k = C(Dk+g, g)": rank(dk, g),
                         "state per head (k·Dv floats, Dv=64)": rank(dk, g) * 64})
    s.tables.append(markdown_table(prow, list(prow[0].keys())))
    s.text += [f"At a fixed logit radius (1) and target error {p.hd_eps:g} the degree is fixed (g = {g}), and the "
               "rank C(d+g, g) grows like d^g/g!: the cost of larger head dimensions is polynomial in d with "
               "exponent g, which is why the theory asks for d = O(log n). Rows with NaN were not measured because "
               "the rank exceeds this preset's cap.",
               "Projecting keys and queries to a small Dk (second table) is what makes the method usable at "
               "model head dims of 64-128: the rank depends on Dk only, while values keep their full dimension."]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy([r["d"] for r in rows], [r["rank k"] for r in rows], marker="o", label=f"rank k (g = {g})")
    meas = [r for r in rows if r["fast grad (s)"] == r["fast grad (s)"]]
    ax2 = ax.twinx()
    ax2.semilogy([r["d"] for r in meas], [r["fast grad (s)"] for r in meas], "s--", color="C1", label="fast grad time")
    ax2.semilogy([r["d"] for r in meas], [r["exact grad (s)"] for r in meas], "^--", color="C2", label="exact grad time")
    ax.set(xlabel="head dim d", ylabel="rank k", title=f"n = {p.hd_n}, ε = {p.hd_eps:g}")
    ax2.set_ylabel("time (s)")
    ax.legend(loc="upper left", fontsize=7)
    ax2.legend(loc="lower right", fontsize=7)
    s.figures.append(rep.figure("headdim", fig))
    s.data = {"rows": rows, "projection": prow}
    return s


def _grad_to_weights(G: torch.Tensor, WQ, WK1, WK2):
    """Chain rule from dLoss/dX (X[a, b·d+e] = Σ_c WQ[a,c] WK1[b,c] WK2[e,c]) to the three weights."""
    d = WQ.shape[0]
    G3 = G.reshape(d, d, d)
    return (torch.einsum("abe,bc,ec->ac", G3, WK1, WK2), torch.einsum("abe,ac,ec->bc", G3, WQ, WK2),
            torch.einsum("abe,ac,bc->ec", G3, WQ, WK1))


def train_paper_objective(As, E, Ws, *, steps: int, lr: float, method: str, degree=None, device="cpu"):
    """Gradient descent on Definition 2.8 over (WQ, WK1, WK2) through dLoss/dX (values fixed, as in the paper).

    Returns ``(losses, seconds per step, diverged_at)``: the loss before every step (and after the last one),
    the mean time of a step (gradient + update), and the step at which the run stopped because the loss or the
    gradient stopped being finite, or the fast gradient refused the weights (logits too large for any degree):
    ``None`` if it ran to the end.
    """
    WQ, WK1, WK2, WV1, WV2 = [w.clone() for w in Ws]
    losses, times, diverged_at = [], [], None
    for step in range(steps):
        losses.append(paper.loss(*As, E, WQ, WK1, WK2, WV1, WV2).item())
        if not math.isfinite(losses[-1]):
            diverged_at = step
            break
        _sync(device)
        t0 = time.perf_counter()
        kw = {"method": "fast", "degree": degree} if method == "fast" else {}
        try:
            G = paper.loss_grad(*As, E, WQ, WK1, WK2, WV1, WV2, **kw)
        except ValueError:  # the fast method refuses non-finite or unboundedly large logits
            diverged_at = step
            break
        if not bool(torch.isfinite(G).all()):
            diverged_at = step
            break
        gq, g1, g2 = _grad_to_weights(G, WQ, WK1, WK2)
        WQ, WK1, WK2 = WQ - lr * gq, WK1 - lr * g1, WK2 - lr * g2
        _sync(device)
        times.append(time.perf_counter() - t0)
    else:
        losses.append(paper.loss(*As, E, WQ, WK1, WK2, WV1, WV2).item())
    timed_steps = times[1:] or times  # the first step includes warm-up
    return losses, sum(timed_steps) / max(1, len(timed_steps)), diverged_at


def section_training(rep: Report, progress) -> Section:
    p, dev = rep.preset, rep.device
    s = Section("training", "Training on the paper's objective: exact against fast gradients", {
        "n": p.tr_n, "d": p.tr_d, "steps": p.tr_steps, "learning rate": p.tr_lr, "fast degrees": p.tr_degrees,
        "parameters": "WQ, WK1, WK2 (values fixed, as in Definition 2.8)", "start entry bound B": p.tr_B,
        "target": f"E = attention output of a teacher with entry bound {1.5 * p.tr_B:g}"})
    # a teacher with other weights defines the target, so the loss can really fall
    As, _, Ws = bounded_problem(p.tr_n, p.tr_d, p.tr_B, seed=p.seed, device=dev)
    _, _, Wt = bounded_problem(p.tr_n, p.tr_d, 1.5 * p.tr_B, seed=p.seed + 99, device=dev)
    E = paper.attention(*As, Wt[0], Wt[1], Wt[2], Ws[3], Ws[4])
    runs = {"exact": train_paper_objective(As, E, Ws, steps=p.tr_steps, lr=p.tr_lr, method="exact", device=dev)}
    progress("training exact")
    for g in p.tr_degrees:
        runs[f"fast g={g}"] = train_paper_objective(As, E, Ws, steps=p.tr_steps, lr=p.tr_lr, method="fast",
                                                    degree=g, device=dev)
        progress(f"training fast g={g}")
    ex = runs["exact"][0]
    rows = []
    for name, (losses, t, div) in runs.items():
        done = div is None
        rows.append({"gradient": name, "initial loss": losses[0], "final loss": losses[-1] if done else float("nan"),
                     "final gap to exact": losses[-1] - ex[-1] if done else float("nan"),
                     "max abs gap over the run": max(abs(a - b) for a, b in zip(losses, ex)),
                     "stopped at step": float("nan") if done else div, "time per step (ms)": t * 1e3})
    s.tables.append(markdown_table(rows, list(rows[0].keys())))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (losses, _, div) in runs.items():
        line = ax.semilogy(losses, ls="-" if name == "exact" else "--", label=name + ("" if div is None else
                                                                                      f" (stopped at step {div})"))[0]
        if div is not None and losses:
            ax.plot([len(losses) - 1], [losses[-1]], "x", color=line.get_color(), ms=9, mew=2)
    ax.set(xlabel="step", ylabel="loss (Definition 2.8)", title=f"gradient descent, n = {p.tr_n}, d = {p.tr_d}")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    s.figures.append(rep.figure("training", fig))
    finished = [r for r in rows if r["gradient"] != "exact" and r["final gap to exact"] == r["final gap to exact"]]
    stopped = [f"{r['gradient']} (step {r['stopped at step']})" for r in rows if r["stopped at step"] == r["stopped at step"]]
    txt = ("All runs start from the same weights and take the same steps; only the gradient differs. "
           f"The exact run lowers the loss from {fmt(ex[0])} to {fmt(ex[-1])}. A low degree drifts away from it (the "
           "weights grow during training, so the logits leave the interval where the polynomial is accurate)")
    if finished:
        best = min(finished, key=lambda r: abs(r["final gap to exact"]))
        txt += f"; the closest fast run ({best['gradient']}) ends {fmt(abs(best['final gap to exact']))} from the exact loss"
    if stopped:
        txt += ("; runs that stopped because the loss or gradient stopped being finite (the approximate softmax "
                "goes wrong once the logits pass the polynomial's range): " + ", ".join(stopped))
    s.text.append(txt + ". Time per step includes the gradient and the update; at this n the closed form is "
                  "still cheap, the cost section shows where the fast method wins.")
    s.data = {name: {"losses": losses, "s_per_step": t, "stopped_at": div} for name, (losses, t, div) in runs.items()}
    return s


SECTIONS = ("correctness", "cost", "threshold", "order", "headdim", "training")


def check_args(preset: str, out: str, device: str, sections: Sequence[str]) -> None:
    """The checks of :func:`run`'s arguments, done before anything runs (ValueError naming the argument)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if isinstance(sections, str):
        raise TypeError(f"sections must be a sequence of section names, got the string {sections!r}")
    sections = list(sections)
    if not sections:
        raise ValueError(f"sections selects nothing; expected one or more of {list(SECTIONS)}")
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise ValueError(f"sections must be among {list(SECTIONS)}, got {bad}")
    dup = sorted({s for s in sections if sections.count(s) > 1})
    if dup:
        raise ValueError(f"sections must name each section once, got {dup} more than once")
    from .check import check_device

    check_device(device)
    o = Path(out)
    for q in (o, *o.parents):
        if q.exists():
            if not q.is_dir():
                raise ValueError(f"out {str(out)!r} must be a directory, but {str(q)!r} is a file")
            break


def run(preset: str = "quick", out: str = "reports/quick", device: str = "cpu",
        sections: Sequence[str] = SECTIONS, command: Optional[str] = None) -> Path:
    """Run the chosen sections and write ``out/report.md``, ``out/report.json`` and the PNG figures.

    Raises ValueError (before running anything) for an unknown preset, an unknown, repeated or empty
    selection of sections, a device that is not available, or an ``out`` that is a file.
    """
    check_args(preset, out, device, sections)
    p = PRESETS[preset]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir, ["report.md", "report.json"])  # left by a run killed mid-write
    rep = Report(out_dir, device, p)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(sections), desc="reproduce", unit="section", file=sys.stderr)
    progress = lambda msg: bar.set_postfix_str(msg)  # noqa: E731
    t0 = time.perf_counter()
    funcs = {"correctness": lambda: section_correctness(rep), "cost": lambda: section_cost(rep, progress),
             "threshold": lambda: section_threshold(rep, progress), "order": lambda: section_order(rep, progress),
             "headdim": lambda: section_headdim(rep, progress), "training": lambda: section_training(rep, progress)}
    command = command or f"tensorattn reproduce --preset {preset} --out {out} --device {device}"

    def write(done: bool) -> None:
        # written after every section, so a run cut short still leaves a complete report of what it finished
        status = "" if done else (f"\n\n**Partial report: {len(rep.sections)} of {len(sections)} sections "
                                  "finished so far.**\n")
        label = "Total run time" if done else "Run time so far"
        text = rep.render(command) + status + f"\n\n{label}: {time.perf_counter() - t0:.1f} s.\n"
        atomic_write_json(out_dir / "report.json", {
            "meta": rep.meta, "preset": asdict(p), "command": command, "complete": done,
            "sections": {s.key: {"title": s.title, "config": s.config, "data": s.data, "figures": s.figures}
                         for s in rep.sections}})
        atomic_write_text(out_dir / "report.md", text)

    for name in sections:
        bar.set_description(f"reproduce: {name}")
        rep.sections.append(funcs[name]())
        bar.update(1)
        write(done=len(rep.sections) == len(sections))
    bar.close()
    return out_dir / "report.md"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="tensorattn reproduce", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                    help="quick: CPU-sized, minutes; full: GPU-sized; tiny: seconds (tests)")
    ap.add_argument("--out", default=None, help="output folder (default reports/<preset>)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    args = ap.parse_args(argv)
    out = args.out or f"reports/{args.preset}"
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    try:
        if not sections:
            raise ValueError(f"--sections {args.sections!r} selects nothing; expected a comma-separated subset of "
                             f"{','.join(SECTIONS)}")
        check_args(args.preset, out, args.device, sections)
    except (ValueError, TypeError) as e:
        print(f"tensorattn reproduce: {e}", file=sys.stderr)
        return 2
    path = run(args.preset, out, args.device, sections,
               command="tensorattn reproduce " + " ".join(argv if argv is not None else sys.argv[2:]))
    print(f"report written to {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
