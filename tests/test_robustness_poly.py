"""Robustness of the polynomial op and its decoding state, by the classes of the reliability issue: each test
asserts the error type and that the message names the argument (or that the result is right)."""
import pytest
import torch

import tensorattn as ta
from tensorattn.poly import BACKENDS, MAX_DEGREE, MAX_RANK, PolyTensorAttnState, naive_poly_tensor_attn


def _xs(B=1, T=12, Hq=2, Hkv=1, D=4, Dv=3, dtype=torch.float64, seed=0, scale=0.5, grad=False):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, T, Hq, D), (B, T, Hkv, D), (B, T, Hkv, D), (B, T, Hkv, Dv), (B, T, Hkv, Dv)]
    return [(scale * torch.randn(*s, generator=g, dtype=dtype)).requires_grad_(grad) for s in shapes]


# ---------------------------------------------------------------------------------------------------------------
# Class 2: autograd is right or refused
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
def test_double_backward_is_refused_not_wrong(causal):
    xs = _xs(grad=True)
    o = ta.poly_tensor_attn(*xs, causal=causal, backend="torch")
    (gq,) = torch.autograd.grad(o.square().sum(), xs[:1], create_graph=True)
    with pytest.raises(RuntimeError, match="poly_tensor_attn does not support double backward"):
        torch.autograd.grad(gq.sum(), xs)


def test_backward_through_several_decoding_steps_matches_the_parallel_op():
    xs = _xs(T=5, grad=True)
    par = ta.poly_tensor_attn(*xs, causal=True, backend="torch")
    w = torch.randn(par.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gpar = torch.autograd.grad((par * w).sum(), xs)
    st = PolyTensorAttnState.empty(1, 1, 4, 3, dtype=torch.float64)
    outs = []
    for t in range(5):
        o, st = ta.poly_tensor_attn_step(st, *(x[:, t] for x in xs))
        outs.append(o)
    seq = torch.stack(outs, 1)
    torch.testing.assert_close(seq, par, rtol=1e-10, atol=1e-12)
    gseq = torch.autograd.grad((seq * w).sum(), xs)  # in-place state updates made this raise before
    for a, b in zip(gseq, gpar):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------------------------------------------------------
# Class 3: sizes checked before allocating
# ---------------------------------------------------------------------------------------------------------------
def test_state_with_a_huge_rank_is_refused_before_allocating():
    with pytest.raises(ValueError, match="head_dim") as e:
        PolyTensorAttnState.empty(1, 1, 16, 64, degree=24)  # rank C(40, 24) ~ 6e10: hundreds of TB
    assert str(MAX_RANK) in str(e.value)


def test_op_with_a_huge_rank_is_refused():
    xs = _xs(D=64)
    with pytest.raises(ValueError, match=r"q\.shape\[3\]"):
        ta.poly_tensor_attn(*xs, degree=4, causal=True)  # rank C(68, 4) = 814,385


# ---------------------------------------------------------------------------------------------------------------
# Class 4: overflow is refused with a bound, never a NaN result
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("degree", [40, 160, 200])
def test_degrees_past_the_bound_are_refused(degree):
    xs = _xs(D=2, scale=3.0)
    with pytest.raises(ValueError, match="degree") as e:
        ta.poly_tensor_attn(*xs, degree=degree, causal=True)
    assert str(MAX_DEGREE) in str(e.value)
    with pytest.raises(ValueError, match="degree"):
        PolyTensorAttnState.empty(1, 1, 2, 3, degree=degree)


def test_a_scale_that_overflows_is_an_error_not_nan():
    xs = _xs(dtype=torch.float32)
    with pytest.raises(ValueError, match="overflow.*scale"):
        ta.poly_tensor_attn(*xs, causal=True, scale=1e30)
    # the largest degree allowed stays finite and close to exact attention at moderate logits
    xs = _xs(D=2)
    out = ta.poly_tensor_attn(*xs, degree=MAX_DEGREE, causal=True)
    torch.testing.assert_close(out, naive_poly_tensor_attn(*xs, degree=MAX_DEGREE, causal=True))
    torch.testing.assert_close(out, ta.naive_tensor_attn(*xs, causal=True), rtol=1e-5, atol=1e-6)  # EPS in den


# ---------------------------------------------------------------------------------------------------------------
# Class 5: one non-finite rule (CPU inputs checked by default)
# ---------------------------------------------------------------------------------------------------------------
def test_decoding_step_refuses_non_finite_tokens():
    xs = _xs(T=2)
    st = PolyTensorAttnState.empty(1, 1, 4, 3, dtype=torch.float64)
    tok = [x[:, 0].clone() for x in xs]
    tok[3][0, 0, 1] = float("nan")
    with pytest.raises(ValueError, match="v1_t"):
        ta.poly_tensor_attn_step(st, *tok)
    assert st.length == 0 and bool(torch.isfinite(st.a2).all())  # the state was not touched
    o, st = ta.poly_tensor_attn_step(st, *tok, check_finite=False)  # opting out is the caller's choice
    assert not bool(torch.isfinite(o).all())


# ---------------------------------------------------------------------------------------------------------------
# Class 9: no capability declared where results would be wrong
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_backend_refuses_low_precision_under_the_interpreter(monkeypatch, dtype):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton_be = BACKENDS["triton"]
    problem = dict(device=torch.device("cpu"), degree=2, causal=True, head_dim=16, value_dim=16)
    reasons = triton_be.not_supported_reasons(dtype=dtype, **problem)
    assert any("TRITON_INTERPRET" in r and str(dtype) in r for r in reasons), reasons
    assert triton_be.not_supported_reasons(dtype=torch.float32, **problem) == []
