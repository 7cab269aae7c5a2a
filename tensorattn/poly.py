"""Fast (polynomial) tensor attention: a differentiable, causal or non-causal, linear-time op.

Semantics
---------
Exact tensor attention (:func:`tensorattn.naive.naive_tensor_attn`) weighs every visible key pair
``(j1, j2)`` of query ``i`` by ``exp(z)`` with ``z = scale * <q_i, k1_j1 ∘ k2_j2>``. This op replaces
``exp`` by its degree-``g`` Taylor polynomial ``P(z) = sum_{t<=g} z^t / t!`` (docs/math.md#polynomial) and keeps
everything else (same visibility, same ``[B, T, H, D]`` layout, same GQA rule)::

    o[i, e] = sum_{visible (j1, j2)} P(z[i, j1, j2]) * v1[j1, e] * v2[j2, e]
              / (eps + sum_{visible (j1, j2)} P(z[i, j1, j2]))

Only even degrees are allowed: an even Taylor polynomial of exp is > 0 on all of R (``T2 >= 1/2``,
``T4 >= 0.27``, docs/math.md#positivity), so the normaliser is at least ``min P > 0`` times the number of visible
pairs, whatever the logits. ``eps = 1e-6`` (:data:`EPS`) only guards against a normaliser lost to
underflow; it is included in the reference :func:`naive_poly_tensor_attn` too, so the two compute the
same function.

How it is computed (never the ``T x S1 x S2`` scores)
---------------------------------------------------
Feature map: exact monomials (:mod:`tensorattn.features`), rank ``k = C(Dk + g, g)`` (153 for Dk=16,
g=2; 2145 for Dk=64, g=2; 4845 for Dk=16, g=4). With ``U1 = φ_q(scale q)`` (weights ``1/β!``),
``U2 = φ(k1)``, ``U3 = φ(k2)``: ``P(z[i,j1,j2]) = sum_m U1[i,m] U2[j1,m] U3[j2,m]`` exactly. Append a
column of ones to v1 and v2 (``Dv' = Dv + 1``): the last output column is then the normaliser.

* non-causal: ``A2 = U2^T [v1, 1]``, ``A3 = U3^T [v2, 1]`` (``[k, Dv']`` each) and
  ``num = U1 (A2 ∘ A3)`` (docs/math.md#non-causal), chunk by chunk over the rows.
* causal (docs/math.md#chunks): for query ``i`` in chunk ``c`` (positions ``c0 .. c0+C-1``) the visible
  pairs ``{j1 <= i} x {j2 <= i}`` split into four blocks by whether each key lies before the chunk (B)
  or inside it at or before ``i`` (W)::

      (B,B): U1[i] · (A2 ∘ A3)                                  A2, A3: running states before c
      (B,W): sum_{j2 in W(i)} v2[j2] ∘ ((U1[i] ∘ U3[j2]) A2)    C x C pairs, one matrix product
      (W,B): sum_{j1 in W(i)} v1[j1] ∘ ((U1[i] ∘ U2[j1]) A3)
      (W,W): sum_{j1, j2 in W(i)} P(z[i,j1,j2]) v1[j1] ∘ v2[j2] the exact polynomial, C^3 per chunk

  then ``A2 += U2_c^T [v1_c, 1]``, ``A3 += U3_c^T [v2_c, 1]``. Nothing larger than a chunk is stored:
  the states are ``2 k Dv'`` floats per (batch, kv head). Time ``O(T (C k Dv + C^2 (Dk + Dv)))``.
* backward (by hand, docs/math.md#chunk-parallel): the gradient of ``o = num / den`` w.r.t. ``num'`` is
  ``G = [dO / den, -<dO, o> / den]``; a reverse pass over chunks carries ``dA2, dA3`` (the gradient
  of the later chunks w.r.t. the states) and recovers ``A2(c), A3(c)`` by subtracting each chunk's
  update from checkpoints saved every ``ckpt`` chunks by the forward pass (so the subtraction never
  runs for more than ``ckpt`` chunks: no drift). Feature Jacobians are applied chunk by chunk.
* causal on CUDA with small states (``B Hkv k (Dv + 1) <= 2^17``, e.g. Dk < 16 where the fused kernel
  does not apply): the scan (:func:`_scan_fwd`, :func:`_scan_bwd`, custom ops ``poly_scan_fwd/bwd``) instead: running sums ``P + cumsum(U2 ⊗ [v1, 1])`` of
  a chunk of ~``2^26 / (B Hkv k Dv')`` positions at once (a few large kernels instead of a Python loop over
  32-position chunks: 68x faster on an H100 at Dk = 4, T = 262K), the backward recomputing each chunk.
  The same scan, started from the ranks' prefix state, is the local part of
  :func:`tensorattn.distributed.cp_poly_tensor_attn`.

Accumulation dtype: float32 (float64 for float64 inputs) everywhere: features, states, products.

Decoding (:class:`PolyTensorAttnState`, :func:`poly_tensor_attn_step`): the causal form as a
recurrence; the state is ``A2, A3`` of shape ``[B, Hkv, k, Dv + 1]`` float32, i.e.
``2 * k * (Dv + 1)`` floats per (batch, kv head), independent of the sequence length
(Dk=16, Dv=64, g=2: 2 * 153 * 65 * 4 B = 78 KiB).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ._validate import (check_attn_inputs, check_cu_seqlens, check_same, check_scale, check_tensor, maybe_check_finite,
                        values_checkable)
from .dispatch import Backend, autocast_off, choose, refuse_double_backward_op, triton_device_reasons
from .features import _plan, _apply_plan, multinomial_weights, rank, taylor_coefficients
from .packing import check_no_max_seqlen, run_per_document

__all__ = [
    "poly_tensor_attn",
    "naive_poly_tensor_attn",
    "PolyTensorAttnState",
    "poly_tensor_attn_step",
    "poly_rank",
    "BACKENDS",
    "EPS",
    "MAX_RANK",
    "MAX_DEGREE",
]

#: Added to the normaliser (which is >= min P > 0 for even Taylor degrees) before dividing.
EPS = 1e-6
#: The largest feature rank k = C(Dk + g, g) accepted (memory of the states is 2 k (Dv + 1) floats).
MAX_RANK = 1 << 15
#: The largest Taylor degree accepted: beyond it the features (scale q)^β / β! and k^β leave the float32 range
#: for inputs of ordinary size (|x| ~ 3 at degree 40 already overflows), and exp needs no more terms for the
#: logits the polynomial method is meant for (|z| <= ~5: relative error of degree 24 < 1e-7 there).
MAX_DEGREE = 24
_TORCH_CHUNK = 32
# Non-causal rows per chunk: as many as keep one [B, H, rows, k] feature block under this many entries.
# (The causal path needs small chunks for its C^3 intra-chunk term; the non-causal one is plain products.)
_FULL_BLOCK_ELEMS = 1 << 24


def _full_chunk(B: int, H: int, k: int, chunk: int) -> int:
    return max(chunk, _FULL_BLOCK_ELEMS // max(1, B * H * k))
_TORCH_CKPT = 16


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


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _heads_first(x: torch.Tensor, groups: int, acc: torch.dtype) -> torch.Tensor:
    # [B, S, Hkv, D] -> [B, Hq, S, D] in the accumulation dtype; query head h reads kv head h // groups
    x = x.transpose(1, 2).to(acc)
    return x.repeat_interleave(groups, dim=1) if groups > 1 else x


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


# --------------------------------------------------------------------------------------------------
# Reference: materialises the [T, S1, S2] polynomial scores (tests only)
# --------------------------------------------------------------------------------------------------
def naive_poly_tensor_attn(q, k1, k2, v1, v2, *, degree: int = 2, causal: bool = False, scale=None, eps: float = EPS,
                           check_finite: Optional[bool] = None):
    """Plain reference of :func:`poly_tensor_attn`: the same math, with the scores materialised.

    ``o[i] = sum P(z) v1[j1] ∘ v2[j2] / (eps + sum P(z))`` over the visible pairs, ``P`` the degree-``g``
    Taylor polynomial of exp, ``z = scale <q_i, k1_j1 ∘ k2_j2>``. Memory ``Θ(B H T S1 S2)``: tiny shapes only.

    Args:
        q: ``[B, T, Hq, Dk]``; k1, k2: ``[B, S1, Hkv, Dk]``, ``[B, S2, Hkv, Dk]``;
        v1, v2: ``[B, S1, Hkv, Dv]``, ``[B, S2, Hkv, Dv]``.
        degree: even Taylor degree. causal: ``j1 <= i`` and ``j2 <= i``. scale: default ``1/sqrt(Dk)``.
        check_finite: as in :func:`poly_tensor_attn`.

    Returns:
        ``[B, T, Hq, Dv]`` in q's dtype; accumulates in float32 (float64 for float64 inputs).
    """
    B, T, Hq, Hkv, D, Dv, S1, S2, _ = check_attn_inputs(q, k1, k2, v1, v2, causal=causal, check_finite=check_finite)
    degree = _check_degree(degree)
    scale = check_scale(scale, D)
    acc, g = _acc(q.dtype), Hq // Hkv
    qh = q.transpose(1, 2).to(acc)
    k1h, k2h, v1h, v2h = (_heads_first(x, g, acc) for x in (k1, k2, v1, v2))
    z = scale * torch.einsum("bhid,bhjd,bhkd->bhijk", qh, k1h, k2h)  # [B, H, T, S1, S2]
    p = _poly(z, degree)
    if causal:
        i = torch.arange(T, device=q.device)
        vis = (i[None, :] <= i[:, None])[:, :, None] & (i[None, :] <= i[:, None])[:, None, :]
        p = p * vis
    num = torch.einsum("bhijk,bhje,bhke->bhie", p, v1h, v2h)
    den = p.sum((-1, -2))[..., None] + eps
    return (num / den).transpose(1, 2).to(q.dtype)


# --------------------------------------------------------------------------------------------------
# Torch path: chunked forward and hand-written backward ([B, H, T, D] inside)
# --------------------------------------------------------------------------------------------------
def _ww_num(qc, k1c, k2c, v1c, v2c, degree, scale, mask):
    """(W,W) block: exact polynomial over the pairs inside one chunk. [B,H,C,*] -> [B,H,C,Dv']."""
    z = scale * torch.einsum("bhid,bhjd,bhkd->bhijk", qc, k1c, k2c)  # [B, H, C, C, C]
    p = _poly(z, degree) * (mask[:, :, None] & mask[:, None, :])
    return torch.einsum("bhijk,bhje,bhke->bhie", p, v1c, v2c)


def _causal_fwd(qh, k1h, k2h, v1h, v2h, feat: _Feat, chunk: int, ckpt: int):
    """Returns num' ``[B, H, T, Dv']`` and the state checkpoints (list of (A2, A3) every ckpt chunks)."""
    B, H, T, _ = qh.shape
    k = feat.w.numel()
    Dp = v1h.shape[-1]
    A2 = qh.new_zeros(B, H, k, Dp)
    A3 = qh.new_zeros(B, H, k, Dp)
    num = qh.new_empty(B, H, T, Dp)
    ckpts = []
    n_chunks = -(-T // chunk)
    for c in range(n_chunks):
        if c % ckpt == 0:
            ckpts.append((A2.clone(), A3.clone()))
        s0, s1 = c * chunk, min(T, (c + 1) * chunk)
        n = s1 - s0
        mask = torch.ones(n, n, dtype=torch.bool, device=qh.device).tril()  # [i, j]: j <= i
        qc, k1c, k2c, v1c, v2c = (x[:, :, s0:s1] for x in (qh, k1h, k2h, v1h, v2h))
        U1, U2, U3 = feat.q(qc), feat.k(k1c), feat.k(k2c)  # [B, H, n, k]
        out = U1 @ (A2 * A3)  # (B,B)
        m = mask.to(qh.dtype)[:, :, None]
        X13 = U1[:, :, :, None, :] * U3[:, :, None, :, :]  # [B, H, i, j2, k]
        out = out + ((X13 @ A2[:, :, None]) * v2c[:, :, None] * m).sum(3)  # (B,W)
        X12 = U1[:, :, :, None, :] * U2[:, :, None, :, :]  # [B, H, i, j1, k]
        out = out + ((X12 @ A3[:, :, None]) * v1c[:, :, None] * m).sum(3)  # (W,B)
        out = out + _ww_num(qc, k1c, k2c, v1c, v2c, feat.degree, feat.scale, mask)  # (W,W)
        num[:, :, s0:s1] = out
        A2 = A2 + U2.transpose(-1, -2) @ v1c
        A3 = A3 + U3.transpose(-1, -2) @ v2c
    ckpts.append((A2, A3))  # final state, used as the start of the reverse pass
    return num, ckpts


def _causal_bwd(qh, k1h, k2h, v1h, v2h, G, feat: _Feat, chunk: int, ckpt: int, ckpts):
    """Gradients w.r.t. qh, k1h, k2h, v1h', v2h' (the ones column included) given G = dLoss/dnum'."""
    B, H, T, _ = qh.shape
    n_chunks = -(-T // chunk)
    dq, dk1, dk2 = torch.zeros_like(qh), torch.zeros_like(k1h), torch.zeros_like(k2h)
    dv1, dv2 = torch.zeros_like(v1h), torch.zeros_like(v2h)
    A2n, A3n = ckpts[-1]  # A(c + 1), starting at the final state
    dA2 = torch.zeros_like(A2n)
    dA3 = torch.zeros_like(A3n)
    for c in range(n_chunks - 1, -1, -1):
        s0, s1 = c * chunk, min(T, (c + 1) * chunk)
        n = s1 - s0
        mask = torch.ones(n, n, dtype=torch.bool, device=qh.device).tril()
        m = mask.to(qh.dtype)
        def chunk_fn(qc, k1c, k2c, v1c, v2c):
            return feat.q(qc), feat.k(k1c), feat.k(k2c), _ww_num(qc, k1c, k2c, v1c, v2c, feat.degree, feat.scale, mask)

        # torch.func.vjp rather than torch.autograd.grad: it also works inside the custom op, where autograd is off
        xs = [x[:, :, s0:s1] for x in (qh, k1h, k2h, v1h, v2h)]
        (u1, u2, u3, _), chunk_vjp = torch.func.vjp(chunk_fn, *xs)
        Gc = G[:, :, s0:s1]  # [B, H, n, Dv']
        v1d, v2d = xs[3], xs[4]
        # states before this chunk: exact checkpoint or one subtraction from the state after it
        if c % ckpt == 0:
            A2, A3 = ckpts[c // ckpt]
        else:
            A2 = A2n - u2.transpose(-1, -2) @ v1d
            A3 = A3n - u3.transpose(-1, -2) @ v2d
        # keys of this chunk seen through the states by all later queries
        dU2 = v1d @ dA2.transpose(-1, -2)
        dV1 = u2 @ dA2
        dU3 = v2d @ dA3.transpose(-1, -2)
        dV2 = u3 @ dA3
        # (B,B)
        dU1 = Gc @ (A2 * A3).transpose(-1, -2)
        R = u1.transpose(-1, -2) @ Gc  # [B, H, k, Dv']
        dA2 = dA2 + R * A3
        dA3 = dA3 + R * A2
        # (B,W): sum_{j2<=i} v2[j2] ∘ ((U1[i] ∘ U3[j2]) A2)
        X = u1[:, :, :, None, :] * u3[:, :, None, :, :]  # [B, H, i, j2, k]
        Z = Gc[:, :, :, None, :] * v2d[:, :, None, :, :] * m[:, :, None]  # [B, H, i, j2, Dv']
        Y = Z @ A2[:, :, None].transpose(-1, -2)  # [B, H, i, j2, k]
        dU1 = dU1 + (Y * u3[:, :, None]).sum(3)
        dU3 = dU3 + (Y * u1[:, :, :, None]).sum(2)
        dV2 = dV2 + ((X @ A2[:, :, None]) * Gc[:, :, :, None] * m[:, :, None]).sum(2)
        dA2 = dA2 + torch.einsum("bhijm,bhije->bhme", X, Z)
        # (W,B): sum_{j1<=i} v1[j1] ∘ ((U1[i] ∘ U2[j1]) A3)
        X = u1[:, :, :, None, :] * u2[:, :, None, :, :]
        Z = Gc[:, :, :, None, :] * v1d[:, :, None, :, :] * m[:, :, None]
        Y = Z @ A3[:, :, None].transpose(-1, -2)
        dU1 = dU1 + (Y * u2[:, :, None]).sum(3)
        dU2 = dU2 + (Y * u1[:, :, :, None]).sum(2)
        dV1 = dV1 + ((X @ A3[:, :, None]) * Gc[:, :, :, None] * m[:, :, None]).sum(2)
        dA3 = dA3 + torch.einsum("bhijm,bhije->bhme", X, Z)
        # (W,W) and the feature Jacobians, by autograd on this chunk only
        gq, gk1, gk2, gv1, gv2 = chunk_vjp((dU1, dU2, dU3, Gc))
        dq[:, :, s0:s1] = gq
        dk1[:, :, s0:s1] = gk1
        dk2[:, :, s0:s1] = gk2
        dv1[:, :, s0:s1] = gv1 + dV1
        dv2[:, :, s0:s1] = gv2 + dV2
        A2n, A3n = A2, A3
    return dq, dk1, dk2, dv1, dv2


def _full_fwd(qh, k1h, k2h, v1h, v2h, feat: _Feat, chunk: int):
    """Non-causal: states over all keys, then num' = U1 (A2 ∘ A3), both chunk by chunk."""
    A2 = sum(feat.k(k1h[:, :, s:s + chunk]).transpose(-1, -2) @ v1h[:, :, s:s + chunk]
             for s in range(0, k1h.shape[2], chunk))
    A3 = sum(feat.k(k2h[:, :, s:s + chunk]).transpose(-1, -2) @ v2h[:, :, s:s + chunk]
             for s in range(0, k2h.shape[2], chunk))
    A23 = A2 * A3
    num = torch.cat([feat.q(qh[:, :, s:s + chunk]) @ A23 for s in range(0, qh.shape[2], chunk)], 2)
    return num, [(A2, A3)]


def _vjp_rows(fn, x, g):
    return torch.func.vjp(fn, x)[1](g)[0]


def _full_bwd(qh, k1h, k2h, v1h, v2h, G, feat: _Feat, chunk: int, states):
    A2, A3 = states[0]
    A23 = A2 * A3
    dq = torch.empty_like(qh)
    R = 0
    for s in range(0, qh.shape[2], chunk):
        sl = slice(s, s + chunk)
        Gc = G[:, :, sl]
        dq[:, :, sl] = _vjp_rows(feat.q, qh[:, :, sl], Gc @ A23.transpose(-1, -2))
        R = R + feat.q(qh[:, :, sl]).transpose(-1, -2) @ Gc  # [B, H, k, Dv']
    dA2, dA3 = R * A3, R * A2
    grads = []
    for kh, vh, dA in ((k1h, v1h, dA2), (k2h, v2h, dA3)):
        dk, dv = torch.empty_like(kh), torch.empty_like(vh)
        for s in range(0, kh.shape[2], chunk):
            sl = slice(s, s + chunk)
            dk[:, :, sl] = _vjp_rows(feat.k, kh[:, :, sl], vh[:, :, sl] @ dA.transpose(-1, -2))
            dv[:, :, sl] = feat.k(kh[:, :, sl]) @ dA
        grads += [dk, dv]
    return dq, grads[0], grads[2], grads[1], grads[3]


def _reduce_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    # [B, Hq, S, D] gradient of the expanded kv -> [B, S, Hkv, D]
    B, Hq, S, D = x.shape
    if groups > 1:
        x = x.view(B, Hq // groups, groups, S, D).sum(2)
    return x.transpose(1, 2)


def _torch_heads(q, k1, k2, v1, v2):
    """The five inputs ``[B, S, H, D]`` as ``[B, Hq, S, D]`` in the accumulation dtype, ones appended to v1, v2."""
    g = q.shape[2] // k1.shape[2]
    acc = _acc(q.dtype)
    qh = q.transpose(1, 2).to(acc)
    k1h, k2h = _heads_first(k1, g, acc), _heads_first(k2, g, acc)
    v1h, v2h = _with_ones(_heads_first(v1, g, acc)), _with_ones(_heads_first(v2, g, acc))
    return qh, k1h, k2h, v1h, v2h


def _torch_fwd(q, k1, k2, v1, v2, degree, causal, scale, chunk, ckpt):
    """The torch path's forward: ``(o [B, Hq, T, Dv], den [B, Hq, T], states)`` in the accumulation dtype, the
    states a list of ``(A2, A3)`` (the checkpoints of the causal pass, or the totals of the non-causal one)."""
    B, T, Hq, D = q.shape
    Dv = v1.shape[3]
    qh, k1h, k2h, v1h, v2h = _torch_heads(q, k1, k2, v1, v2)
    feat = _Feat(D, degree, scale, qh.dtype, q.device)
    if causal:
        num, states = _causal_fwd(qh, k1h, k2h, v1h, v2h, feat, chunk, ckpt)
    else:
        num, states = _full_fwd(qh, k1h, k2h, v1h, v2h, feat, _full_chunk(B, Hq, poly_rank(D, degree), chunk))
    den = num[..., Dv] + EPS  # [B, H, T]
    o = num[..., :Dv] / den[..., None]  # [B, H, T, Dv]
    return o, den, states


def _torch_bwd(do, q, k1, k2, v1, v2, o, den, states, degree, causal, scale, chunk, ckpt):
    """The torch path's backward given ``do`` ``[B, Hq, T, Dv]`` (the gradient of :func:`_torch_fwd`'s ``o``):
    ``(dq, dk1, dk2, dv1, dv2)`` in the inputs' dtypes."""
    B, T, Hq, D = q.shape
    g = Hq // k1.shape[2]
    do = do.to(o.dtype)
    # o = num / den  =>  dnum = dO / den, dden = -<dO, o> / den
    G = torch.cat([do, -(do * o).sum(-1, keepdim=True)], -1) / den[..., None]  # [B, H, T, Dv']
    qh, k1h, k2h, v1h, v2h = _torch_heads(q, k1, k2, v1, v2)
    feat = _Feat(D, degree, scale, o.dtype, q.device)
    if causal:
        dq, dk1, dk2, dv1, dv2 = _causal_bwd(qh, k1h, k2h, v1h, v2h, G, feat, chunk, ckpt, states)
    else:
        dq, dk1, dk2, dv1, dv2 = _full_bwd(qh, k1h, k2h, v1h, v2h, G, feat,
                                           _full_chunk(B, Hq, poly_rank(D, degree), chunk), states)
    dv1, dv2 = dv1[..., :-1], dv2[..., :-1]  # the ones column is not an input
    return (dq.transpose(1, 2).to(q.dtype), _reduce_groups(dk1, g).to(k1.dtype), _reduce_groups(dk2, g).to(k2.dtype),
            _reduce_groups(dv1, g).to(v1.dtype), _reduce_groups(dv2, g).to(v2.dtype))


# Custom ops (torch.library) of the torch path: what poly_tensor_attn calls, one opaque node each under
# torch.compile. The states are stacked into one [n, 2, B, Hq, k, Dv + 1] tensor (n known from the shapes).
def _n_states(T, causal: bool, chunk: int, ckpt: int):
    if not causal:
        return 1
    n_chunks = -(-T // chunk)
    return -(-n_chunks // ckpt) + 1


@torch.library.custom_op("tensorattn::poly_fwd", mutates_args=())
def poly_fwd_op(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor, degree: int,
                causal: bool, scale: float, chunk: int, ckpt: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch-path forward of :func:`poly_tensor_attn` (validated inputs, ``B, T >= 1``): ``(o [B, Hq, T, Dv],
    den [B, Hq, T], states [n, 2, B, Hq, k, Dv + 1])`` in the accumulation dtype (float32; float64 for float64),
    autocast off. ``o`` is the output (transpose it to ``[B, T, Hq, Dv]``); den and the states are for the
    backward."""
    with autocast_off(q.device.type), torch.no_grad():
        o, den, states = _torch_fwd(q, k1, k2, v1, v2, degree, causal, scale, chunk, ckpt)
        return o.contiguous(), den.contiguous(), torch.stack([torch.stack(st) for st in states])


@poly_fwd_op.register_fake
def _poly_fwd_fake(q, k1, k2, v1, v2, degree, causal, scale, chunk, ckpt):
    B, T, Hq, D = q.shape
    Dv, acc = v1.shape[3], _acc(q.dtype)
    k = poly_rank(int(D), degree)
    return (q.new_empty(B, Hq, T, Dv, dtype=acc), q.new_empty(B, Hq, T, dtype=acc),
            q.new_empty(_n_states(T, causal, chunk, ckpt), 2, B, Hq, k, Dv + 1, dtype=acc))


@torch.library.custom_op("tensorattn::poly_bwd", mutates_args=())
def poly_bwd_op(do: torch.Tensor, q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v1: torch.Tensor,
                v2: torch.Tensor, o: torch.Tensor, den: torch.Tensor, states: torch.Tensor, degree: int, causal: bool,
                scale: float, chunk: int, ckpt: int
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch-path backward of :func:`poly_tensor_attn` given ``do`` ``[B, Hq, T, Dv]``: the five input gradients
    (their dtypes, contiguous). Not differentiable: differentiating its outputs raises."""
    with autocast_off(q.device.type), torch.no_grad():
        grads = _torch_bwd(do, q, k1, k2, v1, v2, o, den, [(s[0], s[1]) for s in states.unbind(0)], degree, causal,
                           scale, chunk, ckpt)
        return tuple(g.contiguous() for g in grads)


@poly_bwd_op.register_fake
def _poly_bwd_fake(do, q, k1, k2, v1, v2, o, den, states, degree, causal, scale, chunk, ckpt):
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k1, k2, v1, v2))


def _poly_setup_context(ctx, inputs, output):
    q, k1, k2, v1, v2, degree, causal, scale, chunk, ckpt = inputs
    o, den, states = output
    ctx.save_for_backward(q, k1, k2, v1, v2, o, den, states)
    ctx.mark_non_differentiable(den, states)
    ctx.cfg = (degree, causal, scale, chunk, ckpt)


def _poly_backward(ctx, do, _dden, _dstates):
    return (*poly_bwd_op(do, *ctx.saved_tensors, *ctx.cfg), None, None, None, None, None)


poly_fwd_op.register_autograd(_poly_backward, setup_context=_poly_setup_context)
refuse_double_backward_op(poly_bwd_op, "poly_tensor_attn")


# --------------------------------------------------------------------------------------------------
# Scan path (causal): running sums by cumsum, chunk by chunk, from a prefix state. The torch backend's
# causal algorithm on CUDA, and the local part of context parallelism (tensorattn.distributed)
# --------------------------------------------------------------------------------------------------
# The scan runs this many (batch x position x kv head x feature x value) entries per chunk at most when no
# chunk is given: each [B, chunk, Hkv, k, Dv] running sum is then 256 MiB in float32 (on the H100 at Dk = 16,
# 4x larger chunks than with 2^24 took 35 % less time for 2.2 GiB instead of 0.9: benchmarks/results/scan_chunk_sweep.json).
_SCAN_CHUNK_ELEMS = 1 << 26
# The torch backend takes the scan on CUDA when one position holds at most this many B x Hkv x k x (Dv + 1)
# entries (chunks of >= 512 positions; the saved chunk-start states stay under 512 numbers per position);
# else the chunked pair algorithm, whose memory stays bounded at any rank. On the H100 the scan was 15-61x
# faster for every Dk from 4 to 32 (up to 74K entries): benchmarks/results/scan_vs_pairs.md.
_SCAN_MAX_POS_ELEMS = 1 << 17


def _scan_chunk(T: int, B: int, Hkv: int, k: int, Dv: int) -> int:
    return max(1, min(T, _SCAN_CHUNK_ELEMS // max(1, B * Hkv * k * (Dv + 1))))


def _use_scan(device: torch.device, B: int, Hkv: int, k: int, Dv: int) -> bool:
    """The torch backend's causal algorithm: the scan on CUDA (few large kernels instead of a Python
    loop over 32-position chunks), when its per-position running sums are small."""
    return device.type == "cuda" and B * Hkv * k * (Dv + 1) <= _SCAN_MAX_POS_ELEMS


def _unpack(st, Dv):
    """``[S2 | S3 | z2 | z3]`` of a packed state ``[B, Hkv, k, 2 Dv + 2]``."""
    return st[..., :Dv], st[..., Dv:2 * Dv], st[..., 2 * Dv], st[..., 2 * Dv + 1]


def _chunk_features(feat, groups: int, q, k1, k2, v1, v2):
    """Features of one chunk ``[B, c, H, *]`` (any dtype) -> u1 ``[B, c, Hkv, G, k]``, u2, u3, x1, x2."""
    acc = feat.w.dtype
    B, c, Hq, _ = q.shape
    u1 = feat.q(q.to(acc))
    return (u1.view(B, c, Hq // groups, groups, feat.w.numel()), feat.k(k1.to(acc)), feat.k(k2.to(acc)), v1.to(acc),
            v2.to(acc))


def _causal_chunk(u1, u2, u3, x1, x2, st):
    """One chunk of causal attention from the packed running state ``st`` before it.

    Returns ``(num [B, c, Hkv, G, Dv], den [B, c, Hkv, G], packed state after the chunk)``.
    """
    P2, P3, p2, p3 = _unpack(st, x1.shape[-1])
    A2 = P2[:, None] + torch.cumsum(u2[..., None] * x1[..., None, :], 1)  # [B, c, Hkv, k, Dv]
    A3 = P3[:, None] + torch.cumsum(u3[..., None] * x2[..., None, :], 1)
    a2 = p2[:, None] + torch.cumsum(u2, 1)  # [B, c, Hkv, k]
    a3 = p3[:, None] + torch.cumsum(u3, 1)
    num = torch.einsum("bihgl,bihle->bihge", u1, A2 * A3)  # [B, c, Hkv, G, Dv]
    den = torch.einsum("bihgl,bihl->bihg", u1, a2 * a3)  # [B, c, Hkv, G]
    end = torch.cat([A2[:, -1], A3[:, -1], a2[:, -1, ..., None], a3[:, -1, ..., None]], -1)
    return num, den, end


def _chunk_grads(fn, xs, grad_outs):
    """Gradients of ``fn(*xs)`` w.r.t. ``xs`` given ``grad_outs`` (a chunk's own graph, by :func:`torch.func.vjp`,
    which also runs inside a custom op's implementation, where the autograd dispatch keys are off)."""
    _, vjp = torch.func.vjp(fn, *xs)
    return vjp(grad_outs if isinstance(grad_outs, torch.Tensor) else tuple(grad_outs))


def _scan_fwd(q, k1, k2, v1, v2, prefix, feat: _Feat, groups: int, chunk: int):
    """Causal polynomial attention of a sequence (or a shard) after a packed prefix state ``[S2 | S3 | z2 | z3]``
    (zeros for a whole sequence; in context parallelism the sum over the ranks before this one).

    For query ``i`` of the shard, with ``L2_i = sum_{j <= i} U2[j] ⊗ V1[j]`` (likewise ``L3_i``, and ``l2_i``,
    ``l3_i`` for the normaliser)::

        num_i = U1[i] · ((P2 + L2_i) ∘ (P3 + L3_i))      den_i = U1[i] · ((p2 + l2_i) ∘ (p3 + l3_i))

    It runs ``chunk`` positions at a time, each chunk's running sums starting from the state after the
    previous chunk (:func:`_causal_chunk`). Returns ``(num [B, T, Hkv, G, Dv], den [B, T, Hkv, G])`` in the
    accumulation dtype and the state at each chunk start (``T_r / chunk`` states of ``B · Hkv · k · (2 Dv + 2)``
    numbers: all the backward keeps besides the inputs). The ``[B, chunk, Hkv, k, Dv]`` running sums are the
    largest temporaries."""
    B, T, Hq, _ = q.shape
    Hkv, Dv = k1.shape[2], v1.shape[3]
    acc = feat.w.dtype
    num = torch.empty(B, T, Hkv, groups, Dv, dtype=acc, device=q.device)
    den = torch.empty(B, T, Hkv, groups, dtype=acc, device=q.device)
    st = prefix
    starts = []
    for t0 in range(0, T, chunk):
        sl = slice(t0, t0 + chunk)
        starts.append(st)
        n, d, st = _causal_chunk(*_chunk_features(feat, groups, q[:, sl], k1[:, sl], k2[:, sl], v1[:, sl], v2[:, sl]),
                                 st)
        num[:, sl] = n
        den[:, sl] = d
    return num, den, torch.stack(starts)


def _scan_bwd(gnum, gden, q, k1, k2, v1, v2, starts, feat: _Feat, groups: int, chunk: int):
    """Gradients of the scan's inputs and prefix: the chunks in reverse, each recomputed (features included) with
    its own graph, the gradient of the running state carried back to the prefix."""
    acc = feat.w.dtype
    xs = (q, k1, k2, v1, v2)
    grads = [torch.empty(x.shape, dtype=acc, device=x.device) for x in xs]
    gst = torch.zeros_like(starts[0])  # gradient of the state after the current chunk

    def run(qc, k1c, k2c, v1c, v2c, st):
        return _causal_chunk(*_chunk_features(feat, groups, qc, k1c, k2c, v1c, v2c), st)

    T = q.shape[1]
    for c, t0 in reversed(list(enumerate(range(0, T, chunk)))):
        sl = slice(t0, t0 + chunk)
        gs = _chunk_grads(run, [x[:, sl].to(acc) for x in xs] + [starts[c]], (gnum[:, sl], gden[:, sl], gst))
        for buf, gx in zip(grads, gs[:5]):
            buf[:, sl] = gx
        gst = gs[5]
    return tuple(gx.to(x.dtype) for gx, x in zip(grads, xs)) + (gst,)


# Custom ops of the scan (one opaque node each under torch.compile); the feature maps are rebuilt from
# (Dk, degree, scale) inside, in the prefix's dtype (the accumulation dtype).
@torch.library.custom_op("tensorattn::poly_scan_fwd", mutates_args=())
def poly_scan_fwd_op(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor,
                     prefix: torch.Tensor, degree: int, scale: float, groups: int, chunk: int
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal scan from ``prefix`` ``[B, Hkv, k, 2 Dv + 2]`` (:func:`_scan_fwd`): ``(num, den, chunk-start
    states)``, autocast off."""
    with autocast_off(q.device.type), torch.no_grad():
        feat = _Feat(q.shape[3], degree, scale, prefix.dtype, q.device)
        return _scan_fwd(q, k1, k2, v1, v2, prefix, feat, groups, chunk)


@poly_scan_fwd_op.register_fake
def _poly_scan_fwd_fake(q, k1, k2, v1, v2, prefix, degree, scale, groups, chunk):
    B, T = q.shape[:2]
    Hkv, Dv = k1.shape[2], v1.shape[3]
    acc = prefix.dtype
    return (q.new_empty(B, T, Hkv, groups, Dv, dtype=acc), q.new_empty(B, T, Hkv, groups, dtype=acc),
            prefix.new_empty(-(-T // chunk), *prefix.shape))


@torch.library.custom_op("tensorattn::poly_scan_bwd", mutates_args=())
def poly_scan_bwd_op(gnum: torch.Tensor, gden: torch.Tensor, q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor,
                     v1: torch.Tensor, v2: torch.Tensor, starts: torch.Tensor, degree: int, scale: float, groups: int,
                     chunk: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor]:
    """Gradients of q, k1, k2, v1, v2 (their dtypes) and of the prefix (:func:`_scan_bwd`). Not differentiable:
    differentiating its outputs raises (the chunk gradients are taken without create_graph)."""
    with autocast_off(q.device.type), torch.no_grad():
        feat = _Feat(q.shape[3], degree, scale, starts.dtype, q.device)
        return tuple(g.contiguous() for g in _scan_bwd(gnum, gden, q, k1, k2, v1, v2, starts, feat, groups, chunk))


@poly_scan_bwd_op.register_fake
def _poly_scan_bwd_fake(gnum, gden, q, k1, k2, v1, v2, starts, degree, scale, groups, chunk):
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k1, k2, v1, v2, starts[0]))


def _scan_setup_context(ctx, inputs, output):
    q, k1, k2, v1, v2, _prefix, degree, scale, groups, chunk = inputs
    ctx.save_for_backward(q, k1, k2, v1, v2, output[2])
    ctx.mark_non_differentiable(output[2])
    ctx.cfg = (degree, scale, groups, chunk)


def _scan_backward(ctx, gnum, gden, _gstarts):
    q, k1, k2, v1, v2, starts = ctx.saved_tensors
    B, T, Hkv, Dv = q.shape[0], q.shape[1], k1.shape[2], v1.shape[3]
    groups = ctx.cfg[2]
    if gnum is None:  # an output the loss did not use
        gnum = starts.new_zeros(B, T, Hkv, groups, Dv)
    if gden is None:
        gden = starts.new_zeros(B, T, Hkv, groups)
    return (*poly_scan_bwd_op(gnum, gden, q, k1, k2, v1, v2, starts, *ctx.cfg), None, None, None, None)


poly_scan_fwd_op.register_autograd(_scan_backward, setup_context=_scan_setup_context)
refuse_double_backward_op(poly_scan_bwd_op, "poly_tensor_attn")


def _scan_attn(q, k1, k2, v1, v2, prefix, degree: int, scale: float, chunk: int):
    """Causal output ``[B, T, Hq, Dv]`` in q's dtype by the scan from ``prefix`` (differentiable in the prefix)."""
    B, T, Hq, _ = q.shape
    Hkv, Dv = k1.shape[2], v1.shape[3]
    num, den, _ = poly_scan_fwd_op(q, k1, k2, v1, v2, prefix, degree, float(scale), Hq // Hkv, chunk)
    return (num / (den[..., None] + EPS)).reshape(B, T, Hq, Dv).to(q.dtype)


# --------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------
class _TorchBackend(Backend):
    name = "torch"

    def not_supported_reasons(self, **p) -> List[str]:
        return []

    def run(self, q, k1, k2, v1, v2, degree, causal, scale):
        B, T, _, D = q.shape
        Hkv, Dv = k1.shape[2], v1.shape[3]
        k = poly_rank(D, degree)
        if causal and _use_scan(q.device, B, Hkv, k, Dv):
            prefix = torch.zeros(B, Hkv, k, 2 * Dv + 2, dtype=_acc(q.dtype), device=q.device)
            return _scan_attn(q, k1, k2, v1, v2, prefix, degree, scale, _scan_chunk(T, B, Hkv, k, Dv))
        o, _, _ = poly_fwd_op(q, k1, k2, v1, v2, degree, causal, scale, _TORCH_CHUNK, _TORCH_CKPT)
        return o.transpose(1, 2).to(q.dtype)


class _TritonBackend(Backend):
    name = "triton"

    def not_supported_reasons(self, *, device, dtype, degree, causal, head_dim, value_dim, **_) -> List[str]:
        r = triton_device_reasons(device, dtype)  # with the interpreter's float32-only rule
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            r.append(f"dtype {dtype} is not supported (float16, bfloat16, float32)")
        if degree != 2:
            r.append(f"the fused kernels implement degree 2 only, got degree {degree}")
        if not causal:
            r.append("the fused kernels are causal only (the non-causal op is two matrix products: torch backend)")
        if head_dim > 64 or head_dim < 16 or head_dim & (head_dim - 1):
            # tl.dot needs inner dimensions >= 16 (a Dk = 4 launch failed to compile on an H100)
            r.append(f"Dk must be a power of two in [16, 64], got {head_dim}")
        if value_dim > 128:
            r.append(f"Dv must be <= 128 for the fused kernels, got {value_dim}")
        return r

    def run(self, q, k1, k2, v1, v2, degree, causal, scale):
        from .triton.poly import poly_triton

        return poly_triton(q, k1, k2, v1, v2, scale)


BACKENDS = [_TritonBackend(), _TorchBackend()]


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def poly_tensor_attn(q, k1, k2, v1, v2, *, degree: int = 2, causal: bool = False, scale=None, backend: str = "auto",
                     check_finite: Optional[bool] = None, cu_seqlens: Optional[torch.Tensor] = None,
                     max_seqlen: Optional[int] = None):
    """Tensor attention with ``exp`` replaced by its degree-``g`` Taylor polynomial, in linear time.

    For query ``i`` and visible key pairs ``(j1, j2)`` (all pairs; or ``j1 <= i`` and ``j2 <= i`` when
    ``causal``)::

        z = scale * <q[i], k1[j1] ∘ k2[j2]>,   P(z) = sum_{t <= degree} z^t / t!
        o[i] = sum P(z) v1[j1] ∘ v2[j2] / (EPS + sum P(z))

    which approaches :func:`tensorattn.naive_tensor_attn` as the degree grows when the logits are
    O(1) (error ~ R^(g+1) / (g+1)! for |z| <= R). Time and memory are linear in the sequence lengths:
    the ``T x S1 x S2`` scores are never formed (see the module docstring for the algorithm).

    Args:
        q: ``[B, T, Hq, Dk]`` queries.
        k1, v1: ``[B, S1, Hkv, Dk]``, ``[B, S1, Hkv, Dv]``; k2, v2: ``[B, S2, Hkv, Dk]``, ``[B, S2, Hkv, Dv]``.
            ``Dv`` may differ from ``Dk``; ``Hq`` must be a multiple of ``Hkv`` (GQA: query head ``h``
            reads kv head ``h // (Hq // Hkv)``). Non-causal calls may have ``S1, S2 != T``.
        degree: even Taylor degree >= 2 (odd degrees are refused: the normaliser could be <= 0).
            The feature rank is ``C(Dk + degree, degree)`` (:func:`poly_rank`).
        causal: keep only ``j1 <= i`` and ``j2 <= i`` (needs ``S1 == S2 == T``).
        scale: multiplies the trilinear form; default ``1 / sqrt(Dk)`` as in the exact op.
        backend: ``"auto"`` (the fused Triton kernels when they fit, else torch), ``"triton"`` or ``"torch"``.
        check_finite: refuse NaN/Inf inputs with a ``ValueError``; ``None`` (default) checks CPU inputs only
            (on a GPU the check would synchronise every call). An unchecked non-finite value spreads through
            the shared states: to every row on the torch backend, to its chunk and later ones on Triton.
        cu_seqlens: packed documents (:mod:`tensorattn.packing`): inputs ``[1, total, H, D]`` and an int32
            tensor of document starts with a leading 0 and ``total`` at the end; the pairs (and the causal
            state) stay inside each document. Runs the op once per document for now.
        max_seqlen: with ``cu_seqlens``, optionally the longest document's length (checked).

    Returns:
        ``[B, T, Hq, Dv]`` in q's dtype. Accumulates in float32 (float64 for float64 inputs);
        differentiable w.r.t. all five inputs.
    """
    B, T, Hq, Hkv, D, Dv, S1, S2, _ = check_attn_inputs(q, k1, k2, v1, v2, causal=causal, check_finite=check_finite)
    degree = _check_degree(degree)
    scale = check_scale(scale, D)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str ('auto', 'triton' or 'torch'), got {type(backend).__name__}")
    _check_rank(D, degree, "q.shape[3]")
    check_no_max_seqlen(cu_seqlens, max_seqlen)
    if cu_seqlens is not None:
        bounds = check_cu_seqlens(cu_seqlens, max_seqlen, B=B, T=T, S1=S1, S2=S2, device=q.device)
        if len(bounds) > 2:
            o = run_per_document(lambda *xs: poly_tensor_attn(*xs, degree=degree, causal=causal, scale=scale,
                                                              backend=backend, check_finite=False), bounds,
                                 q, k1, k2, v1, v2)
            return _check_output(o, check_finite, degree, scale)
    be = choose(BACKENDS, backend, dict(device=q.device, dtype=q.dtype, degree=degree, causal=causal,
                                         head_dim=D, value_dim=Dv), op="poly_tensor_attn")
    if B == 0 or T == 0:  # nothing to attend from: an empty output, still connected to the inputs' graph
        return q.new_zeros(B, T, Hq, Dv) + 0 * q.sum() + 0 * (k1.sum() + k2.sum() + v1.sum() + v2.sum())
    return _check_output(be.run(q, k1, k2, v1, v2, degree, causal, scale), check_finite, degree, scale)


@dataclass
class PolyTensorAttnState:
    """Decoding state of causal :func:`poly_tensor_attn`: everything the past contributes.

    ``a2 = sum_{j <= t} φ(k1_j) ⊗ [v1_j, 1]`` and ``a3`` likewise for stream 2, both
    ``[B, Hkv, k, Dv + 1]`` float32 (float64 for float64 inputs), ``k = C(Dk + degree, degree)``:
    ``2 k (Dv + 1)`` floats per (batch, kv head) whatever the length decoded so far.
    """

    a2: torch.Tensor
    a3: torch.Tensor
    degree: int
    scale: float
    length: int = 0

    @classmethod
    def empty(cls, batch: int, kv_heads: int, head_dim: int, value_dim: int, *, degree: int = 2, scale=None,
              dtype=torch.float32, device=None) -> "PolyTensorAttnState":
        """A state that has seen no token (``dtype`` is the accumulation dtype: float32 or float64)."""
        degree = _check_degree(degree)
        for nm, v in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim), ("value_dim", value_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{nm} must be a positive int, got {v!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64 (the accumulation dtype), got {dtype}")
        k = _check_rank(head_dim, degree, "head_dim")
        z = torch.zeros(batch, kv_heads, k, value_dim + 1, dtype=dtype, device=device)
        return cls(z, z.clone(), degree, check_scale(scale, head_dim), 0)

    @classmethod
    def from_keys(cls, k1, k2, v1, v2, *, degree: int = 2, scale=None, block: int = 4096) -> "PolyTensorAttnState":
        """The state after the tokens ``k1, k2`` ``[B, T, Hkv, Dk]``, ``v1, v2`` ``[B, T, Hkv, Dv]`` (a prompt's
        prefill): the same sums that ``T`` calls of :func:`poly_tensor_attn_step` build, ``block`` positions at a
        time (features of one block in memory). Accumulates in float32 (float64 for float64 inputs)."""
        names = ("k1", "k2", "v1", "v2")
        xs = (k1, k2, v1, v2)
        for n, x in zip(names, xs):
            check_tensor(n, x, ndim=4)
        check_same(names, xs)
        B, T, Hkv, D = k1.shape
        Dv = v1.shape[3]
        if tuple(k2.shape) != (B, T, Hkv, D) or tuple(v2.shape) != (B, T, Hkv, Dv) or v1.shape[:3] != k1.shape[:3]:
            raise ValueError(f"k1, k2 must be [B, T, Hkv, Dk] and v1, v2 [B, T, Hkv, Dv] with one B, T, Hkv; got "
                             f"{[tuple(x.shape) for x in xs]}")
        acc = _acc(k1.dtype)
        st = cls.empty(B, Hkv, D, Dv, degree=degree, scale=scale, dtype=acc, device=k1.device)
        feat = _Feat(D, st.degree, st.scale, acc, k1.device)
        a2, a3 = st.a2, st.a3
        for t0 in range(0, T, block):
            sl = slice(t0, t0 + block)
            a2 = a2 + torch.einsum("bthk,bthe->bhke", feat.k(k1[:, sl].to(acc)), _with_ones(v1[:, sl].to(acc)))
            a3 = a3 + torch.einsum("bthk,bthe->bhke", feat.k(k2[:, sl].to(acc)), _with_ones(v2[:, sl].to(acc)))
        st.a2, st.a3, st.length = a2, a3, T
        return st

    def nbytes(self) -> int:
        return self.a2.numel() * self.a2.element_size() * 2


def poly_tensor_attn_step(state: PolyTensorAttnState, q_t, k1_t, k2_t, v1_t, v2_t, *,
                          check_finite: Optional[bool] = None):
    """One decoding step of causal :func:`poly_tensor_attn`: add token t's keys, attend from its query.

    Equals row ``t`` of ``poly_tensor_attn(q, k1, k2, v1, v2, causal=True)`` over the tokens fed so far.
    Differentiable through any number of steps: the state's tensors are replaced, never modified in place (a
    step costs a new ``2 k (Dv + 1)`` state per (batch, kv head); under ``torch.no_grad`` the old one is freed).

    Args:
        state: :class:`PolyTensorAttnState` (its ``a2``, ``a3`` and ``length`` are updated and it is returned).
        q_t: ``[B, Hq, Dk]``; k1_t, k2_t: ``[B, Hkv, Dk]``; v1_t, v2_t: ``[B, Hkv, Dv]``.

    Returns:
        ``(o_t, state)`` with ``o_t`` ``[B, Hq, Dv]`` in q_t's dtype. Cost ``O(Hq k Dv)`` per token.
        check_finite: refuse NaN/Inf tokens (``None``: CPU tokens only), as in :func:`poly_tensor_attn`; a
            non-finite token would stay in the state for every later step.
    """
    if not isinstance(state, PolyTensorAttnState):
        raise TypeError(f"state must be a PolyTensorAttnState, got {type(state).__name__}")
    names = ("q_t", "k1_t", "k2_t", "v1_t", "v2_t")
    xs = (q_t, k1_t, k2_t, v1_t, v2_t)
    for n, x in zip(names, xs):
        check_tensor(n, x, ndim=3)
    check_same(names, xs)  # one device, one dtype
    maybe_check_finite(check_finite, names, xs)
    if q_t.device != state.a2.device:
        raise ValueError(f"q_t is on device {q_t.device} but the state is on {state.a2.device}")
    if state.a2.dtype == torch.float64 and q_t.dtype != torch.float64:
        raise TypeError(f"the state accumulates in float64 but q_t has dtype {q_t.dtype}; feed float64 tokens")
    if q_t.dtype == torch.float64 and state.a2.dtype != torch.float64:
        raise TypeError("q_t is float64 but the state accumulates in float32; make the state with dtype=torch.float64")
    B, Hkv, k, Dp = state.a2.shape
    Hq, D = q_t.shape[1], q_t.shape[2]
    if poly_rank(D, state.degree) != k:
        raise ValueError(f"q_t has head dim {D}, giving rank {poly_rank(D, state.degree)}, but the state has rank {k}")
    for n, x, want in (("q_t", q_t, (B, Hq, D)), ("k1_t", k1_t, (B, Hkv, D)), ("k2_t", k2_t, (B, Hkv, D)),
                       ("v1_t", v1_t, (B, Hkv, Dp - 1)), ("v2_t", v2_t, (B, Hkv, Dp - 1))):
        if tuple(x.shape) != want:
            raise ValueError(f"{n} must have shape {want} (from the state and q_t), got {tuple(x.shape)}")
    if Hq % Hkv:
        raise ValueError(f"q_t has {Hq} heads, not a multiple of the state's {Hkv} kv heads")
    acc = state.a2.dtype
    feat = _Feat(D, state.degree, state.scale, acc, state.a2.device)
    u2, u3 = feat.k(k1_t.to(acc)), feat.k(k2_t.to(acc))  # [B, Hkv, k]
    state.a2 = state.a2 + u2[..., :, None] * _with_ones(v1_t.to(acc))[..., None, :]
    state.a3 = state.a3 + u3[..., :, None] * _with_ones(v2_t.to(acc))[..., None, :]
    state.length += 1
    u1 = feat.q(q_t.to(acc)).view(B, Hkv, Hq // Hkv, k)  # query heads grouped by kv head
    num = u1 @ (state.a2 * state.a3)  # [B, Hkv, groups, Dv']
    o = num[..., :-1] / (num[..., -1:] + EPS)
    return o.reshape(B, Hq, Dp - 1).to(q_t.dtype), state
