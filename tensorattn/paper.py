"""The paper's objects, made executable (Cao, Liang, Shi, Song: "Training Tensor Attention Efficiently").

Conventions (docs/math.md#products):

* ``kron(A, B)``: Kronecker product, first factor the slow index (= ``torch.kron``).
* ``khatri_rao(A, B)``: column-wise Kronecker ⊘, ``(A⊘B)[i·p + j, l] = A[i, l]·B[j, l]``.
* ``face_split(A, B)``: row-wise Kronecker ⊖, ``(A⊖B)[i, j·b + l] = A[i, j]·B[i, l]``.
* ``vec``: row-major (rows stacked), i.e. ``X.reshape(-1)``.

Tensor attention (Definition 2.5), with inputs ``A1..A5 ∈ R^{n×d}`` and weights ``W* ∈ R^{d×d}``::

    X = WQ (WK1 ⊘ WK2)^T ∈ R^{d×d²},   Y = WV1 ⊘ WV2 ∈ R^{d²×d}
    A = exp(A1 X (A2⊗A3)^T / d) ∈ R^{n×n²},   D = diag(A 1),   Att = D^{-1} A (A4⊗A5) Y

and the loss (Definition 2.8) ``Loss(X) = ½‖Att − E‖_F²``. :func:`loss_grad` returns ``dLoss/dX`` (``d×d²``) by
Lemma 3.1: ``dLoss/dX = (1/d)·A1^T p (A2⊗A3)`` with ``p = f∘q − diag(r) f`` (docs/math.md#closed-form).

Everything here streams over query rows, so no ``n×n²`` matrix is ever held: memory is ``O(n²·d)`` (the
value matrix ``h = (A4⊗A5)Y``) plus ``O(block·n²)``. Computations run in the inputs' dtype, which must be
float32 or float64 (use float64 to check identities and gradients).

Checks (every function of the problem): shapes ``n, d >= 1``, one dtype and device, and the library's
non-finite rule: NaN/Inf inputs are refused with a ``ValueError`` naming the argument on the CPU by default
(``check_finite=None``), always with ``check_finite=True``, never with ``False``.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ._budgets import SCORE_BLOCK_ELEMS
from ._validate import check_same, check_tensor, maybe_check_finite

__all__ = ["kron", "khatri_rao", "face_split", "vec", "merge_weights", "logits", "attention", "loss",
           "loss_grad", "closed_form_intermediates"]

_ROW_ELEMS = SCORE_BLOCK_ELEMS  # score entries held at once when streaming over query rows


# ---------------------------------------------------------------------------------------------------------
# products
def kron(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Kronecker product ``A⊗B`` (``[m·p, n·q]``), ``(A⊗B)[i·p+k, j·q+l] = A[i,j]·B[k,l]``."""
    check_tensor("A", A, ndim=2)
    check_tensor("B", B, ndim=2)
    return torch.kron(A, B)


def khatri_rao(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Column-wise Kronecker (Khatri–Rao) ``A⊘B`` of ``A [m, k]`` and ``B [p, k]``: ``[m·p, k]``."""
    check_tensor("A", A, ndim=2)
    check_tensor("B", B, ndim=2)
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"khatri_rao needs A and B with one column count, got A {tuple(A.shape)}, B {tuple(B.shape)}")
    return torch.einsum("il,jl->ijl", A, B).reshape(A.shape[0] * B.shape[0], A.shape[1])


def face_split(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Row-wise Kronecker (face-splitting) ``A⊖B`` of ``A [m, a]`` and ``B [m, b]``: ``[m, a·b]``."""
    check_tensor("A", A, ndim=2)
    check_tensor("B", B, ndim=2)
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"face_split needs A and B with one row count, got A {tuple(A.shape)}, B {tuple(B.shape)}")
    return torch.einsum("ij,il->ijl", A, B).reshape(A.shape[0], A.shape[1] * B.shape[1])


def vec(X: torch.Tensor) -> torch.Tensor:
    """Row-major vectorisation (rows stacked): ``vec(X)[a·cols + b] = X[a, b]``."""
    check_tensor("X", X, ndim=2)
    return X.reshape(-1)


# ---------------------------------------------------------------------------------------------------------
# definitions
_A_NAMES = ("A1", "A2", "A3", "A4", "A5")
_W_NAMES = ("WQ", "WK1", "WK2", "WV1", "WV2")


