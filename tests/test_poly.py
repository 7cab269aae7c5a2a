"""poly_tensor_attn (torch backend): implementation vs the naive polynomial reference (tight, float64),
approximation vs exact tensor attention (a budget that shrinks with the degree), gradients, decoding,
backend choice and bad input. Triton kernels are tested in test_poly_triton.py."""
import math

import pytest
import torch
from utils import attn_inputs

from tensorattn.naive import naive_tensor_attn
from tensorattn.poly import (EPS, PolyTensorAttnState, naive_poly_tensor_attn, poly_rank, poly_tensor_attn,
                             poly_tensor_attn_step)
from tensorattn.poly.op import poly_fwd_op


def _inputs(gen, B, T, Hq, Hkv, D, Dv, S1=None, S2=None, dtype=torch.float64, kscale=1.0):
    return tuple(attn_inputs(B, T, Hq, Hkv, D, Dv, S1=S1, S2=S2, dtype=dtype, generator=gen, k_scale=kscale))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


CASES = [  # B, T, Hq, Hkv, D, Dv, S1, S2 (S only when non-causal)
    pytest.param(1, 1, 1, 1, 2, 3, None, None, id="T1"),
    pytest.param(2, 7, 2, 2, 3, 5, None, None, id="T7-Dk3-Dv5"),
    pytest.param(1, 33, 4, 2, 4, 2, None, None, id="T33-gqa2"),
    pytest.param(1, 70, 4, 1, 2, 6, None, None, id="T70-gqa4-3chunks"),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("degree", [2, 4])
@pytest.mark.parametrize("B,T,Hq,Hkv,D,Dv,S1,S2", CASES)
def test_matches_naive_poly(gen, B, T, Hq, Hkv, D, Dv, S1, S2, degree, causal):
    xs = _inputs(gen, B, T, Hq, Hkv, D, Dv)
    out = poly_tensor_attn(*xs, degree=degree, causal=causal, backend="torch")
    ref = naive_poly_tensor_attn(*xs, degree=degree, causal=causal)
    assert out.shape == (B, T, Hq, Dv) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("S1,S2", [(5, 9), (40, 3), (1, 1)])
def test_noncausal_other_lengths(gen, S1, S2):
    xs = _inputs(gen, 2, 6, 2, 1, 3, 4, S1=S1, S2=S2)
    out = poly_tensor_attn(*xs, degree=2, backend="torch")
    torch.testing.assert_close(out, naive_poly_tensor_attn(*xs, degree=2), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk,ckpt", [(1, 1), (4, 1), (4, 3), (16, 2), (64, 16)])
def test_chunking_does_not_change_the_result(gen, chunk, ckpt):
    xs = [x.requires_grad_() for x in _inputs(gen, 1, 37, 2, 1, 3, 4)]
    ref = naive_poly_tensor_attn(*xs, degree=2, causal=True, scale=0.5)
    out = poly_fwd_op(*xs, 2, True, 0.5, "torch", [0, chunk, ckpt], True, None)[0]  # the op poly_tensor_attn runs
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    w = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    g = torch.autograd.grad((out * w).sum(), xs)
    gr = torch.autograd.grad((ref * w).sum(), xs)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("degree", [2, 4])
def test_gradients_match_autograd_through_naive(gen, degree, causal):
    xs = [x.requires_grad_() for x in _inputs(gen, 2, 19, 4, 2, 3, 5)]
    out = poly_tensor_attn(*xs, degree=degree, causal=causal, backend="torch")
    ref = naive_poly_tensor_attn(*xs, degree=degree, causal=causal)
    w = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    g = torch.autograd.grad((out * w).sum(), xs)
    gr = torch.autograd.grad((ref * w).sum(), xs)
    for name, a, b in zip(("q", "k1", "k2", "v1", "v2"), g, gr):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"gradient of {name}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradcheck(gen, causal):
    xs = [x.requires_grad_() for x in _inputs(gen, 1, 5, 2, 1, 2, 3)]
    f = lambda *a: poly_tensor_attn(*a, degree=2, causal=causal, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(f, xs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_error_against_exact_shrinks_with_degree(gen, causal):
    # logits kept O(1) (|z| <~ 1; the floor is EPS / den ~ 1e-6 at the first rows) so the Taylor error R^(g+1)/(g+1)! falls fast with g
    xs = _inputs(gen, 1, 24, 2, 2, 4, 4, kscale=0.3)
    exact = naive_tensor_attn(*xs, causal=causal)
    errs = [_rel(poly_tensor_attn(*xs, degree=g, causal=causal, backend="torch"), exact) for g in (2, 4, 6)]
    assert errs[0] < 2e-2, errs
    assert errs[1] < errs[0] / 5 and errs[2] < errs[1] / 5, errs
    assert errs[2] < 1e-4, errs


def test_rows_of_weights_sum_to_one(gen):
    # v1 = v2 = 1: every output entry is sum P / (eps + sum P) = 1 - eps / (eps + sum P)
    q, k1, k2, v1, v2 = _inputs(gen, 1, 9, 2, 2, 3, 2)
    ones = torch.ones_like(v1)
    out = poly_tensor_attn(q, k1, k2, ones, ones, causal=True, backend="torch")
    torch.testing.assert_close(out, torch.ones_like(out), rtol=0, atol=4 * EPS)


def test_causal_prefix_does_not_see_the_future(gen):
    xs = _inputs(gen, 1, 20, 2, 1, 3, 3)
    out = poly_tensor_attn(*xs, causal=True, backend="torch")
    ys = [x.clone() for x in xs]
    for y in ys[1:]:
        y[:, 11:] = torch.randn(y[:, 11:].shape, generator=gen, dtype=y.dtype)
    out2 = poly_tensor_attn(*ys, causal=True, backend="torch")
    torch.testing.assert_close(out[:, :11], out2[:, :11], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out[:, 11:], out2[:, 11:])


def test_large_logits_keep_the_normaliser_positive(gen):
    # logits of size ~100: P is far from exp, but the degree-2 normaliser stays >= 0.5 per pair
    xs = _inputs(gen, 1, 12, 2, 1, 4, 3, kscale=10.0)
    out = poly_tensor_attn(*xs, causal=True, backend="torch")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, naive_poly_tensor_attn(*xs, causal=True), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_float32(gen, dtype):
    xs = _inputs(gen, 1, 40, 2, 1, 4, 8, dtype=dtype)
    out = poly_tensor_attn(*xs, causal=True, backend="torch")
    assert out.dtype == dtype
    ref = naive_poly_tensor_attn(*[x.double() for x in xs], causal=True)
    assert _rel(out.double(), ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_decoding_equals_parallel_causal(gen):
    B, T, Hq, Hkv, D, Dv = 2, 13, 4, 2, 3, 5
    q, k1, k2, v1, v2 = _inputs(gen, B, T, Hq, Hkv, D, Dv)
    par = poly_tensor_attn(q, k1, k2, v1, v2, causal=True, degree=4, backend="torch")
    st = PolyTensorAttnState.empty(B, Hkv, D, Dv, degree=4, dtype=torch.float64)
    assert st.a2.shape == (B, Hkv, poly_rank(D, 4), Dv + 1)
    assert st.nbytes() == 2 * B * Hkv * math.comb(D + 4, 4) * (Dv + 1) * 8
    steps = []
    for t in range(T):
        o, st = poly_tensor_attn_step(st, q[:, t], k1[:, t], k2[:, t], v1[:, t], v2[:, t])
        steps.append(o)
    assert st.length == T
    torch.testing.assert_close(torch.stack(steps, 1), par, rtol=1e-10, atol=1e-12)


def test_rank_table():
    assert [poly_rank(16, 2), poly_rank(64, 2), poly_rank(16, 4), poly_rank(3, 10)] == [153, 2145, 4845, 286]


def test_auto_backend_on_cpu_falls_back_to_torch(gen, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    xs = _inputs(gen, 1, 5, 1, 1, 2, 2)
    torch.testing.assert_close(poly_tensor_attn(*xs, causal=True), naive_poly_tensor_attn(*xs, causal=True))
    with pytest.raises(ValueError, match="triton"):
        poly_tensor_attn(*xs, causal=True, backend="triton")


def test_triton_backend_states_its_limits(gen):
    xs = _inputs(gen, 1, 5, 1, 1, 2, 2)
    with pytest.raises(ValueError, match="degrees 2 and 4"):
        poly_tensor_attn(*xs, degree=6, causal=True, backend="triton")
    with pytest.raises(ValueError, match="causal only"):
        poly_tensor_attn(*xs, causal=False, backend="triton")
    from tensorattn.poly.op import BACKENDS

    p = dict(device=torch.device("cuda"), dtype=torch.bfloat16, causal=True, value_dim=64)
    be = BACKENDS["triton"]
    assert not [r for r in be.not_supported_reasons(degree=4, head_dim=16, **p) if "degree" in r]
    assert any("needs Dk = 16" in r for r in be.not_supported_reasons(degree=4, head_dim=32, **p))
    assert any("degree 2 only" in r for r in be.not_supported_reasons(degree=4, head_dim=16, from_prefix=True, **p))


@pytest.mark.parametrize("degree,err,match", [(3, ValueError, "even"), (1, ValueError, "even"), (0, ValueError, "even"),
                                              (2.0, TypeError, "int"), (True, TypeError, "int")])
def test_bad_degree(gen, degree, err, match):
    xs = _inputs(gen, 1, 4, 1, 1, 2, 2)
    with pytest.raises(err, match=match):
        poly_tensor_attn(*xs, degree=degree)


def test_bad_inputs(gen):
    q, k1, k2, v1, v2 = _inputs(gen, 1, 4, 2, 1, 3, 2)
    with pytest.raises(ValueError, match="k1 has head dim"):
        poly_tensor_attn(q, k1[..., :2], k2, v1, v2)
    with pytest.raises(ValueError, match="causal"):
        poly_tensor_attn(q, k1[:, :3], k2[:, :3], v1[:, :3], v2[:, :3], causal=True)
    with pytest.raises(ValueError, match="multiple"):
        poly_tensor_attn(q[:, :, :1], torch.cat([k1, k1], 2), torch.cat([k2, k2], 2), torch.cat([v1, v1], 2),
                         torch.cat([v2, v2], 2))
    with pytest.raises(TypeError, match="v2"):
        poly_tensor_attn(q, k1, k2, v1, v2.float())
    with pytest.raises(ValueError, match="backend"):
        poly_tensor_attn(q, k1, k2, v1, v2, backend="cuda")
    with pytest.raises(TypeError, match="backend"):
        poly_tensor_attn(q, k1, k2, v1, v2, backend=None)
    with pytest.raises(ValueError, match="rank"):
        poly_tensor_attn(torch.zeros(1, 2, 1, 64), torch.zeros(1, 2, 1, 64), torch.zeros(1, 2, 1, 64),
                         torch.zeros(1, 2, 1, 1), torch.zeros(1, 2, 1, 1), degree=4)


def test_bad_decoding_inputs(gen):
    st = PolyTensorAttnState.empty(1, 2, 3, 4, dtype=torch.float64)
    x = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
    with pytest.raises(ValueError, match="v1_t must have shape"):
        poly_tensor_attn_step(st, x(1, 2, 3), x(1, 2, 3), x(1, 2, 3), x(1, 2, 5), x(1, 2, 4))
    with pytest.raises(ValueError, match="rank"):
        poly_tensor_attn_step(st, x(1, 2, 4), x(1, 2, 4), x(1, 2, 4), x(1, 2, 4), x(1, 2, 4))
    with pytest.raises(TypeError, match="state"):
        poly_tensor_attn_step(None, x(1, 2, 3), x(1, 2, 3), x(1, 2, 3), x(1, 2, 4), x(1, 2, 4))
    with pytest.raises(ValueError, match="even"):
        PolyTensorAttnState.empty(1, 1, 2, 2, degree=3)


def test_noncausal_chunking_does_not_change_the_result(monkeypatch):
    """The non-causal path takes large row blocks; force several blocks and compare with one."""
    import tensorattn.poly as P

    g = torch.Generator().manual_seed(5)
    x = [torch.randn(1, 37, 2, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    x += [torch.randn(1, 37, 2, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    o1 = P.poly_tensor_attn(*x, backend="torch")
    g1 = torch.autograd.grad(o1.square().sum(), x)
    monkeypatch.setattr(P.chunked, "_FULL_BLOCK_ELEMS", 1)  # -> blocks of _TORCH_CHUNK rows
    o2 = P.poly_tensor_attn(*x, backend="torch")
    g2 = torch.autograd.grad(o2.square().sum(), x)
    torch.testing.assert_close(o1, o2, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    ref = P.naive_poly_tensor_attn(*[t.detach() for t in x])
    torch.testing.assert_close(o1.detach(), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_elems", [1, 1 << 24], ids=["chunks-of-1", "one-chunk"])
@pytest.mark.parametrize("degree", [2, 4])
def test_scan_path_matches_naive(monkeypatch, chunk_elems, degree):
    """The torch backend's CUDA algorithm for causal calls (running sums by cumsum from a prefix state),
    forced on the CPU: output and gradients equal the reference, with GQA and in bfloat16 (float32 sums)."""
    import tensorattn.poly as P

    monkeypatch.setattr(P.scan, "_use_scan", lambda *a: True)
    monkeypatch.setattr(P.scan, "_SCAN_CHUNK_ELEMS", chunk_elems)
    g = torch.Generator().manual_seed(11)
    xs = [x.requires_grad_() for x in _inputs(g, 2, 13, 4, 2, 3, 5)]
    out = P.poly_tensor_attn(*xs, degree=degree, causal=True, backend="torch")
    ref = P.naive_poly_tensor_attn(*xs, degree=degree, causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    w = torch.randn(out.shape, generator=g, dtype=out.dtype)
    for a, b in zip(torch.autograd.grad((out * w).sum(), xs), torch.autograd.grad((ref * w).sum(), xs)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    lo = [x.detach().to(torch.bfloat16).requires_grad_() for x in xs]
    out = P.poly_tensor_attn(*lo, degree=degree, causal=True, backend="torch")
    assert out.dtype == torch.bfloat16 and _rel(out.double(), ref.detach()) < 1e-2
    assert all(gx.dtype == torch.bfloat16 for gx in torch.autograd.grad(out.float().sum(), lo))


def test_scan_path_is_chosen_on_cuda_for_small_states():
    import tensorattn.poly as P

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert P.scan._use_scan(cuda, 1, 4, P.poly_rank(4, 2), 32)  # the Dk < 16 case the fused kernel does not take
    assert P.scan._use_scan(cuda, 1, 4, P.poly_rank(32, 2), 32)  # 74K entries: 15x faster than the pairs on an H100
    assert not P.scan._use_scan(cpu, 1, 4, P.poly_rank(4, 2), 32)
    assert not P.scan._use_scan(cuda, 4, 4, P.poly_rank(32, 2), 64)  # large states: the chunked pair algorithm


def test_scan_path_ignores_a_callers_autocast_and_refuses_double_backward(monkeypatch):
    """Under bf16 autocast the scan still sums in float32 (the same result as without autocast), and a
    double backward raises instead of returning detached gradients."""
    import tensorattn.poly as P

    monkeypatch.setattr(P.scan, "_use_scan", lambda *a: True)
    g = torch.Generator().manual_seed(3)
    xs = [x.float().requires_grad_() for x in _inputs(g, 1, 29, 2, 1, 4, 6)]
    plain = P.poly_tensor_attn(*xs, causal=True, backend="torch")
    gp = torch.autograd.grad(plain.sum(), xs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = P.poly_tensor_attn(*xs, causal=True, backend="torch")
        ga = torch.autograd.grad(auto.sum(), xs)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain, rtol=1e-6, atol=1e-7)
    for a, b in zip(ga, gp):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    out = P.poly_tensor_attn(*xs, causal=True, backend="torch")
    (gq,) = torch.autograd.grad(out.square().sum(), xs[0], create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        gq.sum().backward()
