"""Machine-code counts of the polynomial walks' inner loops (sm_90), without running them.

Compiles ``_fwd_walk_kernel`` and both passes of ``_bwd_kernel`` for compute capability 9.0 with the
specialisation the runtime gives them (16-byte aligned pointers, the sizes divisible by 16), disassembles them
(``cuobjdump``: on PATH, else the one Triton ships) and counts the instructions of each kernel's row loop (taken
to be the body of the last backward branch, which it is in these kernels), that is one row of one program: the
figure to set against the arithmetic a row needs. Needs Triton >= 3.3 (its ``ASTSource`` signature) and no GPU
(Triton's own ``ptxas``), so a layout or block change can be counted before device time is spent on it.
JSON + markdown.

    python benchmarks/poly_sass.py --out benchmarks/results
    python benchmarks/poly_sass.py --module path/to/variant_kernels.py   # a modified copy of poly_kernels.py
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tensorattn.bench.harness import machine_info, write_report

FP, I32 = "*fp32", "i32"
FWD_SIG = dict(u1_ptr=FP, u2_ptr=FP, u3_ptr=FP, v1_ptr="*bf16", v2_ptr="*bf16", st_ptr=FP, sd_ptr=FP, num_ptr=FP,
               den_ptr=FP, ct_ptr="*i32", T=I32, t0=I32, c0=I32, NFT=I32, NS1=I32, TS=I32, HQ=I32, GROUPS=I32, KP=I32)
BWD_SIG = dict(u1_ptr=FP, u2_ptr=FP, u3_ptr=FP, v1_ptr="*bf16", v2_ptr="*bf16", do_ptr="*bf16", den_ptr=FP,
               delta_ptr=FP, st_ptr=FP, sd_ptr=FP, rs_ptr=FP, rd_ptr=FP, du1_ptr=FP, du2_ptr=FP, du3_ptr=FP, gv_ptr=FP,
               GV2=I32, ct_ptr="*i32", T=I32, t0=I32, c0=I32, NFT=I32, NS1=I32, HQ=I32, GROUPS=I32, KP=I32)
DIVISIBLE = ("T", "t0", "TS", "HQ", "KP", "GV2")  # 16 | each at the benchmark's shapes (NS1, c0 vary)


def _cuobjdump() -> str:
    exe = shutil.which("cuobjdump")
    return exe or os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _compile(fn, sig: dict, consts: dict, warps: int):
    sig = dict(sig, **{k: "constexpr" for k in consts})
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if n.endswith("_ptr") or n in DIVISIBLE}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))


def loop_counts(kernel) -> dict:
    """Instructions of the innermost loop (the last backward branch's body) of a compiled kernel, by opcode."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True).stdout
    ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,6})\*/\s+([^;]*);", sass)]
    back = [(a, t) for a, t in ins if re.search(r"\bBRA\b", t) and "0x" in t
            and int(t.split("0x")[-1].split()[0], 16) < a]
    if not back:
        raise RuntimeError("no loop found in the disassembly")
    end, t = back[-1]
    start = int(t.split("0x")[-1].split()[0], 16)
    body = [t for a, t in ins if start <= a <= end]
    ops = collections.Counter((t.split()[1] if t.startswith("@") else t.split()[0]) for t in body)
    regs = re.search(r"REG:(\d+)", res)
    group = lambda *p: sum(c for o, c in ops.items() if o.startswith(p))  # noqa: E731
    return dict(loop=len(body), regs=int(regs.group(1)) if regs else None, fp32=group("FFMA", "FMUL", "FADD"),
                loads=group("LDG", "LDS"), shuffles=group("SHFL"), barriers=group("BAR"), spills=group("LDL", "STL"),
                red=group("RED"), atom=group("ATOM"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="poly_sass")
    ap.add_argument("--module", default=None, help="a variant of tensorattn/triton/poly_kernels.py to count instead")
    ap.add_argument("--dv", type=int, default=64)
    ap.add_argument("--blocks", default=None,
                    help="features:warps of the forward walk, pass 1 and pass 2 (default: TUNE's BK_FWD:WARPS_FWD, "
                         "BK_BWD1:WARPS_BWD1, BK_BWD:WARPS_BWD)")
    args = ap.parse_args(argv)
    from tensorattn.triton.poly import TUNE

    if args.blocks is None:
        args.blocks = ",".join(f"{TUNE[b]}:{TUNE[w]}" for b, w in (("BK_FWD", "WARPS_FWD"), ("BK_BWD1", "WARPS_BWD1"),
                                                                    ("BK_BWD", "WARPS_BWD")))
    if args.module:
        spec = importlib.util.spec_from_file_location("poly_kernels_variant", args.module)
        pk = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(pk)
    else:
        from tensorattn.triton import poly_kernels as pk
    (fb, fw), (b1, w1), (b2, w2) = [tuple(int(x) for x in s.split(":")) for s in args.blocks.split(",")]
    dvp = max(16, triton.next_power_of_2(args.dv))
    base = dict(DV=args.dv, DVP=dvp, F=int(TUNE["F"]), VARLEN=False)
    rows = []
    for name, fn, sig, consts, warps in (
            ("forward walk", pk._fwd_walk_kernel, FWD_SIG, dict(base, BK=fb), fw),
            ("pass 1", pk._bwd_kernel, BWD_SIG, dict(base, BK=b1, MODE=1), w1),
            ("pass 2", pk._bwd_kernel, BWD_SIG, dict(base, BK=b2, MODE=2), w2)):
        row = dict(kernel=name, features=consts["BK"], warps=warps)
        row.update(loop_counts(_compile(fn, sig, consts, warps)))
        row["per_feature"] = row["loop"] * warps / consts["BK"]
        rows.append(row)
        print(row, flush=True)
    meta = machine_info()
    meta.update(command="python benchmarks/poly_sass.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                target="sm_90", module=args.module or "tensorattn/triton/poly_kernels.py")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_report(out / args.name, title=f"Polynomial walks: instructions per row (sm_90, Dv {args.dv}, bf16 values)",
                 rows=rows, meta=meta,
                 columns=["kernel", "features", "warps", "loop", "per_feature", "fp32", "loads", "shuffles",
                          "barriers", "red", "atom", "spills", "regs"],
                 preamble="`loop`: instructions of the innermost loop (one row of one program, per warp); "
                          "`per_feature`: loop x warps / features; `red`: atomic adds without a return value, "
                          "`atom`: with one.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
