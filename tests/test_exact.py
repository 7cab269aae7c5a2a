"""tensor_attn (naive and torch backends) against the float64 reference: output and all five gradients.

Rule (flash-attention's): a backend's max error against the float64 truth must be at most twice the error of
plain PyTorch in the same dtype (the reference run in that dtype) plus a small floor. The Triton backend has
its own file (tests/test_exact_triton.py), which runs the same checks through the interpreter.
"""
import pytest
import torch

from tensorattn import exact_torch
from tensorattn.exact import BACKENDS, choose_backend, tensor_attn
from tensorattn.naive import naive_tensor_attn

NAMES = ("q", "k1", "k2", "v1", "v2")


def make_inputs(B, T, Hq, Hkv, D, Dv, *, S1=None, S2=None, dtype=torch.float32, gen=None, device="cpu"):
    S1, S2 = S1 or T, S2 or T
    shapes = [(B, T, Hq, D), (B, S1, Hkv, D), (B, S2, Hkv, D), (B, S1, Hkv, Dv), (B, S2, Hkv, Dv)]
    return [torch.randn(*s, generator=gen, dtype=torch.float64).to(device) for s in shapes]


def run(xs, dtype, do, backend, **kw):
    """Output and the five gradients of tensor_attn with inputs cast to ``dtype``."""
    xs = [x.to(dtype).requires_grad_(True) for x in xs]
    o = tensor_attn(*xs, backend=backend, **kw)
    grads = torch.autograd.grad(o, xs, do.to(o.dtype))
    return [o] + list(grads)


def check_against_reference(xs, dtype, backend, floor_scale=None, **kw):
    """Flash-attention rule for the output and all five gradients.

    The floor is a few ulps of the largest reference value: 16 for float32 (where both errors are pure
    summation-order rounding, so their ratio fluctuates), 4 for the half types.
    """
    floor_scale = floor_scale or (16.0 if dtype == torch.float32 else 4.0)
    do = torch.randn(*xs[0].shape[:3], xs[3].shape[3], dtype=torch.float64,
                     generator=torch.Generator().manual_seed(11))
    truth = run(xs, torch.float64, do, "naive", **kw)
    plain = run(xs, dtype, do, "naive", **kw)
    got = run(xs, dtype, do, backend, **kw)
    eps = torch.finfo(dtype).eps
    for name, t, p, g in zip(("o",) + NAMES, truth, plain, got):
        assert g.dtype == dtype and g.shape == t.shape, name
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        err = (g.double() - t).abs().max().item()
        err_plain = (p.double() - t).abs().max().item()
        floor = floor_scale * eps * max(1.0, t.abs().max().item())
        assert err <= 2 * err_plain + floor, f"{name}: error {err:.3e} > 2 x plain {err_plain:.3e} + {floor:.1e}"


def test_closed_form_backward_matches_autograd(gen):
    """The naive backend's closed-form gradients equal autograd through the reference (float64)."""
    for kw, shape in [(dict(), (2, 5, 4, 2, 3, 2, 6, 4)), (dict(causal=True), (1, 9, 2, 2, 4, 3, None, None)),
                      (dict(window=(3, 2)), (2, 9, 4, 1, 4, 4, None, None))]:
        B, T, Hq, Hkv, D, Dv, S1, S2 = shape
        xs = [x.requires_grad_(True) for x in make_inputs(B, T, Hq, Hkv, D, Dv, S1=S1, S2=S2, gen=gen)]
        o = naive_tensor_attn(*xs, **kw)
        do = torch.randn(o.shape, generator=gen, dtype=o.dtype)
        ref = torch.autograd.grad(o, xs, do)
        got = torch.autograd.grad(tensor_attn(*xs, backend="naive", **kw), xs, do)
        for n, a, b in zip(NAMES, got, ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"d{n} ({kw})")


