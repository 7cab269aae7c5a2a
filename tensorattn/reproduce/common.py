"""What every section of ``tensorattn reproduce`` shares: the presets, the bounded problems, timing, the
report and its sections, and the degree a target error needs."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch

from ..bench.harness import machine_info, time_fn
from .._io import atomic_write


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
    from ..naive import naive_order_attn

    o = naive_order_attn(q[None, :, None], [k[None, :, None] for k in keys], [v[None, :, None] for v in values],
                         scale=scale)
    return o[0, :, 0]


def timed(fn: Callable[[], Any], device, repeats: int = 1) -> Tuple[float, Any]:
    """Median time of ``fn()`` in seconds over ``repeats`` calls after one warm-up call, and its result.

    The timing is :func:`tensorattn.bench.harness.time_fn` (device events on CUDA), held to exactly ``repeats`` calls.
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
    from ..features import rank

    g, measured = _degree(radius, eps, family)
    if family == "taylor" and g % 2:
        g += 1  # odd Taylor degrees are refused (normaliser positivity)
    return g, rank(d, g), measured


_UNRESOLVED: Dict[Tuple[float, str], float] = {}  # smallest radius float64 could not resolve, per (eps, family)


@functools.lru_cache(maxsize=None)
def _degree(radius: float, eps: float, family: str) -> Tuple[int, bool]:
    from ..features import degree_for

    # past the first radius where float64 fails, every larger one fails too: skip the search
    if radius < _UNRESOLVED.get((eps, family), math.inf):
        try:
            return degree_for(radius, eps, family), True
        except ValueError:
            _UNRESOLVED[(eps, family)] = min(radius, _UNRESOLVED.get((eps, family), math.inf))
    return _taylor_bound_degree(radius, eps), False
