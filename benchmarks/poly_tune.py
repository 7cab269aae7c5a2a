"""Block-size sweep of the chunk-parallel polynomial kernels (tensorattn/triton/poly.py) on a GPU.

For each variant of ``TUNE`` (state-chunk length F, feature blocks, warps): correctness against the
float64 reference on a small GQA shape, then forward and forward+backward time at one (T, Dk), the
registers and spills of each kernel, and the split of the time between the kernels. JSON + markdown.

    python benchmarks/poly_tune.py --out benchmarks/results --T 65536 --dk 16
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

from tensorattn.bench.harness import (attn_shapes, cuda_kernel_times, guarded, machine_info, randn_inputs, time_fn,
                                      write_report)


KERNELS = ("_state_kernel", "_fwd_walk_kernel", "_bwd_kernel")


def _inputs(B, T, Hq, Hkv, Dk, Dv, dtype, seed, scale=1.0):
    return randn_inputs(attn_shapes(B, T, Hq, Hkv, Dk, Dv), dtype=dtype, device="cuda", seed=seed, scale=scale,
                        requires_grad=True)


def _check(dtype):
    """Max relative error (output and five gradients) against the float64 reference; GQA, T not a block multiple."""
    from tensorattn.poly import naive_poly_tensor_attn, poly_tensor_attn

    xs = _inputs(2, 300, 4, 2, 16, 64, dtype, seed=1, scale=0.5)
    out = poly_tensor_attn(*xs, causal=True, backend="triton")
    w = torch.randn(out.shape, device="cuda")
    grads = torch.autograd.grad((out.float() * w).sum(), xs)
    xd = [x.detach().double().requires_grad_() for x in xs]
    ref = naive_poly_tensor_attn(*xd, causal=True)
    gref = torch.autograd.grad((ref * w.double()).sum(), xd)
    rel = lambda a, b: float((a.detach().double() - b).norm() / b.norm())  # noqa: E731
    return max([rel(out, ref)] + [rel(a, b) for a, b in zip(grads, gref)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="poly_tune")
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--dk", type=int, nargs="+", default=[16])
    ap.add_argument("--variants", nargs="+", default=["F=64"],
                    help="TUNE settings, each 'KEY=VALUE,KEY=VALUE' (keys of tensorattn.triton.poly.TUNE)")
    ap.add_argument("--profile", choices=["first", "all"], default="first",
                    help="profile the kernels of the first variant only, or of every variant")
    ap.add_argument("--best-env", default=None,
                    help="write 'export TENSORATTN_POLY_KEY=VALUE' lines of the fastest variant (fwd+bwd) to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    import tensorattn.triton.poly as tp
    from tensorattn.poly import poly_tensor_attn

    rows, profiles = [], []
    base = dict(tp.TUNE)
    for Dk, spec in itertools.product(args.dk, args.variants):
        tune = dict(base)
        for kv in spec.split(","):
            key, val = kv.split("=")
            if key not in tune:
                raise SystemExit(f"unknown TUNE key {key!r} in {spec!r}; keys: {sorted(tune)}")
            tune[key] = int(val)
        tp.TUNE.clear()
        tp.TUNE.update(tune)
        row = dict(Dk=Dk, T=args.T, variant=spec)
        try:
            row["err_f32"] = _check(torch.float32) if Dk == args.dk[0] else None
            row["err_bf16"] = _check(torch.bfloat16) if Dk == args.dk[0] else None
        except Exception as e:  # a variant that does not compile is a row, not a crash
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(row, flush=True)
            continue
        xs = _inputs(1, args.T, 16, 16, Dk, 64, torch.bfloat16, seed=0)
        do = torch.randn(1, args.T, 16, 64, device="cuda", dtype=torch.bfloat16)

        def fwd():
            with torch.no_grad():
                return poly_tensor_attn(*[x.detach() for x in xs], causal=True, backend="triton")

        def fwdbwd():
            return torch.autograd.grad(poly_tensor_attn(*xs, causal=True, backend="triton"), xs, do)

        r1 = guarded(lambda: time_fn(fwd, device="cuda", warmup=2, rep=5, max_time_s=20), device="cuda")
        r2 = guarded(lambda: time_fn(fwdbwd, device="cuda", warmup=1, rep=3, max_time_s=30), device="cuda")
        row.update(fwd_ms=r1.get("ms"), fwdbwd_ms=r2.get("ms"))
        if r1.get("ms") and r2.get("ms"):
            row["bwd_over_fwd"] = (r2["ms"] - r1["ms"]) / r1["ms"]
        for kname in KERNELS:
            kern = getattr(tp, kname)
            try:  # the kernels compiled so far: registers and spills of each
                cks = list(kern.device_caches[torch.cuda.current_device()][0].values())
                row[kname] = " ".join(f"{ck.n_regs}r/{ck.n_spills}s" for ck in cks)
            except Exception as e:
                row[kname] = f"? ({type(e).__name__})"
        if args.profile == "all" or not profiles:  # where the time goes: device time per kernel of one fwd+bwd
            profiles.append(dict(variant=spec, kernels=cuda_kernel_times(fwdbwd)[:12]))
            print("profile of", spec, flush=True)
            for k in profiles[-1]["kernels"][:6]:
                print(f"  {k['name'][:60]:60s} {k['ms']:9.2f} ms  x{k['count']}", flush=True)
        rows.append(row)
        print(row, flush=True)
        del xs, do
        torch.cuda.empty_cache()
    meta = machine_info("cuda")
    meta["profile"] = profiles
    meta["command"] = "python benchmarks/poly_tune.py " + " ".join(argv if argv is not None else sys.argv[1:])
    cols = ["Dk", "T", "variant", "err_f32", "err_bf16", "fwd_ms", "fwdbwd_ms", "bwd_over_fwd", *KERNELS[1:], "error"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_report(out / args.name, title="Polynomial kernels: block-size sweep (bf16, causal, B=1, H=16, Dv=64)",
                 rows=rows, columns=cols, meta=meta)
    timed = [r for r in rows if r.get("fwdbwd_ms") and r["fwdbwd_ms"] == r["fwdbwd_ms"]]
    if args.best_env and timed:
        best = min(timed, key=lambda r: r["fwdbwd_ms"])
        lines = [f"export TENSORATTN_POLY_{kv.split('=')[0]}={kv.split('=')[1]}" for kv in best["variant"].split(",")]
        Path(args.best_env).write_text("\n".join(lines) + "\n")
        print("fastest variant:", best["variant"], f"{best['fwdbwd_ms']:.1f} ms fwd+bwd", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
