"""Exact tensor attention in pure PyTorch: a streaming forward/backward and the naive closed-form backward.

Both follow :mod:`tensorattn.naive` (scores ``scale * <q_i, k1_j1 * k2_j2>``, one joint softmax over the
visible pairs, output ``sum p * v1_j1 * v2_j2``). Nothing here imports Triton.

Streaming (``torch_fwd`` / ``torch_bwd``): queries are processed in blocks; for each block the visible key
ranges (the whole sequence, the causal prefix, or the two windows) are cut into chunks ``c1 x c2`` and an
online softmax runs over the chunks. The backward recomputes the probabilities from the saved natural-log
log-sum-exp. Memory beyond the inputs is the outputs/gradients (``O(T * D)`` per head) plus one chunk of
``[B, Hq, bq, c1, c2]`` scores, bounded by ``block_elems``; there is no buffer of ``T^2`` or ``T^3`` entries.

Closed-form backward (``naive_bwd``): with ``P`` the probabilities, ``dP[i,j1,j2] = <dO_i, v1_j1 * v2_j2>``
and ``Delta_i = sum_{j1,j2} P dP`` (which is ``<dO_i, O_i>``, but taken over the same recomputed ``P`` and ``dP``,
as autograd's softmax does, so that it cancels exactly where one pair takes all the weight), the score gradient
is ``dS = P * (dP - Delta)``; then

    dq_i   = scale * sum_{j1,j2} dS * k1_j1 * k2_j2       dv1_j1 = sum_{i,j2} P * dO_i * v2_j2
    dk1_j1 = scale * sum_{i,j2}  dS * q_i  * k2_j2        dv2_j2 = sum_{i,j1} P * dO_i * v1_j1
    dk2_j2 = scale * sum_{i,j1}  dS * q_i  * k1_j1

computed by einsum over the full ``[S1, S2]`` score matrix of a block of queries.

All paths accumulate in float32 (float64 for float64 inputs) and return tensors in the input dtype.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._budgets import SCORE_BLOCK_ELEMS
from ._validate import acc_dtype
from .naive import expand_kv, naive_tensor_attn, reduce_kv, visibility_mask

__all__ = ["torch_fwd", "torch_bwd", "naive_fwd", "naive_bwd", "key_range"]

_BLOCK_ELEMS = SCORE_BLOCK_ELEMS  # score entries of one chunk [B, Hq, bq, c1, c2]


def key_range(t0: int, t1: int, s: int, *, causal: bool, w: Optional[int]) -> Tuple[int, int]:
    """Key positions ``[lo, hi)`` visible from at least one query in ``[t0, t1)`` for one key stream."""
    if w is not None:
        return max(0, t0 - w + 1), min(s, t1)
    if causal:
        return 0, min(s, t1)
    return 0, s


def _heads(q, k1, k2, v1, v2):
    """[B, T, H, D] -> [B, Hkv, G, T, D] for q and [B, Hkv, 1, S, D] for K/V (views, no copies of K/V)."""
    B, T, Hq, D = q.shape
    Hkv = k1.shape[2]
    G = Hq // Hkv
    acc = acc_dtype(q.dtype)
    qh = q.to(acc).view(B, T, Hkv, G, D).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, T, D]
    kv = [x.to(acc).transpose(1, 2).unsqueeze(2) for x in (k1, k2, v1, v2)]  # [B, Hkv, 1, S, D]
    return (qh, *kv)


def _chunks(B: int, Hq: int, bq: int, n1: int, n2: int, block_elems: int) -> Tuple[int, int]:
    """Chunk sizes (c1, c2) so that one [B, Hq, bq, c1, c2] score chunk holds at most ``block_elems``."""
    per_row = max(1, block_elems // max(1, B * Hq * bq))
    c2 = max(1, min(n2, per_row))
    c1 = max(1, min(n1, per_row // c2))
    return c1, c2


def _mask(t0, t1, lo1, hi1, lo2, hi2, *, causal, window, device):
    """Visibility of the chunk [t0:t1] x [lo1:hi1] x [lo2:hi2], or None when everything is visible."""
    if not causal and window is None:
        return None
    return visibility_mask(torch.arange(t0, t1, device=device), hi1 - lo1, hi2 - lo2, causal=causal, window=window,
                           starts=(lo1, lo2))  # [bq, c1, c2]


def torch_fwd(q, k1, k2, v1, v2, *, scale: float, causal: bool, window, block_q: int = 64,
              block_elems: int = _BLOCK_ELEMS):
    """Streaming forward. Inputs are validated ``[B, T, H, D]`` tensors; ``window`` is ``None`` or ``(w1, w2)``.

    Returns ``(o [B, T, Hq, Dv] in the input dtype, lse [B, Hq, T] natural log, accumulation dtype)``.
    """
    B, T, Hq, D = q.shape
    S1, S2, Hkv, Dv = k1.shape[1], k2.shape[1], k1.shape[2], v1.shape[3]
    G = Hq // Hkv
    causal = causal or window is not None
    w1, w2 = window if window is not None else (None, None)
    qh, k1h, k2h, v1h, v2h = _heads(q, k1, k2, v1, v2)
    acc = qh.dtype
    out = torch.empty(B, Hkv, G, T, Dv, dtype=acc, device=q.device)
    lse = torch.empty(B, Hkv, G, T, dtype=acc, device=q.device)
    for t0 in range(0, T, block_q):
        t1 = min(T, t0 + block_q)
        bq = t1 - t0
        lo1, hi1 = key_range(t0, t1, S1, causal=causal, w=w1)
        lo2, hi2 = key_range(t0, t1, S2, causal=causal, w=w2)
        c1, c2 = _chunks(B, Hq, bq, hi1 - lo1, hi2 - lo2, block_elems)
        qb = qh[:, :, :, t0:t1]  # [B, Hkv, G, bq, D]
        m = torch.full((B, Hkv, G, bq), float("-inf"), dtype=acc, device=q.device)
        l = torch.zeros(B, Hkv, G, bq, dtype=acc, device=q.device)
        o = torch.zeros(B, Hkv, G, bq, Dv, dtype=acc, device=q.device)
        for a0 in range(lo1, hi1, c1):
            a1 = min(hi1, a0 + c1)
            qk1 = qb[:, :, :, :, None, :] * k1h[:, :, :, None, a0:a1, :]  # [B, Hkv, G, bq, n1, D]
            for b0 in range(lo2, hi2, c2):
                b1 = min(hi2, b0 + c2)
                vis = _mask(t0, t1, a0, a1, b0, b1, causal=causal, window=window, device=q.device)
                if vis is not None and not bool(vis.any()):
                    continue
                s = torch.matmul(qk1, k2h[:, :, :, None, b0:b1, :].transpose(-1, -2)) * scale  # [.., bq, n1, n2]
                if vis is not None:
                    s = s.masked_fill(~vis, float("-inf"))
                m_new = torch.maximum(m, s.amax(dim=(-1, -2)))
                m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
                p = torch.exp(s - m_safe[..., None, None])  # masked entries -> exp(-inf) = 0
                alpha = torch.exp(m - m_safe)
                l = l * alpha + p.sum(dim=(-1, -2))
                pv2 = torch.matmul(p, v2h[:, :, :, None, b0:b1, :])  # [B, Hkv, G, bq, n1, Dv]
                o = o * alpha[..., None] + (pv2 * v1h[:, :, :, None, a0:a1, :]).sum(-2)
                m = m_new
        out[:, :, :, t0:t1] = o / l[..., None]
        lse[:, :, :, t0:t1] = m + torch.log(l)
    o = out.permute(0, 3, 1, 2, 4).reshape(B, T, Hq, Dv).to(q.dtype)
    return o, lse.reshape(B, Hq, T)


def _pair_blocks(qh, k1h, k2h, v1h, v2h, doh, lse, *, scale, causal, window, block_q, block_elems):
    """The backward's blocks of (queries, k1 keys, k2 keys) with visible pairs, each with the recomputed
    ``P = exp(s - lse)`` (at most 1: ``lse >= max s``, so rounding cannot push it past) and ``dP`` ``[B, Hkv, G,
    bq, n1, n2]``, and the block's operands ``(q, dO, q ∘ k1, dO ∘ v1, k1, k2, v2)``."""
    B, Hkv, G, T, D = qh.shape
    S1, S2 = k1h.shape[3], k2h.shape[3]
    w1, w2 = window if window is not None else (None, None)
    for t0 in range(0, T, block_q):
        t1 = min(T, t0 + block_q)
        bq = t1 - t0
        lo1, hi1 = key_range(t0, t1, S1, causal=causal, w=w1)
        lo2, hi2 = key_range(t0, t1, S2, causal=causal, w=w2)
        c1, c2 = _chunks(B, Hkv * G, bq, hi1 - lo1, hi2 - lo2, block_elems)
        qb, dob = qh[:, :, :, t0:t1], doh[:, :, :, t0:t1]  # [B, Hkv, G, bq, D|Dv]
        lb = lse[:, :, :, t0:t1, None, None]
        for a0 in range(lo1, hi1, c1):
            a1 = min(hi1, a0 + c1)
            k1c, v1c = k1h[:, :, :, None, a0:a1], v1h[:, :, :, None, a0:a1]  # [B, Hkv, 1, 1, n1, D]
            qk1 = qb[:, :, :, :, None, :] * k1c  # [B, Hkv, G, bq, n1, D]
            dov1 = dob[:, :, :, :, None, :] * v1c  # [B, Hkv, G, bq, n1, Dv]
            for b0 in range(lo2, hi2, c2):
                b1 = min(hi2, b0 + c2)
                vis = _mask(t0, t1, a0, a1, b0, b1, causal=causal, window=window, device=qh.device)
                if vis is not None and not bool(vis.any()):
                    continue
                k2c, v2c = k2h[:, :, :, None, b0:b1], v2h[:, :, :, None, b0:b1]  # [B, Hkv, 1, 1, n2, D]
                s = torch.matmul(qk1, k2c.transpose(-1, -2)) * scale  # [B, Hkv, G, bq, n1, n2]
                if vis is not None:
                    s = s.masked_fill(~vis, float("-inf"))
                p = torch.exp((s - lb).clamp(max=0.0))
                dp = torch.matmul(dov1, v2c.transpose(-1, -2))
                yield t0, t1, a0, a1, b0, b1, p, dp, (qb, dob, qk1, dov1, k1c, k2c, v2c)