CASES = [
    # id, (B, T, Hq, Hkv, D, Dv), kwargs
    ("cross-lengths", (2, 7, 4, 2, 16, 8), dict(S1=9, S2=5)),
    ("T1-causal", (1, 1, 2, 2, 16, 16), dict(causal=True)),
    ("T7-causal", (2, 7, 2, 1, 16, 16), dict(causal=True)),
    ("T63-causal", (1, 63, 2, 2, 16, 16), dict(causal=True)),
    ("T65-causal-gqa", (1, 65, 4, 1, 16, 16), dict(causal=True)),
    ("T127-window-16-8", (1, 127, 2, 2, 16, 16), dict(window=(16, 8))),
    ("T127-window-8-16-b2", (2, 127, 2, 1, 16, 16), dict(window=(8, 16))),
    ("T65-window-1-1", (2, 65, 2, 2, 16, 16), dict(window=(1, 1))),
    ("T65-window-ge-T", (1, 65, 2, 1, 16, 16), dict(window=(100, 65))),
    ("T300-causal", (1, 300, 1, 1, 16, 16), dict(causal=True)),
    ("T300-window-32-5", (1, 300, 1, 1, 16, 16), dict(window=(32, 5))),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_torch_backend_float32(case, gen):
    _, (B, T, Hq, Hkv, D, Dv), kw = case
    kw = dict(kw)
    S1, S2 = kw.pop("S1", None), kw.pop("S2", None)
    xs = make_inputs(B, T, Hq, Hkv, D, Dv, S1=S1, S2=S2, gen=gen)
    check_against_reference(xs, torch.float32, "torch", **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kw", [dict(causal=True), dict(window=(8, 16))], ids=["causal", "window-8-16"])
def test_torch_backend_half(dtype, kw, gen):
    xs = make_inputs(2, 33, 4, 2, 16, 16, gen=gen)
    check_against_reference(xs, dtype, "torch", **kw)


def test_torch_backend_float64_tight(gen):
    xs = [x.requires_grad_(True) for x in make_inputs(2, 21, 4, 2, 8, 4, gen=gen)]
    for kw in (dict(), dict(causal=True), dict(window=(5, 3))):
        o_ref = naive_tensor_attn(*xs, **kw)
        do = torch.randn(o_ref.shape, generator=gen, dtype=torch.float64)
        ref = torch.autograd.grad(o_ref, xs, do)
        o = tensor_attn(*xs, backend="torch", **kw)
        torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
        for n, a, b in zip(NAMES, torch.autograd.grad(o, xs, do), ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"d{n} ({kw})")


@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(window=(4, 7))], ids=["none", "causal", "window"])
def test_streaming_does_not_depend_on_block_sizes(kw, gen):
    """Tiny chunks (one score entry at a time along a row) exercise every chunk edge and skipped chunk."""
    q, k1, k2, v1, v2 = make_inputs(2, 11, 2, 1, 4, 3, gen=gen)
    causal, win = kw.get("causal", False), kw.get("window")
    scale = 0.3 if win else 0.5  # one scale for the forward and the backward
    for bq, be in ((64, 1 << 22), (5, 7), (3, 1)):
        o, lse = exact_torch.torch_fwd(q, k1, k2, v1, v2, scale=scale, causal=causal, window=win,
                                       block_q=bq, block_elems=be)
        o_ref2, lse_ref2 = naive_tensor_attn(q, k1, k2, v1, v2, scale=scale, return_lse=True, **kw)
        torch.testing.assert_close(o, o_ref2, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse, lse_ref2, rtol=1e-12, atol=1e-12)  # natural log, [B, Hq, T]
        do = torch.randn(o.shape, generator=gen, dtype=o.dtype)
        g_small = exact_torch.torch_bwd(do, q, k1, k2, v1, v2, o, lse, scale=scale, causal=causal, window=win,
                                        block_q=bq, block_elems=be)
        g_big = exact_torch.naive_bwd(do, q, k1, k2, v1, v2, o, lse, scale=scale, causal=causal, window=win)
        for n, a, b in zip(NAMES, g_small, g_big):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"d{n} bq={bq} elems={be}")


def test_window_ge_T_equals_causal(gen):
    xs = make_inputs(1, 12, 2, 2, 4, 4, gen=gen)
    a = tensor_attn(*xs, window=(12, 50), backend="torch")
    b = tensor_attn(*xs, causal=True, backend="torch")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_default_scale_and_explicit_scale(gen):
    xs = make_inputs(1, 6, 2, 1, 9, 4, gen=gen)
    torch.testing.assert_close(tensor_attn(*xs, backend="torch"), naive_tensor_attn(*xs, scale=1 / 3))
    torch.testing.assert_close(tensor_attn(*xs, scale=0.7, causal=True, backend="torch"),
                               naive_tensor_attn(*xs, scale=0.7, causal=True))