def _check_problem(As, Ws, E=None, *, check_finite: Optional[bool] = None, paper_dtypes: bool = True
                   ) -> Tuple[int, int]:
    """Shapes of the paper's problem: A1..A5 (and E) ``[n, d]`` with ``n, d >= 1``, weights ``[d, d]``, one dtype
    and device (``paper_dtypes``: float32 or float64, as this module computes; :mod:`tensorattn.fast` takes any
    float dtype and accumulates in float64); then the non-finite policy (``check_finite``, default: CPU tensors
    only). Returns ``(n, d)``."""
    names = list(_A_NAMES) + list(_W_NAMES) + (["E"] if E is not None else [])
    xs = list(As) + list(Ws) + ([E] if E is not None else [])
    for nm, x in zip(names, xs):
        check_tensor(nm, x, ndim=2)
    check_same(names, xs)
    if paper_dtypes and xs[0].dtype not in (torch.float32, torch.float64):
        raise TypeError(f"A1 must be float32 or float64 for the paper's computations, got {xs[0].dtype}")
    n, d = As[0].shape
    if n < 1 or d < 1:
        raise ValueError(f"A1 must have shape [n, d] with n >= 1 tokens and d >= 1 features, got {tuple(As[0].shape)}")
    for nm, x in zip(names, xs):
        want = (d, d) if nm in _W_NAMES else (n, d)
        if tuple(x.shape) != want:
            raise ValueError(f"{nm} must have shape {want} ({'[d, d]' if nm in _W_NAMES else '[n, d]'}, from "
                             f"A1's shape {(n, d)}), got {tuple(x.shape)}")
    maybe_check_finite(check_finite, names, xs)
    return n, d


def merge_weights(WQ, WK1, WK2, WV1, WV2) -> Tuple[torch.Tensor, torch.Tensor]:
    """``X = WQ (WK1 ⊘ WK2)^T`` (``d×d²``) and ``Y = WV1 ⊘ WV2`` (``d²×d``)."""
    return WQ @ khatri_rao(WK1, WK2).T, khatri_rao(WV1, WV2)


def _values(A4, A5, Y) -> torch.Tensor:
    """``h = (A4⊗A5) Y`` as ``[n, n, d]``: ``h[j1, j2, t] = Σ_{a,b} A4[j1,a] A5[j2,b] Y[a·d+b, t]``."""
    d = A4.shape[1]
    return torch.einsum("ia,jb,abt->ijt", A4, A5, Y.reshape(d, d, -1))


def _logit_rows(A1X, A2, A3, d: int) -> torch.Tensor:
    """Rows of ``A1 X (A2⊗A3)^T / d`` as ``[rows, n, n]`` from ``A1X = A1[rows] X`` (``[rows, d²]``)."""
    return torch.einsum("ibe,jb,ke->ijk", A1X.reshape(A1X.shape[0], d, d), A2, A3) / d


def logits(A1, A2, A3, X) -> torch.Tensor:
    """``A1 X (A2⊗A3)^T / d`` as an explicit ``[n, n²]`` matrix (tests and tiny sizes only)."""
    d = A1.shape[1]
    return _logit_rows(A1 @ X, A2, A3, d).reshape(A1.shape[0], -1)


