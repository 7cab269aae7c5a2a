"""Device time of each exact-attention kernel (forward, query-major and key-major backward) at the configurations of
``tensorattn bench exact``, from the PyTorch profiler: which of the two backward kernels limits a configuration,
and the A/B of the kernels' environment switches (set them on the command line; they are read at import).

Run on a GPU from the repository root::

    PYTHONPATH=. python benchmarks/exact_kernel_split.py --tag NAME --configs w512x32-gqa64-d128,causal-T4096 \\
        [--block BT:GP:BN:BD:BDV:warps] [--deterministic] [--out FILE.jsonl]

One JSON line per configuration is appended to ``--out`` (default ``$OUT/split.jsonl``, else
``benchmarks/results/exact_kernel_split.jsonl``) and a table is printed. TFLOP/s use the rule of the benchmark
(forward ``4 B Hq D`` per visible triple; each backward kernel does half of the backward's 3.5x: 1.75x). With
``--deterministic`` the backward kernels get no rate: the key-major one runs twice, the query-major one skips a
product. The profiler adds a little overhead; compare rows of one run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from tensorattn.bench.exact import CONFIGS, count_triples  # noqa: E402
from tensorattn.bench.harness import attn_shapes, randn_inputs  # noqa: E402

KERNELS = {"_exact_fwd_kernel": 1.0, "_bwd_q_kernel": 1.75, "_bwd_k2_kernel": 1.75}


def split(name: str, block, deterministic: bool, rep: int = 3) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from tensorattn.triton.exact_bwd import exact_bwd
    from tensorattn.triton.exact_fwd import exact_fwd, resources

    B, T, Hq, Hkv, D, window = CONFIGS[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k1, k2, v1, v2 = randn_inputs(attn_shapes(B, T, Hq, Hkv, D, D), dtype=torch.bfloat16, device="cuda",
                                     generator=g)
    kw = dict(scale=1 / math.sqrt(D), causal=True, window=window, block=block)
    o, lse = exact_fwd(q, k1, k2, v1, v2, **kw)
    do = torch.randn(o.shape, generator=g, device="cuda").to(torch.bfloat16)
    for _ in range(2):  # compile and warm up
        exact_bwd(do, q, k1, k2, v1, v2, o, lse, **kw, deterministic=deterministic)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(rep):
            exact_fwd(q, k1, k2, v1, v2, **kw)
            exact_bwd(do, q, k1, k2, v1, v2, o, lse, **kw, deterministic=deterministic)
        torch.cuda.synchronize()
    flop = 4.0 * B * Hq * D * count_triples(T, causal=True, window=window)
    row = dict(config=name, block=str(block), deterministic=deterministic, ms={}, tflops={}, res=resources())
    for ev in prof.key_averages():
        if ev.key in KERNELS:
            ms = ev.device_time_total / rep / 1000  # deterministic: the key-major kernel's two launches
            row["ms"][ev.key] = round(ms, 3)
            if not (deterministic and ev.key != "_exact_fwd_kernel"):  # other work than the rule's: no rate
                row["tflops"][ev.key] = round(KERNELS[ev.key] * flop / (ms * 1e-3) / 1e12, 1)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tag", required=True, help="name of this variant in the output")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    ap.add_argument("--block", default="", help="tile override BT:GP:BN:BD:BDV:warps (forward and backward)")
    ap.add_argument("--deterministic", action="store_true", help="the backward without atomics")
    ap.add_argument("--out", default=None, help="JSON-lines file to append to")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("exact_kernel_split: needs a CUDA device", file=sys.stderr)
        return 2
    block = tuple(int(x) for x in args.block.split(":")) if args.block else None
    out = args.out or (os.path.join(os.environ["OUT"], "split.jsonl") if os.environ.get("OUT")
                       else "benchmarks/results/exact_kernel_split.jsonl")
    from tensorattn.triton import exact_bwd, exact_fwd

    env = {k: v for k, v in os.environ.items() if k.startswith("TENSORATTN_EXACT")}
    # the switches in effect (their defaults change between versions; the environment shows only what was set)
    env["effective"] = dict(ROW1=exact_fwd.ROW1, FAST=exact_fwd.FAST, STAGES=exact_fwd.STAGES, ROWG=exact_bwd.ROWG,
                            BWD_BNQ=exact_bwd.BNQ, BWD_STAGES=exact_bwd.BWD_STAGES)
    for name in [c for c in args.configs.split(",") if c]:
        if name not in CONFIGS:
            print(f"unknown config {name!r}; choose from {list(CONFIGS)}", file=sys.stderr)
            return 2
        row = dict(tag=args.tag, env=env, device=torch.cuda.get_device_name(),
                   **split(name, block, args.deterministic))
        with open(out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        cells = [f"{k.strip('_').replace('_kernel', '')} {row['ms'].get(k, math.nan):8.2f} ms "
                 f"({row['tflops'].get(k, math.nan):5.0f} TF/s, {row['res'].get(k, {}).get('n_spills')} spills)"
                 for k in KERNELS]
        print(f"{args.tag:12s} {name:20s} " + " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
