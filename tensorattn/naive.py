"""Reference tensor attention (the spec in code).

Plain PyTorch, any float dtype, any device. Everything else in tensorattn is tested against these
functions; kernels never import them.

Semantics (defined here once; every backend follows it)
------------------------------------------------------
For a query position ``i`` and a pair of key positions ``(j1, j2)``::

    s[i, j1, j2] = scale * sum_d q[i, d] * k1[j1, d] * k2[j2, d]
    p[i, :, :]   = softmax over all visible (j1, j2) of s[i, :, :]      (one joint softmax)
    o[i, e]      = sum_{j1, j2} p[i, j1, j2] * v1[j1, e] * v2[j2, e]

Visibility:

* no mask: every ``(j1, j2)`` with ``0 <= j1 < S1`` and ``0 <= j2 < S2`` is visible;
* ``causal=True``: ``j1 <= i`` and ``j2 <= i``;
* ``window=(w1, w2)``: ``i - w1 < j1 <= i`` and ``i - w2 < j2 <= i`` (a window is always causal and
  always contains the query's own position; ``window=w`` means ``(w, w)``)::

        w1 = 3, w2 = 2, i = 5:   j1 in {3, 4, 5},  j2 in {4, 5}   -> 6 visible pairs

Layout is ``[B, T, H, D]``. K/V may have fewer heads than Q (grouped-query attention): query head
``h`` reads key/value head ``h // (Hq // Hkv)``.
"""
from __future__ import annotations

import string
from typing import Optional, Sequence, Tuple

import torch

from ._budgets import SCORE_BLOCK_ELEMS
from ._validate import (acc_dtype, check_attn_inputs, check_bool, check_same, check_scale, check_tensor,
                        maybe_check_finite)

__all__ = ["naive_tensor_attn", "naive_order_attn", "visibility_mask", "causal_keys", "expand_kv", "reduce_kv"]

_BLOCK_ELEMS = SCORE_BLOCK_ELEMS  # [B, H, block, S1, S2] scores in one piece


def causal_keys(i: torch.Tensor, j: torch.Tensor, w: Optional[int] = None) -> torch.Tensor:
    """``[len(i), len(j)]``: key position ``j`` visible from query position ``i`` under the causal mask (``j <= i``)
    and, with a window ``w``, ``i - w < j``. One key stream; a pair is visible when both of its keys are."""
    vis = j[None, :] <= i[:, None]
    return vis if w is None else vis & (j[None, :] > i[:, None] - w)


def visibility_mask(i: torch.Tensor, s1: int, s2: int, *, causal: bool, window: Optional[Tuple[int, int]],
                    starts: Tuple[int, int] = (0, 0)):
    """Boolean mask ``[len(i), s1, s2]``: True where ``(j1, j2)`` is visible from query ``i``, for the keys
    ``starts[0] .. starts[0] + s1 - 1`` and ``starts[1] .. starts[1] + s2 - 1`` (a block of them; default all)."""
    j1 = starts[0] + torch.arange(s1, device=i.device)
    j2 = starts[1] + torch.arange(s2, device=i.device)
    if not causal and window is None:
        return torch.ones(len(i), s1, s2, dtype=torch.bool, device=i.device)
    w1, w2 = window if window is not None else (None, None)
    return causal_keys(i, j1, w1)[:, :, None] & causal_keys(i, j2, w2)[:, None, :]


