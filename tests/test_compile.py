"""torch.compile: every op, layer and model traces with fullgraph=True and gives the eager result.

CPU, small shapes, float64 (tight tolerances). The numerical matrix uses ``backend="aot_eager"``: it runs the same
dynamo capture and AOTAutograd forward/backward tracing as the default inductor backend (so custom ops, fake
implementations, registered autograd and graph breaks are all exercised) but skips inductor's C++ code generation,
which takes seconds per graph on CI's two cores. A C compiler is present here (inductor needs one on the CPU);
``test_inductor_model`` compiles the model (all three kinds of layer) with the default backend once.
"""
import pytest
import torch
from utils import attn_inputs

import tensorattn as ta
from tensorattn.layers import PolyTensorAttention, SoftmaxAttention, TensorAttention
from tensorattn.model import MultiViewClassifier, Transformer
from tensorattn.poly import PolyTensorAttnState, poly_tensor_attn_step

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def five(B=2, T=8, H=2, D=4, seed=0, grad=True):
    return attn_inputs(B, T, H, H, D, D, dtype=F64, seed=seed, requires_grad=grad)


def grads(out, leaves):
    w = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(7))
    return torch.autograd.grad((out * w).sum(), leaves)


def assert_same(fn, args, leaves, *, dynamic):
    """Compiled (fullgraph) and eager forward and backward agree."""
    ref = fn(*args)
    comp = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    out = comp(*args)
    torch.testing.assert_close(out, ref, **TOL)
    for a, b in zip(grads(out, leaves), grads(ref, leaves)):
        torch.testing.assert_close(a, b, **TOL)


# ------------------------------------------------------------------------------------------------------------------
# Ops
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("backend", ["torch", "naive"])
@pytest.mark.parametrize("mask", [dict(), dict(causal=True), dict(window=(3, 2))])
def test_tensor_attn_compiles(backend, mask, dynamic):
    x = five()
    assert_same(lambda *a: ta.tensor_attn(*a, backend=backend, **mask), x, x, dynamic=dynamic)


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_poly_tensor_attn_compiles(causal, dynamic):
    x = five(T=40)  # causal: two chunks of the torch path, so the state checkpoints are exercised
    assert_same(lambda *a: ta.poly_tensor_attn(*a, causal=causal, scale=0.5), x, x, dynamic=dynamic)


@pytest.mark.parametrize("dynamic", [False, True])
def test_poly_tensor_attn_step_compiles(dynamic):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 2, 4, generator=g, dtype=F64, requires_grad=True) for _ in range(5)]

    def two_steps(*a):
        st = PolyTensorAttnState.empty(2, 2, 4, 4, dtype=F64)
        o1, st = poly_tensor_attn_step(st, *a)
        o2, st = poly_tensor_attn_step(st, *(t * 0.5 for t in a))
        return torch.stack([o1, o2]) + 0 * st.length

    assert_same(two_steps, xs, xs, dynamic=dynamic)


def _scan_inputs():
    """Inputs of the scan with a positive prefix state that requires a gradient (B = 2, Hkv = 2, Dk = Dv = 4)."""
    from tensorattn.features import rank

    x = five(T=40)
    g = torch.Generator().manual_seed(3)
    prefix = (0.1 * torch.rand(2, 2, rank(4, 2), 2 * 4 + 2, generator=g, dtype=F64)).requires_grad_()
    return x + [prefix]


def _scan(*a):
    from tensorattn.poly.scan import _scan_attn

    return _scan_attn(*a, 2, 0.5, 16)  # degree 2, scale 0.5, chunks of 16 (three chunks, the last partial)


@pytest.mark.parametrize("dynamic", [False, True])
def test_poly_scan_compiles(dynamic):
    """The scan (the torch backend's causal path on CUDA, and context parallelism's local part) is a custom-op
    pair too: fullgraph, the eager result, gradients of the inputs and of the prefix state."""
    x = _scan_inputs()
    assert_same(_scan, x, x, dynamic=dynamic)


