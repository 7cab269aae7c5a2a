"""The paper's almost-linear algorithm (polynomial method, docs/math.md#fast-gradient), for any order m >= 1.

Order-m attention: for a query ``i`` and a key tuple ``J = (j_1, ..., j_m)``::

    z[i, J] = scale * <q_i, k_1[j_1] ∘ ... ∘ k_m[j_m]>
    o[i, e] = sum_J softmax_J(z[i, :])[J] * v_1[j_1, e] * ... * v_m[j_m, e]

(m = 1: softmax attention, the Alman-Song matrix case; m = 2: tensor attention.) The polynomial
method replaces ``exp(z - c_i)`` by a degree-g polynomial ``P(z - c_i)`` (``c_i`` a per-row centre that
cancels in the softmax), so the ``n × prod S_r`` matrix ``Ã`` has the CP form

    Ã[i, J] = sum_β U_q[i, β] U_1[j_1, β] ... U_m[j_m, β],   β ∈ N^d, |β| <= g,  k = C(d + g, g) terms

(:mod:`tensorattn.features`). Every ``n × n^m`` object is kept in CP form and contracted with the
identities of docs/math.md#products:

* normaliser ``w_i = U_q[i] · prod_r (U_r^T 1)``, output ``o = (U_q / w) (prod_r U_r^T V_r)``;
* loss gradient (Algorithm 1) through ``p1 = f∘q`` (rank k·dv) and ``p2 = diag(r) f`` (rank k),
  contracted to ``d × d^m`` via the small tensors ``T_q, T_r`` (``[d, dv, k]``) and ``S_q, S_r``
  (``[d, k]``), never forming an ``n × n^m`` or ``n × k d`` array.

Cost: time ``O((n + sum S_r) k d dv + k dv d^{m+1})``, i.e. ``O(n k d^2 + k d^4)`` for the paper's case;
extra memory ``O(chunk · k + k d dv)``: the features are built chunk by chunk over the rows.

Accuracy and safety:

* everything is computed in float64 whatever the input dtype (the monomial coefficients of Chebyshev
  fits alternate in sign, and features of degree g multiply g numbers); outputs are cast back;
* the degree is given (``degree``) or chosen (``eps``, default ``1e-6`` when neither is given) as
  the smallest *safe* degree whose max relative error of ``exp`` on ``[-R, R]`` is ``<= eps``,
  with ``R`` the largest half-width of the per-row logit intervals of
  :func:`tensorattn.features.logit_bounds`;
* **positivity policy** (docs/math.md#positivity): an explicit odd Taylor degree is *refused* with a ValueError (odd
  Taylor polynomials of exp go negative); with ``eps`` the automatic choice for Taylor only considers
  even degrees (the smallest even degree that meets ``eps``). A Chebyshev fit whose minimum on
  ``[-R, R]`` is ``<= 0`` is refused (explicit degree) or skipped (automatic choice). The computed
  normaliser is checked to be ``> 0`` on every row;
* guarantee (docs/math.md#fast-error): if ``P`` has max relative error ``ε`` on ``[-R, R]`` (``plan.rel_error``,
  ``<= eps``), every entry of the approximate softmax satisfies ``|f̃ − f| <= 2ε/(1−ε) · f`` and so
  ``|õ[i, e] − o[i, e]| <= 2ε/(1−ε) · max_J |prod_r v_r[j_r, e]|`` (up to float64 rounding).
"""
from __future__ import annotations

import math
import string
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from ._budgets import FAST_FEATURE_ELEMS
from ._validate import check_bool, check_same, check_scale, check_tensor, maybe_check_finite
from .features import (
    FAMILIES,
    check_positive,
    check_rank,
    degree_for,
    exp_coefficients,
    logit_bounds,
    monomial_features,
    multinomial_weights,
    shift_coefficients,
)
from .paper import _check_problem

__all__ = ["PolyPlan", "plan_poly", "fast_order_attn", "fast_order_loss_grad", "approx_probs",
           "fast_attention", "fast_loss_grad", "DEFAULT_EPS"]

DEFAULT_EPS = 1e-6
_ACC = torch.float64  # every path accumulates in float64
_CHUNK_ELEMS = FAST_FEATURE_ELEMS  # feature entries (rows x k) built at once


