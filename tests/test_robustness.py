"""Cross-op robustness: autocast, non-finite inputs, degenerate shapes (found by review)."""
import pytest
import torch
from utils import attn_inputs

import tensorattn as ta

OPS = {
    "exact-torch": lambda *x, **kw: ta.tensor_attn(*x, backend="torch", **kw),
    "exact-naive": lambda *x, **kw: ta.tensor_attn(*x, backend="naive", **kw),
    "poly-torch": lambda *x, **kw: ta.poly_tensor_attn(*x, backend="torch", **kw),
}


def inputs(T=24, dtype=torch.float32, seed=0, requires_grad=False):
    # GQA (2 query heads, 1 kv head) and Dk = 16 != Dv = 8
    return attn_inputs(1, T, 2, 1, 16, 8, dtype=dtype, seed=seed, q_scale=0.5, k_scale=0.5,
                       requires_grad=requires_grad)


@pytest.mark.parametrize("name", sorted(OPS))
def test_autocast_does_not_change_the_result(name):
    """Under a caller's bf16 autocast, float32 inputs still get the float32 forward and a matching backward."""
    op = OPS[name]
    x = inputs(requires_grad=True)
    o = op(*x, causal=True)
    g = torch.autograd.grad(o.square().sum(), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o2 = op(*x, causal=True)
        g2 = torch.autograd.grad(o2.square().sum(), x)
    assert o2.dtype == torch.float32
    torch.testing.assert_close(o2, o, rtol=1e-5, atol=1e-6)
    for a, b in zip(g2, g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(OPS))
def test_non_finite_inputs_are_refused_on_cpu(name):
    x = inputs()
    x[3][0, 20, 0, 1] = float("nan")  # a future position: would poison earlier rows through 0 * NaN
    with pytest.raises(ValueError, match=r"v1 contains 1 non-finite value"):
        OPS[name](*x, causal=True)
    x[3][0, 20, 0, 1] = 0.0
    x[0][0, 3, 1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"q contains 1 non-finite value"):
        OPS[name](*x, causal=True)


def test_check_finite_opt_out_and_reference():
    x = inputs()
    x[4][0, 5, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="v2 contains"):
        ta.naive_tensor_attn(*x, causal=True)
    o = ta.tensor_attn(*x, causal=True, backend="torch", check_finite=False)  # opted out: no error
    assert o.shape == (1, 24, 2, 8)
    with pytest.raises(TypeError, match="check_finite must be None or a bool"):
        ta.tensor_attn(*x, check_finite="yes")


def test_zero_head_dims_are_refused():
    x = inputs()
    with pytest.raises(ValueError, match=r"head dim D >= 1 \(q.shape\[3\]\)"):
        ta.tensor_attn(*(t[..., :0] for t in x[:3]), *x[3:])
    with pytest.raises(ValueError, match=r"Dv >= 1 \(v1.shape\[3\]\)"):
        ta.poly_tensor_attn(*x[:3], *(t[..., :0] for t in x[3:]))


@pytest.mark.parametrize("which", ["batch", "length"])
def test_poly_empty_inputs_give_empty_outputs(which):
    x = inputs(requires_grad=True)
    if which == "batch":
        x = [t[:0] for t in x]
    else:
        x = [x[0][:, :0]] + x[1:]  # no queries, some keys (non-causal cross-attention)
    o = ta.poly_tensor_attn(*x)
    e = ta.tensor_attn(*x)
    assert o.shape == e.shape and o.numel() == 0
    o.sum().backward()  # still differentiable


def test_decoding_step_checks_dtype_and_device():
    st = ta.PolyTensorAttnState.empty(1, 1, 4, 3)  # float32 state
    x = [torch.randn(1, 2, 4, dtype=torch.float64)] + [torch.randn(1, 1, 4, dtype=torch.float64)] * 2 \
        + [torch.randn(1, 1, 3, dtype=torch.float64)] * 2
    with pytest.raises(TypeError, match="q_t is float64 but the state accumulates in float32"):
        ta.poly_tensor_attn_step(st, *x)
    with pytest.raises(TypeError, match="v2_t has dtype torch.float32 but q_t has torch.float64"):
        ta.poly_tensor_attn_step(st, *x[:4], x[4].float())
    st64 = ta.PolyTensorAttnState.empty(1, 1, 4, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="the state accumulates in float64"):
        ta.poly_tensor_attn_step(st64, *(t.float() for t in x))
    with pytest.raises(ValueError, match="k1_t is on device meta"):
        ta.poly_tensor_attn_step(st64, x[0], x[1].to("meta"), *x[2:])
    o, st64 = ta.poly_tensor_attn_step(st64, *x)
    assert o.dtype == torch.float64 and st64.length == 1