def torch_bwd(do, q, k1, k2, v1, v2, o, lse, *, scale: float, causal: bool, window, block_q: int = 64,
              block_elems: int = _BLOCK_ELEMS):
    """Streaming backward: recompute ``P = exp(s - lse)`` chunk by chunk (``lse`` natural log, ``[B, Hq, T]``),
    in two passes over the pairs (the row sums ``Σ P dP``, then the gradients; ``o`` is not needed).

    Returns ``(dq, dk1, dk2, dv1, dv2)`` in the input dtype.
    """
    B, T, Hq, D = q.shape
    S1, S2, Hkv, Dv = k1.shape[1], k2.shape[1], k1.shape[2], v1.shape[3]
    G = Hq // Hkv
    causal = causal or window is not None
    qh, k1h, k2h, v1h, v2h = _heads(q, k1, k2, v1, v2)
    acc = qh.dtype
    doh = do.to(acc).view(B, T, Hkv, G, Dv).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, T, Dv]
    lse = lse.to(acc).view(B, Hkv, G, T)
    # delta = Σ P dP over the recomputed P and dP (a first pass over the pairs), not <dO, O>: the two are equal
    # in exact arithmetic, but where one pair takes all the weight (logits in the thousands) only the former
    # makes dP - delta cancel exactly, as autograd's softmax backward does; <dO, O> leaves a rounding error
    # that the size of the keys then multiplies into the gradients
    delta = torch.zeros(B, Hkv, G, T, dtype=acc, device=q.device)
    blocks = lambda: _pair_blocks(qh, k1h, k2h, v1h, v2h, doh, lse, scale=scale, causal=causal,  # noqa: E731
                                  window=window, block_q=block_q, block_elems=block_elems)
    for t0, t1, _a0, _a1, _b0, _b1, p, dp, _k in blocks():
        delta[:, :, :, t0:t1] += (p * dp).sum((-1, -2))
    dq = torch.zeros(B, Hkv, G, T, D, dtype=acc, device=q.device)
    dk1 = torch.zeros(B, Hkv, 1, S1, D, dtype=acc, device=q.device)
    dk2 = torch.zeros(B, Hkv, 1, S2, D, dtype=acc, device=q.device)
    dv1 = torch.zeros(B, Hkv, 1, S1, Dv, dtype=acc, device=q.device)
    dv2 = torch.zeros(B, Hkv, 1, S2, Dv, dtype=acc, device=q.device)
    for t0, t1, a0, a1, b0, b1, p, dp, (qb, dob, qk1, dov1, k1c, k2c, v2c) in blocks():
        bq = t1 - t0
        ds = p * (dp - delta[:, :, :, t0:t1, None, None]) * scale
        t = torch.matmul(ds, k2c)  # [B, Hkv, G, bq, n1, D]: sum_j2 dS k2
        u = torch.matmul(p, v2c)  # [B, Hkv, G, bq, n1, Dv]: sum_j2 P v2
        dq[:, :, :, t0:t1] += (t * k1c).sum(-2)
        dk1[:, :, :, a0:a1] += (t * qb[:, :, :, :, None, :]).sum(dim=(2, 3)).unsqueeze(2)
        dv1[:, :, :, a0:a1] += (u * dob[:, :, :, :, None, :]).sum(dim=(2, 3)).unsqueeze(2)
        n1, n2 = a1 - a0, b1 - b0
        ds_f = ds.reshape(B, Hkv, G * bq * n1, n2)
        p_f = p.reshape(B, Hkv, G * bq * n1, n2)
        dk2[:, :, 0, b0:b1] += torch.matmul(ds_f.transpose(-1, -2), qk1.reshape(B, Hkv, G * bq * n1, D))
        dv2[:, :, 0, b0:b1] += torch.matmul(p_f.transpose(-1, -2), dov1.reshape(B, Hkv, G * bq * n1, Dv))
    dq = dq.permute(0, 3, 1, 2, 4).reshape(B, T, Hq, D).to(q.dtype)
    back = lambda x, ref: x[:, :, 0].transpose(1, 2).to(ref.dtype)  # noqa: E731  [B, S, Hkv, D]
    return dq, back(dk1, k1), back(dk2, k2), back(dv1, v1), back(dv2, v2)


