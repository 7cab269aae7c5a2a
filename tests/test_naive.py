"""The reference tensor attention: definition by loops, masks, GQA, orders, gradients, bad input."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorattn import naive_order_attn, naive_tensor_attn
from tensorattn.check import loop_tensor_attn
from tensorattn.naive import visibility_mask

F64 = torch.float64


def rand(gen, *shape, dtype=F64):
    return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)


def qkv(gen, B=1, T=5, Hq=2, Hkv=1, D=4, Dv=3, S1=None, S2=None, dtype=F64):
    S1 = T if S1 is None else S1
    S2 = T if S2 is None else S2
    return (rand(gen, B, T, Hq, D, dtype=dtype), rand(gen, B, S1, Hkv, D, dtype=dtype),
            rand(gen, B, S2, Hkv, D, dtype=dtype), rand(gen, B, S1, Hkv, Dv, dtype=dtype),
            rand(gen, B, S2, Hkv, Dv, dtype=dtype))


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(1, 6), groups=st.integers(1, 2), Hkv=st.integers(1, 2),
       D=st.integers(1, 5), Dv=st.integers(1, 4), mask=st.sampled_from(["none", "causal", "window"]),
       w1=st.integers(1, 7), w2=st.integers(1, 7), seed=st.integers(0, 10_000))
def test_matches_loops(B, T, groups, Hkv, D, Dv, mask, w1, w2, seed):
    gen = torch.Generator().manual_seed(seed)
    x = qkv(gen, B, T, Hkv * groups, Hkv, D, Dv)
    kw = {"causal": mask == "causal", "window": (w1, w2) if mask == "window" else None}
    torch.testing.assert_close(naive_tensor_attn(*x, **kw), loop_tensor_attn(*x, **kw), rtol=1e-12, atol=1e-12)


def test_cross_lengths_unmasked(gen):
    x = qkv(gen, B=2, T=3, S1=5, S2=4, Hq=2, Hkv=2)
    torch.testing.assert_close(naive_tensor_attn(*x), loop_tensor_attn(*x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window,expect", [((1, 1), "diag"), ((100, 100), "causal"), ((3, 2), None), ((2, 3), None)])
def test_mask_edges(gen, window, expect):
    x = qkv(gen, T=9, Hq=2, Hkv=2)
    got = naive_tensor_attn(*x, window=window)
    if expect == "diag":  # only (i, i) is visible: the output is v1[i] * v2[i]
        torch.testing.assert_close(got, x[3] * x[4], rtol=1e-12, atol=1e-12)
    elif expect == "causal":  # a window as long as the sequence is the causal mask
        torch.testing.assert_close(got, naive_tensor_attn(*x, causal=True), rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(got, loop_tensor_attn(*x, window=window), rtol=1e-12, atol=1e-12)


def test_window_is_asymmetric(gen):
    x = qkv(gen, T=8)
    a, b = naive_tensor_attn(*x, window=(3, 1)), naive_tensor_attn(*x, window=(1, 3))
    assert (a - b).abs().max() > 1e-3


def test_visibility_mask_counts():
    m = visibility_mask(torch.arange(6), 6, 6, causal=True, window=(3, 2))
    # query i sees min(i+1, 3) * min(i+1, 2) pairs
    assert m.sum(dim=(1, 2)).tolist() == [min(i + 1, 3) * min(i + 1, 2) for i in range(6)]
    assert visibility_mask(torch.arange(4), 4, 4, causal=True, window=None).sum().item() == sum(
        (i + 1) ** 2 for i in range(4))


def test_causality(gen):
    x = list(qkv(gen, T=8))
    o = naive_tensor_attn(*x, causal=True)
    for t in x[1:]:
        t[:, 5:] += 1.0
    o2 = naive_tensor_attn(*x, causal=True)
    torch.testing.assert_close(o[:, :5], o2[:, :5], rtol=0, atol=0)
    assert (o[:, 5:] - o2[:, 5:]).abs().max() > 0


def test_gqa_equals_repeated_heads(gen):
    q, k1, k2, v1, v2 = qkv(gen, B=2, T=6, Hq=6, Hkv=2)
    rep = [t.repeat_interleave(3, dim=2) for t in (k1, k2, v1, v2)]
    torch.testing.assert_close(naive_tensor_attn(q, k1, k2, v1, v2, causal=True),
                               naive_tensor_attn(q, *rep, causal=True), rtol=1e-12, atol=1e-12)


def test_lse_and_scale(gen):
    q, k1, k2, v1, v2 = qkv(gen, T=4, Hq=1, Hkv=1, D=3)
    o, lse = naive_tensor_attn(q, k1, k2, v1, v2, scale=0.7, return_lse=True)
    s = 0.7 * torch.einsum("id,jd,kd->ijk", q[0, :, 0], k1[0, :, 0], k2[0, :, 0])
    torch.testing.assert_close(lse[0, 0], s.flatten(1).logsumexp(-1), rtol=1e-12, atol=1e-12)
    o_default = naive_tensor_attn(q, k1, k2, v1, v2)
    torch.testing.assert_close(o_default, naive_tensor_attn(q, k1, k2, v1, v2, scale=1 / math.sqrt(3)))


def test_shift_invariance(gen):
    """Adding a constant to every score leaves the output unchanged: a constant feature in q,k1,k2 does it."""
    q, k1, k2, v1, v2 = qkv(gen, T=5, Hq=1, Hkv=1, D=3)
    one = torch.ones(1, 5, 1, 1, dtype=F64)
    qa = torch.cat([q, 4.0 * one], -1)
    ka, kb = torch.cat([k1, one], -1), torch.cat([k2, one], -1)
    torch.testing.assert_close(naive_tensor_attn(qa, ka, kb, v1, v2, scale=1.0),
                               naive_tensor_attn(q, k1, k2, v1, v2, scale=1.0), rtol=1e-12, atol=1e-12)


def test_large_logits_stay_finite(gen):
    q, k1, k2, v1, v2 = qkv(gen, T=6, dtype=torch.float32)
    o = naive_tensor_attn(q * 300, k1, k2, v1, v2, causal=True)
    assert torch.isfinite(o).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs(gen, dtype):
    x = qkv(gen, T=6, Hq=2, Hkv=1)
    ref = naive_tensor_attn(*x, causal=True)
    got = naive_tensor_attn(*(t.to(dtype) for t in x), causal=True)
    assert got.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 5e-3}[dtype]
    assert (got.double() - ref).abs().max() < tol


def test_streaming_block_size_does_not_matter(gen):
    x = qkv(gen, B=2, T=11, Hq=2, Hkv=2)
    a = naive_tensor_attn(*x, causal=True)
    b = naive_tensor_attn(*x, causal=True, block_elems=1)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_T512_runs_in_small_memory(gen):
    # 512^3 scores would be 512 MiB in float32; streaming keeps the working set to ~16 MiB blocks
    x = torch.randn(1, 512, 1, 8, generator=gen)
    o = naive_tensor_attn(x, x, x, x, x, causal=True, block_elems=1 << 20)
    assert o.shape == (1, 512, 1, 8) and torch.isfinite(o).all()


def test_gradcheck(gen):
    x = [t.requires_grad_(True) for t in qkv(gen, B=1, T=4, Hq=2, Hkv=1, D=3, Dv=2)]
    assert torch.autograd.gradcheck(lambda *a: naive_tensor_attn(*a, causal=True), x)
    assert torch.autograd.gradcheck(lambda *a: naive_tensor_attn(*a, window=(2, 3)), x)


# --- order m ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_order1_is_sdpa(gen, causal):
    q, k, _, v, _ = qkv(gen, B=2, T=7, Hq=2, Hkv=2, D=4, Dv=4)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal).transpose(1, 2)
    torch.testing.assert_close(naive_order_attn(q, [k], [v], causal=causal), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_order2_is_tensor_attn(gen, causal):
    x = qkv(gen, B=2, T=6, Hq=4, Hkv=2)
    torch.testing.assert_close(naive_order_attn(x[0], [x[1], x[2]], [x[3], x[4]], causal=causal),
                               naive_tensor_attn(*x, causal=causal), rtol=1e-12, atol=1e-12)


def test_order3_by_loops(gen):
    T, D = 4, 3
    q, k1, k2, v1, v2 = qkv(gen, T=T, Hq=1, Hkv=1, D=D, Dv=2)
    k3, v3 = rand(gen, 1, T, 1, D), rand(gen, 1, T, 1, 2)
    out = naive_order_attn(q, [k1, k2, k3], [v1, v2, v3], causal=True)
    for i in range(T):
        s, vals = [], []
        for a in range(i + 1):
            for b in range(i + 1):
                for c in range(i + 1):
                    s.append((q[0, i, 0] * k1[0, a, 0] * k2[0, b, 0] * k3[0, c, 0]).sum() / math.sqrt(D))
                    vals.append(v1[0, a, 0] * v2[0, b, 0] * v3[0, c, 0])
        ref = (torch.stack(s).softmax(0)[:, None] * torch.stack(vals)).sum(0)
        torch.testing.assert_close(out[0, i, 0], ref, rtol=1e-12, atol=1e-12)


# --- bad input ----------------------------------------------------------------------------------------
def test_bad_input(gen):
    q, k1, k2, v1, v2 = qkv(gen, T=4, Hq=3, Hkv=3)
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        naive_tensor_attn(q[0], k1, k2, v1, v2)
    with pytest.raises(ValueError, match="k2 has head dim"):
        naive_tensor_attn(q, k1, k2[..., :2], v1, v2)
    with pytest.raises(ValueError, match="v2 has head dim"):
        naive_tensor_attn(q, k1, k2, v1, v2[..., :1])
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        naive_tensor_attn(q, k1[:, :, :2], k2[:, :, :2], v1[:, :, :2], v2[:, :, :2])
    with pytest.raises(ValueError, match=r"window\[0\] \(w1\) must be >= 1"):
        naive_tensor_attn(q, k1, k2, v1, v2, window=(0, 2))
    with pytest.raises(ValueError, match=r"window\[1\] \(w2\) must be >= 1"):
        naive_tensor_attn(q, k1, k2, v1, v2, window=(2, -1))
    with pytest.raises(TypeError, match="floating-point"):
        naive_tensor_attn(q.long(), k1, k2, v1, v2)
    with pytest.raises(TypeError, match="k1 has dtype"):
        naive_tensor_attn(q, k1.float(), k2, v1, v2)
    with pytest.raises(TypeError, match="v1 must be a torch.Tensor"):
        naive_tensor_attn(q, k1, k2, v1.numpy(), v2)
    with pytest.raises(ValueError, match="causal masking and windows need"):
        naive_tensor_attn(q, k1[:, :3], k2, v1[:, :3], v2, causal=True)
    with pytest.raises(ValueError, match="v1 has length"):
        naive_tensor_attn(q, k1, k2, v1[:, :3], v2)
    with pytest.raises(ValueError, match="scale must be finite"):
        naive_tensor_attn(q, k1, k2, v1, v2, scale=float("nan"))
    with pytest.raises(ValueError, match="batch size"):
        naive_tensor_attn(q, k1[:0], k2, v1, v2)
    with pytest.raises(TypeError, match="keys and values must be lists"):
        naive_order_attn(q, k1, v1)
    with pytest.raises(ValueError, match="at least one tensor"):
        naive_order_attn(q, [], [])
    with pytest.raises(ValueError, match="values must hold as many"):
        naive_order_attn(q, [k1, k2], [v1])


def test_device_mismatch(gen):
    q, k1, k2, v1, v2 = qkv(gen, T=3)
    with pytest.raises(ValueError, match="k2 is on device meta"):
        naive_tensor_attn(q, k1, k2.to("meta"), v1, v2)
