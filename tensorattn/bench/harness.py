"""The one benchmark harness: timing (warm-up, median and spread), peak memory, machine info and reports.

Rules: warm up before timing; report the median and the spread; an out-of-memory error
becomes NaN in the table, never a crash; every report carries the device and the versions; timings
are only compared within one run on one device. Reports are JSON plus a markdown table, written
atomically.
"""
from __future__ import annotations

import math
import platform
import statistics
import time
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .._io import atomic_write_json, atomic_write_text


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log y against log x over the finite, positive points (NaN if < 2): the measured
    exponent of a cost that grows like ``x^slope``."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y and y > 0 and math.isfinite(y)]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx > 0 else float("nan")


def attn_shapes(B: int, T: int, Hq: int, Hkv: int, D: int, Dv: int) -> List[tuple]:
    """The shapes of the five inputs ``q, k1, k2, v1, v2`` of the tensor-attention ops."""
    return [(B, T, Hq, D), (B, T, Hkv, D), (B, T, Hkv, D), (B, T, Hkv, Dv), (B, T, Hkv, Dv)]


def randn_inputs(shapes, *, dtype, device, generator: Optional[torch.Generator] = None, seed: int = 0,
                 scale: float = 1.0, requires_grad: bool = False) -> List[torch.Tensor]:
    """Standard normal tensors of the given shapes times ``scale``, drawn in float32 on ``device`` (from
    ``generator``, else a fresh one seeded with ``seed``) and cast to ``dtype``: the benchmarks' inputs."""
    g = generator if generator is not None else torch.Generator(device=device).manual_seed(seed)
    return [(scale * torch.randn(*s, generator=g, device=device, dtype=torch.float32)).to(dtype)
            .requires_grad_(requires_grad) for s in shapes]


def machine_info(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """Device name and library versions, stored in every report."""
    info: Dict[str, Any] = {
        "time_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton  # noqa: F401

        info["triton"] = triton.__version__
    except Exception:  # pragma: no cover - triton is optional
        info["triton"] = None
    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available():
        idx = dev.index if dev is not None and dev.index is not None else torch.cuda.current_device()
        p = torch.cuda.get_device_properties(idx)
        info.update(device=torch.cuda.get_device_name(idx), device_type="cuda", cuda=torch.version.cuda,
                    sm_count=p.multi_processor_count, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    capability=f"{p.major}.{p.minor}")
    else:
        info.update(device=f"CPU ({info['cpu']}, {torch.get_num_threads()} threads)", device_type="cpu")
    return info


def _sync(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], *, device="cpu", warmup: int = 3, rep: int = 10,
            min_time_s: float = 0.0, max_time_s: float = 30.0) -> Dict[str, float]:
    """Median and spread of ``fn()`` in milliseconds after ``warmup`` calls.

    On CUDA it times with events around each call (device time); on the CPU with ``perf_counter``.
    Repeats ``rep`` times, or fewer if ``max_time_s`` runs out, and at least until ``min_time_s``.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times: List[float] = []
    t_start = time.perf_counter()
    while True:
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        spent = time.perf_counter() - t_start
        if (len(times) >= rep and spent >= min_time_s) or spent >= max_time_s:
            break
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * (len(times) - 1) + 0.5))]  # noqa: E731
    return {"ms": statistics.median(times), "ms_p20": q(0.2), "ms_p80": q(0.8), "ms_min": times[0], "reps": len(times)}


def peak_memory(fn: Callable[[], Any], *, device="cpu") -> float:
    """Peak bytes allocated during one ``fn()`` beyond what was allocated before (CUDA), in GiB.

    On the CPU it reports the growth of the process's peak resident set (coarse; NaN if unavailable).
    """
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**30
    try:
        import resource

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (after - before) / 2**20  # ru_maxrss is KiB on Linux
    except Exception:  # pragma: no cover
        return float("nan")


def cuda_kernel_times(fn: Callable[[], Any]) -> List[Dict[str, Any]]:
    """Device time of each CUDA kernel (by name) in one ``fn()`` after a warm-up call, largest first:
    ``[{"name", "ms", "count"}]`` (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t:
            out.append(dict(name=ev.key, ms=t / 1e3, count=ev.count))
    return sorted(out, key=lambda r: -r["ms"])


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def guarded(fn: Callable[[], Dict[str, Any]], device="cpu", catch_all: bool = False) -> Dict[str, Any]:
    """Run one measurement; an out-of-memory error becomes ``{"oom": True}`` with NaN figures.

    With ``catch_all`` any other exception becomes ``{"error": "Type: message", "ms": NaN}`` too (for optional
    peers, whose failure is a note in the report, not a crash); the traceback is printed.
    """
    try:
        return fn()
    except Exception as e:
        oom = isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and is_oom(e))
        if not oom and not catch_all:
            raise
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        if oom:
            return {"oom": True, "ms": float("nan")}
        import traceback

        traceback.print_exc()
        msg = " ".join(str(e).split())
        return {"error": f"{type(e).__name__}: {msg[:300]}", "ms": float("nan")}


def fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "NaN"
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
            return f"{x:.{digits - 1}e}"
        return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:,.{max(0, digits - len(str(int(abs(x)))))}f}"
    return str(x)


def mean_std(values: Sequence[float], *, scale: float = 1.0, digits: int = 1) -> str:
    """``"mean ± std (min–max)"`` of ``values`` times ``scale`` (the sample std; ``–`` for a single value): one
    table cell over seeds."""
    v = [scale * float(x) for x in values]
    sd = f"{statistics.stdev(v):.{digits}f}" if len(v) > 1 else "–"
    return f"{statistics.fmean(v):.{digits}f} ± {sd} ({min(v):.{digits}f}–{max(v):.{digits}f})"


def markdown_table(rows: Sequence[Dict[str, Any]], columns: Sequence[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = "".join("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |\n" for r in rows)
    return head + body


def write_report(stem, *, title: str, rows: Sequence[Dict[str, Any]], columns: Sequence[str],
                 meta: Dict[str, Any], notes: str = "", preamble: str = "") -> Dict[str, str]:
    """Write ``stem.json`` (meta + rows) and ``stem.md`` (device, versions, command, table) atomically.

    ``preamble`` (markdown) goes before the table, ``notes`` after it.
    """
    stem = str(stem)
    atomic_write_json(stem + ".json", {"meta": meta, "rows": list(rows)})
    lines = [f"# {title}", ""]
    for key in ("device", "command", "time_utc", "torch", "triton", "cuda", "python"):
        if meta.get(key) is not None:
            lines.append(f"- {key}: `{meta[key]}`" if key == "command" else f"- {key}: {meta[key]}")
    if preamble:
        lines += ["", preamble.strip()]
    lines += ["", markdown_table(rows, columns)]
    if notes:
        lines += ["", notes.strip(), ""]
    atomic_write_text(stem + ".md", "\n".join(lines))
    return {"json": stem + ".json", "md": stem + ".md"}


def loglog_axes(axes, xlabel: str, ylabels: Sequence[str]) -> None:
    """Log-log axes (base 2 for the lengths on x) with a light grid, one y label each."""
    for ax, yl in zip(axes, ylabels):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)


def save_figure(fig, path, dpi: int = 110) -> None:
    """Write a matplotlib figure as PNG atomically (no half-written plot), then close it."""
    import matplotlib.pyplot as plt

    from .._io import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi), binary=True)
    plt.close(fig)