def _blocks(n: int):
    bq = max(1, min(n, _ROW_ELEMS // max(1, n * n)))
    for i0 in range(0, n, bq):
        yield i0, min(n, i0 + bq)


def attention(A1, A2, A3, A4, A5, WQ, WK1, WK2, WV1, WV2, *, method: str = "exact", degree=None, eps=None,
              family: str = "taylor", check_finite: Optional[bool] = None) -> torch.Tensor:
    """Tensor attention ``D^{-1} A (A4⊗A5) Y`` of Definition 2.5 (scale ``1/d`` inside exp).

    Args:
        A1..A5: ``[n, d]`` token matrices (equal for self-attention, distinct for cross/multi-modal attention).
        WQ, WK1, WK2, WV1, WV2: ``[d, d]`` weights, merged into ``X`` and ``Y`` (:func:`merge_weights`).
        method: ``"exact"`` (streamed over query rows; ``Θ(n³d)`` time, ``O(n²d)`` memory) or ``"fast"``
            (the polynomial method of :mod:`tensorattn.fast`, ``n^{1+o(1)}`` for bounded entries).
        degree, eps, family: the polynomial's degree, target error and coefficient family (``"fast"`` only).
        check_finite: refuse NaN/Inf inputs (``None``: only for CPU tensors).

    Returns:
        ``[n, d]`` attention output in the inputs' dtype.
    """
    if method == "fast":
        from .fast import fast_attention

        return fast_attention(A1, A2, A3, A4, A5, WQ, WK1, WK2, WV1, WV2, degree=degree, eps=eps, family=family,
                              check_finite=check_finite)
    if method != "exact":
        raise ValueError(f"method must be 'exact' or 'fast', got {method!r}")
    n, d = _check_problem((A1, A2, A3, A4, A5), (WQ, WK1, WK2, WV1, WV2), check_finite=check_finite)
    X, Y = merge_weights(WQ, WK1, WK2, WV1, WV2)
    h = _values(A4, A5, Y)  # [n, n, d]
    out = torch.empty(n, Y.shape[1], dtype=A1.dtype, device=A1.device)
    for i0, i1 in _blocks(n):
        s = _logit_rows(A1[i0:i1] @ X, A2, A3, d)  # [bq, n, n]
        f = s.flatten(1).softmax(-1)  # [bq, n²]
        out[i0:i1] = f @ h.reshape(n * n, -1)
    return out


def loss(A1, A2, A3, A4, A5, E, WQ, WK1, WK2, WV1, WV2, *, check_finite: Optional[bool] = None) -> torch.Tensor:
    """Definition 2.8: ``½ ‖Att − E‖_F²`` (a scalar tensor; differentiable with autograd)."""
    _check_problem((A1, A2, A3, A4, A5), (WQ, WK1, WK2, WV1, WV2), E, check_finite=check_finite)
    att = attention(A1, A2, A3, A4, A5, WQ, WK1, WK2, WV1, WV2, check_finite=False)
    return 0.5 * ((att - E) ** 2).sum()


def closed_form_intermediates(A1, A2, A3, A4, A5, E, WQ, WK1, WK2, WV1, WV2, *,
                              check_finite: Optional[bool] = None) -> Dict[str, torch.Tensor]:
    """Every intermediate of Lemma 3.1, materialised (tiny sizes only): ``f, h, c, q, r, p1, p2, p, G``.

    Shapes: ``f, q, p1, p2, p``: ``[n, n²]``; ``h``: ``[n², d]``; ``c``: ``[n, d]``; ``r``: ``[n]``;
    ``G = dLoss/dX``: ``[d, d²]``. Names follow docs/math.md#closed-form.
    """
    n, d = _check_problem((A1, A2, A3, A4, A5), (WQ, WK1, WK2, WV1, WV2), E, check_finite=check_finite)
    X, Y = merge_weights(WQ, WK1, WK2, WV1, WV2)
    f = logits(A1, A2, A3, X).softmax(-1)
    h = kron(A4, A5) @ Y
    c = f @ h - E
    q = c @ h.T
    r = (f * q).sum(-1)
    p1 = f * q
    p2 = r[:, None] * f
    p = p1 - p2
    G = A1.T @ p @ kron(A2, A3) / d
    return {"f": f, "h": h, "c": c, "q": q, "r": r, "p1": p1, "p2": p2, "p": p, "G": G}


def loss_grad(A1, A2, A3, A4, A5, E, WQ, WK1, WK2, WV1, WV2, *, method: str = "closed_form", degree=None,
              eps=None, family: str = "taylor", check_finite: Optional[bool] = None) -> torch.Tensor:
    """``dLoss/dX`` (``[d, d²]``) of Definition 2.8 with respect to ``X = WQ (WK1⊘WK2)^T``.

    ``method="closed_form"`` is Lemma 3.1, streamed over blocks of query rows ``j0`` (docs/math.md#closed-form)::

        f_j0 = softmax row,  c_j0 = f_j0 h − E_j0,  q_j0 = h c_j0,  r_j0 = <f_j0, q_j0>,
        p_j0 = f_j0 ∘ q_j0 − r_j0 f_j0,   G += A1[j0]^T ⊗ (A2^T P_j0 A3)     (P_j0 = p_j0 as n×n)

    and ``dLoss/dX = G / d`` (the ``1/d`` of the logits). Time ``Θ(n³d)``, memory ``O(n²d)``: the ``n×n²``
    matrices are never held at once. ``method="fast"`` is the paper's Algorithm 1 (:mod:`tensorattn.fast`).

    Returns ``[d, d²]`` in the inputs' dtype; ``vec`` of it is the paper's ``d³`` gradient vector.
    """
    if method == "fast":
        from .fast import fast_loss_grad

        return fast_loss_grad(A1, A2, A3, A4, A5, E, WQ, WK1, WK2, WV1, WV2, degree=degree, eps=eps, family=family,
                              check_finite=check_finite)
    if method != "closed_form":
        raise ValueError(f"method must be 'closed_form' or 'fast', got {method!r}")
    n, d = _check_problem((A1, A2, A3, A4, A5), (WQ, WK1, WK2, WV1, WV2), E, check_finite=check_finite)
    X, Y = merge_weights(WQ, WK1, WK2, WV1, WV2)
    h = _values(A4, A5, Y).reshape(n * n, -1)  # [n², d]
    G = torch.zeros(d, d, d, dtype=A1.dtype, device=A1.device)
    for i0, i1 in _blocks(n):
        f = _logit_rows(A1[i0:i1] @ X, A2, A3, d).flatten(1).softmax(-1)  # [bq, n²]
        out = f @ h  # [bq, d]
        c = out - E[i0:i1]  # residual = dLoss/dOutput
        q = c @ h.T  # [bq, n²]
        r = (c * out).sum(-1)  # = <f, q> per row
        p = (f * q - r[:, None] * f).reshape(-1, n, n)  # dLoss/dlogits (without the 1/d)
        M = torch.einsum("ijk,jb,ke->ibe", p, A2, A3)  # A2^T P_i A3, [bq, d, d]
        G += torch.einsum("ia,ibe->abe", A1[i0:i1], M)
    return G.reshape(d, d * d) / d
