"""The fused Triton kernels started from a prefix state: causal context parallelism's local part at Dk >= 16
(:func:`tensorattn.distributed.cp_poly_tensor_attn`), where the earlier ranks' sums come in the torch paths'
packed layout ``[B, Hkv, k, 2 Dv + 2]`` (``[S2 | S3 | z2 | z3]``, features in :class:`~.common._Feat`'s order)
and the kernels keep ``[B * Hkv, 2, KP, DVP]`` states in their own order (``KP``: the rank padded to the
kernels' block). :func:`fused_attn_from_prefix` converts both ways and is differentiable in the prefix;
:func:`fused_shard_totals` gives a shard's own totals (what it sends to the later ranks) in the packed layout."""
from __future__ import annotations

import torch

from ..dispatch import no_autocast, refuse_double_backward
from .common import _Feat

_ORDERS: dict = {}


def _order(D: int, device) -> torch.Tensor:
    """For each feature of :class:`~.common._Feat` (degree 2), the index of the same monomial in the kernels'
    order, found by evaluating both maps on the same random rows (float64: every monomial differs)."""
    key = (int(D), str(device))
    if key not in _ORDERS:
        from ..triton import poly as tp

        ix, _ = tp._tables(D, "cpu", 2)
        x = torch.randn(64, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 2.0
        xe = torch.cat([x, torch.ones(64, 1, dtype=torch.float64)], 1)
        fused = xe[:, ix[0].long()] * xe[:, ix[1].long()]  # [64, KP]
        ref = _Feat(D, 2, 1.0, torch.float64, "cpu").k(x)  # [64, k]
        close = (ref.T[:, None, :] - fused.T[None, :, :]).abs().amax(-1) <= 1e-12 * ref.abs().amax()  # [k, KP]
        if not bool((close.sum(1) >= 1).all()):
            raise RuntimeError(f"the fused kernels' monomials do not cover the feature map at Dk = {D}")
        _ORDERS[key] = close.float().argmax(1).to(device)
    return _ORDERS[key]


def _to_fused(packed: torch.Tensor, D: int, KP: int, DVP: int):
    """``[B, Hkv, k, 2 Dv + 2]`` -> ``([B * Hkv, 2, KP, DVP], [B * Hkv, 2, KP])`` float32 (padded features and
    columns zero: the kernels' padded features have zero query weight, so their states are never read)."""
    B, Hkv, k, W = packed.shape
    Dv = (W - 2) // 2
    idx = _order(D, packed.device)
    st = packed.new_zeros(B * Hkv, 2, KP, DVP, dtype=torch.float32)
    sd = packed.new_zeros(B * Hkv, 2, KP, dtype=torch.float32)
    p = packed.reshape(B * Hkv, k, W).float()
    st[:, 0, idx, :Dv] = p[..., :Dv]
    st[:, 1, idx, :Dv] = p[..., Dv:2 * Dv]
    sd[:, 0, idx] = p[..., 2 * Dv]
    sd[:, 1, idx] = p[..., 2 * Dv + 1]
    return st, sd


def _from_fused(gst: torch.Tensor, gsd: torch.Tensor, B: int, Hkv: int, D: int, Dv: int, dtype) -> torch.Tensor:
    """The gradient of :func:`_to_fused`: kernel-layout state gradients back to ``[B, Hkv, k, 2 Dv + 2]``."""
    idx = _order(D, gst.device)
    g = torch.cat([gst[:, 0][:, idx, :Dv], gst[:, 1][:, idx, :Dv], gsd[:, 0][:, idx, None], gsd[:, 1][:, idx, None]],
                  -1)
    return g.reshape(B, Hkv, idx.numel(), 2 * Dv + 2).to(dtype)


class _FusedFromPrefix(torch.autograd.Function):
    """Causal degree-2 output ``[B, T, Hq, Dv]`` (q's dtype) of the fused kernels after the packed ``prefix``;
    differentiable once in the five inputs and the prefix."""

    @staticmethod
    @no_autocast
    def forward(ctx, q, k1, k2, v1, v2, prefix, scale):
        from ..triton import poly as tp

        F, seg = int(tp.TUNE["F"]), int(tp.SEG_BYTES)
        D, Dv = q.shape[3], v1.shape[3]
        st = _to_fused(prefix, D, *tp.padded_dims(D, Dv))
        o, saved = tp.poly_fwd_saved(q, k1, k2, v1, v2, scale, F, seg, prefix=st)
        ctx.save_for_backward(q, k1, k2, v1, v2, o, *saved)
        ctx.cfg = (scale, F, seg, prefix.dtype)
        return o

    @staticmethod
    @refuse_double_backward("cp_poly_tensor_attn")
    @no_autocast
    def backward(ctx, do):
        from ..triton import poly as tp

        q, k1, k2, v1, v2, o, *saved = ctx.saved_tensors
        scale, F, seg, pdtype = ctx.cfg
        *grads, gst, gsd = tp.poly_bwd_saved(do, q, k1, k2, v1, v2, o, saved, scale, F, seg, prefix_grad=True)
        B, Hkv = k1.shape[0], k1.shape[2]
        return (*grads, _from_fused(gst, gsd, B, Hkv, q.shape[3], v1.shape[3], pdtype), None)


class _FusedShardTotals(torch.autograd.Function):
    """A shard's packed totals ``[B, Hkv, k, 2 Dv + 2]`` float32 on the fused kernels; differentiable once."""

    @staticmethod
    @no_autocast
    def forward(ctx, k1, k2, v1, v2):
        from ..triton import poly as tp

        st, sd = tp.poly_totals(k1, k2, v1, v2, int(tp.TUNE["F"]), int(tp.SEG_BYTES))
        ctx.save_for_backward(k1, k2, v1, v2)
        return _from_fused(st, sd, k1.shape[0], k1.shape[2], k1.shape[3], v1.shape[3], torch.float32)

    @staticmethod
    @refuse_double_backward("cp_poly_tensor_attn")
    @no_autocast
    def backward(ctx, g):
        from ..triton import poly as tp

        k1, k2, v1, v2 = ctx.saved_tensors
        D, Dv = k1.shape[3], v1.shape[3]
        return tp.poly_totals_bwd(k1, k2, v1, v2, *_to_fused(g, D, *tp.padded_dims(D, Dv)))


def fused_shard_totals(k1, k2, v1, v2) -> torch.Tensor:
    """The totals of a shard's keys in the packed layout ``[B, Hkv, k, 2 Dv + 2]`` (``[S2 | S3 | z2 | z3]``, as
    the torch paths' ``_ShardTotals``; float32) on the fused kernels' state kernel; differentiable in the four
    inputs. Context parallelism's causal path exchanges them and starts :func:`fused_attn_from_prefix` from the
    earlier ranks' sum."""
    return _FusedShardTotals.apply(k1, k2, v1, v2)


def fused_attn_from_prefix(q, k1, k2, v1, v2, prefix, scale: float) -> torch.Tensor:
    """Causal degree-2 polynomial attention on the fused kernels with the states before the first position given
    as ``prefix`` ``[B, Hkv, k, 2 Dv + 2]`` (the packed layout of :mod:`.scan`): the same rows as
    ``scan._scan_attn(q, k1, k2, v1, v2, prefix, 2, scale, chunk)``, differentiable in the prefix too."""
    return _FusedFromPrefix.apply(q, k1, k2, v1, v2, prefix, float(scale))
