"""Packed documents (``cu_seqlens``) against the padded equivalent, for both ops: forward + backward tokens/s.

    python benchmarks/packed_bench.py --out benchmarks/results/packed_bench

A batch of documents of mixed lengths (``--lengths``: a fixed list, or ``--docs N --min-len a --max-len b`` drawn
log-uniformly with ``--seed``) is run two ways on the same data:

* ``packed``: one row ``[1, total, H, D]`` with ``cu_seqlens`` (the exact op's fused kernels take the boundaries
  in their masks, one launch; the polynomial op's fused kernels cut every document into its own state chunks,
  one set of launches);
* ``padded``: ``[n_docs, max_len, H, D]``, every document padded at its end to the longest (causal masks keep
  the padding out of the real rows; its rows are computed and thrown away).

Rows: op (exact ``tensor_attn`` with a window, or causal ``poly_tensor_attn``), layout, forward + backward time
(device time on CUDA, median), real tokens per second (padding not counted), peak memory beyond the inputs, and
for ``packed`` the maximum relative difference of the real rows' output from the padded run (the two compute the
same function). JSON + markdown with the device and versions (:func:`tensorattn.bench.harness.write_report`).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tensorattn import poly_tensor_attn, tensor_attn  # noqa: E402
from tensorattn.bench.harness import (attn_shapes, guarded, machine_info, peak_memory, randn_inputs, time_fn,  # noqa: E402
                                      write_report)
from tensorattn.packing import cu_seqlens_from_lengths  # noqa: E402


def _lengths(args) -> list:
    if args.lengths:
        return [int(x) for x in args.lengths.split(",")]
    g = torch.Generator().manual_seed(args.seed)
    lo, hi = math.log(args.min_len), math.log(args.max_len)
    return [int(round(math.exp(lo + (hi - lo) * float(u)))) for u in torch.rand(args.docs, generator=g)]


def _pad(x, lengths, L):
    """``[1, total, H, D]`` -> ``[n, L, H, D]``, each document at the start of its row, zeros after it."""
    out = x.new_zeros(len(lengths), L, *x.shape[2:])
    s = 0
    for i, n in enumerate(lengths):
        out[i, :n] = x[0, s:s + n]
        s += n
    return out


def _unpad(y, lengths):
    return torch.cat([y[i, :n] for i, n in enumerate(lengths)], 0)[None]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/packed_bench", help="report stem")
    ap.add_argument("--lengths", default="", help="comma list of document lengths (overrides --docs)")
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64, help="exact op: D = Dv")
    ap.add_argument("--window", default="512,32", help="exact op's window w1,w2")
    ap.add_argument("--key-dim", type=int, default=16, help="polynomial op: Dk (Dv = --head-dim)")
    ap.add_argument("--ops", default="exact,poly")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rep", type=int, default=5)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    lengths = _lengths(args)
    if not lengths or min(lengths) < 1:
        raise SystemExit(f"--lengths / --min-len: every document needs >= 1 token, got {lengths}")
    total, L, H, Dv = sum(lengths), max(lengths), args.heads, args.head_dim
    cu = cu_seqlens_from_lengths(lengths).to(dev)
    w1, w2 = (int(x) for x in args.window.split(","))
    ops = {"exact": (args.head_dim, lambda *x, **k: tensor_attn(*x, window=(w1, w2), **k)),
           "poly": (args.key_dim, lambda *x, **k: poly_tensor_attn(*x, causal=True, **k))}
    g = torch.Generator(device=dev).manual_seed(args.seed)
    rows = []
    for name in args.ops.split(","):
        D, op = ops[name]
        xs = randn_inputs(attn_shapes(1, total, H, H, D, Dv), dtype=dtype, device=dev, generator=g, scale=0.5)
        do = torch.randn(1, total, H, Dv, generator=g, device=dev).to(dtype)
        padded = [_pad(x, lengths, L) for x in xs]
        dop = _pad(do, lengths, L)
        outs = {}
        for layout, inputs, grad, kw in (("packed", xs, do, dict(cu_seqlens=cu)), ("padded", padded, dop, {})):
            leaves = [x.detach().requires_grad_() for x in inputs]

            def step():
                o = op(*leaves, **kw)
                torch.autograd.grad(o, leaves, grad)
                return o

            row = dict(op=name, layout=layout, docs=len(lengths), tokens=total, rows_computed=total if
                       layout == "packed" else len(lengths) * L, max_len=L, H=H, D=D, Dv=Dv)
            r = guarded(lambda: time_fn(step, device=dev, warmup=args.warmup, rep=args.rep), device=dev)
            row["ms_fwd_bwd"] = r.get("ms")
            if r.get("ms") == r.get("ms") and r.get("ms"):
                row["tokens_per_s"] = total / (r["ms"] / 1e3)
                row["peak_gib"] = peak_memory(step, device=dev) if dev.type == "cuda" else None
                with torch.no_grad():
                    o = op(*[x.detach() for x in inputs], **kw)
                outs[layout] = o if layout == "packed" else _unpad(o, lengths)
            else:
                row["note"] = "out of memory" if r.get("oom") else "failed"
            rows.append(row)
            print(row, flush=True)
        if len(outs) == 2:
            ref = outs["padded"].float()
            rows[-2]["max_rel_diff"] = float((outs["packed"].float() - ref).abs().max() / ref.abs().max())
            if rows[-1].get("tokens_per_s") and rows[-2].get("tokens_per_s"):
                rows[-2]["speedup_vs_padded"] = rows[-2]["tokens_per_s"] / rows[-1]["tokens_per_s"]
    meta = machine_info(dev)
    meta["command"] = "python benchmarks/packed_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta["lengths"] = lengths
    pre = (f"{len(lengths)} documents, {total:,} tokens (longest {L:,}; padded to {len(lengths) * L:,} rows), "
           f"{args.dtype}, H = {H}. exact: `tensor_attn` window ({w1}, {w2}), D = Dv = {args.head_dim}; poly: causal "
           f"`poly_tensor_attn` degree 2, Dk = {args.key_dim}, Dv = {Dv}. tokens_per_s counts real tokens only.")
    cols = ["op", "layout", "docs", "tokens", "rows_computed", "max_len", "ms_fwd_bwd", "tokens_per_s", "peak_gib",
            "speedup_vs_padded", "max_rel_diff", "note"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_report(args.out, title="Packed documents vs padding (forward + backward)", rows=rows, columns=cols,
                 meta=meta, preamble=pre)
    print(f"wrote {args.out}.json and {args.out}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
