"""Incremental decoding: every causal layer with a cache (prefill + one token at a time) equals the full causal
forward, in float64; Transformer.generate is nanoGPT's sampling with clear errors for bad arguments."""
import pytest
import torch

from tensorattn.layers import DecodeCache, PolyTensorAttention, SoftmaxAttention, TensorAttention
from tensorattn.model import Transformer


def _layer(kind, *, kv=None, window=None, rope=True):
    torch.manual_seed(0)
    if kind == "S":
        return SoftmaxAttention(24, 4, n_kv_heads=kv, causal=True, window=window, rope=rope).double()
    if kind == "T":
        return TensorAttention(24, 4, n_kv_heads=kv, causal=True, window=window, rope=rope).double()
    return PolyTensorAttention(24, 4, n_kv_heads=kv, key_dim=4, causal=True, rope=rope).double()


def _decode(layer, x, prefill):
    cache = layer.new_cache()
    outs = [layer(x[:, :prefill], cache=cache)] if prefill else []
    for t in range(prefill, x.shape[1]):
        outs.append(layer(x[:, t:t + 1], cache=cache))
    assert cache.length == x.shape[1]
    return torch.cat(outs, 1), cache


CASES = [("S", None, None), ("S", 2, None), ("S", None, 3), ("S", None, 40),
         ("T", None, None), ("T", 2, None), ("T", None, (3, 5)), ("T", 1, (8, 2)), ("T", None, (40, 40)),
         ("P", None, None), ("P", 2, None)]


@pytest.mark.parametrize("kind,kv,window", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("prefill", [0, 1, 6])
def test_prefill_and_steps_equal_the_full_forward(kind, kv, window, prefill):
    layer = _layer(kind, kv=kv, window=window)
    x = torch.randn(2, 11, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    full = layer(x)
    inc, cache = _decode(layer, x, prefill)
    torch.testing.assert_close(inc, full, rtol=1e-9, atol=1e-11)
    if window is not None:  # only the window is kept
        keep = window if kind == "S" else max(window)
        assert all(t.shape[1] == min(keep, 11) for t in cache.tensors)
    if kind == "P":
        assert cache.tensors is None and cache.state.length == 11


@pytest.mark.parametrize("kind,kv,window", [("S", None, 3), ("T", 2, None), ("T", None, (3, 5)), ("P", 2, None)])
def test_chunks_after_a_prefill_equal_the_full_forward(kind, kv, window):
    layer = _layer(kind, kv=kv, window=window)
    x = torch.randn(2, 11, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    cache = layer.new_cache()
    parts = [layer(x[:, a:b], cache=cache) for a, b in ((0, 4), (4, 7), (7, 8), (8, 11))]
    torch.testing.assert_close(torch.cat(parts, 1), layer(x), rtol=1e-9, atol=1e-11)


def test_fast_layer_state_stays_the_same_size():
    layer = _layer("P")
    x = torch.randn(1, 30, 24, dtype=torch.float64)
    cache = layer.new_cache()
    layer(x[:, :4], cache=cache)
    size = cache.nbytes()
    for t in range(4, 30):
        layer(x[:, t:t + 1], cache=cache)
    assert cache.nbytes() == size


def test_cache_refuses_cross_attention_and_non_causal_layers():
    layer = _layer("T")
    x = torch.randn(1, 4, 24, dtype=torch.float64)
    with pytest.raises(ValueError, match="y and z must be None"):
        layer(x, x, cache=layer.new_cache())
    nc = TensorAttention(24, 4, causal=False).double()
    with pytest.raises(ValueError, match="causal=False"):
        nc(x, cache=nc.new_cache())
    with pytest.raises(TypeError, match="DecodeCache"):
        layer(x, cache={})


def _model(pattern="STP", pos="rope", block=16, **kw):
    torch.manual_seed(0)
    return Transformer(11, block_size=block, dim=24, n_layer=len(pattern), pattern=pattern, n_heads=4,
                       t_heads=2, t_kv_heads=1, p_key_dim=4, window=kw.pop("window", (4, 3)), pos=pos, **kw).double()


@pytest.mark.parametrize("pos", ["rope", "learned", "none"])
def test_model_decoding_equals_the_full_forward(pos):
    model = _model(pos=pos)
    idx = torch.randint(0, 11, (3, 14), generator=torch.Generator().manual_seed(2))
    full = model(idx)
    cache = model.new_cache()
    logits = [model(idx[:, :5], cache=cache)] + [model(idx[:, t:t + 1], cache=cache) for t in range(5, 14)]
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-9, atol=1e-10)


def test_generate_greedy_is_deterministic_and_sampling_reproducible():
    model = _model()
    idx = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(3))
    a = model.generate(idx, 12, top_k=1)
    b = model.generate(idx, 12, top_k=1)
    assert a.shape == (2, 17) and torch.equal(a[:, :5], idx) and torch.equal(a, b)
    # greedy tokens are the argmax of the full forward on the sequence so far
    for t in range(5, 17):
        assert torch.equal(a[:, t], model(a[:, :t])[:, -1].argmax(-1))
    s1 = model.generate(idx, 12, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(7))
    s2 = model.generate(idx, 12, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(s1, s2) and int(s1.min()) >= 0 and int(s1.max()) < 11
    assert torch.equal(model.generate(idx, 0), idx)


def test_generate_goes_past_block_size_with_rope_and_stops_with_learned_positions():
    out = _model(pos="rope", block=8).generate(torch.zeros(1, 3, dtype=torch.long), 20, top_k=1)
    assert out.shape == (1, 23)
    with pytest.raises(ValueError, match="block_size"):
        _model(pos="learned", block=8).generate(torch.zeros(1, 3, dtype=torch.long), 20)


@pytest.mark.parametrize("kw,match", [(dict(max_new_tokens=-1), "max_new_tokens"),
                                      (dict(max_new_tokens=True), "max_new_tokens"),
                                      (dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
                                      (dict(temperature=float("nan")), "temperature"), (dict(top_k=0), "top_k"),
                                      (dict(top_k=2.5), "top_k"), (dict(generator=3), "generator")])
def test_generate_bad_arguments(kw, match):
    model = _model()
    args = {"max_new_tokens": 3, **kw}
    n = args.pop("max_new_tokens")
    with pytest.raises((ValueError, TypeError), match=match):
        model.generate(torch.zeros(1, 2, dtype=torch.long), n, **args)


def test_generate_needs_a_causal_language_model():
    with pytest.raises(ValueError, match="causal"):
        _model(causal=False).generate(torch.zeros(1, 2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="n_out"):
        _model(n_out=2).generate(torch.zeros(1, 2, dtype=torch.long), 3)
    assert isinstance(_model().new_cache().layers[0], DecodeCache)
