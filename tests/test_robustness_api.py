"""Robustness of the math API (issue 17): ops other than the polynomial op, paper functions, layers, model.

Sections follow the issue's class numbers. Every test asserts the error type and that the message names the
argument (or the limit) the caller has to change.
"""
import numpy as np
import pytest
import torch
from utils import attn_inputs

import tensorattn as ta
from tensorattn import fast, features, paper
from tensorattn._validate import check_bool
from tensorattn.exact import BACKENDS, TensorAttnFunction, choose_backend
from tensorattn.layers import PolyTensorAttention, SoftmaxAttention, TensorAttention
from tensorattn.model import MultiViewClassifier, Transformer


def five(T=5, D=4, Dv=3, dtype=torch.float32, seed=0, requires_grad=False):
    return attn_inputs(1, T, 2, 2, D, Dv, dtype=dtype, seed=seed, requires_grad=requires_grad)


def order_inputs(n=6, d=3, dv=2, m=2, c=0.3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g, dtype=dtype) * c
    ks = [torch.randn(n, d, generator=g, dtype=dtype) * c for _ in range(m)]
    vs = [torch.randn(n, dv, generator=g, dtype=dtype) for _ in range(m)]
    return q, ks, vs


def paper_problem(n=5, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(n, d, generator=g, dtype=torch.float64) * 0.5 for _ in range(5)]
    E = torch.randn(n, d, generator=g, dtype=torch.float64)
    Ws = [torch.randn(d, d, generator=g, dtype=torch.float64) * 0.5 for _ in range(5)]
    return As, E, Ws


# =========================================================================================================
# Class 2: silently wrong autograd -> double backward is refused on every path
# =========================================================================================================
@pytest.mark.parametrize("backend", ["torch", "naive", "auto"])
def test_double_backward_is_refused(backend):
    x = five(dtype=torch.float64, requires_grad=True)
    o = ta.tensor_attn(*x, causal=True, backend=backend)
    g = torch.autograd.grad(o.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="tensor_attn does not support double backward"):
        torch.autograd.grad(g[0].sum(), x)


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_double_backward_is_refused_when_only_the_inputs_need_grad(backend):
    """o.sum(): the incoming gradient is a constant, the gradient still depends on the inputs (a Hessian)."""
    x = five(dtype=torch.float64, requires_grad=True)
    o = ta.tensor_attn(*x, backend=backend)
    g = torch.autograd.grad(o.sum(), x, create_graph=True)
    assert all(t.requires_grad for t in g)  # not silently detached
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad((g[1] * g[2]).sum(), x[1])


def test_gradgradcheck_fails_loudly_while_gradcheck_passes():
    x = five(T=3, D=2, Dv=2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ta.tensor_attn(*a, causal=True, backend="torch"), x)
    g = torch.autograd.grad(ta.tensor_attn(*x, backend="torch").sum(), x)
    assert not any(t.requires_grad for t in g)  # no graph without create_graph
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.gradgradcheck(lambda *a: ta.tensor_attn(*a, backend="torch"), x)


