"""Shared pieces of the polynomial op: constants, argument checks, the Taylor polynomial and the feature maps
(``_Feat``: exact monomials, built from a plan that ``torch.compile`` can trace)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._validate import values_checkable
from ..features import _plan, _apply_plan, multinomial_weights, rank, taylor_coefficients

#: Added to the normaliser (which is >= min P > 0 for even Taylor degrees) before dividing.
EPS = 1e-6
#: The largest feature rank k = C(Dk + g, g) accepted (memory of the states is 2 k (Dv + 1) floats).
MAX_RANK = 1 << 15
#: The largest Taylor degree accepted: beyond it the features (scale q)^β / β! and k^β leave the float32 range
#: for inputs of ordinary size (|x| ~ 3 at degree 40 already overflows), and exp needs no more terms for the
#: logits the polynomial method is meant for (|z| <= ~5: relative error of degree 24 < 1e-7 there).
MAX_DEGREE = 24


# --------------------------------------------------------------------------------------------------
# Checks and small helpers
# --------------------------------------------------------------------------------------------------
def _check_degree(degree) -> int:
    if isinstance(degree, bool) or not isinstance(degree, int):
        raise TypeError(f"degree must be an int (an even Taylor degree: 2, 4, ...), got {type(degree).__name__}")
    if degree < 2 or degree % 2:
        raise ValueError(f"degree must be an even integer >= 2 (odd Taylor polynomials of exp go negative, so "
                         f"the normaliser could vanish), got {degree}")
    if degree > MAX_DEGREE:
        raise ValueError(f"degree must be <= {MAX_DEGREE} (MAX_DEGREE: higher powers of the inputs overflow the "
                         f"float32 features), got {degree}")
    return degree


def _check_rank(head_dim: int, degree: int, what: str) -> int:
    k = poly_rank(head_dim, degree)
    if k > MAX_RANK:
        raise ValueError(f"the feature rank C(Dk + degree, degree) = C({head_dim} + {degree}, {degree}) = {k} exceeds "
                         f"MAX_RANK = {MAX_RANK}; lower the degree or the key dim Dk ({what})")
    return k


def _check_output(o: torch.Tensor, check_finite: Optional[bool], degree: int, scale: float) -> torch.Tensor:
    """Finite inputs (checked under the same policy) must give a finite output: else the polynomial overflowed.
    Skipped while ``torch.compile`` traces (a data-dependent branch would break the graph:
    :func:`tensorattn._validate.values_checkable`) and for meta tensors (no values)."""
    if not values_checkable() or o.device.type == "meta":
        return o
    if check_finite or (check_finite is None and o.device.type == "cpu"):
        if not bool(torch.isfinite(o).all()):
            raise ValueError(f"poly_tensor_attn overflowed: finite inputs gave a non-finite output at degree {degree} "
                             f"and scale {scale:g} (the degree-{degree} features and states outgrew the accumulation "
                             f"dtype); lower the degree, the scale or the input magnitude, or use float64 inputs")
    return o


def poly_rank(head_dim: int, degree: int) -> int:
    """Feature rank ``k = C(head_dim + degree, degree)`` of the exact monomial map used here."""
    if torch.compiler.is_compiling():  # dynamo cannot trace math.comb: the same binomial by integer steps
        k = 1
        for t in range(1, degree + 1):
            k = k * (head_dim + t) // t
        return k
    return rank(head_dim, degree)


def _with_ones(v: torch.Tensor) -> torch.Tensor:
    # [..., S, Dv] -> [..., S, Dv + 1]: the ones column turns the numerator into the normaliser
    return torch.cat([v, torch.ones_like(v[..., :1])], -1)


def _poly(z: torch.Tensor, degree: int) -> torch.Tensor:
    """Taylor polynomial of exp, Horner's rule."""
    c = taylor_coefficients(degree).tolist()
    out = torch.full_like(z, c[-1])
    for t in range(degree - 1, -1, -1):
        out = out * z + c[t]
    return out


def _static_int(n) -> int:
    """``n`` as a Python int. Under ``torch.compile(dynamic=True)`` a size is symbolic; ``len(range(n))`` makes
    dynamo specialise it (a guard, so another head dim recompiles) where the feature plan needs a constant."""
    return len(range(n))


@torch.compiler.assume_constant_result
def _feature_plan(d: int, degree: int):
    """``(parents, variables, query weights)`` of the monomial map of :func:`tensorattn.features.monomial_features`
    as Python tuples: per degree ``t = 1..g`` the monomial of degree ``t - 1`` and the variable each degree-``t``
    monomial is built from, and the query weights ``γ_|β| |β|!/β! = 1/β!`` (Taylor ``γ_t = 1/t!``). Constants for ``torch.compile``, which
    cannot trace the plan's construction (its sizes depend on tensor values)."""
    key = (int(d), int(degree))
    if key not in _PLANS:
        deg, mult = multinomial_weights(d, degree)
        p = _plan(d, degree)
        w = tuple(float(m) * (1.0 / math.factorial(int(t))) for m, t in zip(mult.tolist(), deg.tolist()))
        _PLANS[key] = (tuple(tuple(x.tolist()) for x in p.parents), tuple(tuple(x.tolist()) for x in p.vars), w)
    return _PLANS[key]


_PLANS: dict = {}  # (d, degree) -> _feature_plan's tuples (dynamo calls _feature_plan eagerly, it never traces it)


class _Feat:
    """The three feature maps: U1 = φ(scale q) / β!, U2 = φ(k1), U3 = φ(k2).

    φ is :func:`tensorattn.features.monomial_features` (the same products in the same order), computed here
    from :func:`_feature_plan` so that ``torch.compile`` traces it (the decoding step runs it outside an op)."""

    def __init__(self, d: int, degree: int, scale: float, dtype, device):
        self.degree, self.scale = degree, scale
        parents, variables, w = _feature_plan(_static_int(d), _static_int(degree))
        self.w = torch.tensor(w, dtype=torch.float64).to(dtype=dtype, device=device)  # [k]
        self._parents = [torch.tensor(a, dtype=torch.long, device=device) for a in parents]
        self._vars = [torch.tensor(b, dtype=torch.long, device=device) for b in variables]

    def q(self, x):
        return _apply_plan(x * self.scale, self._parents, self._vars) * self.w

    def k(self, x):
        return _apply_plan(x, self._parents, self._vars)


def _chunk_grads(fn, xs, grad_outs):
    """Gradients of ``fn(*xs)`` w.r.t. ``xs`` given ``grad_outs`` (a chunk's own graph, by :func:`torch.func.vjp`,
    which also runs inside a custom op's implementation, where the autograd dispatch keys are off): the backward
    of every chunked torch path that recomputes a chunk instead of keeping its graph."""
    _, vjp = torch.func.vjp(fn, *xs)
    return vjp(grad_outs if isinstance(grad_outs, torch.Tensor) else tuple(grad_outs))
