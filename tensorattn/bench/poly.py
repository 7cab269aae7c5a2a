"""``tensorattn bench poly``: polynomial tensor attention (fused Triton kernels) against exact tensor
attention and three matrix-attention peers: flash-linear-attention's ``fused_chunk_based`` (degree-2 Taylor),
power-attention's ``power_full`` (symmetric power p = 2, chunked) and PyTorch's causal SDPA.

Time (median of CUDA-event timings after warm-up) and peak memory beyond the inputs vs T, forward and
forward+backward, causal, bf16 inputs, B = 1; a summary per T (poly fwd+bwd, fwd, bwd/fwd, and each peer's
time over poly's in the same run) checked against the issue's targets; plus the error of the polynomial op
against exact tensor attention on the lengths where exact fits. Writes ``<out>/bench_poly.{json,md,png}``
(rewritten after every length, so a run stopped from outside still leaves a report).

    PYTHONPATH=. python -m tensorattn bench poly --out benchmarks/results

The peers are optional: install the ``fla-core`` / ``power-attention`` (+ ``vidrial``) wheels into the path
first (``benchmarks/poly_device.sh`` does); one that fails to import or crashes is a note in its row. Skip
them with ``--no-fla``, ``--no-power``, ``--no-sdpa``. A job stops at the first length where its last
measurement, extrapolated (linear in T; quadratic for exact-full and SDPA), predicts a call longer than
``--max-call-s`` or more memory than the GPU has free, so long lengths such as 4,194,304 run only where they fit.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .harness import (attn_shapes, guarded, loglog_axes, machine_info, peak_memory, randn_inputs, save_figure, time_fn,
                      write_report)
from .poly_report import EXACT_FULL, FLA, POLY, WINDOW, measured, summarize, summary_markdown

DEFAULT_T = [2**p for p in range(14, 21)] + [2**22]  # 16K .. 1M, then 4M where the memory prediction fits
COLUMNS = ["impl", "mode", "Dk", "T", "ms", "ms_p20", "ms_p80", "peak_gib", "first_s", "note"]


def power_name(d, chunk):
    return f"power-attention(p=2,d={d},chunk={chunk})"


def sdpa_name(d):
    return f"sdpa-causal(D={d})"


@dataclass
class Job:
    """One implementation at one feature size: how to make its inputs and call it."""
    name: str
    fn: Optional[Callable[..., torch.Tensor]]
    shapes: Callable[[int], List[Tuple[int, ...]]]  # T -> input shapes (bf16)
    Dk: int
    tmax: Optional[int] = None
    tmax_flag: str = ""
    order: int = 1  # time grows as T**order (memory is taken as linear for every job)
    peer: bool = False  # Dk-independent peer: matched to poly at every Dk in the summary
    unavailable: str = ""  # import failure: the job is one note row
    state: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # per mode: last measured T, ms, peak; stop

    def input_gib(self, T):
        return sum(math.prod(s) for s in self.shapes(T)) * 2 / 2**30


def _measure(fn, xs, mode, max_s):
    """Time and peak memory of fn(*xs) (mode 'fwd') or of fn(*xs) + backward (mode 'fwd+bwd')."""
    t0 = time.perf_counter()
    with torch.no_grad():
        out = fn(*[x.detach() for x in xs])  # compiles / warms up the forward
    finite = bool(torch.isfinite(out).all())
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(*[x.detach() for x in xs])
        del out
    else:
        do = torch.randn_like(out)
        del out

        def run():
            out = fn(*xs)
            return torch.autograd.grad(out, xs, do, allow_unused=True)  # fla uses only q, k1, v1
        run()  # compile / warm up the backward before measuring memory
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0  # compile (and autotune) time shows here, at a job's first length
    mem = peak_memory(run, device="cuda")
    t = time_fn(run, device="cuda", warmup=0, rep=5, max_time_s=max_s)  # warmed up above
    r = dict(ms=t["ms"], ms_p20=t["ms_p20"], ms_p80=t["ms_p80"], reps=t["reps"], peak_gib=mem,
             first_s=round(first_s, 2))
    if not finite:
        r["note"] = "non-finite output"
    return r


def _cuda_ok() -> bool:
    try:
        torch.cuda.synchronize()
        return float(torch.ones(1, device="cuda").add_(1).item()) == 2.0
    except Exception:  # pragma: no cover - needs a broken CUDA context
        return False


def _version(dist):
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def _load_fla():
    from fla.ops.based import fused_chunk_based

    return lambda q, k1, k2, v1, v2: fused_chunk_based(q, k1, v1)


def _load_power(chunk):
    """power-attention 1.4.4: ``power_full(Q, K, V, log_G=None, ..., deg=2, scale=None, chunk_size=None)``,
    layout [B, T, H, d], causal by construction, scale 1/sqrt(d) by default, no gating when log_G is None."""
    import importlib.util

    spec = importlib.util.find_spec("vidrial")
    if spec is not None and spec.submodule_search_locations:
        pkg = Path(list(spec.submodule_search_locations)[0])
        if not (pkg.parent / "cutlass").exists() and not (pkg / "cutlass").exists():
            # vidrial.jit.compiler runs `git clone cutlass` at import unless <site>/cutlass exists
            raise RuntimeError(f"{pkg.parent / 'cutlass'} missing: vidrial would git-clone cutlass at import "
                               "(mkdir it; the benchmark needs none of vidrial's CUDA kernels)")
    from power_attention import power_full

    return lambda q, k, v: power_full(q, k, v, deg=2, chunk_size=chunk)


def _sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def _skip_reason(job: Job, mode: str, T: int, args, free_gib: float) -> str:
    st = job.state.get(mode, {})
    if job.tmax is not None and T > job.tmax:
        return f"not run at T >= {T}: beyond {job.tmax_flag} {job.tmax}"
    if st.get("T"):
        ratio = T / st["T"]
        pred_ms = st["ms"] * ratio ** job.order * 1.1
        if pred_ms > args.max_call_s * 1e3:
            return f"not run at T >= {T}: predicted {pred_ms / 1e3:.3g} s a call > --max-call-s {args.max_call_s}"
        pred_gib = (st["peak"] + job.input_gib(st["T"])) * ratio * 1.05
        if pred_gib > 0.92 * free_gib:
            return f"not run at T >= {T}: predicted {pred_gib:.3g} GiB > 92% of the {free_gib:.3g} GiB free"
    return ""


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="tensorattn bench poly", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results", help="folder for bench_poly.{json,md,png}")
    ap.add_argument("--name", default="bench_poly", help="file stem of the report")
    ap.add_argument("--T", type=int, nargs="+", default=DEFAULT_T,
                    help="sequence lengths (default 16384..1048576 and 4194304; each job stops at the first one "
                         "whose predicted time or memory does not fit)")
    ap.add_argument("--dk", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--dv", type=int, default=64)
    ap.add_argument("--degree", type=int, default=2, choices=[2, 4],
                    help="the polynomial's degree (4: the fused kernels need Dk = 16)")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    ap.add_argument("--no-fla", action="store_true", help="skip fla's fused_chunk_based (Dk <= 16 only)")
    ap.add_argument("--no-power", action="store_true", help="skip power-attention's power_full")
    ap.add_argument("--no-sdpa", action="store_true", help="skip torch's causal scaled_dot_product_attention")
    ap.add_argument("--no-exact", action="store_true", help="skip exact tensor attention (full and window)")
    ap.add_argument("--no-errors", action="store_true", help="skip the error of poly against exact")
    ap.add_argument("--exact-full-max-T", type=int, default=8192, help="longest T for exact full causal")
    ap.add_argument("--window-max-T", type=int, default=None, help="longest T for exact window (512, 32) (no limit)")
    ap.add_argument("--power-max-T", type=int, default=None, help="longest T for power-attention (no limit)")
    ap.add_argument("--power-dim", type=int, default=64, help="power-attention head dim d")
    ap.add_argument("--power-chunk", type=int, default=128, help="power-attention chunk_size")
    ap.add_argument("--sdpa-max-T", type=int, default=131072, help="longest T for SDPA (quadratic time)")
    ap.add_argument("--sdpa-dim", type=int, default=64, help="SDPA head dim D")
    ap.add_argument("--target-dk", type=int, default=16, help="Dk on which the targets are judged")
    ap.add_argument("--max-call-s", type=float, default=4.0,
                    help="skip a larger T when the last call, extrapolated, would take longer than this")
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop starting measurements after this")
    args = ap.parse_args(argv)
    if args.degree == 4 and any(d != 16 for d in args.dk):
        ap.error(f"--degree 4 needs --dk 16 (the fused kernels' degree-4 rank C(20, 4)), got --dk {args.dk}")
    if not torch.cuda.is_available():
        print("tensorattn bench poly needs a CUDA device", file=sys.stderr)
        return 2
    from ..naive import naive_tensor_attn
    from ..poly import poly_tensor_attn

    dtype, H, Dv = torch.bfloat16, args.heads, args.dv
    t_start = time.perf_counter()

    def poly(q, k1, k2, v1, v2):
        return poly_tensor_attn(q, k1, k2, v1, v2, degree=args.degree, causal=True, backend="triton")

    def tensor_shapes(Dk):
        return lambda T: [(1, T, H, Dk)] * 3 + [(1, T, H, Dv)] * 2

    exact, exact_err = None, ""
    if not args.no_exact:
        try:
            from ..exact import tensor_attn as exact
        except Exception as e:  # pragma: no cover - optional
            exact_err = f"unavailable: {type(e).__name__}: {e}"
            print(f"exact kernels {exact_err}")
    fla, fla_err = None, ""
    if not args.no_fla:
        try:
            fla = _load_fla()
        except Exception as e:
            fla_err = f"unavailable: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
            print(f"fla {fla_err}")
    power, power_err = None, ""
    if not args.no_power:
        try:
            power = _load_power(args.power_chunk)
        except Exception as e:
            power_err = f"unavailable: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
            print(f"power-attention {power_err}")

    jobs: List[Job] = []
    for Dk in args.dk:
        jobs.append(Job(POLY, poly, tensor_shapes(Dk), Dk))
        if not args.no_exact:
            jobs.append(Job(WINDOW, exact and (lambda *a: exact(*a, window=(512, 32))), tensor_shapes(Dk), Dk,
                            args.window_max_T, "--window-max-T", unavailable=exact_err))
        if not args.no_fla and Dk <= 16:  # fla's based kernels support feature dim <= 16
            jobs.append(Job(FLA, fla, tensor_shapes(Dk), Dk, unavailable=fla_err))
    if not args.no_sdpa:
        d = args.sdpa_dim
        jobs.append(Job(sdpa_name(d), _sdpa, lambda T, d=d: [(1, H, T, d)] * 3, d, args.sdpa_max_T, "--sdpa-max-T",
                        order=2, peer=True))
    if not args.no_power:
        d = args.power_dim
        jobs.append(Job(power_name(d, args.power_chunk), power, lambda T, d=d: [(1, T, H, d)] * 3, d,
                        args.power_max_T, "--power-max-T", peer=True, unavailable=power_err))
    if not args.no_exact:  # last: quadratic, and with the default lengths it runs only if --exact-full-max-T allows
        for Dk in args.dk:
            jobs.append(Job(EXACT_FULL, exact and (lambda *a: exact(*a, causal=True)), tensor_shapes(Dk), Dk,
                            args.exact_full_max_T, "--exact-full-max-T", order=2, unavailable=exact_err))

    rows: List[Dict[str, Any]] = []
    for job in jobs:
        if job.unavailable or job.fn is None:
            rows.append(dict(impl=job.name, mode="-", Dk=job.Dk, peer=job.peer, ms=float("nan"),
                             note=job.unavailable or "unavailable"))
            job.state = {m: dict(stop=job.unavailable or "unavailable") for m in args.modes}
        else:
            job.state = {m: {} for m in args.modes}

    meta = machine_info("cuda")
    meta.update(command="PYTHONPATH=. python -m tensorattn bench poly " + " ".join(argv if argv is not None else sys.argv[1:]),
                B=1, H=H, Dv=Dv, dtype="bfloat16", causal=True, degree=args.degree,
                peers={"fla-core": _version("fla-core"), "power-attention": _version("power-attention"),
                       "vidrial": _version("vidrial"),
                       "power_call": f"power_full(q, k, v, deg=2, chunk_size={args.power_chunk}), [B, T, H, "
                                     f"{args.power_dim}], no gating, scale 1/sqrt(d)",
                       "sdpa_call": f"scaled_dot_product_attention(q, k, v, is_causal=True), [B, H, T, {args.sdpa_dim}]",
                       "fla_call": "fused_chunk_based(q, k1, v1), [B, T, H, Dk], Dv"})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_notes: List[str] = []
    meta["env"] = {k: os.environ.get(k) for k in ("TRITON_NO_AUTOTUNE", "PYTHONPATH") if os.environ.get(k)}
    if power is not None and os.environ.get("TRITON_NO_AUTOTUNE", "0") == "1":
        run_notes.append("- TRITON_NO_AUTOTUNE=1: power-attention's update_state / query_state kernels took their "
                         "first valid config instead of autotuning (its attention kernel still autotunes), so its "
                         "times are upper bounds. tensorattn's and fla's kernels do not autotune.")
    err_rows: List[Dict[str, Any]] = []

    def report():
        summary, targets = summarize(rows, args.target_dk)
        meta.update(summary=summary, targets=targets, errors=err_rows, run_notes=run_notes,
                    elapsed_s=round(time.perf_counter() - t_start, 1))
        notes = ["For the peers (power-attention, SDPA) Dk is their head dim; their inputs are q, k, v of that "
                 "dim. fla takes (q, k1, v1) of the tensor inputs. peak_gib is the peak allocation beyond the inputs "
                 "(gradients included for fwd+bwd); first_s is the wall time of the warm-up calls (compilation and "
                 "autotuning at a job's first length). A row with a note and no time: not run or failed (the log "
                 "has the traceback).", ""] + run_notes
        if err_rows:
            notes += ["", "Errors vs exact (bf16 inputs):", ""] + [
                f"- Dk={r['Dk']} T={r['T']}: " + (f"rel. Frobenius error {r['rel_err']:.3g} ({r['how']}; {r['logits']})"
                                                  if "rel_err" in r else r.get("note", "")) for r in err_rows]
        order = {}  # the table by implementation (in job order), Dk, mode, T; the log keeps the run order
        for j, job in enumerate(jobs):
            order.setdefault((job.name, job.Dk), j)
        table = sorted(rows, key=lambda r: (order.get((r["impl"], r["Dk"]), len(order)), r["mode"], r.get("T") or 0))
        write_report(out / args.name, title=f"Polynomial tensor attention (degree {args.degree}, causal) vs exact, "
                     "fla, power-attention and SDPA", rows=table, columns=COLUMNS, meta=meta, notes="\n".join(notes),
                     preamble=summary_markdown(summary, targets))
        try:
            _plot(rows, out / (args.name + ".png"), meta)
        except Exception as e:  # pragma: no cover - matplotlib optional
            print(f"no plot: {e}")

    fatal = False  # stop starting measurements (budget spent, or the CUDA context is gone)
    for T in sorted(set(args.T)):
        if fatal:
            break
        for job in jobs:
            if fatal:
                break
            for mode in args.modes:
                st = job.state[mode]
                if st.get("stop"):
                    continue
                if time.perf_counter() - t_start > args.budget_s:
                    if not any("budget" in n for n in run_notes):
                        run_notes.append(f"- Budget (--budget-s {args.budget_s:g}) spent at T = {T:,} "
                                         f"({job.name} Dk={job.Dk} {mode}): later measurements not started.")
                        print(run_notes[-1], flush=True)
                    fatal = True  # not an error: no more measurements
                    break
                torch.cuda.empty_cache()
                free_gib = torch.cuda.mem_get_info()[0] / 2**30
                reason = _skip_reason(job, mode, T, args, free_gib)
                if reason:
                    st["stop"] = reason
                    rows.append(dict(impl=job.name, mode=mode, Dk=job.Dk, T=T, peer=job.peer, ms=float("nan"),
                                     note=reason))
                    print(rows[-1], flush=True)
                    continue
                xs = randn_inputs(job.shapes(T), dtype=dtype, device="cuda", requires_grad=mode != "fwd")
                r = guarded(lambda: _measure(job.fn, xs, mode, max_s=3 * args.max_call_s), device="cuda",
                            catch_all=True)
                del xs
                note = r.pop("note", "") or ("OOM" if r.get("oom") else "") or r.pop("error", "")
                row = dict(impl=job.name, mode=mode, Dk=job.Dk, Dv=Dv if not job.peer else job.Dk, H=H, T=T,
                           peer=job.peer, input_gib=round(job.input_gib(T), 3), **r, note=note)
                rows.append(row)
                print(row, flush=True)
                if measured(r):
                    st.update(T=T, ms=r["ms"], peak=r["peak_gib"])
                else:
                    st["stop"] = note or "failed"
                torch.cuda.empty_cache()
                if not r.get("oom") and not measured(r) and not _cuda_ok():
                    run_notes.append(f"- CUDA context lost after {job.name} {mode} Dk={job.Dk} T={T:,}: the run "
                                     "stopped there (rows after it are missing).")
                    print(run_notes[-1], flush=True)
                    fatal = True
                    break
        report()
    if fatal and any("CUDA context lost" in n for n in run_notes):
        return 3
    # error of the polynomial op against exact (exact kernel on all queries, or the reference on a slice)
    for Dk in ([] if args.no_errors else args.dk):
        for T in (4096, 8192):
            try:
                err_rows.append(_error_row(poly, exact, naive_tensor_attn, Dk, T, H, Dv, dtype, args.exact_full_max_T))
            except Exception as e:
                import traceback

                traceback.print_exc()
                err_rows.append(dict(impl="poly-triton deg 2 vs exact", Dk=Dk, T=T,
                                     note=f"failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}"))
            print(err_rows[-1], flush=True)
            torch.cuda.empty_cache()
    report()
    return 0


def _error_row(poly, exact, naive_tensor_attn, Dk, T, H, Dv, dtype, exact_full_max_T):
    xs = randn_inputs(attn_shapes(1, T, H, H, Dk, Dv), dtype=dtype, device="cuda", seed=1)
    with torch.no_grad():
        out = poly(*xs).float()
        if exact is not None and T <= exact_full_max_T:
            ref, how = exact(*xs, causal=True).float(), "exact kernel, all queries"
        else:
            # causal rows T-8..T-1 see keys [0, i]: run them one at a time on their prefixes, float32
            outs = [naive_tensor_attn(xs[0][:, i:i + 1].float(), *[x[:, :i + 1].float() for x in xs[1:]])
                    for i in range(T - 8, T)]
            ref, out, how = torch.cat(outs, 1), out[:, T - 8:T], "naive reference, last 8 queries"
    rel = float((out - ref).norm() / ref.norm())
    return dict(impl="poly-triton deg 2 vs exact", Dk=Dk, T=T, rel_err=rel, how=how,
                logits="randn inputs, scale 1/sqrt(Dk)")


def _plot(rows, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    good = [r for r in rows if r.get("T") is not None and measured(r)]
    keys = sorted({(r["impl"], r["mode"], r["Dk"]) for r in good})
    impls = sorted({k[0] for k in keys})
    colors = {impl: plt.get_cmap("tab10")(i % 10) for i, impl in enumerate(impls)}  # colour: implementation
    dks = sorted({r["Dk"] for r in good if not r.get("peer")})
    markers = {Dk: "osD^v<>"[i % 7] for i, Dk in enumerate(dks)}  # marker: Dk; line: solid fwd+bwd, dashed fwd
    for impl, mode, Dk in keys:
        rs = sorted((r for r in good if (r["impl"], r["mode"], r["Dk"]) == (impl, mode, Dk)), key=lambda r: r["T"])
        peer = rs[0].get("peer")
        style = dict(ls="-" if mode == "fwd+bwd" else "--", color=colors[impl], marker="x" if peer else markers[Dk], ms=4)
        lab = f"{impl} {mode}" + ("" if peer else f" Dk={Dk}")
        axes[0].plot([r["T"] for r in rs], [r["ms"] for r in rs], label=lab, **style)
        axes[1].plot([r["T"] for r in rs], [max(r["peak_gib"], 1e-4) for r in rs], label=lab, **style)
    loglog_axes(axes, "T", ("time (ms)", "peak memory beyond inputs (GiB)"))
    if keys:
        axes[0].legend(fontsize=6)
    fig.suptitle(f"causal, bf16, B=1, H={meta['H']}, Dv={meta['Dv']}, degree {meta.get('degree', 2)} — "
                 f"{meta.get('device')}")
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
