"""Fused Triton kernels of poly_tensor_attn: output and all five gradients vs the naive polynomial
reference, under TRITON_INTERPRET=1 on tiny shapes (in a subprocess, so the variable, which must be
set before triton is imported, does not leak into other test modules) and on a CUDA device."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import skip_if_interpreter_broken

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

# (B, T, Hq, Hkv, Dk, Dv, checkpoint interval in chunks or 0 for the default)
INTERP_CASES = [(1, 20, 1, 1, 16, 8, 0), (1, 37, 2, 1, 16, 20, 2), (2, 17, 2, 2, 16, 15, 1)]

_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    import tensorattn.triton.poly as tp
    from tensorattn.poly import naive_poly_tensor_attn, poly_tensor_attn
    B, T, Hq, Hkv, D, Dv, every = json.loads(sys.argv[1])
    if every:
        tp._ckpt_every = lambda n_chunks, slot_bytes: every
    g = torch.Generator().manual_seed(7)
    xs = [0.5 * torch.randn(*s, generator=g) for s in
          [(B, T, Hq, D), (B, T, Hkv, D), (B, T, Hkv, D), (B, T, Hkv, Dv), (B, T, Hkv, Dv)]]
    xs = [x.requires_grad_() for x in xs]
    out = poly_tensor_attn(*xs, causal=True, backend="triton")
    w = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * w).sum(), xs)
    xd = [x.detach().double().requires_grad_() for x in xs]
    ref = naive_poly_tensor_attn(*xd, causal=True)
    gref = torch.autograd.grad((ref * w.double()).sum(), xd)
    rel = lambda a, b: float((a.double() - b).norm() / b.norm())
    print(json.dumps({"out": rel(out, ref), "grads": [rel(a, b) for a, b in zip(grads, gref)],
                      "finite": bool(torch.isfinite(out).all())}))
""")


@pytest.mark.parametrize("case", INTERP_CASES, ids=lambda c: "B{}-T{}-H{}/{}-Dk{}-Dv{}-ck{}".format(*c))
def test_triton_interpreter_matches_naive(case):
    skip_if_interpreter_broken()
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(case)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["finite"]
    # float32 inputs, exact (ieee) products under the interpreter: float32 rounding only
    assert res["out"] < 1e-5, res
    assert max(res["grads"]) < 1e-5, res


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,Hq,Hkv,D,Dv", [(1, 17, 1, 1, 16, 64), (2, 300, 4, 2, 16, 64), (1, 257, 2, 1, 64, 16)])
def test_triton_gpu_matches_naive(B, T, Hq, Hkv, D, Dv, dtype):
    from tensorattn.poly import naive_poly_tensor_attn, poly_tensor_attn

    g = torch.Generator(device="cuda").manual_seed(3)
    shapes = [(B, T, Hq, D), (B, T, Hkv, D), (B, T, Hkv, D), (B, T, Hkv, Dv), (B, T, Hkv, Dv)]
    xs = [(0.5 * torch.randn(*s, generator=g, device="cuda")).to(dtype).requires_grad_() for s in shapes]
    out = poly_tensor_attn(*xs, causal=True, backend="triton")
    w = torch.randn(out.shape, generator=g, device="cuda")
    grads = torch.autograd.grad((out.float() * w).sum(), xs)
    xd = [x.detach().double().requires_grad_() for x in xs]
    ref = naive_poly_tensor_attn(*xd, causal=True)
    gref = torch.autograd.grad((ref * w.double()).sum(), xd)
    # flash-attention's rule: at most ~2x the error plain PyTorch makes in the same dtype (plus a floor)
    xl = [x.detach().requires_grad_() for x in xs]
    low = poly_tensor_attn(*xl, causal=True, backend="torch")
    glow = torch.autograd.grad((low.float() * w).sum(), xl)
    rel = lambda a, b: float((a.detach().double() - b).norm() / b.norm())  # noqa: E731
    floor = 2e-3  # tf32 products in the kernels
    assert rel(out, ref) <= 2 * rel(low, ref) + floor
    for n, a, al, b in zip(("q", "k1", "k2", "v1", "v2"), grads, glow, gref):
        assert rel(a, b) <= 2 * rel(al, b) + floor, (n, rel(a, b), rel(al, b))
