"""tensorattn.paper: conventions of the products, Definitions 2.5/2.8 and the closed-form gradient (Lemma 3.1)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorattn import naive_tensor_attn, paper
from tensorattn.check import _autograd_grad

F64 = torch.float64


def problem(seed, n, d, w_scale=0.5):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    return [r(n, d) for _ in range(5)], r(n, d), [r(d, d) * w_scale for _ in range(5)]


def test_product_conventions():
    A = torch.arange(6, dtype=F64).reshape(2, 3) + 1
    B = torch.arange(12, dtype=F64).reshape(4, 3) - 5
    C = torch.arange(8, dtype=F64).reshape(2, 4) * 0.5
    kr = paper.khatri_rao(A, B)
    assert kr.shape == (8, 3)
    for i in range(2):
        for j in range(4):
            torch.testing.assert_close(kr[i * 4 + j], A[i] * B[j])
    fs = paper.face_split(A, C)
    assert fs.shape == (2, 12)
    for i in range(2):
        for j in range(3):
            for l in range(4):
                assert fs[i, j * 4 + l] == A[i, j] * C[i, l]
    k = paper.kron(A, C)
    assert k[1 * 2 + 1, 2 * 4 + 3] == A[1, 2] * C[1, 3]
    X = torch.arange(6, dtype=F64).reshape(2, 3)
    assert paper.vec(X).tolist() == [0, 1, 2, 3, 4, 5]  # rows stacked
    torch.testing.assert_close(paper.khatri_rao(A.T, C.T).T, paper.face_split(A, C))


def test_identities_I1_to_I6():
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    A, B, C, D = r(3, 4), r(2, 5), r(4, 6), r(5, 6)
    kr, fs, kron = paper.khatri_rao, paper.face_split, paper.kron
    torch.testing.assert_close(kron(A, B) @ kr(C, D), kr(A @ C, B @ D))  # I1
    U, W = r(3, 6), r(2, 6)
    torch.testing.assert_close(kron(A, B).T @ kr(U, W), kr(A.T @ U, B.T @ W))  # I1'
    n = 5
    U, W, C2, D2 = r(n, 3), r(n, 3), r(n, 4), r(n, 4)
    torch.testing.assert_close(kr(U, W).T @ kr(C2, D2), (U.T @ C2) * (W.T @ D2))  # I2
    C3, D3 = r(n, 2), r(n, 3)
    torch.testing.assert_close(kr(U, W).T @ kron(C3, D3), fs(U.T @ C3, W.T @ D3))  # I3
    U1, U2, U3, P1, P2, P3 = r(4, 3), r(n, 3), r(n, 3), r(4, 2), r(n, 2), r(n, 2)
    lhs = (U1 @ kr(U2, U3).T) * (P1 @ kr(P2, P3).T)
    torch.testing.assert_close(lhs, fs(U1, P1) @ kr(fs(U2, P2), fs(U3, P3)).T)  # I4
    V = r(4, 3)
    torch.testing.assert_close(V @ kr(U2, U3).T @ torch.ones(n * n, dtype=F64),
                               V @ (U2.T @ torch.ones(n, dtype=F64) * (U3.T @ torch.ones(n, dtype=F64))))  # I5
    d = 3
    A1, A2, A3, X = r(4, d), r(n, d), r(2, d), r(d, d * d)
    torch.testing.assert_close(paper.vec(A1 @ X @ kron(A2, A3).T), kron(kron(A1, A2), A3) @ paper.vec(X))  # I6


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 9), d=st.integers(1, 5), seed=st.integers(0, 10_000),
       w_scale=st.sampled_from([0.1, 0.5, 1.0]))
def test_closed_form_matches_autograd(n, d, seed, w_scale):
    As, E, Ws = problem(seed, n, d, w_scale)
    g_ref, _ = _autograd_grad(As, E, Ws)
    g = paper.loss_grad(*As, E, *Ws)
    assert g.shape == (d, d * d)
    # relative error, with an absolute floor: for n = 1 the softmax has a single pair and the true gradient
    # is exactly 0, so both sides are rounding noise
    assert (g - g_ref).abs().max() <= 1e-9 * g_ref.abs().max() + 1e-13


def test_single_row_gradient_vanishes():
    As, E, Ws = problem(0, 1, 5)
    assert paper.loss_grad(*As, E, *Ws).abs().max() < 1e-13  # one pair: the softmax is constant 1


def test_closed_form_matches_finite_differences():
    As, E, Ws = problem(7, 4, 2)
    X, Y = paper.merge_weights(*Ws)

    def loss_of_X(X):
        f = paper.logits(As[0], As[1], As[2], X).softmax(-1)
        return 0.5 * ((f @ (paper.kron(As[3], As[4]) @ Y) - E) ** 2).sum()

    g = paper.loss_grad(*As, E, *Ws)
    h = 1e-6
    fd = torch.zeros_like(X)
    for idx in range(X.numel()):
        e = torch.zeros(X.numel(), dtype=F64)
        e[idx] = h
        fd.view(-1)[idx] = (loss_of_X(X + e.view_as(X)) - loss_of_X(X - e.view_as(X))) / (2 * h)
    assert (fd - g).abs().max() < 1e-8


def test_intermediates_consistent():
    As, E, Ws = problem(11, 5, 3)
    I = paper.closed_form_intermediates(*As, E, *Ws)
    torch.testing.assert_close(I["f"].sum(-1), torch.ones(5, dtype=F64))  # softmax rows
    torch.testing.assert_close(I["r"], (I["c"] * (I["f"] @ I["h"])).sum(-1))  # r = rowsum(c ∘ output)
    torch.testing.assert_close(I["p"], I["p1"] - I["p2"])
    torch.testing.assert_close(I["p"].sum(-1), torch.zeros(5, dtype=F64))  # softmax backward rows sum to 0
    torch.testing.assert_close(I["G"], paper.loss_grad(*As, E, *Ws))


def test_attention_equals_reference_with_projections():
    As, E, Ws = problem(5, 6, 3)
    Q, K1, K2, V1, V2 = (A @ W for A, W in zip(As, Ws))
    ref = naive_tensor_attn(*(t[None, :, None] for t in (Q, K1, K2, V1, V2)), scale=1 / 3)[0, :, 0]
    torch.testing.assert_close(paper.attention(*As, *Ws), ref)


def test_streaming_over_rows(monkeypatch):
    As, E, Ws = problem(13, 7, 2)
    full = paper.loss_grad(*As, E, *Ws)
    monkeypatch.setattr(paper, "_ROW_ELEMS", 1)  # one query row per block
    torch.testing.assert_close(paper.loss_grad(*As, E, *Ws), full, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(paper.attention(*As, *Ws), paper.closed_form_intermediates(*As, E, *Ws)["f"]
                               @ paper.closed_form_intermediates(*As, E, *Ws)["h"])


def test_bad_input():
    As, E, Ws = problem(0, 4, 2)
    with pytest.raises(ValueError, match="A3 must have shape"):
        paper.loss_grad(As[0], As[1], As[2][:3], As[3], As[4], E, *Ws)
    with pytest.raises(ValueError, match="WK2 must have shape"):
        paper.attention(*As, Ws[0], Ws[1], Ws[2][:1], Ws[3], Ws[4])
    with pytest.raises(ValueError, match="E must have shape"):
        paper.loss_grad(*As, E[:2], *Ws)
    with pytest.raises(TypeError, match="float32 or float64"):
        paper.attention(*(a.half() for a in As), *(w.half() for w in Ws))
    with pytest.raises(ValueError, match="method must be"):
        paper.loss_grad(*As, E, *Ws, method="autograd")
    with pytest.raises(ValueError, match="one column count"):
        paper.khatri_rao(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="one row count"):
        paper.face_split(torch.ones(2, 3), torch.ones(3, 3))
    with pytest.raises(ValueError, match="X must have 2 dimensions"):
        paper.vec(torch.ones(2, 2, 2))
