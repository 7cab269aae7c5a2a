"""The op :func:`poly_tensor_attn`: its backends and its custom-op pair.

Every backend follows the protocol of :class:`tensorattn.dispatch.Backend`, the exact op's too:
``not_supported_reasons(**problem)`` (empty when it can run the call), ``fwd`` and ``bwd`` (the two halves of the op,
not differentiable themselves), plus here ``plan`` (the backend's block sizes, fixed at the forward so that the backward replays the same
plan) and ``fake_fwd`` (the shapes of ``fwd``'s outputs, for ``torch.compile``). One custom-op pair,
``tensorattn::poly_fwd`` / ``poly_bwd``, dispatches to the chosen backend by name; its registered autograd is the
op's only autograd function. ``fwd`` returns the output ``[B, T, Hq, Dv]`` in q's dtype and a list of saved tensors
(what ``bwd`` needs besides the inputs and the output; empty when ``save`` is false and nothing needs it).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .._validate import acc_dtype, check_attn_inputs, check_cu_seqlens, check_scale
from ..dispatch import Backend, autocast_off, choose, refuse_double_backward_op, triton_device_reasons
from ..packing import check_no_max_seqlen, run_per_document
from . import chunked, scan
from .common import EPS, _check_degree, _check_output, _check_rank, _Feat, poly_rank


class _TorchBackend(Backend):
    """Pure PyTorch, any device and float dtype: the chunked path (:mod:`.chunked`), or causal on CUDA with small
    running sums the scan (:mod:`.scan`). ``plan``: ``[0, chunk, ckpt]`` (chunked) or ``[1, chunk]`` (scan)."""

    name = "torch"

    def not_supported_reasons(self, **p) -> List[str]:
        return []

    def plan(self, q, k1, v1, *, degree, causal) -> List[int]:
        B, T, _, D = q.shape
        Hkv, Dv = k1.shape[2], v1.shape[3]
        k = poly_rank(D, degree)
        if causal and scan._use_scan(q.device, B, Hkv, k, Dv):
            return [1, scan._scan_chunk(T, B, Hkv, k, Dv)]
        return [0, chunked._TORCH_CHUNK, chunked._TORCH_CKPT]

    def fwd(self, q, k1, k2, v1, v2, *, degree, causal, scale, plan, save, chunks=None):
        _no_chunks(self, chunks)
        B, T, Hq, D = q.shape
        Hkv, Dv = k1.shape[2], v1.shape[3]
        acc = acc_dtype(q.dtype)
        # saved: the output in the accumulation dtype (only when q's dtype is narrower: else it is the output), the
        # normaliser, and the chunk-start states (scan) or the stacked (A2, A3) states (chunked)
        if plan[0]:
            k = poly_rank(D, degree)
            prefix = torch.zeros(B, Hkv, k, 2 * Dv + 2, dtype=acc, device=q.device)
            num, den, states = scan._scan_fwd(q, k1, k2, v1, v2, prefix, _Feat(D, degree, scale, acc, q.device),
                                              Hq // Hkv, plan[1])
            oa = num / (den[..., None] + EPS)  # [B, T, Hkv, G, Dv]
            o = oa.reshape(B, T, Hq, Dv).to(q.dtype)
        else:
            oa, den, st = chunked._torch_fwd(q, k1, k2, v1, v2, degree, causal, scale, plan[1], plan[2])
            states = torch.stack([torch.stack(x) for x in st])
            o = oa.transpose(1, 2).to(q.dtype).contiguous()  # oa: [B, Hq, T, Dv]
        if not save:
            return o, []
        return o, ([oa] if q.dtype != acc else []) + [den, states]

    def fake_fwd(self, q, k1, k2, v1, v2, *, degree, causal, plan, save, chunks=None):
        _no_chunks(self, chunks)
        B, T, Hq, D = q.shape
        Hkv, Dv = k1.shape[2], v1.shape[3]
        acc, k = acc_dtype(q.dtype), poly_rank(int(D), degree)
        out = q.new_empty(B, T, Hq, Dv)
        if not save:
            return out, []
        G = Hq // Hkv
        if plan[0]:
            oa, rest = q.new_empty(B, T, Hkv, G, Dv, dtype=acc), [
                q.new_empty(B, T, Hkv, G, dtype=acc), q.new_empty(-(-T // plan[1]), B, Hkv, k, 2 * Dv + 2, dtype=acc)]
        else:
            oa, rest = q.new_empty(B, Hq, T, Dv, dtype=acc), [
                q.new_empty(B, Hq, T, dtype=acc),
                q.new_empty(chunked._n_states(T, causal, plan[1], plan[2]), 2, B, Hq, k, Dv + 1, dtype=acc)]
        return out, ([oa] if q.dtype != acc else []) + rest

    def bwd(self, do, q, k1, k2, v1, v2, o, saved, *, degree, causal, scale, plan, chunks=None):
        _no_chunks(self, chunks)
        oa, den, states = saved if len(saved) == 3 else (None, *saved)
        B, T, Hq, Dv = o.shape
        Hkv = k1.shape[2]
        G = Hq // Hkv
        if plan[0]:  # o = num / (den + EPS)  =>  dnum = dO / (den + EPS), dden = -<dO, o> / (den + EPS)
            oa = o.view(B, T, Hkv, G, Dv) if oa is None else oa
            doa = do.to(oa.dtype).view(B, T, Hkv, G, Dv)
            r = 1.0 / (den + EPS)
            feat = _Feat(q.shape[3], degree, scale, oa.dtype, q.device)
            return scan._scan_bwd(doa * r[..., None], -(doa * oa).sum(-1) * r, q, k1, k2, v1, v2, states, feat, G,
                                  plan[1])[:5]
        oa = o.transpose(1, 2) if oa is None else oa
        return chunked._torch_bwd(do.transpose(1, 2), q, k1, k2, v1, v2, oa, den,
                                  [(s[0], s[1]) for s in states.unbind(0)], degree, causal, scale, plan[1], plan[2])


class _TritonBackend(Backend):
    """The fused Triton kernels (:mod:`tensorattn.triton.poly`): causal, degree 2 (degree 4 at Dk = 16). ``plan``:
    ``[F, segment bytes]`` (the state-chunk length and the segments' memory budget at the forward)."""

    name = "triton"

    def not_supported_reasons(self, *, device, dtype, degree, causal, head_dim, value_dim, from_prefix=False,
                              batch_heads: Optional[int] = None, **_) -> List[str]:
        r = triton_device_reasons(device, dtype)  # with the interpreter's float32-only rule
        if batch_heads is not None and batch_heads > 65535:  # the walks' grid axis 1 (CUDA's limit on it)
            r.append(f"batch x query heads must be at most 65535 for the fused kernels, got {batch_heads}")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            r.append(f"dtype {dtype} is not supported (float16, bfloat16, float32)")
        if degree not in (2, 4):
            r.append(f"the fused kernels implement degrees 2 and 4, got degree {degree}")
        elif degree == 4 and head_dim != 16:
            r.append(f"degree 4 on the fused kernels needs Dk = 16 (rank C(20, 4) = 4845), got Dk = {head_dim}")
        elif degree != 2 and from_prefix:
            r.append(f"context parallelism's fused path (a prefix state) is degree 2 only, got degree {degree}")
        if not causal:
            r.append("the fused kernels are causal only (the non-causal op is two matrix products: torch backend)")
        if head_dim > 64 or head_dim < 16 or head_dim & (head_dim - 1):
            # tl.dot needs inner dimensions >= 16 (a Dk = 4 launch failed to compile on an H100)
            r.append(f"Dk must be a power of two in [16, 64], got {head_dim}")
        if value_dim > 128:
            r.append(f"Dv must be <= 128 for the fused kernels, got {value_dim}")
        return r

    @staticmethod
    def _mod():
        from ..triton import poly as tp

        return tp

    def plan(self, q, k1, v1, *, degree, causal) -> List[int]:
        tp = self._mod()
        return [int(tp.TUNE["F"]), int(tp.SEG_BYTES)]

    def fwd(self, q, k1, k2, v1, v2, *, degree, causal, scale, plan, save, chunks=None):
        """saved = (the normaliser, then two states per backward segment when ``save``). ``chunks``: packed
        documents' chunk table (:func:`tensorattn.triton.poly.chunk_table`)."""
        return self._mod().poly_fwd_saved(q, k1, k2, v1, v2, scale, plan[0], plan[1], save=save, chunks=chunks,
                                          degree=degree)

    def fake_fwd(self, q, k1, k2, v1, v2, *, degree, causal, plan, save, chunks=None):
        tp = self._mod()
        B, T, HQ, D = q.shape
        HK, DV = k1.shape[2], v1.shape[3]
        KP, DVP = tp.padded_dims(int(D), int(DV), degree)
        NF = None if chunks is None else int(chunks.shape[1])
        n = len(tp._saved_ranges(int(B), int(T), int(HQ), int(HK), int(D), int(DV), plan[0], plan[1], NF,
                                 degree)) if save else 0
        f32 = dict(dtype=torch.float32)
        states = [t for _ in range(n) for t in (q.new_empty(B * HK, 2, KP, DVP, **f32), q.new_empty(B * HK, 2, KP, **f32))]
        return q.new_empty(B, T, HQ, DV), [q.new_empty(B, T, HQ, **f32)] + states

    def chunk_table(self, cu_seqlens, T: int, plan: List[int]) -> torch.Tensor:
        """The chunk table of packed documents for ``plan``'s state-chunk length (``fwd``'s ``chunks``)."""
        return self._mod().chunk_table(cu_seqlens, T, plan[0])

    def bwd(self, do, q, k1, k2, v1, v2, o, saved, *, degree, causal, scale, plan, chunks=None):
        return self._mod().poly_bwd_saved(do, q, k1, k2, v1, v2, o, saved, scale, plan[0], plan[1], chunks=chunks,
                                          degree=degree)


def _no_chunks(backend: Backend, chunks) -> None:
    if chunks is not None:
        raise ValueError(f"poly_tensor_attn: the {backend.name} backend takes no chunk table (packed documents run "
                         f"once per document there)")


#: The backends by name, in the order ``backend="auto"`` tries them (as :data:`tensorattn.exact.BACKENDS`).
BACKENDS: Dict[str, Backend] = {b.name: b for b in (_TritonBackend(), _TorchBackend())}


# --------------------------------------------------------------------------------------------------
# Custom ops (torch.library): one opaque node each under torch.compile, with fake implementations that size every
# output from the shapes alone (the number of saved tensors depends on the shapes, so a compiled graph specialises
# on them)
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("tensorattn::poly_fwd", mutates_args=())
def poly_fwd_op(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor, degree: int,
                causal: bool, scale: float, backend: str, plan: List[int], save: bool,
                chunks: Optional[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Forward of :func:`poly_tensor_attn` on the named backend (inputs validated, ``B, T >= 1``): ``(o [B, T, Hq,
    Dv]`` in q's dtype, the backend's saved tensors``)``, autocast off. ``chunks``: packed documents' chunk table
    (the Triton backend only) or None. (No default: the dispatcher drops trailing arguments equal to their default,
    and the registered backward must return one gradient per argument it kept.)"""
    with autocast_off(q.device.type), torch.no_grad():
        o, saved = BACKENDS[backend].fwd(q, k1, k2, v1, v2, degree=degree, causal=causal, scale=scale, plan=plan,
                                         save=save, chunks=chunks)
        return o.contiguous(), [t.contiguous() for t in saved]


@poly_fwd_op.register_fake
def _poly_fwd_fake(q, k1, k2, v1, v2, degree, causal, scale, backend, plan, save, chunks):
    return BACKENDS[backend].fake_fwd(q, k1, k2, v1, v2, degree=degree, causal=causal, plan=plan, save=save,
                                      chunks=chunks)


@torch.library.custom_op("tensorattn::poly_bwd", mutates_args=())
def poly_bwd_op(do: torch.Tensor, q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v1: torch.Tensor,
                v2: torch.Tensor, o: torch.Tensor, saved: List[torch.Tensor], degree: int, causal: bool, scale: float,
                backend: str, plan: List[int], chunks: Optional[torch.Tensor]
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The five input gradients (their dtypes, contiguous) given ``do`` ``[B, T, Hq, Dv]``. Not differentiable:
    differentiating its outputs raises."""
    with autocast_off(q.device.type), torch.no_grad():
        grads = BACKENDS[backend].bwd(do, q, k1, k2, v1, v2, o, saved, degree=degree, causal=causal, scale=scale,
                                      plan=plan, chunks=chunks)
        return tuple(g.contiguous() for g in grads)


@poly_bwd_op.register_fake
def _poly_bwd_fake(do, q, k1, k2, v1, v2, o, saved, degree, causal, scale, backend, plan, chunks):
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k1, k2, v1, v2))


def _setup_context(ctx, inputs, output):
    q, k1, k2, v1, v2, degree, causal, scale, backend, plan, save, chunks = inputs
    o, saved = output
    ctx.save_for_backward(q, k1, k2, v1, v2, o, chunks, *saved)
    ctx.mark_non_differentiable(*saved)
    ctx.cfg, ctx.save = (degree, causal, scale, backend, plan), save


def _backward(ctx, do, _dsaved):
    if not ctx.save:
        raise RuntimeError("poly_tensor_attn: this forward saved nothing for a backward (no input required a "
                           "gradient then)")
    q, k1, k2, v1, v2, o, chunks, *saved = ctx.saved_tensors
    return (*poly_bwd_op(do, q, k1, k2, v1, v2, o, saved, *ctx.cfg, chunks), *([None] * 7))


poly_fwd_op.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward_op(poly_bwd_op, "poly_tensor_attn")


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
            state) stay inside each document. The fused Triton kernels take the whole packed row in one set of
            launches (the states restart at each document inside them); the torch backend runs once per document.
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
    bounds = None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, max_seqlen, B=B, T=T, S1=S1, S2=S2,
                                                                   device=q.device)
    be = choose(list(BACKENDS.values()), backend, dict(device=q.device, dtype=q.dtype, degree=degree, causal=causal,
                                         head_dim=D, value_dim=Dv, batch_heads=B * Hq), op="poly_tensor_attn")
    packed = bounds is not None and len(bounds) > 2
    if packed and be.name != "triton":  # the torch backend runs once per document
        o = run_per_document(lambda *xs: poly_tensor_attn(*xs, degree=degree, causal=causal, scale=scale,
                                                          backend=backend, check_finite=False), bounds,
                             q, k1, k2, v1, v2)
        return _check_output(o, check_finite, degree, scale)
    if B == 0 or T == 0:  # nothing to attend from: an empty output, still connected to the inputs' graph
        return q.new_zeros(B, T, Hq, Dv) + 0 * q.sum() + 0 * (k1.sum() + k2.sum() + v1.sum() + v2.sum())
    save = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k1, k2, v1, v2))
    plan = be.plan(q, k1, v1, degree=degree, causal=causal)
    # the fused kernels: one launch per kernel for the whole packed row, the states restarting at every document
    chunks = be.chunk_table(cu_seqlens, T, plan) if packed else None
    o, _ = poly_fwd_op(q, k1, k2, v1, v2, degree, causal, float(scale), be.name, plan, save, chunks)
    return _check_output(o, check_finite, degree, scale)
