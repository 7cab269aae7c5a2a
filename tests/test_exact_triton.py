"""The fused Triton backend of tensor_attn against the float64 reference (output, LSE and all five gradients).

Where it runs:
* on a CUDA machine: the full sweep below, directly;
* on a CPU machine with Triton: one test re-runs this file in a subprocess with ``TRITON_INTERPRET=1`` (the
  variable must be set before Triton is imported, and setting it here would leak into other test modules),
  where the tiny interpreter cases run;
* without Triton: skipped.

Rule (flash-attention's): error against the float64 truth <= 2 x the error of the reference run in the same
dtype + a floor of a few ulps of the largest reference value.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from utils import interpreter_env, skip_if_interpreter_broken

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
ON_GPU = torch.cuda.is_available() and not INTERP
NAMES = ("o", "dq", "dk1", "dk2", "dv1", "dv2")

if not (INTERP or ON_GPU):

    @pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
    def test_triton_kernels_under_interpreter():
        skip_if_interpreter_broken()
        root = Path(__file__).resolve().parents[1]
        # the runner of every interpreter test (tests/utils.py), here around pytest itself
        r = subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-x", "-q",
                            "-p", "no:cacheprovider"], cwd=root, env=interpreter_env(),
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
        assert " passed" in r.stdout and "skipped" not in r.stdout.split("\n")[-2], r.stdout[-2000:]

else:
    from tensorattn.exact import tensor_attn
    from tensorattn.naive import naive_tensor_attn

    DEVICE = "cuda" if ON_GPU else "cpu"

    def make(B, T, Hq, Hkv, D, Dv, S1=None, S2=None, gen=None, strided=False):
        S1, S2 = S1 or T, S2 or T
        shapes = [(B, T, Hq, D), (B, S1, Hkv, D), (B, S2, Hkv, D), (B, S1, Hkv, Dv), (B, S2, Hkv, Dv)]
        xs = []
        for s in shapes:
            if strided:  # batch-major storage [H, B, T, D] seen through a permuted view: odd batch/head strides
                x = torch.randn(s[2], s[0], s[1], s[3], generator=gen, dtype=torch.float64).permute(1, 2, 0, 3)
            else:
                x = torch.randn(*s, generator=gen, dtype=torch.float64)
            xs.append(x.to(DEVICE))
        return xs

    def run(xs, dtype, do, backend, **kw):
        leaves = [x.detach().to(dtype).requires_grad_(True) for x in xs]
        o = tensor_attn(*leaves, backend=backend, **kw)
        return [o] + list(torch.autograd.grad(o, leaves, do.to(dtype)))

    def check(xs, dtype, floor_ulps=None, **kw):
        # float32: the kernels accumulate dk2/dv2 sequentially over up to S1*S2/BN tile products (the reference
        # sums through cuBLAS), an error that grows like sqrt(S1*S2) ulps (measured on the H100: dv2 at T=300 off
        # by 79 ulps of its largest value); 2*sqrt(S1*S2) ulps still flags tf32 products (~1e-3 relative) by 15x
        S1, S2 = xs[1].shape[1], xs[2].shape[1]
        floor_ulps = floor_ulps or (max(64.0, 2.0 * (S1 * S2) ** 0.5) if dtype == torch.float32 else 4.0)
        gen = torch.Generator().manual_seed(7)
        do = torch.randn(*xs[0].shape[:3], xs[3].shape[3], generator=gen, dtype=torch.float64).to(DEVICE)
        truth = run(xs, torch.float64, do, "naive", **kw)
        plain = run(xs, dtype, do, "naive", **kw)
        got = run(xs, dtype, do, "triton", **kw)
        eps = torch.finfo(dtype).eps
        for name, t, p, g in zip(NAMES, truth, plain, got):
            assert g.dtype == dtype and g.shape == t.shape, name
            assert torch.isfinite(g).all(), f"{name}: non-finite values"
            err = (g.double() - t).abs().max().item()
            err_plain = (p.double() - t).abs().max().item()
            floor = floor_ulps * eps * max(1.0, t.abs().max().item())
            assert err <= 2 * err_plain + floor, f"{name}: error {err:.3e} > 2 x {err_plain:.3e} + {floor:.1e}"

    if ON_GPU:
        DTYPES = [torch.float32, torch.bfloat16, torch.float16]
        CASES = [
            ("cross-lengths", (2, 37, 4, 2, 64, 64), dict(S1=45, S2=29)),
            ("cross-whole", (1, 37, 4, 2, 64, 64), dict(S1=45, S2=127)),
            ("T1", (1, 1, 2, 2, 64, 64), dict(causal=True)),
            ("T7", (2, 7, 2, 1, 64, 64), dict(causal=True)),
            ("T63", (1, 63, 4, 4, 64, 64), dict(causal=True)),
            ("T65-gqa4", (2, 65, 8, 2, 64, 64), dict(causal=True)),
            ("T127-d128", (1, 127, 2, 1, 128, 128), dict(causal=True)),
            ("T300", (1, 300, 2, 2, 64, 64), dict(causal=True)),
            ("T300-d40-dv24", (1, 300, 2, 2, 40, 24), dict(causal=True)),
            ("w1-1", (2, 129, 4, 2, 64, 64), dict(window=(1, 1))),
            ("w16-8", (2, 300, 4, 2, 64, 64), dict(window=(16, 8))),
            ("w8-16", (2, 300, 4, 2, 64, 64), dict(window=(8, 16))),
            ("w-ge-T", (1, 65, 4, 1, 64, 64), dict(window=(80, 65))),
            ("w7-100-gqa3", (3, 150, 6, 2, 16, 16), dict(window=(7, 100))),
            ("w32-64-gqa16-d128", (2, 200, 16, 1, 128, 128), dict(window=(32, 64))),
            # one token per program (64 rows = its 64 heads): the outer k1/v1 row is loaded once, broadcast
            ("w16-40-gqa64-d128", (1, 90, 64, 1, 128, 128), dict(window=(16, 40))),
            ("strided-b3", (3, 100, 4, 2, 64, 64), dict(window=(20, 12), strided=True)),
            ("strided-b3-causal", (3, 70, 4, 4, 32, 32), dict(causal=True, strided=True)),
        ]
    else:  # interpreter: tiny shapes, a few seconds each
        DTYPES = [torch.float32]
        CASES = [
            ("cross-lengths", (2, 7, 4, 2, 16, 16), dict(S1=9, S2=5)),
            ("T1", (1, 1, 2, 2, 16, 16), dict(causal=True)),
            ("T20-causal-gqa3-d20", (1, 20, 3, 1, 20, 8), dict(causal=True)),
            ("w1-1", (1, 17, 2, 2, 16, 16), dict(window=(1, 1))),
            ("w5-3-b2", (2, 19, 4, 2, 16, 16), dict(window=(5, 3))),
            ("w3-9", (1, 18, 2, 1, 16, 16), dict(window=(3, 9))),
            ("w-ge-T", (1, 9, 2, 1, 16, 16), dict(window=(9, 30))),
            ("strided-b2", (2, 11, 2, 1, 16, 16), dict(window=(4, 6), strided=True)),
            ("w4-6-gqa16", (1, 12, 16, 1, 16, 16), dict(window=(4, 6))),  # one token per program: k1/v1 broadcast
            # a window wider than a query block plus a key block: whole inner blocks skip the mask, the rest not
            ("w3-40", (1, 70, 2, 1, 16, 16), dict(window=(3, 40))),
            ("T50-causal", (1, 50, 1, 1, 16, 16), dict(causal=True)),
            # full attention with whole key blocks and a tail one short of a block; a window edge on a block bound
            ("cross-whole", (1, 9, 2, 1, 16, 16), dict(S1=20, S2=31)),
            ("w3-32-edge", (1, 64, 2, 1, 16, 16), dict(window=(3, 32))),
            # two tokens per program (GQA 8): blocks that end one key past the first token, or start one key before
            # the second token's window
            ("T40-causal-gqa8", (1, 40, 8, 1, 16, 16), dict(causal=True)),
            ("w3-20-gqa8", (1, 48, 8, 1, 16, 16), dict(window=(3, 20))),
        ]

    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
    @pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
    def test_triton_matches_reference(case, dtype, request):
        if case[0] == "w1-1" and dtype != torch.float32:
            # one visible pair: P = 1 and the true dq is 0; the kernels' dP uses 16-bit products (dO ∘ v1 rounded)
            # while the row sums come from <dO, O>, so dq is a 16-bit rounding (H200: 5.4e-2 in bf16, 5.6e-3 in
            # fp16, against a floor of 4 ulps). Fixed by row sums over the same dP (issue 14), not by tolerances.
            request.applymarker(pytest.mark.xfail(reason="dq at a one-pair softmax: 16-bit dP vs <dO, O> row sums",
                                                  strict=False))
        _, (B, T, Hq, Hkv, D, Dv), kw = case
        kw = dict(kw)
        S1, S2, strided = kw.pop("S1", None), kw.pop("S2", None), kw.pop("strided", False)
        xs = make(B, T, Hq, Hkv, D, Dv, S1=S1, S2=S2, gen=torch.Generator().manual_seed(T * 31 + Hq), strided=strided)
        check(xs, dtype, **kw)

    DET_CASES = [c for c in CASES if c[0] in ("cross-lengths", "T20-causal-gqa3-d20", "w5-3-b2", "w3-9", "T300",
                                              "w16-8", "w8-16", "w32-64-gqa16-d128", "strided-b3")]

    @pytest.mark.parametrize("case", DET_CASES, ids=[c[0] for c in DET_CASES])
    def test_deterministic_backward(case):
        """deterministic=True (no atomics: dk1/dv1 from the key-major kernel with the streams swapped) holds the
        same accuracy rule, and two runs give bitwise the same gradients."""
        _, (B, T, Hq, Hkv, D, Dv), kw = case
        kw = dict(kw)
        S1, S2, strided = kw.pop("S1", None), kw.pop("S2", None), kw.pop("strided", False)
        xs = make(B, T, Hq, Hkv, D, Dv, S1=S1, S2=S2, gen=torch.Generator().manual_seed(T * 31 + Hq), strided=strided)
        dtype = DTYPES[-1] if ON_GPU else torch.float32  # fp16 on the GPU: its rounding shows any disorder
        check(xs, dtype, deterministic=True, **kw)
        do = torch.randn(*xs[0].shape[:3], xs[3].shape[3], generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64).to(DEVICE)
        a = run(xs, dtype, do, "triton", deterministic=True, **kw)
        b = run(xs, dtype, do, "triton", deterministic=True, **kw)
        assert all(torch.equal(x, y) for x, y in zip(a, b)), [float((x - y).abs().max()) for x, y in zip(a, b)]

    @pytest.mark.parametrize("kw", [dict(causal=True), dict(window=(3, 5)), dict()], ids=["causal", "w3-5", "full"])
    def test_lse_is_natural_log(kw):
        """The saved LSE equals the reference's natural-log LSE (a base-2 LSE would be off by a factor 1.44)."""
        from tensorattn.triton.exact_fwd import exact_fwd

        q, k1, k2, v1, v2 = [x.float() for x in make(2, 13, 2, 1, 16, 16, gen=torch.Generator().manual_seed(3))]
        win = kw.get("window")
        o, lse = exact_fwd(q, k1, k2, v1, v2, scale=0.4, causal=kw.get("causal", False) or win is not None,
                           window=win)
        o_ref, lse_ref = naive_tensor_attn(q, k1, k2, v1, v2, scale=0.4, return_lse=True, **kw)
        torch.testing.assert_close(lse, lse_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)

    def test_output_fully_written():
        """Poisoned output buffers would show up as NaN: every row, including ragged tails, is written."""
        q, k1, k2, v1, v2 = [x.float() for x in make(1, 23, 4, 2, 16, 16, gen=torch.Generator().manual_seed(5))]
        for _ in range(2):
            torch.empty(10**6, device=DEVICE).fill_(float("nan"))  # dirty the allocator's reuse pool
            o = tensor_attn(q, k1, k2, v1, v2, window=(4, 2), backend="triton")
            assert torch.isfinite(o).all()

    @pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
    @pytest.mark.parametrize("Hq,window", [(64 if ON_GPU else 16, (3, 7)), (16 if ON_GPU else 8, (3, 20))],
                             ids=["one-token-per-block", "tokens-x-heads"])
    def test_outer_rows_are_not_read_outside_the_sequence(Hq, window, det):
        """The outer k1/v1 rows loaded once per block (one token of all heads) or once per token (several tokens
        of several heads) are read only at positions inside the sequence: with k and v viewed inside buffers that
        hold NaN before the first and after the last position, forward and gradients are finite and equal those
        of clean copies. A masked score does not protect the backward, where dq += t * k1 and dk2 += dS^T (q k1)
        multiply the row itself."""
        T, D, pad = 41, 128 if (ON_GPU and Hq == 64) else 16, 8  # 41: a last block with tokens past T
        gen = torch.Generator().manual_seed(11)
        q, k1, k2, v1, v2 = [x.float() for x in make(1, T, Hq, 1, D, D, gen=gen)]

        def poisoned(x):
            buf = torch.full((1, T + 2 * pad) + tuple(x.shape[2:]), float("nan"), device=x.device)
            buf[:, pad:pad + T] = x
            return buf[:, pad:pad + T]

        do = torch.randn(1, T, Hq, D, generator=gen, dtype=torch.float64).to(DEVICE)
        clean = run([q, k1, k2, v1, v2], torch.float32, do, "triton", window=window, deterministic=det)
        dirty = run([q] + [poisoned(x) for x in (k1, k2, v1, v2)], torch.float32, do, "triton", window=window,
                    deterministic=det)
        for name, a, b in zip(NAMES, clean, dirty):
            assert torch.isfinite(b).all(), f"{name}: non-finite with NaN outside the sequence"
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)

    @pytest.mark.parametrize("kw", [dict(window=(3, 20)), dict(causal=True)], ids=["w3-20", "causal"])
    def test_query_major_inner_block_of_its_own(kw, monkeypatch):
        """The query-major kernel's inner key block (``BNQ``) differs from the key-major kernel's key block: both
        kernels keep the accuracy rule (the interpreter's default tiles have them equal)."""
        import tensorattn.triton.exact_bwd as eb

        monkeypatch.setattr(eb, "BNQ", 16 if ON_GPU else 32)
        xs = make(1, 70, 4, 2, 16, 16, gen=torch.Generator().manual_seed(13))
        check(xs, torch.float32, **kw)

    def test_auto_picks_triton():
        from tensorattn.exact import choose_backend

        # the interpreter runs float32 only (its bf16/fp16 tl.dot is wrong): there auto must not pick triton for bf16
        dtype = torch.bfloat16 if ON_GPU else torch.float32
        prob = dict(device=torch.device(DEVICE), dtype=dtype, head_dim=64, head_dim_v=64)
        assert choose_backend("auto", prob).name == "triton"
        if not ON_GPU:
            prob["dtype"] = torch.bfloat16
            assert choose_backend("auto", prob).name == "torch"
            with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
                choose_backend("triton", prob)


if not INTERP:  # once, outside the interpreter's re-run of this file

    @pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
    @pytest.mark.parametrize("var,value", [("TENSORATTN_EXACT_STAGES", "2"), ("TENSORATTN_EXACT_STAGES", "0,3"),
                                           ("TENSORATTN_EXACT_STAGES", "two,three"), ("TENSORATTN_EXACT_BWD_BNQ", "48"),
                                           ("TENSORATTN_EXACT_BWD_STAGES", "0")])
    def test_kernel_switches_reject_bad_values(var, value):
        """The kernels' environment switches (benchmark A/B runs) fail at import, naming the variable and the value,
        instead of running a tiling nobody asked for."""
        root = Path(__file__).resolve().parents[1]
        r = subprocess.run([sys.executable, "-c", "import tensorattn.triton.exact_bwd"], cwd=root,
                           env=dict(os.environ, **{var: value}), capture_output=True, text=True, timeout=300)
        assert r.returncode != 0
        assert "ValueError" in r.stderr and var in r.stderr and repr(value) in r.stderr, r.stderr[-2000:]
