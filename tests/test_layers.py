"""Layers and models: shapes, GQA, wiring against the reference, causality, windows, cross-attention."""
import math

import pytest
import torch

from tensorattn.layers import (PolyTensorAttention, RotaryEmbedding, SoftmaxAttention, TensorAttention,
                               param_count)
from tensorattn.model import MultiViewClassifier, Transformer, parse_pattern

torch.set_num_threads(1)



def _layer(kind, dim=24, **kw):
    torch.manual_seed(0)
    if kind == "S":
        return SoftmaxAttention(dim, 4, **kw).double()
    if kind == "T":
        return TensorAttention(dim, 4, **kw).double()
    return PolyTensorAttention(dim, 4, **kw).double()


KINDS = ["S", "T", "P"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kv", [4, 2, 1])
def test_shapes_and_gqa(kind, kv):
    layer = _layer(kind, n_kv_heads=kv, head_dim=6)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    assert layer(x).shape == (2, 7, 24)
    # kv projections shrink with the kv head count; q and o do not
    assert layer.o.weight.shape == (24, 4 * 6)
    kname = "k" if kind == "S" else "k1"
    assert getattr(layer, kname).weight.shape[0] == kv * 6


@pytest.mark.parametrize("kind", ["S", "T"])
def test_gqa_equals_duplicated_kv_heads(kind):
    """Query head h reads kv head h // (Hq // Hkv): a GQA layer equals a full layer whose kv weights repeat."""
    gqa = _layer(kind, n_kv_heads=2, head_dim=6)
    full = _layer(kind, n_kv_heads=4, head_dim=6)
    sd = gqa.state_dict()
    for name, w in sd.items():
        if name.split(".")[0] in ("k", "v", "k1", "k2", "v1", "v2"):
            sd[name] = w.view(2, 6, -1).repeat_interleave(2, dim=0).reshape(4 * 6, -1)
    full.load_state_dict(sd)
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    torch.testing.assert_close(gqa(x), full(x))


def test_tensor_layer_matches_reference_einsum():
    """Wiring: q from x, (k1, v1) from y, (k2, v2) from z, joint softmax over pairs, heads concatenated."""
    layer = _layer("T", head_dim=5)
    B, T, S1, S2, H, D = 2, 3, 4, 5, 4, 5
    x, y, z = (torch.randn(B, n, 24, dtype=torch.float64) for n in (T, S1, S2))
    q = layer.q(x).view(B, T, H, D)
    k1, v1 = layer.k1(y).view(B, S1, H, D), layer.v1(y).view(B, S1, H, D)
    k2, v2 = layer.k2(z).view(B, S2, H, D), layer.v2(z).view(B, S2, H, D)
    s = torch.einsum("bihd,bjhd,bkhd->bhijk", q, k1, k2) / math.sqrt(D)
    p = s.flatten(-2).softmax(-1).view_as(s)
    o = torch.einsum("bhijk,bjhe,bkhe->bihe", p, v1, v2).reshape(B, T, H * D)
    torch.testing.assert_close(layer(x, y, z), layer.o(o))


def test_softmax_cross_attention_uses_y():
    layer = _layer("S")
    x, y = torch.randn(1, 3, 24, dtype=torch.float64), torch.randn(1, 6, 24, dtype=torch.float64)
    out = layer(x, y)
    assert out.shape == (1, 3, 24)
    y2 = y.clone()
    y2[0, 4] += 1.0
    assert not torch.allclose(out, layer(x, y2))


@pytest.mark.parametrize("kind", KINDS)
def test_single_layer_causality(kind):
    """Changing input t changes no output before t, and does change output t."""
    layer = _layer(kind, causal=True)
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    t = 5
    x2 = x.clone()
    x2[:, t] += torch.randn(2, 24, dtype=torch.float64)
    a, b = layer(x), layer(x2)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-12)
    assert (a[:, t] - b[:, t]).abs().max() > 1e-6


@pytest.mark.parametrize("window", [1, 3, (2, 4)])
def test_tensor_window_limits_what_a_query_sees(window):
    """With window (w1, w2), output i sees inputs i - max(w1, w2) < j <= i only."""
    layer = _layer("T", window=window)
    w = max(window) if isinstance(window, tuple) else window
    x = torch.randn(1, 10, 24, dtype=torch.float64)
    j = 3
    x2 = x.clone()
    x2[:, j] += 1.0
    diff = (layer(x) - layer(x2)).abs().amax(-1)[0]  # [T]
    for i in range(10):
        if i < j or i >= j + w:
            assert diff[i] < 1e-12, (i, diff[i])
        else:
            assert diff[i] > 1e-9, (i, diff[i])