def test_double_backward_is_refused_for_a_backend_returning_detached_gradients():
    """The Triton path: its kernels return plain tensors; the Function wrapper (shared by every backend) must
    still refuse, rather than hand back gradients that a second backward treats as constants."""

    class Detached(type(BACKENDS["torch"])):
        name = "detached"

        def bwd(self, *args, **kw):
            return tuple(t.detach() for t in super().bwd(*args, **kw))

    x = five(dtype=torch.float64, requires_grad=True)
    o = TensorAttnFunction.apply(*x, 0.5, False, None, Detached())
    g = torch.autograd.grad(o.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(g[0].sum(), x)


# =========================================================================================================
# Class 3: sizes checked before allocating (fast method)
# =========================================================================================================
@pytest.fixture
def no_features(monkeypatch):
    """Fail (not OOM) if the fast method starts building features."""
    def boom(*a, **k):
        raise AssertionError("features were allocated before the rank was checked")

    for name in ("monomial_features", "multinomial_weights"):
        monkeypatch.setattr(fast, name, boom)


def test_fast_order_attn_refuses_a_huge_rank_before_allocating(no_features):
    q, ks, vs = order_inputs(n=8, d=16, dv=4, c=0.5, dtype=torch.float32)  # default eps: degree 12, k = 3.0e7
    with pytest.raises(ValueError) as e:
        fast.fast_order_attn(q, ks, vs)
    msg = str(e.value)
    assert "rank" in msg and "30,421,755" in msg and f"{features.MAX_RANK:,}" in msg
    assert "eps" in msg and "degree" in msg and "head dim" in msg


def test_fast_order_attn_refuses_an_explicit_huge_degree(no_features):
    q, ks, vs = order_inputs(n=4, d=16, c=0.1)
    with pytest.raises(ValueError, match=r"C\(16 \+ 16, 16\) = 601,080,390 exceeds the limit .*degree=16"):
        fast.fast_order_attn(q, ks, vs, degree=16)


@pytest.mark.parametrize("fn", ["attention", "loss_grad"])
def test_paper_fast_refuses_a_huge_rank(fn, no_features):
    As, E, Ws = paper_problem(n=4, d=16)
    args = (*As, *Ws) if fn == "attention" else (*As, E, *Ws)
    with pytest.raises(ValueError, match=r"feature rank k = .* exceeds the limit"):
        getattr(paper, fn)(*args, method="fast", degree=20)


def test_rank_limit_is_the_one_in_features(monkeypatch):
    monkeypatch.setattr(features, "MAX_RANK", 100, raising=False)
    q, ks, vs = order_inputs(n=4, d=8, c=0.2)  # degree 8 would give C(16, 8) = 12870 > 100
    with pytest.raises(ValueError, match=r"exceeds the limit 100 \(tensorattn.features.MAX_RANK\)"):
        fast.fast_order_attn(q, ks, vs, degree=8)
    with pytest.raises(ValueError, match="exceeds the limit 100"):
        features.multi_indices(8, 8)
    with pytest.raises(ValueError, match="exceeds the limit 100"):
        features.monomial_features(torch.ones(2, 8), 8)
    assert features.rank(8, 8) == 12870  # counting is not allocating
    assert features.check_rank(3, 2) == 10


# =========================================================================================================
# Class 4: overflow -> refuse a scale whose scores overflow the accumulator
# =========================================================================================================
EXACT_OPS = {
    "tensor_attn-torch": lambda *x, **kw: ta.tensor_attn(*x, backend="torch", **kw),
    "tensor_attn-naive": lambda *x, **kw: ta.tensor_attn(*x, backend="naive", **kw),
    "tensor_attn-auto": lambda *x, **kw: ta.tensor_attn(*x, **kw),
    "naive_tensor_attn": lambda *x, **kw: ta.naive_tensor_attn(*x, **kw),
    "naive_order_attn": lambda q, k1, k2, v1, v2, **kw: ta.naive_order_attn(q, [k1, k2], [v1, v2], **kw),
}


@pytest.mark.parametrize("name", sorted(EXACT_OPS))
def test_huge_scale_is_refused_with_the_bound(name):
    x = five(seed=3)
    with pytest.raises(ValueError, match=r"\|scale\| must be <= 1.84e\+19 for torch.float32 inputs, got scale=1e\+38"):
        EXACT_OPS[name](*x, scale=1e38)
    # below the bound: finite, and the float64 result
    o = EXACT_OPS[name](*x, scale=1e18)
    ref = ta.naive_tensor_attn(*(t.double() for t in x), scale=1e18)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o.double(), ref, rtol=1e-5, atol=1e-5)


def test_float64_inputs_have_a_float64_bound():
    x = five(dtype=torch.float64)
    assert torch.isfinite(ta.tensor_attn(*x, scale=1e38)).all()
    with pytest.raises(ValueError, match="scale"):
        ta.tensor_attn(*x, scale=1e200)


# =========================================================================================================
# Class 5: one non-finite rule (CPU: refuse by default; check_finite=True/False)
# =========================================================================================================
def test_naive_order_attn_refuses_nan():
    q, k, v = five()[:3]
    k = k.clone()
    k[0, 1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"keys\[1\] contains 1 non-finite value"):
        ta.naive_order_attn(q, [q, k], [q, q])
    assert ta.naive_order_attn(q, [q, k], [q, q], check_finite=False).shape == q.shape  # opt-out


@pytest.mark.parametrize("fn", ["fast_order_attn", "approx_probs"])
def test_fast_order_ops_refuse_nan(fn):
    q, ks, vs = order_inputs()
    ks[1][2, 0] = float("inf")
    with pytest.raises(ValueError, match=r"keys\[1\] contains 1 non-finite value"):
        if fn == "fast_order_attn":
            fast.fast_order_attn(q, ks, vs)
        else:
            fast.approx_probs(q, ks)


