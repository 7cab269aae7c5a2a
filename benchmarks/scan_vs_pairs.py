"""Causal poly_tensor_attn, torch backend: the scan against the chunked pair algorithm, by key dim.

The torch backend takes the scan (``tensorattn.poly.scan``) on CUDA when one position's running sums
hold at most ``_SCAN_MAX_POS_ELEMS`` entries (``B * Hkv * k * (Dv + 1)``), else the chunked pair algorithm.
This script times forward + backward of both on the same problems, so that the limit rests on a measurement::

    python benchmarks/scan_vs_pairs.py --out benchmarks/results/scan_vs_pairs

Writes ``OUT.json`` and ``OUT.md`` (device, versions, command) through :func:`tensorattn.bench.harness.write_report`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import tensorattn.poly as P  # noqa: E402
import tensorattn.poly.scan as S  # noqa: E402
from tensorattn.bench.harness import guarded, machine_info, peak_memory, time_fn, write_report  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, default=16384)
    ap.add_argument("--dks", default="4,8,16,24,32")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--value-dim", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rep", type=int, default=3)
    ap.add_argument("--max-time", type=float, default=5.0)
    ap.add_argument("--out", default="benchmarks/results/scan_vs_pairs")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    B, H, T, Dv = 1, args.heads, args.T, args.value_dim
    rows = []
    real_use_scan = S._use_scan
    for dk in [int(x) for x in args.dks.split(",")]:
        g = torch.Generator(device=dev).manual_seed(dk)
        xs = [torch.randn(B, T, H, d, device=dev, generator=g).to(dtype).requires_grad_() for d in (dk, dk, dk, Dv, Dv)]
        do = torch.randn(B, T, H, Dv, device=dev, generator=g).to(dtype)
        k = P.poly_rank(dk, 2)
        default = "scan" if real_use_scan(dev, B, H, k, Dv) else "pairs"
        for algo in ("scan", "pairs"):
            S._use_scan = (lambda *a: True) if algo == "scan" else (lambda *a: False)

            def step():
                for x in xs:
                    x.grad = None
                P.poly_tensor_attn(*xs, causal=True, backend="torch").backward(do)

            def measure():
                t = time_fn(step, device=dev, warmup=args.warmup, rep=args.rep, max_time_s=args.max_time)
                return {"ms": t["ms"], "ms_p20": t["ms_p20"], "ms_p80": t["ms_p80"], "peak_gib": peak_memory(step, device=dev)}

            res = guarded(measure, dev)
            row = {"key_dim": dk, "rank_k": k, "entries_per_position": B * H * k * (Dv + 1), "algo": algo,
                   "default": "yes" if algo == default else "", "T": T, "ms_fwd_bwd": res.get("ms", float("nan")),
                   "ms_p20": res.get("ms_p20", float("nan")), "ms_p80": res.get("ms_p80", float("nan")),
                   "peak_gib": res.get("peak_gib", float("nan")), "note": "OOM" if res.get("oom") else ""}
            rows.append(row)
            print(row, flush=True)
        S._use_scan = real_use_scan
    meta = machine_info(dev)
    meta.update(command=" ".join(["python"] + sys.argv), dtype=str(dtype), scan_max_pos_elems=S._SCAN_MAX_POS_ELEMS,
                scan_chunk_elems=S._SCAN_CHUNK_ELEMS)
    notes = (f"Causal poly_tensor_attn(backend='torch'), degree 2, B={B}, Hq=Hkv={H}, Dv={Dv}, {dtype} inputs (float32 "
             "sums), forward + backward. algo=scan: running sums by cumsum a chunk at a time; algo=pairs: the chunked "
             "pair algorithm (32-position chunks). default: what the backend picks on this device "
             f"(scan when entries_per_position <= {S._SCAN_MAX_POS_ELEMS} on CUDA).")
    paths = write_report(args.out, title="Causal torch path: scan vs chunked pairs", rows=rows, columns=list(rows[0]),
                         meta=meta, notes=notes)
    print(f"wrote {paths['json']} and {paths['md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