def naive_fwd(q, k1, k2, v1, v2, *, scale: float, causal: bool, window):
    """The reference forward (:func:`naive_tensor_attn`); returns ``(o, lse)`` with ``lse`` natural log."""
    return naive_tensor_attn(q, k1, k2, v1, v2, scale=scale, causal=causal, window=window, return_lse=True)


def naive_bwd(do, q, k1, k2, v1, v2, o, lse, *, scale: float, causal: bool, window, block_elems: int = _BLOCK_ELEMS):
    """Closed-form backward over the full ``[S1, S2]`` score matrix of each block of queries (einsum).

    ``dS = P * (dP - Σ P dP)`` with ``P`` recomputed from the natural-log ``lse`` ``[B, Hq, T]``: the row sum
    taken over the same recomputed ``P`` and ``dP`` (as autograd's softmax backward does), not as ``<dO, O>``,
    so that where one pair takes all the weight (logits in the thousands) ``dP - Σ P dP`` cancels exactly
    instead of leaving a rounding error that the keys' size then multiplies.
    Returns ``(dq, dk1, dk2, dv1, dv2)`` in the input dtype; accumulates in float32 (float64 for float64).
    """
    B, T, Hq, D = q.shape
    S1, S2, Hkv = k1.shape[1], k2.shape[1], k1.shape[2]
    G = Hq // Hkv
    acc = acc_dtype(q.dtype)
    qh, doh = q.to(acc).transpose(1, 2), do.to(acc).transpose(1, 2)
    k1h, k2h, v1h, v2h = (expand_kv(x, G, acc) for x in (k1, k2, v1, v2))  # [B, Hq, S, D]
    lse = lse.to(acc)
    masked = causal or window is not None
    dq = torch.zeros_like(qh)
    dk1, dk2 = torch.zeros_like(k1h), torch.zeros_like(k2h)
    dv1, dv2 = torch.zeros_like(v1h), torch.zeros_like(v2h)
    bq = max(1, min(T, block_elems // max(1, B * Hq * S1 * S2)))
    for t0 in range(0, T, bq):
        t1 = min(T, t0 + bq)
        qb, dob = qh[:, :, t0:t1], doh[:, :, t0:t1]
        s = torch.einsum("bhid,bhjd,bhkd->bhijk", qb, k1h, k2h) * scale
        if masked:
            vis = visibility_mask(torch.arange(t0, t1, device=q.device), S1, S2, causal=causal, window=window)
            s = s.masked_fill(~vis, float("-inf"))
        p = torch.exp((s - lse[:, :, t0:t1, None, None]).clamp(max=0.0))  # [B, Hq, bq, S1, S2]; P <= 1
        dp = torch.einsum("bhie,bhje,bhke->bhijk", dob, v1h, v2h)
        ds = p * (dp - (p * dp).sum((-1, -2), keepdim=True))
        dq[:, :, t0:t1] = scale * torch.einsum("bhijk,bhjd,bhkd->bhid", ds, k1h, k2h)
        dk1 += scale * torch.einsum("bhijk,bhid,bhkd->bhjd", ds, qb, k2h)
        dk2 += scale * torch.einsum("bhijk,bhid,bhjd->bhkd", ds, qb, k1h)
        dv1 += torch.einsum("bhijk,bhie,bhke->bhje", p, dob, v2h)
        dv2 += torch.einsum("bhijk,bhie,bhje->bhke", p, dob, v1h)

    return (dq.transpose(1, 2).to(q.dtype), reduce_kv(dk1, G, k1.dtype), reduce_kv(dk2, G, k2.dtype),
            reduce_kv(dv1, G, v1.dtype), reduce_kv(dv2, G, v2.dtype))

