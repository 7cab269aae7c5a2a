"""Where a fused polynomial forward + backward spends its wall time on a GPU: kernels, host launches, or idle.

For each T: the device time of one call between two CUDA events (what `tensorattn bench poly` reports), the
host time to enqueue it (the call returning, no synchronisation: the Python and launch overhead), the sum of the
kernels' device time (torch profiler), the kernel launches, and the same call replayed from a CUDA graph (no
host work: the GPU-only time). ``idle = events - kernels``: the GPU waiting on the host or on launch gaps.
JSON + markdown.

    python benchmarks/poly_overhead.py --out benchmarks/results --T 16384 65536
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from tensorattn.bench.harness import (attn_shapes, cuda_kernel_times, guarded, machine_info, randn_inputs, time_fn,
                                      write_report)


def _host_ms(fn, rep=5):
    """Median host time (ms) for ``fn()`` to return without a synchronisation, the queue drained before each."""
    out = []
    for _ in range(rep):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return sorted(out)[len(out) // 2]


def _host_profile(fn, top: int = 25) -> str:
    """cProfile of one ``fn()`` enqueue (after a drained queue): the ``top`` functions by own time, as text."""
    import cProfile
    import io
    import pstats

    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def _host_api(fn, top: int = 25) -> str:
    """torch profiler (CPU) of one ``fn()`` after a drained queue: the ``top`` operators and CUDA runtime calls by
    their own host time (allocations, launches, synchronisations), and the caching allocator's device allocations
    and frees during the call (each one a cudaMalloc/cudaFree), as text."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    after = torch.cuda.memory_stats()
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("num_device_alloc", "num_device_free", "num_alloc_retries",
                                                             "num_sync_all_streams")}
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60)
    return f"allocator during the call: {delta}\n\n{table}"


def _graph_ms(fn, rep=5):
    """Device time (ms) of ``fn`` replayed from a CUDA graph (captured after two warm-up calls)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return time_fn(g.replay, device="cuda", warmup=1, rep=rep, max_time_s=20)["ms"]


def _measure(op, T: int, dk: int, profiles: list) -> list:
    """The rows of one length: the forward (no gradients) and the forward + backward."""
    xs = randn_inputs(attn_shapes(1, T, 16, 16, dk, 64), dtype=torch.bfloat16, device="cuda", seed=0,
                      requires_grad=True)
    do = torch.randn(1, T, 16, 64, device="cuda", dtype=torch.bfloat16)
    calls = {
        "fwd": lambda: op(*[x.detach() for x in xs], causal=True, backend="triton"),
        "fwd+bwd": lambda: torch.autograd.grad(op(*xs, causal=True, backend="triton"), xs, do),
    }
    rows = []
    for what, fn in calls.items():
        row = dict(T=T, Dk=dk, call=what)
        ev = guarded(lambda: time_fn(fn, device="cuda", warmup=2, rep=5, max_time_s=20), device="cuda")
        row["events_ms"] = ev.get("ms")
        row["host_ms"] = _host_ms(fn)
        ks = cuda_kernel_times(fn)
        row["kernels_ms"], row["launches"] = sum(k["ms"] for k in ks), sum(k["count"] for k in ks)
        row["idle_ms"] = row["events_ms"] - row["kernels_ms"] if row["events_ms"] else None
        try:
            row["graph_ms"] = _graph_ms(fn)
        except Exception as e:  # a call that cannot be captured is a note, not a crash
            row["graph_ms"] = None
            row["note"] = f"graph: {type(e).__name__}: {str(e)[:120]}"
        if profiles is not None:
            profiles.append(f"## T = {T}, {what}\n\n" + _host_profile(fn) + "\n" + _host_api(fn))
        rows.append(row)
        print(row, flush=True)
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="poly_overhead")
    ap.add_argument("--T", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--dk", type=int, default=16)
    ap.add_argument("--host-profile", action="store_true",
                    help="also write NAME_host.txt: cProfile's top functions (own time) of one enqueue per row, "
                         "and the torch profiler's host-side operators and CUDA runtime calls")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    from tensorattn.poly import poly_tensor_attn

    profiles = [] if args.host_profile else None
    rows = [row for T in args.T for row in _measure(poly_tensor_attn, T, args.dk, profiles)]
    meta = machine_info("cuda")
    meta["command"] = "python benchmarks/poly_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_report(out / args.name, title="Polynomial op: kernels, host and idle time (bf16, causal, B=1, H=16, Dv=64)",
                 rows=rows, meta=meta,
                 columns=["T", "Dk", "call", "events_ms", "host_ms", "kernels_ms", "launches", "idle_ms", "graph_ms",
                          "note"])
    if profiles:
        from tensorattn._io import atomic_write_text

        atomic_write_text(str(out / f"{args.name}_host.txt"), "\n\n".join(profiles))
    return 0


if __name__ == "__main__":
    sys.exit(main())
