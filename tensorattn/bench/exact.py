"""``tensorattn bench exact``: exact tensor attention kernels on the GPU (forward, backward, both).

Run: ``python -m tensorattn bench exact [--configs NAMES] [--out STEM]`` (CUDA needed for the Triton rows).

FLOP formula (stated, tensor-core FLOPs): forward ``4 * B * Hq * D`` per visible ``(i, j1, j2)`` triple
(the score product and the value product, 2 FLOPs per multiply-add each), backward 3.5 times that. Visible
triples are counted exactly by :func:`count_triples` (closed form). In the same run: torch SDPA (flash) with
``P = triples / T`` keys per query, no mask (the same number of scored pairs per query: the ceiling for dense
attention on this GPU; its FLOPs use the same rule, ``4 * B * Hq * D`` per pair forward, 2.5x that backward),
lucidrains' ``simplicial-attention`` Triton kernel and Meta's FBGEMM Triton kernels (from an ignored folder:
:mod:`.fbgemm`) where they run (a note says why when they do not).
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
from typing import Any, Dict, List, Optional

import torch

from .harness import attn_shapes, guarded, machine_info, peak_memory, randn_inputs, time_fn, write_report

CONFIGS = {
    # name: (B, T, Hq, Hkv, D, window or None (full causal))
    "w512x32-h16-d64": (1, 8192, 16, 16, 64, (512, 32)),
    "w512x32-gqa16-d64": (1, 8192, 16, 1, 64, (512, 32)),
    "w32x512-gqa64-d128": (4, 8192, 64, 1, 128, (32, 512)),
    "w512x32-gqa64-d128": (1, 8192, 64, 1, 128, (512, 32)),
    "causal-T2048": (1, 2048, 16, 16, 64, None),
    "causal-T4096": (1, 4096, 16, 16, 64, None),
}
TARGETS = {  # bf16 forward / backward TFLOP/s targets (issue 14: D 64 both >= 220; D 128 fwd >= 354, bwd >= 240)
    "w512x32-h16-d64": (220, 220),
    "w512x32-gqa16-d64": (220, 220),
    "w32x512-gqa64-d128": (354, 240),
    "w512x32-gqa64-d128": (354, 240),
}


def count_triples(T: int, *, causal: bool = True, window=None, S1: Optional[int] = None, S2: Optional[int] = None) -> int:
    """Exact number of visible ``(i, j1, j2)`` triples for one head (closed form, no loops).

    Window ``(w1, w2)``: query ``i`` sees ``min(i+1, w1) * min(i+1, w2)`` pairs; with ``a <= b`` the two
    windows clipped to T, the sum over ``n = i + 1`` is ``sum_{n<=a} n^2 + a * sum_{a<n<=b} n + a*b*(T-b)``.
    Causal: ``sum n^2 = T(T+1)(2T+1)/6``. No mask: ``T * S1 * S2``.
    """
    if window is not None:
        a, b = sorted((min(window[0], T), min(window[1], T)))
        sq = a * (a + 1) * (2 * a + 1) // 6
        mid = a * ((b * (b + 1)) // 2 - (a * (a + 1)) // 2)
        return sq + mid + a * b * (T - b)
    if causal:
        return T * (T + 1) * (2 * T + 1) // 6
    return T * (S1 or T) * (S2 or T)


def _measure(fwd, bwd, fwdbwd, device, warmup, rep):
    """Times of ``fwd`` (skipped when None: a row that shares another's forward), ``bwd`` and ``fwdbwd`` (NaN when
    None: a peer without a backward here), and the peak memory of ``fwdbwd``."""
    row: Dict[str, Any] = {}
    if fwd is not None:
        row["fwd_ms"] = guarded(lambda: time_fn(fwd, device=device, warmup=warmup, rep=rep), device)["ms"]
    row["bwd_ms"] = guarded(lambda: time_fn(bwd, device=device, warmup=warmup, rep=rep), device)["ms"] if bwd else math.nan
    if fwdbwd is None:
        return dict(row, fwdbwd_ms=math.nan, peak_gib=math.nan)
    row["fwdbwd_ms"] = guarded(lambda: time_fn(fwdbwd, device=device, warmup=warmup, rep=rep), device)["ms"]
    try:
        row["peak_gib"] = peak_memory(fwdbwd, device=device)
    except RuntimeError:
        row["peak_gib"] = math.nan
    return row


def bench_config(name, cfg, *, dtype, device, warmup, rep, sdpa=True, peer=True, block=None,
                 fbgemm_dir: Optional[str] = None) -> List[Dict[str, Any]]:
    from ..triton.exact_bwd import exact_bwd
    from ..triton.exact_fwd import exact_fwd, resources

    B, T, Hq, Hkv, D, window = cfg
    gen = torch.Generator(device=device).manual_seed(0)
    q, k1, k2, v1, v2 = randn_inputs(attn_shapes(B, T, Hq, Hkv, D, D), dtype=dtype, device=device, generator=gen)
    scale = 1 / math.sqrt(D)
    tri = count_triples(T, causal=True, window=window)
    kw = dict(scale=scale, causal=True, window=window)
    rows = []

    o, lse = exact_fwd(q, k1, k2, v1, v2, **kw, block=block)
    do = torch.randn(o.shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    leaves = [x.detach().requires_grad_(True) for x in (q, k1, k2, v1, v2)]

    def fwdbwd(deterministic=False):
        from ..exact import tensor_attn
        out = tensor_attn(*leaves, window=window, causal=True, backend="triton", deterministic=deterministic)
        torch.autograd.grad(out, leaves, do)

    row = dict(config=name, impl="tensorattn-triton", B=B, T=T, Hq=Hq, Hkv=Hkv, D=D, window=str(window),
               triples=tri, block=str(block) if block else "default")
    row.update(_measure(lambda: exact_fwd(q, k1, k2, v1, v2, **kw, block=block),
                        lambda: exact_bwd(do, q, k1, k2, v1, v2, o, lse, **kw, block=block), fwdbwd, device, warmup, rep))
    row["resources"] = resources()
    rows.append(row)
    if block is None:  # the cost of a bitwise-reproducible backward (no atomics); the forward is the same kernel
        drow = dict(row, impl="tensorattn-triton deterministic")
        drow.update(_measure(None, lambda: exact_bwd(do, q, k1, k2, v1, v2, o, lse, **kw, deterministic=True),
                             lambda: fwdbwd(deterministic=True), device, warmup, rep))
        rows.append(drow)

    if sdpa:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        P = max(1, tri // T)
        sq = torch.randn(B, Hq, T, D, generator=gen, device=device, dtype=torch.float32).to(dtype).requires_grad_(True)
        sk = torch.randn(B, Hq, P, D, generator=gen, device=device, dtype=torch.float32).to(dtype).requires_grad_(True)
        sv = torch.randn(B, Hq, P, D, generator=gen, device=device, dtype=torch.float32).to(dtype).requires_grad_(True)
        sdo = torch.randn(B, Hq, T, D, generator=gen, device=device, dtype=torch.float32).to(dtype)

        def s_fwd():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(sq, sk, sv)

        s_out = s_fwd()

        def s_bwd():
            torch.autograd.grad(s_out, (sq, sk, sv), sdo, retain_graph=True)

        def s_fb():
            torch.autograd.grad(s_fwd(), (sq, sk, sv), sdo)

        srow = dict(config=name, impl=f"sdpa-flash (P={P} keys/query)", B=B, T=T, Hq=Hq, Hkv=Hq, D=D,
                    window="none", triples=P * T)
        srow.update(_measure(s_fwd, s_bwd, s_fb, device, warmup, rep))
        rows.append(srow)
        del sq, sk, sv, s_out

    if peer:
        prow = dict(config=name, impl="lucidrains simplicial-attention", B=B, T=T, Hq=Hq, Hkv=Hkv, D=D,
                    window=str(window), triples=tri)
        try:
            if window is None:
                raise RuntimeError("the peer kernel has no full-causal (unwindowed) path")
            from simplicial_attention.triton_two_simplicial_attention import sliding_two_simplicial_attn

            pl = [x.detach().requires_grad_(True) for x in (q, k1, k2, v1, v2)]

            def p_fwd():
                return sliding_two_simplicial_attn(pl[0], (pl[1], pl[2]), (pl[3], pl[4]), window[0], window[1], True)

            def p_fb():
                torch.autograd.grad(p_fwd(), pl, do)

            p_out = p_fwd()

            def p_bwd():
                torch.autograd.grad(p_out, pl, do, retain_graph=True)

            prow.update(_measure(p_fwd, p_bwd, p_fb, device, warmup, rep))
        except Exception as e:  # the peer is optional: record why it did not run
            prow.update(fwd_ms=math.nan, bwd_ms=math.nan, fwdbwd_ms=math.nan, note=f"{type(e).__name__}: {e}"[:300])
        rows.append(prow)

    if peer and fbgemm_dir is not None:
        from .fbgemm import peer_row

        frow = dict(config=name, impl="FBGEMM triton", B=B, T=T, Hq=Hq, Hkv=Hkv, D=D, window=str(window),
                    triples=tri)
        try:
            peer_row(frow, (q, k1, k2, v1, v2), do, window, o, lambda: exact_bwd(do, q, k1, k2, v1, v2, o, lse, **kw),
                     lambda f, b, fb: _measure(f, b, fb, device, warmup, rep), fbgemm_dir)
        except Exception as e:  # the peer is optional: record why it did not run
            frow.update(fwd_ms=math.nan, bwd_ms=math.nan, fwdbwd_ms=math.nan, note=f"{type(e).__name__}: {e}"[:300])
        rows.append(frow)

    for r in rows:
        f = 4.0 * B * Hq * D * r["triples"]
        bwd_factor = 2.5 if r["impl"].startswith("sdpa") else 3.5
        r["fwd_tflops"] = f / (r["fwd_ms"] * 1e-3) / 1e12
        r["bwd_tflops"] = bwd_factor * f / (r["bwd_ms"] * 1e-3) / 1e12
        r["fwdbwd_tflops"] = (1 + bwd_factor) * f / (r["fwdbwd_ms"] * 1e-3) / 1e12
        r["bwd_over_fwd"] = r["bwd_ms"] / r["fwd_ms"]
    return rows


COLUMNS = ["config", "impl", "block", "fwd_ms", "bwd_ms", "fwdbwd_ms", "fwd_tflops", "bwd_tflops", "fwdbwd_tflops",
           "bwd_over_fwd", "peak_gib", "err_o", "err_grads", "note"]


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="tensorattn bench exact", description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--out", default="benchmarks/results/bench_exact", help="report stem (writes .json and .md)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rep", type=int, default=5)
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--fbgemm-dir", default=".peers/fbgemm",
                    help="folder holding FBGEMM's simplicial fwd.py and bwd.py (git-ignored; missing: a note in the row)")
    ap.add_argument("--blocks", default="", help="extra forward/backward tile variants 'BT:GP:BN:BD:BDV:warps;...'")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tensorattn bench exact: needs a CUDA device (the Triton kernels are the subject)", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    rows: List[Dict[str, Any]] = []
    for name in [c for c in args.configs.split(",") if c]:
        if name not in CONFIGS:
            print(f"unknown config {name!r}; choose from {list(CONFIGS)}", file=sys.stderr)
            return 2
        rows += bench_config(name, CONFIGS[name], dtype=dtype, device=device, warmup=args.warmup, rep=args.rep,
                             sdpa=not args.no_sdpa, peer=not args.no_peer, fbgemm_dir=args.fbgemm_dir)
        for spec in [s for s in args.blocks.split(";") if s]:
            blk = tuple(int(x) for x in spec.split(":"))
            B_, T_, Hq_, Hkv_, D_, _w = CONFIGS[name]
            if blk[0] * blk[1] < 16 or blk[1] != 1 << (Hq_ // Hkv_ - 1).bit_length():
                continue  # GP must be the config's group size rounded up to a power of two
            rows += bench_config(name, CONFIGS[name], dtype=dtype, device=device, warmup=args.warmup,
                                 rep=args.rep, sdpa=False, peer=False, block=blk)
        for r in [r for r in rows if r.get("config") == name]:
            print({k: r.get(k) for k in COLUMNS}, flush=True)
        paths = _report(args, argv, rows, device)  # after every config: a timeout keeps what was measured
    print(open(paths["md"]).read())
    return 0


def _report(args, argv, rows, device):
    meta = machine_info(device)
    meta["command"] = "python -m tensorattn bench exact " + " ".join(shlex.quote(a) for a in (argv or []))
    meta["dtype"] = args.dtype
    meta["flop_formula"] = "fwd 4*B*Hq*D per visible (i,j1,j2) triple, bwd 3.5x (SDPA: per pair, bwd 2.5x)"
    meta["targets_tflops_fwd_bwd"] = TARGETS
    notes = ("TFLOP/s by the stated formula; bwd_over_fwd = bwd_ms / fwd_ms. Times are medians (ms) of CUDA-event "
             "timings after warm-up; the bwd column times the backward launch alone (exact_bwd on saved o, lse).")
    return write_report(args.out, title=f"Exact tensor attention ({args.dtype})", rows=rows, columns=COLUMNS,
                        meta=meta, notes=notes)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