@dataclass(frozen=True)
class PolyPlan:
    """The polynomial chosen for one call.

    Attributes:
        degree: ``g``.
        family: ``"taylor"`` or ``"chebyshev"``.
        rank: ``k = C(d + g, g)``.
        radius: largest half-width ``R`` of the per-row logit intervals (after centring).
        rel_error: measured max relative error of ``P`` against ``exp`` on ``[-R, R]`` (float64 grid).
        coeffs: float64 ``[g + 1]`` monomial coefficients of ``P``.
        centre: float64 ``[n]``: the per-row centres ``c_i`` (midpoints of the logit intervals).
    """

    degree: int
    family: str
    rank: int
    radius: float
    rel_error: float
    coeffs: torch.Tensor
    centre: torch.Tensor

    @property
    def prob_bound(self) -> float:
        """Entrywise relative error bound ``2ε/(1−ε)`` of the approximate softmax."""
        e = self.rel_error
        return 2 * e / (1 - e) if e < 1 else math.inf


# --------------------------------------------------------------------------------------------------
# validation
def _check_poly_args(degree, eps, family) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if degree is not None and eps is not None:
        raise ValueError(f"give degree or eps, not both (got degree={degree!r}, eps={eps!r})")
    if degree is not None and (isinstance(degree, bool) or not isinstance(degree, int) or degree < 0):
        raise ValueError(f"degree must be None or an int >= 0, got {degree!r}")
    if eps is not None:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise TypeError(f"eps must be None or a float in (0, 1), got {type(eps).__name__}")
        if not (0 < eps < 1):
            raise ValueError(f"eps must be in (0, 1) (a max relative error of exp), got {eps}")


def _check_order_inputs(q, keys, values, E=None, *, check_finite: Optional[bool] = False) -> Tuple[int, int, int]:
    """Shapes, dtypes and devices of ``q [n, d]``, ``keys`` (m x ``[S_r, d]``), ``values`` (m x ``[S_r, dv]``, or
    ``None`` when only the keys matter: dv is then 0) and ``E [n, dv]``; then the non-finite policy."""
    check_tensor("q", q, ndim=2)
    if not isinstance(keys, (list, tuple)) or not isinstance(values, (list, tuple, type(None))):
        raise TypeError(f"keys and values must be lists (or tuples) of tensors, got {type(keys).__name__} and "
                        f"{type(values).__name__}")
    m = len(keys)
    if m < 1:
        raise ValueError("keys must hold at least one tensor (order m >= 1), got an empty sequence")
    vals = [] if values is None else list(values)
    if values is not None and len(vals) != m:
        raise ValueError(f"values must hold as many tensors as keys ({m}), got {len(vals)}")
    names = ["q"] + [f"keys[{r}]" for r in range(m)] + [f"values[{r}]" for r in range(len(vals))] \
        + (["E"] if E is not None else [])
    xs = [q, *keys, *vals] + ([E] if E is not None else [])
    for nm, x in zip(names[1:], xs[1:]):
        check_tensor(nm, x, ndim=2)
    check_same(names, xs)
    n, d = q.shape
    if n == 0 or d == 0:
        raise ValueError(f"q must have at least one row and one column, got shape {tuple(q.shape)}")
    dv = vals[0].shape[1] if vals else 0
    if vals and dv == 0:
        raise ValueError(f"values[0] must have at least one column (dv >= 1), got shape {tuple(vals[0].shape)}")
    for r in range(m):
        if keys[r].shape[1] != d:
            raise ValueError(f"keys[{r}] must have shape [S_{r}, d] with d = {d} (q's last dim), got "
                             f"{tuple(keys[r].shape)}")
        if keys[r].shape[0] == 0:
            raise ValueError(f"keys[{r}] must have at least one row, got shape {tuple(keys[r].shape)}")
        if vals and vals[r].shape != (keys[r].shape[0], dv):
            raise ValueError(f"values[{r}] must have shape [S_{r}, dv] = {(keys[r].shape[0], dv)} (keys[{r}]'s "
                             f"length, values[0]'s width), got {tuple(vals[r].shape)}")
    if E is not None and tuple(E.shape) != (n, dv):
        raise ValueError(f"E must have shape [n, dv] = {(n, dv)}, got {tuple(E.shape)}")
    maybe_check_finite(check_finite, names, xs)
    return n, d, dv