def expand_kv(x: torch.Tensor, groups: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Grouped-query attention's key/value heads, heads first: ``[B, S, Hkv, D] -> [B, Hkv * groups, S, D]``
    (in ``dtype`` when given); query head ``h`` reads kv head ``h // groups``."""
    x = x.transpose(1, 2)
    if dtype is not None:
        x = x.to(dtype)
    return x.repeat_interleave(groups, dim=1) if groups > 1 else x


def reduce_kv(x: torch.Tensor, groups: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The adjoint of :func:`expand_kv` (for gradients): ``[B, Hq, S, D]`` summed over each kv head's ``groups``
    query heads, ``-> [B, S, Hkv, D]`` (in ``dtype`` when given)."""
    B, Hq, S, D = x.shape
    if groups > 1:
        x = x.view(B, Hq // groups, groups, S, D).sum(2)
    x = x.transpose(1, 2)
    return x if dtype is None else x.to(dtype)


def naive_tensor_attn(q, k1, k2, v1, v2, *, scale=None, causal=False, window=None, return_lse=False,
                      block_elems: int = _BLOCK_ELEMS, check_finite: Optional[bool] = None):
    """Exact tensor (2-simplicial) attention, computed by brute force in blocks of queries.

    See the module docstring for the semantics (scores, joint softmax, visibility).

    Args:
        q: ``[B, T, Hq, D]`` queries.
        k1, v1: ``[B, S1, Hkv, D]`` and ``[B, S1, Hkv, Dv]``: the first key/value stream.
        k2, v2: ``[B, S2, Hkv, D]`` and ``[B, S2, Hkv, Dv]``: the second key/value stream.
            ``Hq`` must be a multiple of ``Hkv``. With a causal mask or a window, ``S1 == S2 == T``.
        scale: multiplies the trilinear score; default ``1 / sqrt(D)``.
        causal: keep only ``j1 <= i`` and ``j2 <= i``.
        window: ``None``, an int ``w`` or ``(w1, w2)``: keep ``i - w1 < j1 <= i`` and ``i - w2 < j2 <= i``.
        return_lse: also return the natural-log log-sum-exp of the visible scores per query.
        block_elems: at most this many score entries are held at once (memory knob; the result
            does not depend on it).
        check_finite: refuse NaN/Inf inputs (``None``: only for CPU tensors, where the check is cheap). A
            non-finite value would reach rows that cannot see it (0 · NaN in the masked sums).

    Returns:
        ``o`` of shape ``[B, T, Hq, Dv]`` in the input dtype, and, when ``return_lse``, ``lse`` of shape
        ``[B, Hq, T]`` in float32 (float64 for float64 inputs).

    Accumulates in float32 (float64 for float64 inputs). Memory is ``O(block · S1 · S2)``, never
    ``Θ(T · S1 · S2)``: T = 512 fits easily on a laptop CPU. Cost is ``Θ(T · S1 · S2 · (D + Dv))``.

    Equivalent, for one head, to::

        s = scale * torch.einsum('id,jd,kd->ijk', q, k1, k2)
        p = s.masked_fill(~visible, -inf).flatten(1).softmax(-1).view_as(s)
        o = torch.einsum('ijk,je,ke->ie', p, v1, v2)
    """
    causal = check_bool("causal", causal)
    return_lse = check_bool("return_lse", return_lse)
    B, T, Hq, Hkv, D, Dv, S1, S2, win = check_attn_inputs(q, k1, k2, v1, v2, causal=causal, window=window,
                                                          check_finite=check_finite)
    scale = check_scale(scale, D, dtype=q.dtype)
    groups = Hq // Hkv
    acc = acc_dtype(q.dtype)
    qh = q.transpose(1, 2).to(acc)  # [B, Hq, T, D]
    k1h, k2h = expand_kv(k1, groups, acc), expand_kv(k2, groups, acc)  # [B, Hq, S, D]
    v1h, v2h = expand_kv(v1, groups, acc), expand_kv(v2, groups, acc)  # [B, Hq, S, Dv]
    masked = causal or win is not None
    out = torch.empty(B, Hq, T, Dv, dtype=acc, device=q.device)
    lse = torch.empty(B, Hq, T, dtype=acc, device=q.device)
    bq = max(1, min(T, block_elems // max(1, B * Hq * S1 * S2)))
    for t0 in range(0, T, bq):
        t1 = min(T, t0 + bq)
        # s[b,h,i,j1,j2] = scale * sum_d q k1 k2, via (q * k1) @ k2^T
        qk1 = qh[:, :, t0:t1, None, :] * k1h[:, :, None, :, :]  # [B, H, bq, S1, D]
        s = torch.matmul(qk1, k2h[:, :, None].transpose(-1, -2)) * scale  # [B, H, bq, S1, S2]
        if masked:
            vis = visibility_mask(torch.arange(t0, t1, device=q.device), S1, S2, causal=causal, window=win)
            s = s.masked_fill(~vis, float("-inf"))
        m = s.flatten(-2).logsumexp(-1)  # [B, H, bq]
        p = torch.exp(s - m[..., None, None])
        # o[i,e] = sum_j1 v1[j1,e] * sum_j2 p[i,j1,j2] v2[j2,e]
        pv2 = torch.matmul(p, v2h[:, :, None])  # [B, H, bq, S1, Dv]
        out[:, :, t0:t1] = (pv2 * v1h[:, :, None]).sum(-2)
        lse[:, :, t0:t1] = m
    o = out.transpose(1, 2).to(q.dtype)
    return (o, lse) if return_lse else o


def naive_order_attn(q, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], *, scale=None,
                     causal=False, block_elems: int = _BLOCK_ELEMS, check_finite: Optional[bool] = None):
    """Exact attention of any order m = len(keys) >= 1 (m = 1: softmax attention; m = 2: tensor attention).

    For query ``i`` and a tuple ``(j1, ..., jm)``::

        s = scale * sum_d q[i, d] * keys[0][j1, d] * ... * keys[m-1][jm, d]
        o[i, e] = sum softmax(s)[j1..jm] * values[0][j1, e] * ... * values[m-1][jm, e]

    Args:
        q: ``[B, T, Hq, D]``.
        keys: m tensors ``[B, S_r, Hkv, D]``.
        values: m tensors ``[B, S_r, Hkv, Dv]``, ``values[r]`` as long as ``keys[r]``.
        scale: default ``1 / sqrt(D)``; ``|scale|`` at most :func:`tensorattn._validate.scale_bound`.
        causal: keep tuples with every ``j_r <= i`` (needs every ``S_r == T``); a bool.
        check_finite: refuse NaN/Inf inputs (``None``: only for CPU tensors), as :func:`naive_tensor_attn`.

    ``D``, ``Dv`` and every ``S_r`` must be >= 1 (an empty key stream leaves nothing to attend to).

    Returns ``[B, T, Hq, Dv]`` in the input dtype; accumulates in float32 (float64 for float64).
    Memory ``O(block · prod S_r)``; time ``Θ(T · prod S_r · (D + Dv))``, so keep sizes small for m >= 3.
    ``m = 1`` equals ``torch.nn.functional.scaled_dot_product_attention`` and ``m = 2`` equals
    :func:`naive_tensor_attn`.
    """
    if not isinstance(keys, (list, tuple)) or not isinstance(values, (list, tuple)):
        raise TypeError("keys and values must be lists (or tuples) of tensors")
    m = len(keys)
    if m < 1:
        raise ValueError("keys must hold at least one tensor (order m >= 1), got an empty sequence")
    if len(values) != m:
        raise ValueError(f"values must hold as many tensors as keys ({m}), got {len(values)}")
    check_tensor("q", q, ndim=4)
    names = ["q"] + [f"keys[{r}]" for r in range(m)] + [f"values[{r}]" for r in range(m)]
    xs = [q, *keys, *values]
    for n, x in zip(names, xs):
        check_tensor(n, x, ndim=4)
    check_same(names, xs)
    causal = check_bool("causal", causal)
    B, T, Hq, D = q.shape
    Hkv, Dv = keys[0].shape[2], values[0].shape[3]
    if D < 1:
        raise ValueError(f"q must have a head dim D >= 1 (q.shape[3]), got {D}")
    if Dv < 1:
        raise ValueError(f"values[0] must have a value head dim Dv >= 1 (values[0].shape[3]), got {Dv}")
    for r in range(m):
        k, v = keys[r], values[r]
        if k.shape[0] != B or v.shape[0] != B:
            raise ValueError(f"keys[{r}]/values[{r}] have batch {k.shape[0]}/{v.shape[0]}, q has {B}")
        if k.shape[3] != D:
            raise ValueError(f"keys[{r}] has head dim {k.shape[3]} but q has {D}")
        if v.shape[3] != Dv:
            raise ValueError(f"values[{r}] has head dim {v.shape[3]} but values[0] has {Dv}")
        if k.shape[2] != Hkv or v.shape[2] != Hkv:
            raise ValueError(f"keys[{r}]/values[{r}] have {k.shape[2]}/{v.shape[2]} heads but keys[0] has {Hkv}")
        if v.shape[1] != k.shape[1]:
            raise ValueError(f"values[{r}] has length {v.shape[1]} but keys[{r}] has {k.shape[1]}")
        if k.shape[1] == 0:
            raise ValueError(f"keys[{r}] must have at least one position (keys[{r}].shape[1] >= 1), got "
                             f"shape {tuple(k.shape)}")
        if causal and k.shape[1] != T:
            raise ValueError(f"causal masking needs keys[{r}] as long as q ({T}), got {k.shape[1]}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"the number of query heads ({Hq}) must be a multiple of the key/value heads ({Hkv})")
    maybe_check_finite(check_finite, names, xs)
    scale = check_scale(scale, D, dtype=q.dtype)
    groups = Hq // Hkv
    acc = acc_dtype(q.dtype)
    qh = q.transpose(1, 2).to(acc)
    ks = [expand_kv(k, groups, acc) for k in keys]
    vs = [expand_kv(v, groups, acc) for v in values]
    lens = [k.shape[2] for k in ks]
    letters = string.ascii_letters.replace("b", "").replace("h", "").replace("q", "").replace("d", "") \
        .replace("e", "")
    idx = letters[:m]
    s_eq = "bhqd," + ",".join(f"bh{c}d" for c in idx) + "->bhq" + idx
    o_eq = "bhq" + idx + "," + ",".join(f"bh{c}e" for c in idx) + "->bhqe"
    n_tuples = 1
    for n in lens:
        n_tuples *= n
    bq = max(1, min(T, block_elems // max(1, B * Hq * n_tuples)))
    out = torch.empty(B, Hq, T, Dv, dtype=acc, device=q.device)
    for t0 in range(0, T, bq):
        t1 = min(T, t0 + bq)
        s = torch.einsum(s_eq, qh[:, :, t0:t1], *ks) * scale  # [B, H, bq, S_1, ..., S_m]
        if causal:
            i = torch.arange(t0, t1, device=q.device)
            vis = torch.ones((t1 - t0,) + (1,) * m, dtype=torch.bool, device=q.device)
            for r in range(m):
                shape = [t1 - t0] + [1] * m
                shape[1 + r] = lens[r]
                vis = vis & (torch.arange(lens[r], device=q.device)[None, :] <= i[:, None]).view(shape)
            s = s.masked_fill(~vis, float("-inf"))
        flat = s.flatten(3)
        p = flat.softmax(-1).view_as(s)
        out[:, :, t0:t1] = torch.einsum(o_eq, p, *vs)
    return out.transpose(1, 2).to(q.dtype)
