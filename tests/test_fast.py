"""The polynomial method (docs/math.md#fast-gradient), float64.

Two separate claims: *implementation* (the fast CP algorithm equals the same polynomial
attention computed explicitly, to rounding) and *approximation* (the polynomial attention approaches
exact attention as the degree grows, within the documented eps guarantee).
"""
import math

import pytest
import torch

from tensorattn import naive_order_attn, naive_tensor_attn, paper
from tensorattn.fast import (
    DEFAULT_EPS,
    approx_probs,
    fast_attention,
    fast_loss_grad,
    fast_order_attn,
    fast_order_loss_grad,
    plan_poly,
)
from tensorattn.features import poly_eval

F64 = torch.float64


def _rand(*shape, s=1.0, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    return torch.randn(*shape, dtype=F64) * s


def _paper_problem(n=7, d=3, s=0.6, seed=0):
    torch.manual_seed(seed)
    A = [_rand(n, d, s=s) for _ in range(5)]
    W = [_rand(d, d, s=s) for _ in range(5)]
    E = _rand(n, d)
    return A, E, W


def _chain(op, xs):
    out = xs[0]
    for x in xs[1:]:
        out = op(out, x)
    return out


def _explicit_loss(Aq, Aks, Avs, E, X, WV, scale, weight):
    """Order-m loss ½‖f V − E‖² with the n × prod(S) matrix formed explicitly; ``weight(z)`` is exp or P."""
    z = scale * Aq @ X @ _chain(torch.kron, Aks).T  # [n, prod S]
    w = weight(z)
    f = w / w.sum(1, keepdim=True)
    V = _chain(paper.khatri_rao, [A @ W for A, W in zip(Avs, WV)])  # [prod S, dv]
    return 0.5 * ((f @ V - E) ** 2).sum()


def _order_problem(m, n=5, lens=(4, 3, 3), d=3, dv=2, s=0.7, seed=1):
    torch.manual_seed(seed)
    Aq = _rand(n, d, s=s)
    Aks = [_rand(lens[r], d, s=s) for r in range(m)]
    Avs = [_rand(lens[r], d) for r in range(m)]
    WQ = _rand(d, d, s=s)
    WK = [_rand(d, d, s=s) for _ in range(m)]
    WV = [_rand(d, dv) for _ in range(m)]
    E = _rand(n, dv)
    return Aq, Aks, Avs, E, WQ, WK, WV


def _merged_x(WQ, WK):
    return WQ @ _chain(paper.khatri_rao, list(WK)).T  # [d, d^m]


# ---------------------------------------------------------------- identities of docs/math.md#products
def test_identities():
    torch.manual_seed(5)
    n, k, d = 4, 3, 2
    A, B = _rand(d, d), _rand(d, d)
    C, D = _rand(d, k), _rand(d, k)
    U, W = _rand(d, k), _rand(d, k)
    kr, fs, kron = paper.khatri_rao, paper.face_split, paper.kron
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)  # noqa: E731
    close(kron(A, B) @ kr(C, D), kr(A @ C, B @ D))  # I1 swap
    close(kron(A, B).T @ kr(U, W), kr(A.T @ U, B.T @ W))  # I1'
    U2, W2 = _rand(n, k), _rand(n, k)
    Ck, Dk = _rand(n, k), _rand(n, k)
    close(kr(U2, W2).T @ kr(Ck, Dk), (U2.T @ Ck) * (W2.T @ Dk))  # I2
    Cn, Dn = _rand(n, d), _rand(n, 2)
    close(kr(U2, W2).T @ kron(Cn, Dn), fs(U2.T @ Cn, W2.T @ Dn))  # I3
    U1, P1, P2, P3 = _rand(n, k), _rand(n, 2), _rand(n, 2), _rand(n, 2)
    V2, V3 = _rand(n, k), _rand(n, k)
    lhs = (U1 @ kr(V2, V3).T) * (P1 @ kr(P2, P3).T)
    close(lhs, fs(U1, P1) @ kr(fs(V2, P2), fs(V3, P3)).T)  # I4 distribution
    ones = torch.ones(n, dtype=F64)
    close(U1 @ kr(V2, V3).T @ torch.ones(n * n, dtype=F64), U1 @ ((V2.T @ ones) * (V3.T @ ones)))  # I5
    A1, A2, A3, X = _rand(n, d), _rand(n, d), _rand(n, d), _rand(d, d * d)
    close(paper.vec(A1 @ X @ kron(A2, A3).T), kron(kron(A1, A2), A3) @ paper.vec(X))  # I6 tensor trick