def test_fast_order_loss_grad_refuses_nan_naming_the_argument():
    q, ks, vs = order_inputs(d=3, dv=3)
    E = torch.zeros(6, 3, dtype=torch.float64)
    W = [torch.eye(3, dtype=torch.float64) for _ in range(5)]
    vs[0][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"A_values\[0\] contains 1 non-finite"):
        fast.fast_order_loss_grad(q, ks, vs, E, W[0], W[1:3], W[3:5])


def test_fast_without_the_check_names_the_inputs_not_a_radius():
    q, ks, vs = order_inputs()
    q[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"q or keys contain NaN/Inf \(pass check_finite=True"):
        fast.fast_order_attn(q, ks, vs, check_finite=False)


@pytest.mark.parametrize("method", ["exact", "fast"])
def test_paper_attention_refuses_nan(method):
    As, E, Ws = paper_problem()
    As[2][1, 1] = float("nan")
    with pytest.raises(ValueError, match="A3 contains 1 non-finite"):
        paper.attention(*As, *Ws, method=method)


@pytest.mark.parametrize("method", ["closed_form", "fast"])
def test_paper_loss_grad_refuses_nan(method):
    As, E, Ws = paper_problem()
    Ws[1][0, 0] = float("inf")
    with pytest.raises(ValueError, match="WK1 contains 1 non-finite"):
        paper.loss_grad(*As, E, *Ws, method=method)


@pytest.mark.parametrize("fn", ["loss", "closed_form_intermediates"])
def test_paper_loss_and_intermediates_refuse_nan(fn):
    As, E, Ws = paper_problem()
    E[0, 0] = float("nan")
    with pytest.raises(ValueError, match="E contains 1 non-finite"):
        getattr(paper, fn)(*As, E, *Ws)
    assert torch.isnan(paper.loss(*As, E, *Ws, check_finite=False))  # opted out: the caller's NaN comes back


@pytest.mark.parametrize("cls", [SoftmaxAttention, TensorAttention, PolyTensorAttention])
def test_layers_refuse_nan_naming_the_input(cls):
    layer = cls(8, 2)
    x = torch.randn(2, 5, 8)
    y = x.clone()
    y[1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="y contains 1 non-finite"):
        layer(x, y)
    x2 = x.clone()
    x2[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="x contains 1 non-finite"):
        layer(x2)


def test_softmax_layer_opt_out_and_flag_type():
    layer = SoftmaxAttention(8, 2, check_finite=False)
    x = torch.randn(1, 4, 8)
    x[0, 0, 0] = float("nan")
    assert torch.isnan(layer(x)).any()  # the caller opted out
    with pytest.raises(TypeError, match="check_finite must be None or a bool"):
        SoftmaxAttention(8, 2, check_finite="yes")


def test_multiview_classifier_refuses_nan():
    model = MultiViewClassifier([6, 7, 5], 3, n_tokens=2, dim=8, n_heads=2)
    views = [torch.randn(4, d) for d in (6, 7, 5)]
    views[2][1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"views\[2\] contains 1 non-finite"):
        model(views)


# =========================================================================================================
# Class 6: flags are bools (numpy bools accepted), never truthiness
# =========================================================================================================
def test_check_bool_helper():
    assert check_bool("causal", True) is True and check_bool("causal", np.bool_(False)) is False
    for bad in ("False", 0, 1, None, torch.tensor(True)):
        with pytest.raises(TypeError, match="causal must be a bool"):
            check_bool("causal", bad)


def test_numpy_bool_is_accepted_by_the_ops():
    x = five()
    o = ta.tensor_attn(*x, causal=np.bool_(True))
    torch.testing.assert_close(o, ta.tensor_attn(*x, causal=True))
    torch.testing.assert_close(ta.naive_tensor_attn(*x, causal=np.bool_(True)), o, rtol=1e-5, atol=1e-6)
    assert ta.tensor_attn(*x, check_finite=np.bool_(True)).shape == o.shape


@pytest.mark.parametrize("call", [
    lambda x: ta.naive_order_attn(x[0], [x[1]], [x[3]], causal="False"),
    lambda x: ta.tensor_attn(*x, causal="False"),
    lambda x: ta.naive_tensor_attn(*x, causal="False"),
    lambda x: ta.naive_tensor_attn(*x, return_lse="no"),
    lambda x: ta.tensor_attn(*x, deterministic="no"),
], ids=["naive_order_attn", "tensor_attn", "naive_tensor_attn", "return_lse", "deterministic"])
def test_string_flags_are_refused_by_the_ops(call):
    with pytest.raises(TypeError, match=r"(causal|return_lse|deterministic) must be a bool \(True or False\), got str"):
        call(five())