def _chunk_rows(k: int, chunk_size: Optional[int]) -> int:
    if chunk_size is None:
        return max(64, _CHUNK_ELEMS // max(1, k))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    return chunk_size


# --------------------------------------------------------------------------------------------------
# the polynomial
def plan_poly(q: torch.Tensor, keys: Sequence[torch.Tensor], *, scale: float, degree: Optional[int] = None,
              eps: Optional[float] = None, family: str = "taylor") -> PolyPlan:
    """Choose (or check) the polynomial for these inputs.

    Measures the per-row logit intervals ``[lo_i, hi_i]`` (:func:`~tensorattn.features.logit_bounds`,
    O(n d)), centres each row at its midpoint and takes ``R = max_i (hi_i − lo_i) / 2``. With ``eps``
    (or neither argument: ``eps = 1e-6``) the degree is the smallest safe one with max relative error
    ``<= eps`` on ``[-R, R]``; with ``degree`` the polynomial is checked for positivity on ``[-R, R]``
    (odd Taylor degrees are refused). Chebyshev coefficients are fitted on ``[-R, R]``.

    Args:
        q: ``[n, d]``; keys: m tensors ``[S_r, d]``; scale: multiplies the logits.
        degree, eps, family: see the module docstring.

    Returns:
        :class:`PolyPlan`.
    """
    _check_poly_args(degree, eps, family)
    lo, hi = logit_bounds(q, keys, scale)  # float64 [n]
    centre = (lo + hi) / 2
    radius = float(((hi - lo) / 2).max())
    if not math.isfinite(radius):
        raise ValueError(f"the logit bound scale * sum_l |q_il| prod_r max_j |keys[r][j, l]| is {radius}, not finite: "
                         "q or keys contain NaN/Inf (pass check_finite=True to find which) or their products "
                         f"overflow float64 (scale={scale:g})")
    d = q.shape[1]
    if degree is None:
        degree = degree_for(radius, DEFAULT_EPS if eps is None else float(eps), family, positive=True)
        how = (f"degree {degree} is what eps={DEFAULT_EPS if eps is None else eps:g} needs at the logit radius "
               f"{radius:.4g}: raise eps, pass a smaller degree, lower the head dim d = {d}, scale the inputs down, "
               "or use exact attention")
    else:
        how = f"lower degree={degree} or the head dim d = {d}"
    k = check_rank(d, degree, hint=how)  # before any feature of size k exists
    coeffs = exp_coefficients(degree, family, radius)
    err, _ = check_positive(coeffs, degree, family, radius)
    return PolyPlan(degree, family, k, radius, err, coeffs, centre)


# --------------------------------------------------------------------------------------------------
# CP pieces (all float64)
def _query_features(x: torch.Tensor, centre: torch.Tensor, plan: PolyPlan) -> torch.Tensor:
    """``U_q[i, β] = γ_{i,|β|} (|β|!/β!) x_i^β`` with ``γ_i`` the coefficients of ``P(· − c_i)``: ``[rows, k]``."""
    deg, mult = multinomial_weights(x.shape[1], plan.degree)
    gam = shift_coefficients(plan.coeffs.to(x.device), centre)  # [rows, g+1]
    return monomial_features(x, plan.degree) * mult.to(x.device) * gam.index_select(1, deg.to(x.device))


def _key_sums(K: torch.Tensor, V: torch.Tensor, A: Optional[torch.Tensor], g: int, rows: int):
    """One pass over a key stream: ``s = U^T 1`` [k], ``M = U^T V`` [k, dv] and, when ``A`` is given,
    ``T[b, t, l] = sum_j A[j, b] V[j, t] U[j, l]`` [da, dv, k] and ``S = A^T U`` [da, k]."""
    s = M = T = S = None
    for j0 in range(0, K.shape[0], rows):
        U = monomial_features(K[j0:j0 + rows], g)  # [c, k]
        Vc = V[j0:j0 + rows]  # [c, dv]
        ds, dM = U.sum(0), U.T @ Vc
        s, M = (ds, dM) if s is None else (s + ds, M + dM)
        if A is not None:
            Ac = A[j0:j0 + rows]  # [c, da]
            AV = (Ac[:, :, None] * Vc[:, None, :]).reshape(len(Ac), -1)  # [c, da*dv], never c x k*d
            dT, dS = AV.T @ U, Ac.T @ U  # [da*dv, k], [da, k]
            T, S = (dT, dS) if T is None else (T + dT, S + dS)
    if T is not None:
        T = T.reshape(A.shape[1], V.shape[1], -1)
    return s, M, T, S


def _normalised_rows(Uq: torch.Tensor, sprod: torch.Tensor) -> torch.Tensor:
    w = Uq @ sprod  # [c]: the approximate normaliser of each row
    if not bool((w > 0).all()):
        bad = int((w <= 0).sum())
        raise ValueError(f"the approximate softmax normaliser is <= 0 on {bad} row(s): the logits are too large "
                         "for the float64 polynomial expansion (catastrophic cancellation); scale the inputs down "
                         "or use exact attention")
    return Uq / w[:, None]


def _as_acc(xs):
    return [x.to(_ACC) for x in xs]


# --------------------------------------------------------------------------------------------------
# order-m API at the Q/K level
def fast_order_attn(q: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], *,
                    scale: Optional[float] = None, degree: Optional[int] = None, eps: Optional[float] = None,
                    family: str = "taylor", chunk_size: Optional[int] = None, return_plan: bool = False,
                    check_finite: Optional[bool] = None):
    """Approximate order-m attention by the polynomial method, in ``O((n + sum S_r) k dv)`` time.

    Semantics as :func:`tensorattn.naive_order_attn` (one joint softmax over all key tuples, no mask)
    for a single head, with ``exp`` replaced by the polynomial of :func:`plan_poly`::

        o ≈ naive_order_attn(q[None, :, None], [k[None, :, None] for k in keys],
                             [v[None, :, None] for v in values], scale=scale)[0, :, 0]

    Args:
        q: ``[n, d]`` queries.
        keys: m >= 1 tensors ``[S_r, d]``.
        values: m tensors ``[S_r, dv]``.
        scale: multiplies the logits; default ``1 / sqrt(d)`` (as the reference).
        degree: polynomial degree (even for Taylor), or None to choose it from ``eps``.
        eps: target max relative error of ``exp`` on the logit interval (default 1e-6 when
            ``degree`` is None too); gives the guarantee of the module docstring.
        family: ``"taylor"`` or ``"chebyshev"``.
        chunk_size: rows of features built at once (memory knob; the result does not depend on it).
        return_plan: also return the :class:`PolyPlan` (degree used, rank, measured error).
        check_finite: refuse NaN/Inf inputs (``None``: only for CPU tensors), as the exact ops.

    Returns:
        ``[n, dv]`` in q's dtype (computed in float64), and the plan when ``return_plan``.

    Raises:
        ValueError: bad inputs; or a rank ``k = C(d + g, g)`` above :data:`tensorattn.features.MAX_RANK`
            (checked before any feature is built; e.g. d = 16 with the default eps can need k ~ 6e8).
    """
    return_plan = check_bool("return_plan", return_plan)
    n, d, dv = _check_order_inputs(q, keys, values, check_finite=check_finite)
    scale = check_scale(scale, d)
    plan = plan_poly(q, keys, scale=scale, degree=degree, eps=eps, family=family)
    rows = _chunk_rows(plan.rank, chunk_size)
    qa, ks, vs = _as_acc([q])[0] * scale, _as_acc(keys), _as_acc(values)
    sprod, Mprod = 1.0, 1.0
    for K, V in zip(ks, vs):
        s, M, _, _ = _key_sums(K, V, None, plan.degree, rows)
        sprod, Mprod = sprod * s, Mprod * M  # (I5), (I2) generalised to m factors
    out = torch.empty(n, dv, dtype=_ACC, device=q.device)
    for i0 in range(0, n, rows):
        Uq = _normalised_rows(_query_features(qa[i0:i0 + rows], plan.centre[i0:i0 + rows], plan), sprod)
        out[i0:i0 + rows] = Uq @ Mprod
    out = out.to(q.dtype)
    return (out, plan) if return_plan else out


