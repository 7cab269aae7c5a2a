"""``tensorattn bench <suite> [options]``: benchmarks of the attention ops through the one harness
(:mod:`tensorattn.bench.harness`). Suites: ``exact`` (tensor_attn kernels), ``poly`` (poly_tensor_attn), ``decode`` (generation).
"""
from __future__ import annotations

import importlib
import sys
from typing import List, Optional

SUITES = {
    "exact": ("tensorattn.bench.exact", "exact tensor attention: forward/backward time, TFLOP/s, memory"),
    "poly": ("tensorattn.bench.poly", "polynomial (fast) tensor attention against exact and matrix baselines"),
    "decode": ("tensorattn.bench.decode", "incremental decoding: tokens/s and cache memory against the context"),
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUITES:
        print("usage: tensorattn bench <suite> [options]\n\nsuites:")
        for k, (_, h) in SUITES.items():
            print(f"  {k:<6} {h}")
        return 0 if (not argv or argv[0] in ("-h", "--help")) else 2
    return int(importlib.import_module(SUITES[argv[0]][0]).main(argv[1:]) or 0)