def test_noncontiguous_inputs(gen):
    """Inputs that are views with batch and head strides not in [B, T, H, D] order still give the reference."""
    base = torch.randn(3, 2, 10, 16, generator=gen, dtype=torch.float64)  # [H, B, T, D]
    q = base.permute(1, 2, 0, 3)[..., :8]  # [B, T, 3, 8], non-contiguous
    kv = base[:1].permute(1, 2, 0, 3)[..., 8:]  # [B, T, 1, 8]
    o = tensor_attn(q, kv, kv * 0.5, kv, kv.flip(1), causal=True, backend="torch")
    torch.testing.assert_close(o, naive_tensor_attn(q, kv, kv * 0.5, kv, kv.flip(1), causal=True))


# ---- bad input and backend choice ---------------------------------------------------------------------------

def test_bad_inputs_name_the_argument(gen):
    q, k1, k2, v1, v2 = make_inputs(1, 8, 2, 1, 4, 4, gen=gen)
    with pytest.raises(ValueError, match="k2 has head dim 3"):
        tensor_attn(q, k1, k2[..., :3], v1, v2)
    with pytest.raises(TypeError, match="v1 must be a torch.Tensor"):
        tensor_attn(q, k1, k2, v1.numpy(), v2)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        tensor_attn(q[:, :, :1].expand(1, 8, 3, 4), k1.expand(1, 8, 2, 4), k2.expand(1, 8, 2, 4),
                    v1.expand(1, 8, 2, 4), v2.expand(1, 8, 2, 4))
    with pytest.raises(ValueError, match=r"window\[1\] \(w2\) must be >= 1"):
        tensor_attn(q, k1, k2, v1, v2, window=(3, 0))
    with pytest.raises(ValueError, match="causal masking and windows need"):
        tensor_attn(q, k1[:, :5], k2, v1[:, :5], v2, causal=True)
    with pytest.raises(TypeError, match="q must have a floating-point dtype"):
        tensor_attn(q.long(), k1, k2, v1, v2)
    with pytest.raises(TypeError, match="scale must be a float"):
        tensor_attn(q, k1, k2, v1, v2, scale="big")
    with pytest.raises(TypeError, match="backend must be a str"):
        tensor_attn(q, k1, k2, v1, v2, backend=3)


def test_backend_choice_and_reasons(gen, monkeypatch):
    q, k1, k2, v1, v2 = make_inputs(1, 8, 2, 1, 4, 4, gen=gen)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cpu = dict(device=torch.device("cpu"), dtype=torch.float32, head_dim=64, head_dim_v=64)
    assert choose_backend("auto", cpu).name == "torch"  # triton needs CUDA here
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        tensor_attn(q, k1, k2, v1, v2, backend="flash")
    with pytest.raises(ValueError, match="backend 'triton' cannot run.*TRITON_INTERPRET=1 is not set"):
        tensor_attn(q, k1, k2, v1, v2, backend="triton")
    reasons = BACKENDS["triton"].not_supported_reasons(device=torch.device("cpu"), dtype=torch.float64,
                                                       head_dim=256, head_dim_v=64)
    assert any("float64" in r for r in reasons) and any("exceed 128" in r for r in reasons)
    if torch.cuda.is_available():
        gpu = dict(cpu, device=torch.device("cuda"))
        assert choose_backend("auto", gpu).name == "triton"
        assert choose_backend("auto", dict(gpu, dtype=torch.float64)).name == "torch"
    # naive runs only when forced
    assert choose_backend("naive", cpu).name == "naive"


@pytest.mark.parametrize("T,window", [(1, None), (9, None), (40, (512, 32)), (40, (3, 7)), (40, (7, 3)), (13, (13, 1)),
                                      (100, (32, 64))])
def test_count_triples_closed_form(T, window):
    """The benchmark's FLOP count: closed form equals the number of visible triples of the reference mask."""
    from tensorattn.bench.exact import count_triples
    from tensorattn.naive import visibility_mask

    vis = visibility_mask(torch.arange(T), T, T, causal=True, window=None if window is None else
                          (min(window[0], T), min(window[1], T)))
    assert count_triples(T, causal=True, window=window) == int(vis.sum())
    assert count_triples(5, causal=False, S1=3, S2=4) == 60