def test_string_flags_are_refused_by_fast():
    q, ks, vs = order_inputs()
    with pytest.raises(TypeError, match="return_plan must be a bool"):
        fast.fast_order_attn(q, ks, vs, return_plan="no")
    E, W = torch.zeros(6, 2, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="return_loss must be a bool"):
        fast.fast_order_loss_grad(q, ks, vs, E, W, [W, W], [W[:, :2], W[:, :2]], return_loss="no")
    with pytest.raises(TypeError, match="positive must be a bool"):
        features.degree_for(1.0, 1e-3, positive="no")


@pytest.mark.parametrize("cls", [SoftmaxAttention, TensorAttention, PolyTensorAttention])
@pytest.mark.parametrize("flag", ["causal", "bias", "rope"])
def test_string_flags_are_refused_by_the_layers(cls, flag):
    value = "no" if flag != "causal" else "False"
    with pytest.raises(TypeError, match=rf"{flag} must be a bool \(True or False\), got str '{value}'"):
        cls(8, 2, **{flag: value})


def test_deterministic_flag_of_the_exact_layer_and_op():
    with pytest.raises(TypeError, match=r"deterministic must be a bool \(True or False\), got int"):
        TensorAttention(8, 2, deterministic=1)
    x = five()
    ref = [t.clone().requires_grad_() for t in x]
    det = [t.clone().requires_grad_() for t in x]
    for backend in ("torch", "naive"):  # deterministic either way: the flag changes nothing there
        o1 = ta.tensor_attn(*ref, causal=True, backend=backend)
        o2 = ta.tensor_attn(*det, causal=True, backend=backend, deterministic=True)
        assert torch.equal(o1, o2)
        assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(o1.sum(), ref),
                                                      torch.autograd.grad(o2.sum(), det)))
    layer = TensorAttention(8, 2, causal=True, deterministic=True)
    assert layer.deterministic is True and layer(torch.randn(1, 5, 8)).shape == (1, 5, 8)


@pytest.mark.parametrize("cls", [TensorAttention, PolyTensorAttention])
def test_numpy_bool_flags_work_in_the_layers(cls):
    layer = cls(8, 2, causal=np.bool_(True), bias=np.bool_(False))
    assert layer.causal is True and layer.q.bias is None
    x = torch.randn(1, 5, 8)
    ref = cls(8, 2, causal=True)
    ref.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), ref(x))


def test_transformer_causal_must_be_a_bool():
    with pytest.raises(TypeError, match="causal must be a bool"):
        Transformer(10, block_size=8, dim=8, n_layer=1, n_heads=2, causal="False")


# =========================================================================================================
# Class 7: crashes where a clear error belongs
# =========================================================================================================
@pytest.mark.parametrize("cls", [SoftmaxAttention, TensorAttention, PolyTensorAttention])
def test_zero_heads_is_a_value_error(cls):
    with pytest.raises(ValueError, match="n_heads must be >= 1, got 0"):
        cls(16, 0)


def test_transformer_zero_heads_is_a_value_error():
    with pytest.raises(ValueError, match="n_heads must be >= 1, got 0"):
        Transformer(10, block_size=8, dim=8, n_layer=1, n_heads=0)
    with pytest.raises(ValueError, match="dim must be >= 1"):
        Transformer(10, block_size=8, dim=0, n_layer=1, n_heads=2)


@pytest.mark.parametrize("cls", [SoftmaxAttention, TensorAttention])
def test_layer_input_checks_name_the_argument(cls):
    layer = cls(8, 2)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"x must have 3 dimensions, got 2"):
        layer(x[0])
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, dim\] with dim = 8"):
        layer(torch.randn(2, 5, 6))
    with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the layer's parameters are torch.float32"):
        layer(x.double())
    with pytest.raises(ValueError, match="y has batch size 3 but x has 2"):
        layer(x, torch.randn(3, 5, 8))
    with pytest.raises(ValueError, match="y must have at least one position"):
        layer(x, torch.randn(2, 0, 8))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer([[1.0] * 8])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts for the layer: a dtype mismatch is fine
        assert layer(x.bfloat16()).shape == (2, 5, 8)


