"""One causal forward + backward of the Triton polynomial kernels, for Nsight Compute on a GPU.

    ncu --clock-control none -k regex:_bwd_kernel --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section SchedulerStats python benchmarks/poly_ncu.py --T 16384

Runs the call once to compile (ncu skips no kernel: filter with ``-k`` and ``--launch-skip``), then once more.
"""
from __future__ import annotations

import argparse

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, default=16384)
    ap.add_argument("--dk", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dv", type=int, default=64)
    args = ap.parse_args(argv)
    from tensorattn.poly import poly_tensor_attn

    g = torch.Generator(device="cuda").manual_seed(0)
    H, T = args.heads, args.T
    shapes = [(1, T, H, args.dk)] * 3 + [(1, T, H, args.dv)] * 2
    xs = [torch.randn(*s, generator=g, device="cuda").to(torch.bfloat16).requires_grad_() for s in shapes]
    do = torch.randn(1, T, H, args.dv, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):
        torch.autograd.grad(poly_tensor_attn(*xs, causal=True, backend="triton"), xs, do)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
