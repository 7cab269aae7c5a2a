"""``tensorattn bench poly``: polynomial tensor attention (fused Triton kernels) against exact tensor
attention and flash-linear-attention's ``fused_chunk_based`` (degree-2 Taylor *matrix* attention).

Time (median of CUDA-event timings after warm-up) and peak memory beyond the inputs vs T, forward and
forward+backward, causal, bf16 inputs, B = 1; plus the error of the polynomial op against exact
tensor attention on the lengths where exact fits. Writes ``<out>/bench_poly.{json,md,png}``.

    PYTHONPATH=. python -m tensorattn bench poly --out benchmarks/results

fla is optional: install the ``fla-core`` wheel into the path first (``--no-fla`` skips it).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

from ._bench import guarded, machine_info, peak_memory, time_fn, write_report


def _inputs(T, H, Dk, Dv, dtype, grad, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(1, T, H, Dk), (1, T, H, Dk), (1, T, H, Dk), (1, T, H, Dv), (1, T, H, Dv)]
    return [torch.randn(*s, generator=g, device="cuda", dtype=torch.float32).to(dtype).requires_grad_(grad)
            for s in shapes]


def _measure(fn, xs, mode, max_s):
    """Time and peak memory of fn(*xs) (mode 'fwd') or of fn(*xs) + backward (mode 'fwd+bwd')."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(*[x.detach() for x in xs])
    else:
        do = torch.randn_like(fn(*[x.detach() for x in xs]))

        def run():
            out = fn(*xs)
            return torch.autograd.grad(out, xs, do, allow_unused=True)  # fla uses only q, k1, v1
    run()  # compile / warm up before measuring memory
    torch.cuda.synchronize()
    mem = peak_memory(run, device="cuda")
    t = time_fn(run, device="cuda", warmup=0, rep=5, max_time_s=max_s)  # warmed up above
    return dict(ms=t["ms"], ms_p20=t["ms_p20"], ms_p80=t["ms_p80"], reps=t["reps"], peak_gib=mem)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="tensorattn bench poly", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results", help="folder for bench_poly.{json,md,png}")
    ap.add_argument("--name", default="bench_poly", help="file stem of the report")
    ap.add_argument("--T", type=int, nargs="+", default=[2**p for p in range(12, 21)], help="sequence lengths")
    ap.add_argument("--dk", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--dv", type=int, default=64)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--no-exact", action="store_true")
    ap.add_argument("--exact-full-max-T", type=int, default=8192, help="longest T for exact full causal")
    ap.add_argument("--window-max-T", type=int, default=65536, help="longest T for exact window (512, 32)")
    ap.add_argument("--max-call-s", type=float, default=4.0,
                    help="skip a larger T when the previous one took longer than this / 2.2 per call")
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop starting measurements after this")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tensorattn bench poly needs a CUDA device", file=sys.stderr)
        return 2
    from .poly import poly_tensor_attn
    from .naive import naive_tensor_attn

    exact = None
    if not args.no_exact:
        try:
            from .exact import tensor_attn as exact
        except Exception as e:  # pragma: no cover - optional
            print(f"exact kernels unavailable: {e}")
    fla = None
    if not args.no_fla:
        try:
            from fla.ops.based import fused_chunk_based as fla
        except Exception as e:  # pragma: no cover - optional
            print(f"fla unavailable: {e}")
    dtype, H, Dv = torch.bfloat16, args.heads, args.dv
    t_start = time.perf_counter()
    rows = []

    def poly(q, k1, k2, v1, v2):
        return poly_tensor_attn(q, k1, k2, v1, v2, degree=2, causal=True, backend="triton")

    impls = [("poly-triton", poly, None)]
    if exact is not None:
        impls.append(("exact-full", lambda *a: exact(*a, causal=True), args.exact_full_max_T))
        impls.append(("exact-window(512,32)", lambda *a: exact(*a, window=(512, 32)), args.window_max_T))
    if fla is not None:
        impls.append(("fla-fused_chunk_based", lambda q, k1, k2, v1, v2: fla(q, k1, v1), None))

    for Dk in args.dk:
        for name, fn, tmax in impls:
            if name.startswith("fla") and Dk > 16:
                continue  # fla's based kernels support feature dim <= 16
            for mode in args.modes:
                last = None
                for T in args.T:
                    if tmax is not None and T > tmax:
                        break
                    if time.perf_counter() - t_start > args.budget_s:
                        print(f"budget spent: skipping {name} {mode} Dk={Dk} T>={T}")
                        break
                    if last is not None and (math.isnan(last) or last * 2.2 > args.max_call_s * 1e3):
                        break
                    xs = _inputs(T, H, Dk, Dv, dtype, mode != "fwd")
                    r = guarded(lambda: _measure(fn, xs, mode, max_s=3 * args.max_call_s), device="cuda")
                    row = dict(impl=name, mode=mode, Dk=Dk, Dv=Dv, H=H, T=T, **r)
                    rows.append(row)
                    print(row, flush=True)
                    last = r.get("ms", float("nan"))
                    del xs
                    torch.cuda.empty_cache()
    # error of the polynomial op against exact (exact kernel on all queries, or the reference on a slice)
    err_rows = []
    for Dk in args.dk:
        for T in (4096, 8192):
            xs = [x.detach() for x in _inputs(T, H, Dk, Dv, dtype, False, seed=1)]
            with torch.no_grad():
                out = poly(*xs).float()
                if exact is not None and T <= args.exact_full_max_T:
                    ref, how = exact(*xs, causal=True).float(), "exact kernel, all queries"
                else:
                    # naive reference on the last 8 queries (full causal prefix), float32
                    sl = slice(T - 8, T)
                    # causal rows T-8..T-1 see keys [0, i]: run them one at a time on their prefixes
                    outs = [naive_tensor_attn(xs[0][:, i:i + 1].float(), *[x[:, :i + 1].float() for x in xs[1:]])
                            for i in range(T - 8, T)]
                    ref, out, how = torch.cat(outs, 1), out[:, sl], "naive reference, last 8 queries"
            rel = float((out - ref).norm() / ref.norm())
            err_rows.append(dict(impl="poly-triton deg 2 vs exact", Dk=Dk, T=T, rel_err=rel, how=how,
                                 logits="randn inputs, scale 1/sqrt(Dk)"))
            print(err_rows[-1], flush=True)
    meta = machine_info("cuda")
    meta.update(command="PYTHONPATH=. python -m tensorattn bench poly " + " ".join(argv or []),
                B=1, H=H, Dv=Dv, dtype="bfloat16", causal=True, degree=2, errors=err_rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    notes = "Errors vs exact (bf16 inputs):\n\n" + "\n".join(
        f"- Dk={r['Dk']} T={r['T']}: rel. Frobenius error {r['rel_err']:.3g} ({r['how']}; {r['logits']})" for r in err_rows)
    write_report(out / args.name, title="Polynomial tensor attention (degree 2, causal) vs exact and fla",
                 rows=rows, columns=["impl", "mode", "Dk", "T", "ms", "ms_p20", "ms_p80", "peak_gib"],
                 meta=meta, notes=notes)
    try:
        _plot(rows, out / (args.name + ".png"), meta)
    except Exception as e:  # pragma: no cover - matplotlib optional
        print(f"no plot: {e}")
    return 0


def _plot(rows, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    keys = sorted({(r["impl"], r["mode"], r["Dk"]) for r in rows})
    for impl, mode, Dk in keys:
        rs = [r for r in rows if (r["impl"], r["mode"], r["Dk"]) == (impl, mode, Dk) and not r.get("oom")]
        if not rs:
            continue
        ls = "-" if mode == "fwd+bwd" else "--"
        lab = f"{impl} {mode} Dk={Dk}"
        axes[0].plot([r["T"] for r in rs], [r["ms"] for r in rs], ls, marker="o", label=lab)
        axes[1].plot([r["T"] for r in rs], [r["peak_gib"] for r in rs], ls, marker="o", label=lab)
    for ax, yl in zip(axes, ("time (ms)", "peak memory beyond inputs (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T")
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"causal, bf16, B=1, H={meta['H']}, Dv={meta['Dv']}, degree 2 — {meta.get('device')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