def approx_probs(q: torch.Tensor, keys: Sequence[torch.Tensor], *, scale: Optional[float] = None,
                 degree: Optional[int] = None, eps: Optional[float] = None, family: str = "taylor",
                 check_finite: Optional[bool] = None):
    """The approximate softmax ``f̃`` materialised as ``[n, S_1, ..., S_m]`` (float64; tests and tiny sizes).

    Built from the same CP factors as :func:`fast_order_attn` (``f̃ = (U_q / w) (U_1 ⊘ ... ⊘ U_m)^T``),
    so its rows sum to 1 by construction. Memory ``O(n prod S_r)``.

    Returns:
        ``(f̃, plan)``.
    """
    n, d, _ = _check_order_inputs(q, keys, None, check_finite=check_finite)
    scale = check_scale(scale, d)
    plan = plan_poly(q, keys, scale=scale, degree=degree, eps=eps, family=family)
    ks = _as_acc(keys)
    Us = [monomial_features(K, plan.degree) for K in ks]  # [S_r, k]
    sprod = math.prod(U.sum(0) for U in Us)
    Uq = _normalised_rows(_query_features(q.to(_ACC) * scale, plan.centre, plan), sprod)
    letters = string.ascii_lowercase[: len(ks)]
    eq = "il," + ",".join(f"{c}l" for c in letters) + "->i" + letters
    return torch.einsum(eq, Uq, *Us), plan