def test_poly_scan_matches_the_reference_and_refuses_double_backward():
    """From a zero prefix the scan is the causal op; its backward op refuses to be differentiated."""
    from tensorattn.poly import naive_poly_tensor_attn

    x = _scan_inputs()
    zero = torch.zeros_like(x[5]).requires_grad_()
    out = _scan(*x[:5], zero)
    ref = naive_poly_tensor_attn(*x[:5], causal=True, scale=0.5)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
    for a, b in zip(grads(out, x[:5]), grads(ref, x[:5])):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    g = torch.autograd.grad(_scan(*x).sum(), x[0], create_graph=True)[0]
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def test_the_ops_are_custom_ops_one_node_each():
    """AOTAutograd sees one opaque node per op: the forward graph calls tensorattn::exact_fwd / poly_fwd /
    poly_scan_fwd once, the backward graph exact_bwd / poly_bwd / poly_scan_bwd once."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_function

    seen = []

    def record(gm, _):
        seen.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return make_boxed_func(gm)

    x = five()
    for fn, name, args in ((lambda *a: ta.tensor_attn(*a, causal=True, backend="torch"), "exact", x),
                           (lambda *a: ta.poly_tensor_attn(*a, causal=True), "poly", x),
                           (_scan, "poly_scan", _scan_inputs())):
        seen.clear()
        out = torch.compile(fn, fullgraph=True, backend=lambda gm, ex: aot_function(gm, record, record))(*args)
        out.sum().backward()
        fwd, bwd = seen
        assert sum(f"tensorattn.{name}_fwd" in t for t in fwd) == 1, fwd
        assert sum(f"tensorattn.{name}_bwd" in t for t in bwd) == 1, bwd


@pytest.mark.parametrize("op", ["exact", "poly"])
def test_double_backward_through_the_custom_op_raises(op):
    x = five()
    f = (lambda *a: ta.tensor_attn(*a, causal=True)) if op == "exact" else (lambda *a: ta.poly_tensor_attn(*a))
    name = "tensor_attn" if op == "exact" else "poly_tensor_attn"
    # eager: the custom backward op's registered autograd raises; compiled: AOTAutograd refuses first (its own
    # "torch.compile with aot_autograd does not currently support double backward")
    for fn, msg in ((f, f"{name} does not support double backward"),
                    (torch.compile(f, fullgraph=True, backend="aot_eager"), "does not currently support double backward")):
        g = torch.autograd.grad(fn(*x).square().sum(), x, create_graph=True)
        assert g[0].requires_grad
        with pytest.raises(RuntimeError, match=msg):
            torch.autograd.grad(g[0].sum(), x)


# ------------------------------------------------------------------------------------------------------------------
# Layers and models
# ------------------------------------------------------------------------------------------------------------------
def _layers():
    torch.manual_seed(0)
    return {
        "tensor": TensorAttention(16, 2, causal=True, window=(4, 3)),
        "tensor_cross": TensorAttention(16, 2, n_kv_heads=1),
        "poly": PolyTensorAttention(16, 2, key_dim=4, causal=True, rope=True),
        "poly_full": PolyTensorAttention(16, 2, key_dim=4),
        "softmax": SoftmaxAttention(16, 2, causal=True, rope=True),
    }


def _models():
    torch.manual_seed(0)
    return {
        "transformer": (Transformer(11, block_size=16, dim=16, n_layer=3, pattern="STP", n_heads=2, p_key_dim=4),
                        lambda: (torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(2)),)),
        "multiview": (MultiViewClassifier([5, 6, 7], 3, n_tokens=4, dim=16, hidden=16),
                      lambda: ([torch.randn(2, d, dtype=F64, generator=torch.Generator().manual_seed(d))
                                for d in (5, 6, 7)],)),
    }


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("name", ["tensor", "tensor_cross", "poly", "poly_full", "softmax"])
def test_layer_compiles(name, dynamic):
    layer = _layers()[name].double()
    x = torch.randn(2, 8, 16, dtype=F64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    leaves = [x, *layer.parameters()]
    if name == "tensor_cross":  # cross-attention with three distinct inputs and other lengths
        y, z = (torch.randn(2, S, 16, dtype=F64, generator=torch.Generator().manual_seed(S)) for S in (5, 6))
        assert_same(lambda a: layer(a, y, z), (x,), leaves, dynamic=dynamic)
    else:
        assert_same(layer, (x,), leaves, dynamic=dynamic)


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("name", ["transformer", "multiview"])
def test_model_compiles(name, dynamic):
    model, make = _models()[name]
    model = model.double()
    assert_same(model, make(), list(model.parameters()), dynamic=dynamic)


def test_zero_graph_breaks():
    """torch._dynamo.explain: one graph, no break, for every layer and both models."""
    x = torch.randn(2, 8, 16)
    for name, layer in _layers().items():
        ex = torch._dynamo.explain(layer)(x)
        assert (ex.graph_break_count, ex.graph_count) == (0, 1), (name, ex.break_reasons)
    for name, (model, make) in _models().items():
        args = make()
        if name == "multiview":
            args = ([v.float() for v in args[0]],)
        ex = torch._dynamo.explain(model)(*args)
        assert (ex.graph_break_count, ex.graph_count) == (0, 1), (name, ex.break_reasons)


def test_compiled_model_trains_like_the_eager_one():
    """Three SGD steps of the compiled Transformer follow the eager ones (a state dict moves between them)."""
    model, make = _models()["transformer"]
    model = model.double()
    twin = Transformer(11, block_size=16, dim=16, n_layer=3, pattern="STP", n_heads=2, p_key_dim=4).double()
    twin.load_state_dict(model.state_dict())
    comp = torch.compile(twin, fullgraph=True, backend="aot_eager")
    (idx,) = make()
    opt_a, opt_b = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(twin.parameters(), lr=0.1)
    for _ in range(3):
        for m, opt in ((model, opt_a), (comp, opt_b)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(idx).flatten(0, 1), idx.flatten()).backward()
            opt.step()
    for (n, a), b in zip(model.state_dict().items(), comp.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=n)


def test_value_checks_are_skipped_only_while_compiling():
    """Eager calls still refuse NaN inputs and bad token ids; the compiled ones trace past the checks."""
    x = five(grad=False)
    x[0][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        ta.tensor_attn(*x)
    out = torch.compile(lambda *a: ta.tensor_attn(*a), fullgraph=True, backend="aot_eager")(*x)
    assert out.isnan().any()
    model, _ = _models()["transformer"]
    with pytest.raises(ValueError, match="token ids"):
        model(torch.full((1, 4), 11))


# ------------------------------------------------------------------------------------------------------------------
# Inductor (the default backend), once each
# ------------------------------------------------------------------------------------------------------------------
def test_inductor_model():
    """The default backend on the model "STP" (softmax, exact and polynomial layers), forward and backward."""
    model, make = _models()["transformer"]
    model = model.double()
    (idx,) = make()
    ps = list(model.parameters())
    out, ref = torch.compile(model, fullgraph=True)(idx), model(idx)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
    for a, b in zip(grads(out, ps), grads(ref, ps)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------------------------------------------------------
# Meta device
# ------------------------------------------------------------------------------------------------------------------
def test_meta_device_ops():
    meta = [torch.empty(2, 8, 2, d, device="meta") for d in (4, 4, 4, 3, 3)]
    for out in (ta.tensor_attn(*meta), ta.tensor_attn(*meta, causal=True, backend="naive"),
                ta.tensor_attn(*meta, window=2), ta.poly_tensor_attn(*meta), ta.poly_tensor_attn(*meta, causal=True),
                ta.tensor_attn(*meta, check_finite=True)):
        assert out.device.type == "meta" and out.shape == (2, 8, 2, 3) and out.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast on another device type: nothing to turn off
        assert ta.tensor_attn(*meta).shape == (2, 8, 2, 3)
    st = PolyTensorAttnState.empty(2, 2, 4, 3, device="meta")
    o, st = poly_tensor_attn_step(st, *(t[:, 0] for t in meta))
    assert o.device.type == "meta" and o.shape == (2, 2, 3)


def test_meta_device_layers_and_models():
    for name, layer in _layers().items():
        layer = layer.to("meta")
        out = layer(torch.empty(2, 8, 16, device="meta"))
        assert out.device.type == "meta" and out.shape == (2, 8, 16), name
    for name, (model, make) in _models().items():
        model = model.to("meta")
        args = make()
        args = (args[0].to("meta"),) if name == "transformer" else ([v.float().to("meta") for v in args[0]],)
        out = model(*args)
        assert out.device.type == "meta" and out.shape == ((2, 8, 11) if name == "transformer" else (2, 3)), name


_TRITON_POLY_SCRIPT = """
import torch
import tensorattn.triton.poly as tp
from tensorattn import poly_tensor_attn
tp.TUNE["F"] = 16
tp.SEG_BYTES = 200_000  # T = 40: one forward segment of 3 chunks, 3 backward segments (3 saved states)
g = torch.Generator().manual_seed(0)
q = 0.5 * torch.randn(1, 40, 2, 16, generator=g)
k1, k2 = (0.5 * torch.randn(1, 40, 1, 16, generator=g) for _ in range(2))
v1, v2 = (torch.randn(1, 40, 1, 8, generator=g) for _ in range(2))
xs = [q, k1, k2, v1, v2]
f = lambda *x: poly_tensor_attn(*x, causal=True, backend="triton")
cf = torch.compile(f, fullgraph=True)
a = [x.clone().requires_grad_() for x in xs]
o1 = f(*a)
g1 = torch.autograd.grad(o1.square().sum(), a)
b = [x.clone().requires_grad_() for x in xs]
o2 = cf(*b)
g2 = torch.autograd.grad(o2.square().sum(), b)
with torch.no_grad():
    o3 = cf(*xs)  # no input needs a gradient: the op saves no states
