"""The plain reference of :func:`tensorattn.poly.poly_tensor_attn`: the polynomial scores materialised
(``[B, H, T, S1, S2]``; tests and tiny shapes only)."""
from __future__ import annotations

from typing import Optional

import torch

from .._validate import acc_dtype, check_attn_inputs, check_scale
from ..naive import expand_kv
from .common import EPS, _check_degree, _poly


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
    acc, g = acc_dtype(q.dtype), Hq // Hkv
    qh = q.transpose(1, 2).to(acc)
    k1h, k2h, v1h, v2h = (expand_kv(x, g, acc) for x in (k1, k2, v1, v2))
    z = scale * torch.einsum("bhid,bhjd,bhkd->bhijk", qh, k1h, k2h)  # [B, H, T, S1, S2]
    p = _poly(z, degree)
    if causal:
        i = torch.arange(T, device=q.device)
        vis = (i[None, :] <= i[:, None])[:, :, None] & (i[None, :] <= i[:, None])[:, None, :]
        p = p * vis
    num = torch.einsum("bhijk,bhje,bhke->bhie", p, v1h, v2h)
    den = p.sum((-1, -2))[..., None] + eps
    return (num / den).transpose(1, 2).to(q.dtype)

