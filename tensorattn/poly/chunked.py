"""The torch backend's chunked path: forward in chunks of ``_TORCH_CHUNK`` positions and a hand-written
backward, ``[B, H, T, D]`` inside (the algorithm: :mod:`tensorattn.poly`). ``_torch_fwd`` and ``_torch_bwd``
are the two halves the op runs; the states are stacked into one ``[n, 2, B, Hq, k, Dv + 1]`` tensor
(``_n_states`` gives n from the shapes)."""
from __future__ import annotations

import torch

from .._budgets import FEATURE_BLOCK_ELEMS
from .._validate import acc_dtype
from ..naive import expand_kv, reduce_kv
from .common import EPS, _chunk_grads, _Feat, _poly, _with_ones, poly_rank

_TORCH_CHUNK = 32
# Non-causal rows per chunk: as many as keep one [B, H, rows, k] feature block under this many entries.
# (The causal path needs small chunks for its C^3 intra-chunk term; the non-causal one is plain products.)
_FULL_BLOCK_ELEMS = FEATURE_BLOCK_ELEMS


def _full_chunk(B: int, H: int, k: int, chunk: int) -> int:
    return max(chunk, _FULL_BLOCK_ELEMS // max(1, B * H * k))
_TORCH_CKPT = 16


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


def _full_bwd(qh, k1h, k2h, v1h, v2h, G, feat: _Feat, chunk: int, states):
    A2, A3 = states[0]
    A23 = A2 * A3
    dq = torch.empty_like(qh)
    R = 0
    for s in range(0, qh.shape[2], chunk):
        sl = slice(s, s + chunk)
        Gc = G[:, :, sl]
        dq[:, :, sl] = _chunk_grads(feat.q, [qh[:, :, sl]], Gc @ A23.transpose(-1, -2))[0]
        R = R + feat.q(qh[:, :, sl]).transpose(-1, -2) @ Gc  # [B, H, k, Dv']
    dA2, dA3 = R * A3, R * A2
    grads = []
    for kh, vh, dA in ((k1h, v1h, dA2), (k2h, v2h, dA3)):
        dk, dv = torch.empty_like(kh), torch.empty_like(vh)
        for s in range(0, kh.shape[2], chunk):
            sl = slice(s, s + chunk)
            dk[:, :, sl] = _chunk_grads(feat.k, [kh[:, :, sl]], vh[:, :, sl] @ dA.transpose(-1, -2))[0]
            dv[:, :, sl] = feat.k(kh[:, :, sl]) @ dA
        grads += [dk, dv]
    return dq, grads[0], grads[2], grads[1], grads[3]


def _torch_heads(q, k1, k2, v1, v2):
    """The five inputs ``[B, S, H, D]`` as ``[B, Hq, S, D]`` in the accumulation dtype, ones appended to v1, v2."""
    g = q.shape[2] // k1.shape[2]
    acc = acc_dtype(q.dtype)
    qh = q.transpose(1, 2).to(acc)
    k1h, k2h = expand_kv(k1, g, acc), expand_kv(k2, g, acc)
    v1h, v2h = _with_ones(expand_kv(v1, g, acc)), _with_ones(expand_kv(v2, g, acc))
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
    return (dq.transpose(1, 2).to(q.dtype), reduce_kv(dk1, g, k1.dtype), reduce_kv(dk2, g, k2.dtype),
            reduce_kv(dv1, g, v1.dtype), reduce_kv(dv2, g, v2.dtype))


def _n_states(T, causal: bool, chunk: int, ckpt: int):
    """How many ``(A2, A3)`` states the forward keeps: the causal checkpoints (and the final state), or the
    non-causal totals."""
    if not causal:
        return 1
    n_chunks = -(-T // chunk)
    return -(-n_chunks // ckpt) + 1