def fast_order_loss_grad(Aq: torch.Tensor, A_keys: Sequence[torch.Tensor], A_values: Sequence[torch.Tensor],
                         E: torch.Tensor, WQ: torch.Tensor, WK: Sequence[torch.Tensor],
                         WV: Sequence[torch.Tensor], *, scale: Optional[float] = None, degree: Optional[int] = None,
                         eps: Optional[float] = None, family: str = "taylor", chunk_size: Optional[int] = None,
                         return_loss: bool = False, return_plan: bool = False, check_finite: Optional[bool] = None):
    """``dLoss/dX`` of the order-m loss ``½‖Att − E‖_F²`` by the polynomial method (Algorithm 1, any m).

    Order-m version of the paper's problem: ``Q = Aq WQ``, ``K_r = A_keys[r] WK[r]``,
    ``V_r = A_values[r] WV[r]``, merged weight ``X = WQ (WK[0] ⊘ ... ⊘ WK[m-1])^T ∈ R^{d × d^m}`` so that
    the logits are ``scale · Aq X (A_keys[0] ⊗ ... ⊗ A_keys[m-1])^T``, and
    ``dLoss/dX = scale · Aq^T p (A_keys[0] ⊗ ... ⊗ A_keys[m-1])`` with ``p = f∘q − diag(r) f`` (docs/math.md#closed-form).
    With ``f ≈ f̃`` in CP form, ``p1 = f̃∘q`` has rank ``k·dv`` and ``p2`` rank ``k`` (docs/math.md#fast-gradient), and::

        G[a, b_1..b_m] = scale · ( sum_{l,t} T_q[a,t,l] prod_r T_r[b_r,t,l] − sum_l S_q[a,l] prod_r S_r[b_r,l] )

    Time ``O((n + sum S_r) k d dv + k dv d^{m+1})``; memory ``O(chunk · k + d dv k)``. As in the paper,
    this is Lemma 3.1's closed form evaluated with ``f̃`` in place of ``f``; it approximates the true
    gradient, and is *not* the derivative of the approximate loss (``P' != P``).

    Args:
        Aq: ``[n, d]``; A_keys, A_values: m tensors ``[S_r, d]``; E: ``[n, dv]`` target.
        WQ: ``[d, d]``; WK: m tensors ``[d, d]``; WV: m tensors ``[d, dv]``.
        scale: default ``1 / d`` (the paper's).
        degree, eps, family, chunk_size: as :func:`fast_order_attn`.
        return_loss: also return the (approximate) loss value.
        return_plan: also return the :class:`PolyPlan`.
        check_finite: refuse NaN/Inf in any input tensor (``None``: only for CPU tensors).

    Returns:
        ``[d, d^m]`` in Aq's dtype (computed in float64) (``G.reshape(-1)`` is the paper's ``vec``
        order), then the loss (0-dim float64 tensor) and the plan if asked.
    """
    if not isinstance(A_keys, (list, tuple)) or not isinstance(WK, (list, tuple)) \
            or not isinstance(A_values, (list, tuple)) or not isinstance(WV, (list, tuple)):
        raise TypeError("A_keys, A_values, WK and WV must be lists (or tuples) of tensors")
    return_loss = check_bool("return_loss", return_loss)
    return_plan = check_bool("return_plan", return_plan)
    m = len(A_keys)
    if m < 1:
        raise ValueError("A_keys must hold at least one tensor (order m >= 1), got an empty sequence")
    if len(WK) != m or len(A_values) != m or len(WV) != m:
        raise ValueError(f"A_keys, A_values, WK and WV must all hold m tensors; got {m}, {len(A_values)}, "
                         f"{len(WK)}, {len(WV)}")
    check_tensor("Aq", Aq, ndim=2)
    if Aq.shape[0] == 0 or Aq.shape[1] == 0:
        raise ValueError(f"Aq must have at least one row and one column, got shape {tuple(Aq.shape)}")
    check_tensor("WQ", WQ, ndim=2)
    d = Aq.shape[1]
    for nm, W in [("WQ", WQ)] + [(f"WK[{r}]", w) for r, w in enumerate(WK)]:
        check_tensor(nm, W, ndim=2)
        if d is not None and tuple(W.shape) != (d, d):
            raise ValueError(f"{nm} must have shape [d, d] = {(d, d)} (d = Aq's width), got {tuple(W.shape)}")
    for r, w in enumerate(WV):
        check_tensor(f"WV[{r}]", w, ndim=2)
        if d is not None and w.shape[0] != d:
            raise ValueError(f"WV[{r}] must have shape [d, dv] with d = {d}, got {tuple(w.shape)}")
    # reuse the Q/K-level checks on the products (shapes, lengths, dtype, device)
    for r in range(m):
        check_tensor(f"A_keys[{r}]", A_keys[r], ndim=2)
        check_tensor(f"A_values[{r}]", A_values[r], ndim=2)
        if A_values[r].shape[0] != A_keys[r].shape[0]:
            raise ValueError(f"A_values[{r}] must have as many rows as A_keys[{r}] ({A_keys[r].shape[0]}), got "
                             f"{A_values[r].shape[0]}")
    all_names = (["Aq", "WQ"] + [f"WK[{r}]" for r in range(m)] + [f"WV[{r}]" for r in range(m)] +
                 [f"A_keys[{r}]" for r in range(m)] + [f"A_values[{r}]" for r in range(m)])
    all_xs = [Aq, WQ, *WK, *WV, *A_keys, *A_values]
    check_same(all_names, all_xs)
    check_tensor("E", E, ndim=2)
    maybe_check_finite(check_finite, all_names + ["E"], all_xs + [E])
    Q = Aq @ WQ
    Ks = [A @ W for A, W in zip(A_keys, WK)]
    Vs = [A @ W for A, W in zip(A_values, WV)]
    n, d, dv = _check_order_inputs(Q, Ks, Vs, E)
    scale = 1.0 / d if scale is None else check_scale(scale, d)
    plan = plan_poly(Q, Ks, scale=scale, degree=degree, eps=eps, family=family)
    rows = _chunk_rows(plan.rank, chunk_size)
    Aqa, Qa, Ea = Aq.to(_ACC), Q.to(_ACC) * scale, E.to(_ACC)
    sprod, Mprod, Ts, Ss = 1.0, 1.0, [], []
    for A, K, V in zip(_as_acc(A_keys), _as_acc(Ks), _as_acc(Vs)):
        s, M, T, S = _key_sums(K, V, A, plan.degree, rows)
        sprod, Mprod = sprod * s, Mprod * M
        Ts.append(T)  # [d, dv, k]
        Ss.append(S)  # [d, k]
    Tq = torch.zeros(d * dv, plan.rank, dtype=_ACC, device=Aq.device)
    Sq = torch.zeros(d, plan.rank, dtype=_ACC, device=Aq.device)
    loss = torch.zeros((), dtype=_ACC, device=Aq.device)
    for i0 in range(0, n, rows):
        Uq = _normalised_rows(_query_features(Qa[i0:i0 + rows], plan.centre[i0:i0 + rows], plan), sprod)  # [c, k]
        O = Uq @ Mprod  # [c, dv]
        c = O - Ea[i0:i0 + rows]  # residual = dLoss/dOutput (stage 2)
        r = (c * O).sum(1)  # r_i = <f_i, q_i> (stage 5)
        Ac = Aqa[i0:i0 + rows]  # [c, d]
        Tq += (Ac[:, :, None] * c[:, None, :]).reshape(len(Ac), -1).T @ Uq  # stage 4 (p1 = f∘q), [d*dv, k]
        Sq += Ac.T @ (r[:, None] * Uq)  # stage 5 (p2 = diag(r) f), [d, k]
        loss = loss + 0.5 * (c * c).sum()
    Tq = Tq.reshape(d, dv, plan.rank)
    letters = string.ascii_lowercase[1: m + 1]  # a is the query-side index
    eq1 = "atl," + ",".join(f"{b}tl" for b in letters) + "->a" + letters
    eq2 = "al," + ",".join(f"{b}l" for b in letters) + "->a" + letters
    G = (torch.einsum(eq1, Tq, *Ts) - torch.einsum(eq2, Sq, *Ss)) * scale  # [d, d, ..., d]
    G = G.reshape(d, d**m).to(Aq.dtype)
    out = [G]
    if return_loss:
        out.append(loss)
    if return_plan:
        out.append(plan)
    return out[0] if len(out) == 1 else tuple(out)