# ---------------------------------------------------------------- approximation claim
def test_fast_vs_closed_form_error_falls_with_degree():
    A, E, W = _paper_problem()
    X, _ = paper.merge_weights(*W)
    assert paper.logits(A[0], A[1], A[2], X).abs().max() <= 1.0  # the |logits| <= 1 regime
    G = paper.loss_grad(*A, E, *W)
    O = paper.attention(*A, *W)
    errs_g, errs_o = [], []
    for g in (2, 4, 6, 8, 10):
        errs_g.append(float((fast_loss_grad(*A, E, *W, degree=g) - G).abs().max()))
        errs_o.append(float((fast_attention(*A, *W, degree=g) - O).abs().max()))
    for errs in (errs_g, errs_o):
        # about 25-100x per +2 in degree; demand >= 10x
        assert all(b < a / 10 for a, b in zip(errs, errs[1:])), errs
    assert errs_g[3] < 1e-6 and errs_o[3] < 1e-6  # g = 8
    assert errs_g[4] < 1e-9


def test_chebyshev_family_error_falls_with_degree():
    A, E, W = _paper_problem(seed=3, s=0.8)  # logit radius about 1.8
    G = paper.loss_grad(*A, E, *W)
    Q, K1, K2 = A[0] @ W[0], A[1] @ W[1], A[2] @ W[2]
    errs = []
    for g in (6, 8, 10):
        errs.append(float((fast_loss_grad(*A, E, *W, degree=g, family="chebyshev") - G).abs().max()))
        # on the same interval, the Chebyshev fit beats Taylor of the same degree
        pc = plan_poly(Q, [K1, K2], scale=1 / 3, degree=g, family="chebyshev")
        assert pc.rel_error < plan_poly(Q, [K1, K2], scale=1 / 3, degree=g).rel_error / 4
    assert all(b < a / 10 for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-8


@pytest.mark.parametrize("family", ["taylor", "chebyshev"])
@pytest.mark.parametrize("eps", [1e-3, 1e-6, 1e-9])
def test_eps_guarantee(family, eps):
    torch.manual_seed(11)
    n, S, d = 6, 5, 3
    q = _rand(n, d)
    ks = [_rand(S, d) + 1.0, _rand(S, d)]  # shifted keys: asymmetric logit intervals, centring matters
    vs = [_rand(S, 2), _rand(S, 2)]
    scale = 0.5
    out, plan = fast_order_attn(q, ks, vs, scale=scale, eps=eps, family=family, return_plan=True)
    assert plan.rel_error <= eps
    assert plan.family == family and (family == "chebyshev" or plan.degree % 2 == 0)
    ref = naive_order_attn(q[None, :, None], [k[None, :, None] for k in ks], [v[None, :, None] for v in vs],
                           scale=scale)[0, :, 0]
    f_t, _ = approx_probs(q, ks, scale=scale, eps=eps, family=family)
    z = scale * torch.einsum("id,jd,kd->ijk", q, *ks)
    f = z.flatten(1).softmax(-1).view_as(z)
    assert float(((f_t - f).abs() / f).max()) <= plan.prob_bound + 1e-12
    vmax = (vs[0].abs().max(0).values * vs[1].abs().max(0).values)  # [dv]
    assert bool(((out - ref).abs() <= plan.prob_bound * vmax + 1e-12).all())


def test_default_eps_and_even_degree():
    A, E, W = _paper_problem()
    Q, K1, K2 = A[0] @ W[0], A[1] @ W[1], A[2] @ W[2]
    plan = plan_poly(Q, [K1, K2], scale=1 / 3)
    assert plan.rel_error <= DEFAULT_EPS and plan.degree % 2 == 0
    # the same as asking for eps = 1e-6 explicitly; odd degrees are never chosen
    assert plan_poly(Q, [K1, K2], scale=1 / 3, eps=1e-6).degree == plan.degree
    assert plan.rank == math.comb(3 + plan.degree, plan.degree)


def test_rows_of_the_approximate_softmax_sum_to_one():
    q, ks = _rand(6, 3, s=1.2, seed=2), [_rand(4, 3, s=1.2), _rand(5, 3, s=1.2)]
    for family, g in (("taylor", 2), ("taylor", 6), ("chebyshev", 12)):
        f, _ = approx_probs(q, ks, scale=0.5, degree=g, family=family)
        assert f.shape == (6, 4, 5)
        torch.testing.assert_close(f.flatten(1).sum(1), torch.ones(6, dtype=F64), rtol=1e-13, atol=1e-13)
        assert bool((f > 0).all())


@pytest.mark.parametrize("m", [1, 2, 3])
def test_order_m_vs_naive(m):
    torch.manual_seed(20 + m)
    n, d, dv = 6, 3, 2
    lens = (5, 4, 3)[:m]
    q = _rand(n, d, s=0.5)
    ks = [_rand(s_, d, s=0.5) for s_ in lens]
    vs = [_rand(s_, dv) for s_ in lens]
    ref = naive_order_attn(q[None, :, None], [k[None, :, None] for k in ks], [v[None, :, None] for v in vs])
    out = fast_order_attn(q, ks, vs, degree=12)  # default scale 1/sqrt(d) as the reference
    torch.testing.assert_close(out, ref[0, :, 0], rtol=0, atol=1e-8)
    if m == 2:
        ref2 = naive_tensor_attn(q[None, :, None], ks[0][None, :, None], ks[1][None, :, None],
                                 vs[0][None, :, None], vs[1][None, :, None])
        torch.testing.assert_close(out, ref2[0, :, 0], rtol=0, atol=1e-8)


@pytest.mark.parametrize("m", [1, 2, 3])
def test_order_m_loss_grad_vs_autograd_of_exact_loss(m):
    Aq, Aks, Avs, E, WQ, WK, WV = _order_problem(m)
    X = _merged_x(WQ, WK).requires_grad_(True)
    scale = 1 / 3
    _explicit_loss(Aq, Aks, Avs, E, X, WV, scale, torch.exp).backward()
    G, loss = fast_order_loss_grad(Aq, Aks, Avs, E, WQ, WK, WV, scale=scale, degree=12, return_loss=True)
    assert G.shape == (3, 3**m)
    torch.testing.assert_close(G, X.grad, rtol=0, atol=1e-9)
    exact = _explicit_loss(Aq, Aks, Avs, E, X.detach(), WV, scale, torch.exp)
    assert float(loss) == pytest.approx(float(exact), rel=1e-9)


# ---------------------------------------------------------------- implementation claim
@pytest.mark.parametrize("family,degree", [("taylor", 2), ("taylor", 4), ("chebyshev", 5)])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_fast_equals_explicit_polynomial_algorithm(m, family, degree):
    # Algorithm 1 = Lemma 3.1's closed form with f replaced by the polynomial softmax f̃ (this is not the
    # derivative of the approximate loss, since P' != P). Here every n x prod(S) object is formed
    # explicitly; the fast CP algorithm must agree to rounding, even at a crude degree.
    Aq, Aks, Avs, E, WQ, WK, WV = _order_problem(m, s=0.7, seed=30 + m)
    X = _merged_x(WQ, WK)
    scale = 0.4
    G, loss, plan = fast_order_loss_grad(Aq, Aks, Avs, E, WQ, WK, WV, scale=scale, degree=degree, family=family,
                                         return_loss=True, return_plan=True, chunk_size=2)
    z = scale * Aq @ X @ _chain(torch.kron, Aks).T  # [n, prod S]
    w = poly_eval(plan.coeffs, z - plan.centre[:, None])
    f = w / w.sum(1, keepdim=True)
    V = _chain(paper.khatri_rao, [A @ W for A, W in zip(Avs, WV)])  # [prod S, dv]
    O = f @ V
    c = O - E
    q = c @ V.T
    r = (c * O).sum(1)
    p = f * q - r[:, None] * f
    G_ref = scale * Aq.T @ p @ _chain(torch.kron, Aks)
    torch.testing.assert_close(G, G_ref, rtol=1e-10, atol=1e-13)
    assert float(loss) == pytest.approx(0.5 * float((c * c).sum()), rel=1e-12)
    Q, Ks = Aq @ WQ, [A @ W for A, W in zip(Aks, WK)]
    Vs = [A @ W for A, W in zip(Avs, WV)]
    out = fast_order_attn(Q, Ks, Vs, scale=scale, degree=degree, family=family)
    torch.testing.assert_close(out, O, rtol=1e-11, atol=1e-13)


def test_chunking_does_not_change_the_result():
    A, E, W = _paper_problem(n=11)
    g1 = fast_loss_grad(*A, E, *W, degree=4)
    g2 = fast_loss_grad(*A, E, *W, degree=4, chunk_size=3)
    torch.testing.assert_close(g1, g2, rtol=1e-13, atol=1e-15)
    o1 = fast_attention(*A, *W, degree=4)
    torch.testing.assert_close(o1, fast_attention(*A, *W, degree=4, chunk_size=1), rtol=1e-13, atol=1e-15)


def test_paper_delegates_to_fast():
    A, E, W = _paper_problem()
    torch.testing.assert_close(paper.loss_grad(*A, E, *W, method="fast", degree=6),
                               fast_loss_grad(*A, E, *W, degree=6), rtol=0, atol=0)
    torch.testing.assert_close(paper.attention(*A, *W, method="fast", eps=1e-9),
                               fast_attention(*A, *W, eps=1e-9), rtol=0, atol=0)


def test_float32_inputs_keep_their_dtype():
    A, E, W = _paper_problem()
    A32, E32, W32 = [a.float() for a in A], E.float(), [w.float() for w in W]
    g = fast_loss_grad(*A32, E32, *W32, degree=8)
    assert g.dtype == torch.float32
    torch.testing.assert_close(g.double(), paper.loss_grad(*A, E, *W), rtol=0, atol=1e-6)
    assert fast_attention(*A32, *W32, degree=4).dtype == torch.float32


# ---------------------------------------------------------------- positivity and bad input
def test_odd_taylor_degree_is_refused():
    A, E, W = _paper_problem()
    with pytest.raises(ValueError, match="degree must be even"):
        fast_loss_grad(*A, E, *W, degree=3)
    with pytest.raises(ValueError, match="degree must be even"):
        fast_attention(*A, *W, degree=5)


def test_chebyshev_that_dips_below_zero_is_refused():
    torch.manual_seed(0)
    q = torch.full((2, 1), 4.0, dtype=F64)
    ks = [torch.tensor([[-1.0], [1.0]], dtype=F64)]  # logits in [-4, 4]: radius 4
    vs = [torch.ones(2, 1, dtype=F64)]
    with pytest.raises(ValueError, match="minimum on the logit interval"):
        fast_order_attn(q, ks, vs, scale=1.0, degree=4, family="chebyshev")
    out = fast_order_attn(q, ks, vs, scale=1.0, eps=1e-6, family="chebyshev")  # automatic: a safe degree
    torch.testing.assert_close(out, torch.ones(2, 1, dtype=F64), rtol=0, atol=1e-12)


def test_bad_input():
    q, k, v = _rand(4, 3, seed=0), _rand(5, 3), _rand(5, 2)
    with pytest.raises(ValueError, match="q must have 2 dimensions"):
        fast_order_attn(q[None], [k], [v])
    with pytest.raises(TypeError, match="keys and values must be lists"):
        fast_order_attn(q, k, [v])
    with pytest.raises(ValueError, match="at least one tensor"):
        fast_order_attn(q, [], [])
    with pytest.raises(ValueError, match="values must hold as many"):
        fast_order_attn(q, [k, k], [v])
    with pytest.raises(ValueError, match=r"keys\[0\] must have shape \[S_0, d\] with d = 3"):
        fast_order_attn(q, [_rand(5, 4)], [v])
    with pytest.raises(ValueError, match=r"values\[1\] must have shape"):
        fast_order_attn(q, [k, k], [v, _rand(4, 2)])
    with pytest.raises(TypeError, match="dtype"):
        fast_order_attn(q, [k.float()], [v])
    with pytest.raises(TypeError, match="floating-point"):
        fast_order_attn(q.long(), [k.long()], [v.long()])
    with pytest.raises(ValueError, match="not both"):
        fast_order_attn(q, [k], [v], degree=4, eps=1e-3)
    with pytest.raises(ValueError, match="eps must be in"):
        fast_order_attn(q, [k], [v], eps=2.0)
    with pytest.raises(ValueError, match="degree must be None or an int"):
        fast_order_attn(q, [k], [v], degree=-2)
    with pytest.raises(ValueError, match="family"):
        fast_order_attn(q, [k], [v], degree=4, family="pade")
    with pytest.raises(ValueError, match="chunk_size"):
        fast_order_attn(q, [k], [v], degree=4, chunk_size=0)
    with pytest.raises(ValueError, match="radius is too large"):
        fast_order_attn(q * 100, [k * 100], [v], eps=1e-9)
    A, E, W = _paper_problem()
    with pytest.raises(ValueError, match=r"WK1 must have shape \(3, 3\)"):
        fast_loss_grad(*A, E, W[0], _rand(3, 4), *W[2:], degree=4)
    with pytest.raises(ValueError, match=r"E must have shape \(7, 3\)"):
        fast_loss_grad(*A, E[:5], *W, degree=4)
    with pytest.raises(ValueError, match=r"A3 must have shape \(7, 3\)"):
        fast_attention(A[0], A[1], A[2][:4], A[3], A[4], *W, degree=4)
    Aq, Aks, Avs, E2, WQ, WK, WV = _order_problem(2)
    with pytest.raises(ValueError, match="must all hold m tensors"):
        fast_order_loss_grad(Aq, Aks, Avs, E2, WQ, WK[:1], WV, degree=4)
    with pytest.raises(ValueError, match=r"A_values\[1\] must have as many rows"):
        fast_order_loss_grad(Aq, Aks, [Avs[0], Avs[1][:2]], E2, WQ, WK, WV, degree=4)
