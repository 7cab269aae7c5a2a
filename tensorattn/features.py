"""Polynomial features for the polynomial method (docs/math.md#polynomial).

The fast algorithm replaces ``exp(z)`` of a logit ``z = scale * <q, k_1 ∘ ... ∘ k_m>`` by a polynomial
``P(z) = sum_{t <= g} γ_t z^t`` and expands every power with the multinomial theorem::

    z^t = sum_{|β| = t} (t! / β!) (scale q)^β k_1^β ... k_m^β          (β ∈ N^d a multi-index)

so ``P(z) = sum_β U_q[β] U_1[β] ... U_m[β]`` with query features ``U_q[β] = γ_{|β|} (|β|!/β!) (scale q)^β``
and key features ``U_r[β] = k_r^β``. The rank is the number of multi-indices of total degree ``<= g``,
``k = C(d + g, g)``, whatever the order m (docs/math.md#rank-table).

This module holds the pieces that do not depend on the attention layout:

* :func:`multi_indices`, :func:`rank`, :func:`monomial_features`: the exact monomial feature map;
* coefficient families of ``exp``: truncated Taylor (:func:`taylor_coefficients`) and Chebyshev
  interpolation on ``[-R, R]`` converted to monomial coefficients (:func:`chebyshev_coefficients`),
  both in float64;
* :func:`max_rel_error` and :func:`degree_for`: the smallest degree whose maximum relative error of
  ``exp`` on ``[-R, R]`` is ``<= eps``, measured on a dense float64 grid (docs/math.md#degree);
* positivity (docs/math.md#positivity): :func:`check_positive` refuses a polynomial that is not > 0 on the
  interval the logits occupy (odd Taylor degrees, Chebyshev fits that dip to 0);
* :func:`logit_bounds` (a cheap per-row interval that contains every logit of a query row, by
  interval arithmetic, O(n d)) and :func:`shift_coefficients` (re-centre ``P`` per row, docs/math.md#shift).

All coefficient arithmetic is float64. :func:`monomial_features` computes in the dtype of its input.
"""
from __future__ import annotations

import functools
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from ._validate import check_bool, check_tensor

__all__ = [
    "FAMILIES",
    "MAX_RANK",
    "check_rank",
    "multi_indices",
    "rank",
    "monomial_features",
    "multinomial_weights",
    "taylor_coefficients",
    "chebyshev_coefficients",
    "exp_coefficients",
    "poly_eval",
    "max_rel_error",
    "poly_min",
    "degree_for",
    "check_positive",
    "logit_bounds",
    "shift_coefficients",
]

FAMILIES = ("taylor", "chebyshev")

# Dense grid used to measure max relative errors and minima (float64). 20001 points resolve the
# equioscillation peaks of a degree <= 64 interpolant to far better than the eps we test (1e-9).
_GRID = 20001
# Chebyshev fits are made on [-max(R, _CHEB_MIN_R), ...]: fitting on a tiny interval gives huge
# monomial coefficients made of rounding noise (c_t / R^t); a wider interval is always still valid.
_CHEB_MIN_R = 0.25
MAX_DEGREE = 64
# Largest feature count k = C(d + g, g) the feature map and the fast (polynomial) method build: a chunk of 64
# float64 feature rows is then 512 MiB, and the d x d^m loss gradient holds [d * dv, k] float64 arrays.
MAX_RANK = 1 << 20


def _check_int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return int(v)


def _check_family(family) -> str:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return family


def _check_radius(radius) -> float:
    if isinstance(radius, torch.Tensor):
        radius = float(radius)
    if isinstance(radius, bool) or not isinstance(radius, (int, float, np.floating)):
        raise TypeError(f"radius must be a float, got {type(radius).__name__}")
    radius = float(radius)
    if not math.isfinite(radius) or radius < 0:
        raise ValueError(f"radius must be finite and >= 0, got {radius}")
    return radius


def check_rank(d: int, degree: int, *, max_rank: Optional[int] = None, hint: Optional[str] = None) -> int:
    """``k = C(d + degree, degree)`` if it is at most ``max_rank`` (default :data:`MAX_RANK`), else a ``ValueError``
    with the rank, the limit and what to change; checked before anything of size ``k`` is allocated."""
    limit = MAX_RANK if max_rank is None else max_rank
    k = math.comb(d + degree, degree)
    if k > limit:
        raise ValueError(f"the feature rank k = C(d + degree, degree) = C({d} + {degree}, {degree}) = {k:,} exceeds "
                         f"the limit {limit:,} (tensorattn.features.MAX_RANK), so its features would not fit in "
                         f"memory; " + (hint or "lower the degree or the head dim d"))
    return k