# --------------------------------------------------------------------------------------------------
# the paper's interface (tensorattn.paper delegates method="fast" here)
def fast_attention(A1, A2, A3, A4, A5, WQ, WK1, WK2, WV1, WV2, *, degree=None, eps=None, family="taylor",
                   chunk_size=None, check_finite: Optional[bool] = None) -> torch.Tensor:
    """Tensor attention of Definition 2.5 (scale ``1/d``) by the polynomial method (docs/math.md#non-causal).

    ``Q = A1 WQ``, ``K1 = A2 WK1``, ``K2 = A3 WK2``, ``V1 = A4 WV1``, ``V2 = A5 WV2``, then
    :func:`fast_order_attn` with m = 2 and ``scale = 1/d``. Approximates
    ``tensorattn.paper.attention(..., method="exact")``.

    Args:
        A1..A5: ``[n, d]``; WQ, WK1, WK2, WV1, WV2: ``[d, d]``.
        degree, eps, family, chunk_size: see :func:`fast_order_attn` (even Taylor degrees only).
        check_finite: refuse NaN/Inf inputs, naming the argument (``None``: only for CPU tensors).

    Returns:
        ``[n, d]`` in the inputs' dtype; computed in float64.
    """
    n, d = _check_problem((A1, A2, A3, A4, A5), (WQ, WK1, WK2, WV1, WV2), check_finite=check_finite,
                          paper_dtypes=False)
    return fast_order_attn(A1 @ WQ, [A2 @ WK1, A3 @ WK2], [A4 @ WV1, A5 @ WV2], scale=1.0 / d, degree=degree,
                           eps=eps, family=family, chunk_size=chunk_size, check_finite=False)