def test_tensor_layer_checks_z():
    layer = TensorAttention(8, 2)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="z has batch size 1 but x has 2"):
        layer(x, x, torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match=r"z must have shape \[B, T, dim\]"):
        layer(x, x, torch.randn(2, 5, 4))


def test_transformer_input_checks():
    model = Transformer(10, block_size=8, dim=8, n_layer=1, n_heads=2)
    with pytest.raises(ValueError, match="idx must have 2 dimensions"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="idx must hold integer token ids"):
        model(torch.zeros(1, 5))
    with pytest.raises(ValueError, match=r"idx must hold token ids in \[0, vocab_size\) = \[0, 10\), got values in \[0, 10\]"):
        model(torch.tensor([[0, 10]]))
    with pytest.raises(ValueError, match="idx must have at least one position"):
        model(torch.zeros(1, 0, dtype=torch.long))


def test_multiview_classifier_input_checks():
    model = MultiViewClassifier([6, 7, 5], 3, n_tokens=2, dim=8, n_heads=2)
    views = [torch.randn(4, d) for d in (6, 7, 5)]
    with pytest.raises(ValueError, match=r"views\[1\] has batch size 3 but views\[0\] has 4"):
        model([views[0], views[1][:3], views[2]])
    with pytest.raises(TypeError, match=r"views\[0\] has dtype torch.float64"):
        model([views[0].double(), views[1], views[2]])
    with pytest.raises(ValueError, match="n_tokens must be >= 1, got 0"):
        MultiViewClassifier([6, 7, 5], 3, n_tokens=0)
    with pytest.raises(TypeError, match=r"view_dims\[1\] must be an int"):
        MultiViewClassifier([6, 7.5, 5], 3)


@pytest.mark.parametrize("method", ["exact", "fast"])
@pytest.mark.parametrize("which", ["n", "d"])
def test_paper_empty_sizes_are_refused(method, which):
    As, E, Ws = paper_problem(n=0 if which == "n" else 4, d=0 if which == "d" else 3)
    with pytest.raises(ValueError, match=r"A1 must have shape \[n, d\] with n >= 1 tokens and d >= 1 features"):
        paper.attention(*As, *Ws, method=method)
    with pytest.raises(ValueError, match=r"A1 must have shape \[n, d\]"):
        paper.loss_grad(*As, E, *Ws, method="closed_form" if method == "exact" else "fast")


def test_naive_order_attn_empty_dims_are_refused():
    q, k, _, v, _ = five()
    with pytest.raises(ValueError, match=r"q must have a head dim D >= 1 \(q.shape\[3\]\), got 0"):
        ta.naive_order_attn(q[..., :0], [k[..., :0]], [v])
    with pytest.raises(ValueError, match=r"keys\[1\] must have at least one position"):
        ta.naive_order_attn(q, [k, k[:, :0]], [v, v[:, :0]])
    with pytest.raises(ValueError, match=r"values\[0\] must have a value head dim Dv >= 1"):
        ta.naive_order_attn(q, [k], [v[..., :0]])


# =========================================================================================================
# Class 9: capabilities declared only where they hold
# =========================================================================================================
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_interpreter_does_not_declare_low_precision(monkeypatch, dtype):
    from tensorattn.dispatch import triton_device_reasons, triton_interpreter_dtype_reasons

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    (reason,) = triton_interpreter_dtype_reasons(dtype)
    assert str(dtype) in reason and "TRITON_INTERPRET=1" in reason
    assert reason in triton_device_reasons(torch.device("cpu"), dtype)
    prob = dict(device=torch.device("cpu"), dtype=dtype, head_dim=16, head_dim_v=16)
    assert choose_backend("auto", prob).name == "torch"
    with pytest.raises(ValueError, match=rf"backend 'triton' cannot run .*{dtype} under TRITON_INTERPRET=1"):
        choose_backend("triton", prob)


def test_interpreter_still_declares_float32(monkeypatch):
    from tensorattn.dispatch import triton_available, triton_interpreter_dtype_reasons

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_interpreter_dtype_reasons(torch.float32) == []
    if triton_available():
        prob = dict(device=torch.device("cpu"), dtype=torch.float32, head_dim=16, head_dim_v=16)
        assert choose_backend("auto", prob).name == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert triton_interpreter_dtype_reasons(torch.bfloat16) == []  # on a GPU the compiled kernels handle bf16