@pytest.mark.parametrize("pattern", ["ST", "TS", "SP"])
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_transformer_causality_leak(pattern, pos):
    """Changing token t changes no logit before t (through every layer), and changes logit t."""
    torch.manual_seed(0)
    model = Transformer(50, block_size=12, dim=24, n_layer=2, pattern=pattern, n_heads=4, window=3, pos=pos).double()
    idx = torch.randint(0, 50, (2, 12))
    t = 7
    idx2 = idx.clone()
    idx2[:, t] = (idx2[:, t] + 1) % 50
    a, b = model(idx), model(idx2)
    assert a.shape == (2, 12, 50)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-12)
    assert (a[:, t] - b[:, t]).abs().max() > 1e-6


def test_equal_parameter_count_recipe():
    """A tensor layer with 2/3 of the softmax layer's inner width has the same number of weights."""
    s = SoftmaxAttention(96, 6, head_dim=16)  # inner 96
    t = TensorAttention(96, 4, head_dim=16)  # inner 64
    assert param_count(s) == param_count(t) == 4 * 96 * 96


def test_poly_layer_has_the_exact_layers_parameters():
    t = TensorAttention(24, 4, head_dim=6)
    p = PolyTensorAttention(24, 4, head_dim=6, degree=4)
    assert {k: v.shape for k, v in t.state_dict().items()} == {k: v.shape for k, v in p.state_dict().items()}
    p.load_state_dict(t.state_dict())
    small = PolyTensorAttention(24, 4, head_dim=6, key_dim=2)
    assert small.q.weight.shape == (8, 24) and small.v1.weight.shape == (24, 24)


def test_poly_layer_approaches_exact_layer():
    """With small scores the degree-g polynomial is close to exp, so the two layers nearly agree."""
    torch.manual_seed(0)
    t = TensorAttention(16, 2, head_dim=4, causal=True).double()
    x = 0.5 * torch.randn(2, 8, 16, dtype=torch.float64)
    errs = []
    for g in (2, 6):
        p = PolyTensorAttention(16, 2, head_dim=4, degree=g, causal=True).double()
        p.load_state_dict(t.state_dict())
        errs.append((p(x) - t(x)).abs().max().item())
    scale = t(x).abs().max().item()
    assert errs[1] < errs[0] and errs[1] < 1e-3 * scale


def test_rotary_is_relative_for_matrix_scores():
    rope = RotaryEmbedding(8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    def score(i, j):
        return (rope(q, offset=i) * rope(k, offset=j)).sum()
    torch.testing.assert_close(score(5, 2), score(13, 10))
    torch.testing.assert_close(rope(q, offset=7).norm(), q.norm())


def test_layer_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match="n_heads .*multiple of n_kv_heads"):
        TensorAttention(24, 4, n_kv_heads=3)
    with pytest.raises(TypeError, match="head_dim must be an int"):
        SoftmaxAttention(24, 4, head_dim=2.5)
    with pytest.raises(ValueError, match="window"):
        TensorAttention(24, 4, window=0)
    with pytest.raises(ValueError, match="causal/window attention needs y as long as x"):
        SoftmaxAttention(24, 4, causal=True)(torch.randn(1, 3, 24), torch.randn(1, 4, 24))
    with pytest.raises(ValueError, match="unknown letter"):
        parse_pattern("SSXT", 4)
    with pytest.raises(ValueError, match="multiple of len"):
        parse_pattern("SSST", 6)
    assert parse_pattern("SSST", 8) == "SSSTSSST"


@pytest.mark.parametrize("mixer", ["tensor", "softmax", "concat"])
def test_multiview_classifier_uses_every_view(mixer):
    torch.manual_seed(0)
    model = MultiViewClassifier([10, 7, 5], 4, mixer=mixer, n_tokens=3, dim=16, n_heads=2).double()
    views = [torch.randn(6, d, dtype=torch.float64) for d in (10, 7, 5)]
    out = model(views)
    assert out.shape == (6, 4)
    for v in range(3):
        changed = [x.clone() for x in views]
        changed[v] += 1.0
        assert (model(changed) - out).abs().max() > 1e-8, v
    with pytest.raises(ValueError, match="view 1 must be"):
        model([views[0], views[2], views[2]])


def test_tensor_attention_key_dim_differs_from_head_dim():
    torch.manual_seed(0)
    layer = TensorAttention(12, 2, head_dim=4, key_dim=6, causal=True).double()
    assert layer.q.weight.shape == (12, 12) and layer.v1.weight.shape == (8, 12)
    x = torch.randn(1, 7, 12, dtype=torch.float64)
    q, k1, k2, v1, v2 = layer._project(x, None, None)
    assert q.shape[-1] == k1.shape[-1] == 6 and v1.shape[-1] == 4
    from tensorattn import naive_tensor_attn

    ref = layer.o(naive_tensor_attn(q, k1, k2, v1, v2, causal=True).reshape(1, 7, 8))
    torch.testing.assert_close(layer(x), ref)
