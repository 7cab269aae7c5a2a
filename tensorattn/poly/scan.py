"""The scan (causal): running sums by cumsum, a chunk of many positions at a time, from a prefix state. The
torch backend's causal algorithm on CUDA when the running sums are small, and the local part of context
parallelism (:func:`tensorattn.distributed.cp_poly_tensor_attn`), which differentiates the prefix too:
so it has its own custom-op pair ``poly_scan_fwd/bwd`` besides the op's."""
from __future__ import annotations

from typing import Tuple

import torch

from .._budgets import SCAN_STATE_ELEMS
from ..dispatch import autocast_off, refuse_double_backward_op
from .common import EPS, _chunk_grads, _Feat

# The scan runs this many (batch x position x kv head x feature x value) entries per chunk at most when no
# chunk is given: each [B, chunk, Hkv, k, Dv] running sum is then 256 MiB in float32 (the time/memory trade of
# the chunk size: benchmarks/results/scan_chunk_sweep.json).
_SCAN_CHUNK_ELEMS = SCAN_STATE_ELEMS
# The torch backend takes the scan on CUDA when one position holds at most this many B x Hkv x k x (Dv + 1)
# entries (chunks of >= 512 positions; the saved chunk-start states stay under 512 numbers per position);
# else the chunked pair algorithm, whose memory stays bounded at any rank (the measurement behind the limit:
# benchmarks/results/scan_vs_pairs.md).
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