def fast_loss_grad(A1, A2, A3, A4, A5, E, WQ, WK1, WK2, WV1, WV2, *, degree=None, eps=None, family="taylor",
                   chunk_size=None, check_finite: Optional[bool] = None) -> torch.Tensor:
    """``dLoss/dX`` (``[d, d²]``) of Definition 2.8 by the paper's Algorithm 1 (docs/math.md#fast-gradient).

    Five low-rank stages (f̃ in CP form, c̃ = Õ − E, q = c̃ (V1⊘V2)^T, p1 = f̃∘q of rank k·d, p2 =
    diag(r̃) f̃ of rank k), then ``G = (1/d) A1^T (p1 − p2) (A2⊗A3)`` as an explicit CP contraction
    (:func:`fast_order_loss_grad` with m = 2). Time ``O(n k d² + k d⁴)``, extra memory ``O(chunk·k)``.
    Approximates ``tensorattn.paper.loss_grad(..., method="closed_form")``.

    Args:
        A1..A5, E: ``[n, d]``; WQ, WK1, WK2, WV1, WV2: ``[d, d]``.
        degree, eps, family, chunk_size: see :func:`fast_order_attn` (even Taylor degrees only).
        check_finite: refuse NaN/Inf inputs, naming the argument (``None``: only for CPU tensors).

    Returns:
        ``[d, d²]`` in the inputs' dtype (``G.reshape(-1)`` = the paper's ``vec`` order); computed in float64.
    """
    n, d = _check_problem((A1, A2, A3, A4, A5), (WQ, WK1, WK2, WV1, WV2), E, check_finite=check_finite,
                          paper_dtypes=False)
    return fast_order_loss_grad(A1, [A2, A3], [A4, A5], E, WQ, [WK1, WK2], [WV1, WV2], scale=1.0 / d,
                                degree=degree, eps=eps, family=family, chunk_size=chunk_size, check_finite=False)