# --------------------------------------------------------------------------------------------------
# Monomial features
# --------------------------------------------------------------------------------------------------
class _Plan(NamedTuple):
    """Graded-lexicographic multi-indices, built degree by degree.

    Every multi-index of degree t >= 1 is ``parent + e_var`` with ``parent`` of degree t - 1 and
    ``var >= last variable of parent`` (so each index is generated exactly once, in lexicographic
    order within its degree). ``parents[t-1]``/``vars[t-1]`` index into the degree t-1 block.
    """

    beta: torch.Tensor  # [k, d] int64
    degree: torch.Tensor  # [k] int64, total degree of each row of beta
    mult: torch.Tensor  # [k] float64, |β|! / β!
    parents: List[torch.Tensor]  # per degree t = 1..g: [n_t] int64 into block t-1
    vars: List[torch.Tensor]  # per degree t = 1..g: [n_t] int64 variable multiplied in


def _plan(d: int, degree: int) -> _Plan:
    check_rank(d, degree)
    return _plan_cached(d, degree)


@functools.lru_cache(maxsize=32)
def _plan_cached(d: int, degree: int) -> _Plan:
    betas = [torch.zeros(1, d, dtype=torch.long)]
    last = [torch.zeros(1, dtype=torch.long)]  # last variable used (0 for the empty product)
    mults = [torch.ones(1, dtype=torch.float64)]
    parents, varss = [], []
    for t in range(1, degree + 1):
        counts = d - last[-1]  # parent p may be extended by variables last[p] .. d-1
        parent = torch.repeat_interleave(torch.arange(len(counts)), counts)  # [n_t]
        start = torch.repeat_interleave(last[-1], counts)
        offs = torch.arange(len(parent)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        var = start + offs  # [n_t]
        beta = betas[-1][parent].clone()
        beta[torch.arange(len(parent)), var] += 1
        # multinomial t!/β! from the parent's (t-1)!/β'!: multiply by t / β[var] (exact in float64)
        mult = mults[-1][parent] * t / beta[torch.arange(len(parent)), var].to(torch.float64)
        betas.append(beta)
        last.append(var)
        mults.append(mult)
        parents.append(parent)
        varss.append(var)
    beta = torch.cat(betas)
    deg = beta.sum(1)
    return _Plan(beta, deg, torch.cat(mults).round(), parents, varss)


def rank(d: int, degree: int, order: int = 2, kind: str = "monomial") -> int:
    """Number of features (the CP rank ``k``) of the polynomial method.

    Args:
        d: head dimension (number of variables).
        degree: polynomial degree ``g``.
        order: number of key factors ``m`` (1: matrix attention, 2: tensor attention).
        kind: ``"monomial"`` (what this library uses): ``C(d + g, g)``, independent of ``order``
            because ``z^t`` only involves ``q^β k_1^β ... k_m^β``; ``"paper"``: the bound
            ``C((m+1)(g+d), (m+1)g)`` (AS23 for m = 1, AS24b for m = 2); ``"kronecker"``: the
            non-symmetrised Kronecker-power feature map, ``sum_{t <= g} d^t``.

    Returns:
        ``int``. See docs/math.md#rank-table for a table (d = 4, g = 4: 70 | 2.70e6 | 341).
    """
    d = _check_int("d", d, 1)
    degree = _check_int("degree", degree, 0)
    order = _check_int("order", order, 1)
    if kind == "monomial":
        return math.comb(d + degree, degree)
    if kind == "paper":
        return math.comb((order + 1) * (degree + d), (order + 1) * degree)
    if kind == "kronecker":
        return sum(d**t for t in range(degree + 1))
    raise ValueError(f"kind must be 'monomial', 'paper' or 'kronecker', got {kind!r}")


def multi_indices(d: int, degree: int) -> torch.Tensor:
    """All multi-indices ``β ∈ N^d`` with ``|β| <= degree``, ordered by total degree.

    Within one degree the order is lexicographic in the sorted variable tuple
    (``itertools.combinations_with_replacement`` order). Row ``i`` is the exponent vector of
    feature ``i`` of :func:`monomial_features`.

    Args:
        d: number of variables, ``>= 1``.
        degree: maximum total degree ``g >= 0``.

    Returns:
        LongTensor ``[k, d]`` with ``k = C(d + g, g)``; row 0 is the zero index (the constant).
    """
    d = _check_int("d", d, 1)
    degree = _check_int("degree", degree, 0)
    return _plan(d, degree).beta.clone()


def multinomial_weights(d: int, degree: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(|β|, |β|!/β!)`` for every row of :func:`multi_indices`: LongTensor ``[k]``, float64 ``[k]``."""
    d = _check_int("d", d, 1)
    degree = _check_int("degree", degree, 0)
    p = _plan(d, degree)
    return p.degree.clone(), p.mult.clone()


def monomial_features(x: torch.Tensor, degree: int) -> torch.Tensor:
    """Every monomial ``x^β = prod_j x_j^{β_j}`` with ``|β| <= degree``.

    ``<mono(a) * w, mono(b)>`` with ``w = |β|!/β!`` equals ``sum_{t<=g} <a, b>^t``, and with three
    factors ``sum_β w_β a^β b^β c^β = sum_t <a, b ∘ c>^t``: the identity the polynomial method rests on.

    Args:
        x: ``[..., d]`` floating tensor (any device; autograd flows through).
        degree: ``g >= 0``.

    Returns:
        ``[..., k]`` in ``x``'s dtype, ``k = C(d + g, g)``, columns in :func:`multi_indices` order.
        Built degree by degree (each monomial = a monomial of one lower degree times one variable),
        so the cost is one multiply per output entry.
    """
    check_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have a last dimension d >= 1, got shape {tuple(x.shape)}")
    degree = _check_int("degree", degree, 0)
    p = _plan(x.shape[-1], degree)
    return _apply_plan(x, p.parents, p.vars)


def _apply_plan(x: torch.Tensor, parents, variables) -> torch.Tensor:
    """The monomials of ``x`` ``[..., d]`` built by a plan: for each degree ``t = 1..g``, monomial ``i`` of degree
    ``t`` is monomial ``parents[t-1][i]`` of degree ``t - 1`` times variable ``variables[t-1][i]`` (index
    tensors). :func:`monomial_features` runs it with the plan of :func:`multi_indices`; no checks here (callers
    that trace under ``torch.compile`` hold the plan as constants)."""
    # Work feature-major ([d, rows] -> [k, rows]): gathering whole rows is a contiguous copy, while
    # gathering columns of a row-major array is ~10x slower on the CPU.
    xt = x.reshape(-1, x.shape[-1]).T.contiguous()  # [d, rows]
    blocks = [torch.ones(1, xt.shape[1], dtype=x.dtype, device=x.device)]
    for parent, var in zip(parents, variables):
        blocks.append(blocks[-1].index_select(0, parent.to(x.device)) * xt.index_select(0, var.to(x.device)))
    feats = torch.cat(blocks, 0)  # [k, rows]
    return feats.T.reshape(*x.shape[:-1], feats.shape[0])  # [..., k] (a transposed view for 2-D x; k explicit: rows may be 0)


# --------------------------------------------------------------------------------------------------
# Coefficient families of exp
# --------------------------------------------------------------------------------------------------
def taylor_coefficients(degree: int) -> torch.Tensor:
    """Monomial coefficients ``γ_t = 1/t!`` of the degree-``g`` Taylor polynomial of ``exp`` at 0.

    Even degrees are > 0 on all of R (docs/math.md#positivity); odd degrees go negative for large negative z.

    Returns:
        float64 ``[g + 1]``.
    """
    degree = _check_int("degree", degree, 0)
    return torch.tensor([1.0 / math.factorial(t) for t in range(degree + 1)], dtype=torch.float64)


def chebyshev_coefficients(degree: int, radius: float) -> torch.Tensor:
    """Monomial coefficients of the Chebyshev interpolant of ``exp`` on ``[-R, R]``.

    Interpolates at the ``g + 1`` Chebyshev points of the first kind on ``[-R', R']`` with
    ``R' = max(R, 0.25)`` (a wider interval is still valid and avoids coefficients made of rounding
    noise), then converts to the monomial basis in ``z`` (not in ``z / R``), all in float64. Monomial
    coefficients alternate in sign; check the result with :func:`max_rel_error` and
    :func:`poly_min`, which evaluate exactly this monomial form.

    Returns:
        float64 ``[g + 1]``.
    """
    degree = _check_int("degree", degree, 0)
    r = max(_check_radius(radius), _CHEB_MIN_R)
    cheb = np.polynomial.chebyshev.chebinterpolate(lambda u: np.exp(r * u), degree)  # in u = z / r
    mono = np.polynomial.chebyshev.cheb2poly(cheb)
    mono = np.pad(mono, (0, degree + 1 - len(mono)))
    return torch.from_numpy(mono / r ** np.arange(degree + 1)).to(torch.float64)


def exp_coefficients(degree: int, family: str = "taylor", radius: Optional[float] = None) -> torch.Tensor:
    """Monomial coefficients (float64 ``[g + 1]``) of the chosen approximation of ``exp``.

    ``family="taylor"`` ignores ``radius``; ``family="chebyshev"`` needs it (the fit interval).
    """
    family = _check_family(family)
    if family == "taylor":
        return taylor_coefficients(degree)
    if radius is None:
        raise ValueError("family='chebyshev' needs radius (the fit interval is [-radius, radius]), got None")
    return chebyshev_coefficients(degree, radius)


def poly_eval(coeffs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``sum_t coeffs[..., t] z^t`` by Horner's rule (coefficients broadcast against ``z``)."""
    out = torch.zeros_like(z) + coeffs[..., -1]
    for t in range(coeffs.shape[-1] - 2, -1, -1):
        out = out * z + coeffs[..., t]
    return out


def _grid(radius: float) -> torch.Tensor:
    return torch.linspace(-radius, radius, _GRID, dtype=torch.float64)


def max_rel_error(coeffs: torch.Tensor, radius: float) -> float:
    """``max |P(z) - e^z| / e^z`` over a dense float64 grid of ``[-radius, radius]`` (endpoints included)."""
    radius = _check_radius(radius)
    z = _grid(radius)
    return float(((poly_eval(coeffs.to(torch.float64), z) - torch.exp(z)).abs() * torch.exp(-z)).max())


def poly_min(coeffs: torch.Tensor, radius: float) -> float:
    """Minimum of ``P`` over a dense float64 grid of ``[-radius, radius]``."""
    radius = _check_radius(radius)
    return float(poly_eval(coeffs.to(torch.float64), _grid(radius)).min())


@functools.lru_cache(maxsize=256)
def _degree_for(radius: float, eps: float, family: str, positive: bool, max_degree: int) -> int:
    step = 2 if (positive and family == "taylor") else 1
    best = math.inf
    for g in range(0, max_degree + 1, step):
        c = exp_coefficients(g, family, radius)
        err = max_rel_error(c, radius)
        best = min(best, err)
        if err <= eps and (not positive or poly_min(c, radius) > 0):
            return g
    raise ValueError(
        f"no {family} polynomial of degree <= {max_degree} approximates exp on [-{radius:.4g}, {radius:.4g}] "
        f"to relative error eps={eps:.3g} in float64 (best {best:.3g}); the logit radius is too large for "
        "the polynomial method (docs/math.md#degree: it needs bounded entries), use exact attention or smaller inputs")


def degree_for(radius: float, eps: float, family: str = "taylor", *, positive: bool = False,
               max_degree: int = MAX_DEGREE) -> int:
    """Smallest degree ``g`` whose polynomial has max relative error ``<= eps`` for ``exp`` on ``[-radius, radius]``.

    Measured numerically (float64, dense grid, the monomial form actually used), so it agrees with
    docs/math.md#degree: e.g. radius 1, eps 1e-6 gives 9 (Taylor) and 7 (Chebyshev).

    Args:
        radius: half-width ``R >= 0`` of the logit interval (after centring).
        eps: target max relative error, ``0 < eps < 1``.
        family: ``"taylor"`` or ``"chebyshev"`` (fitted on ``[-radius, radius]``).
        positive: only accept polynomials that are safe for a normaliser: for Taylor, even degrees
            (positive on all of R); for Chebyshev, a fit whose minimum on the interval is > 0 (implied
            by a relative error < 1, checked anyway).
        max_degree: give up above this degree.

    Returns:
        ``int`` degree.

    Raises:
        ValueError: when no degree ``<= max_degree`` reaches ``eps`` (radius too large).
    """
    radius = _check_radius(radius)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float in (0, 1), got {type(eps).__name__}")
    if not (0 < eps < 1):
        raise ValueError(f"eps must be in (0, 1) (a relative error), got {eps}")
    family = _check_family(family)
    positive = check_bool("positive", positive)
    max_degree = _check_int("max_degree", max_degree, 0)
    return _degree_for(radius, float(eps), family, positive, max_degree)


def check_positive(coeffs: torch.Tensor, degree: int, family: str, radius: float) -> Tuple[float, float]:
    """Refuse a polynomial that could make the attention normaliser ``<= 0`` (docs/math.md#positivity).

    Policy (the same everywhere in tensorattn): an odd Taylor degree is *refused* (it is negative for
    large negative z), not silently bumped; a Chebyshev fit is refused when its minimum on the
    interval ``[-radius, radius]`` that the centred logits occupy is ``<= 0``.

    Returns:
        ``(max relative error, minimum)`` of the polynomial on ``[-radius, radius]``.

    Raises:
        ValueError: naming ``degree``, what is needed and what was given.
    """
    if family == "taylor" and degree % 2 == 1:
        raise ValueError(f"degree must be even for family='taylor' (odd Taylor polynomials of exp go negative, "
                         f"which can make the softmax normaliser <= 0), got degree={degree}; use {degree + 1}")
    err, lo = max_rel_error(coeffs, radius), poly_min(coeffs, radius)
    if lo <= 0:
        raise ValueError(f"degree={degree} with family={family!r} gives a polynomial whose minimum on the logit "
                         f"interval [-{radius:.4g}, {radius:.4g}] is {lo:.3g} <= 0 (max relative error {err:.3g}); "
                         "the normaliser could be <= 0: use a higher degree")
    return err, lo


# --------------------------------------------------------------------------------------------------
# Per-row logit bounds and re-centring
# --------------------------------------------------------------------------------------------------
def logit_bounds(q: torch.Tensor, keys: Sequence[torch.Tensor], scale: float = 1.0
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-query interval ``[lo_i, hi_i]`` containing every logit ``scale * <q_i, k_1[j_1] ∘ ... ∘ k_m[j_m]>``.

    Interval arithmetic, O((n + sum S_r) d): for each coordinate l, the product ``prod_r k_r[j_r, l]``
    lies in the product of the intervals ``[min_j k_r[j, l], max_j k_r[j, l]]``; multiplying by
    ``scale * q_il`` and summing over l bounds the logit. It is never looser than the symmetric
    bound ``sum_l |q_il| prod_r max_j |k_r[j, l]|`` and is one-sided when the keys are (e.g. positive keys).

    Args:
        q: ``[n, d]``.
        keys: m tensors ``[S_r, d]``.
        scale: multiplies the logit.

    Returns:
        ``(lo, hi)``, float64 ``[n]`` each.
    """
    plo = phi = None
    for k in keys:
        k = k.to(torch.float64)
        klo, khi = k.min(0).values, k.max(0).values  # [d]
        if plo is None:
            plo, phi = klo, khi
        else:
            cands = torch.stack([plo * klo, plo * khi, phi * klo, phi * khi])  # [4, d]
            plo, phi = cands.min(0).values, cands.max(0).values
    s = q.to(torch.float64) * float(scale)  # [n, d]
    a, b = s * plo, s * phi  # [n, d]
    return torch.minimum(a, b).sum(-1), torch.maximum(a, b).sum(-1)


def shift_coefficients(coeffs: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Coefficients of ``z -> P(z - centre_i)`` in powers of ``z``, one row per centre.

    ``P(z - m) = sum_s z^s sum_{t >= s} γ_t C(t, s) (-m)^{t - s}``, so the re-centred polynomial is
    still a degree-g polynomial in z and its row-dependent coefficients go into the query features
    (docs/math.md#shift); the factor ``e^{-m_i}`` it removes cancels in the softmax. Conditioning: the
    expansion loses roughly ``2 |m| / ln 10`` decimal digits, harmless for |m| of a few units.

    Args:
        coeffs: float64 ``[g + 1]``.
        centre: ``[n]``.

    Returns:
        float64 ``[n, g + 1]``.
    """
    g = coeffs.shape[-1] - 1
    c = coeffs.to(torch.float64)
    m = centre.to(torch.float64)
    powers = torch.stack([(-m) ** p for p in range(g + 1)], -1)  # [n, g+1]
    out = torch.empty(len(m), g + 1, dtype=torch.float64, device=m.device)
    for s in range(g + 1):
        binom = torch.tensor([math.comb(t, s) for t in range(s, g + 1)], dtype=torch.float64, device=m.device)
        out[:, s] = powers[:, : g + 1 - s] @ (c[s:].to(m.device) * binom)
    return out