err = max([float((o1 - o2).abs().max()), float((o1 - o3).abs().max())] +
          [float((x - y).abs().max()) for x, y in zip(g1, g2)])
assert err < 1e-6, err
assert len(tp._saved_ranges(1, 40, 2, 1, 16, 8, 16, tp.SEG_BYTES)) == 3
from tensorattn.poly.op import poly_fwd_op
_, saved = poly_fwd_op(*xs, 2, True, 0.25, "triton", [16, tp.SEG_BYTES], True, None)
_, none = poly_fwd_op(*xs, 2, True, 0.25, "triton", [16, tp.SEG_BYTES], False, None)
assert (len(saved), len(none)) == (7, 1), (len(saved), len(none))  # the normaliser, then two states a segment
try:
    gg = torch.autograd.grad(f(*b).sum(), b[0], create_graph=True)[0]  # eager: compiled graphs donate buffers
    torch.autograd.grad(gg.sum(), b[0])
    raise SystemExit("double backward did not raise")
except RuntimeError as e:
    assert "double backward" in str(e), e
print("ok")
"""


def test_triton_poly_path_compiles_fullgraph_under_the_interpreter():
    """The fused polynomial path is a pair of custom ops too: fullgraph compiles, equal to eager (output and
    gradients), with and without gradients; double backward refused (eagerly)."""
    pytest.importorskip("triton")
    from utils import run_interpreter

    assert run_interpreter(_TRITON_POLY_SCRIPT).strip().endswith("ok")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("op", ["poly-causal", "exact-causal", "exact-window"])
def test_triton_kernels_compile_on_cuda(op, dynamic):
    """On a GPU, with the default (inductor) backend: the fused Triton paths trace with fullgraph=True and give
    the eager output and gradients (float32, GQA, a length that is not a block multiple)."""
    pytest.importorskip("triton")
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(2, 300, 4, 16), (2, 300, 2, 16), (2, 300, 2, 16), (2, 300, 2, 32), (2, 300, 2, 32)]
    xs = [(0.5 * torch.randn(*s, generator=g, device="cuda")).requires_grad_() for s in shapes]
    if op == "poly-causal":
        fn = lambda *a: ta.poly_tensor_attn(*a, causal=True, backend="triton")  # noqa: E731
    else:
        mask = dict(causal=True) if op == "exact-causal" else dict(window=(64, 16))
        fn = lambda *a: ta.tensor_attn(*a, backend="triton", **mask)  # noqa: E731
    ref = fn(*xs)
    out = torch.compile(fn, fullgraph=True, dynamic=dynamic)(*xs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    w = torch.randn(ref.shape, generator=g, device="cuda")
    for a, b in zip(torch.autograd.grad((out * w).sum(), xs), torch.autograd.grad((ref * w).sum(), xs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
