"""Exact tensor attention as an autograd op, with three backends.

``tensor_attn`` computes exactly what :func:`tensorattn.naive.naive_tensor_attn` defines (one joint softmax
over the visible key pairs ``(j1, j2)`` of each query, trilinear scores, output ``sum p * v1 * v2``; causal
masks, 2-D sliding windows and grouped-query attention), and differentiates it with respect to all five
inputs.

Backends (after xformers: each declares what it supports and says why not):

* ``triton``: fused Triton forward and backward kernels (:mod:`tensorattn.triton.exact_fwd`,
  :mod:`tensorattn.triton.exact_bwd`); CUDA, or the CPU under ``TRITON_INTERPRET=1``.
* ``torch``: streaming pure PyTorch (:func:`tensorattn.exact_torch.torch_fwd`), any device;
  memory ``O(T * D)`` per head beyond the inputs.
* ``naive``: the reference forward plus the closed-form backward; only when asked for by name.

``backend="auto"`` takes the first of ``triton``, ``torch`` that supports the call. Every path
accumulates in float32 (float64 for float64 inputs) and returns the input dtype. The log-sum-exp that
the forward saves for the backward is in natural log, ``[B, Hq, T]``, float32 (float64 for float64).
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import exact_torch
from ._validate import acc_dtype, check_attn_inputs, check_bool, check_cu_seqlens, check_scale
from .dispatch import (Backend, autocast_off, choose, no_autocast, refuse_double_backward, refuse_double_backward_op,
                       triton_device_reasons)
from .packing import check_no_max_seqlen, document_bounds, run_per_document

__all__ = ["tensor_attn", "TensorAttnFunction", "BACKENDS", "AUTO_BACKENDS", "choose_backend", "exact_fwd_op",
           "exact_bwd_op"]


class NaiveBackend(Backend):
    """Reference forward (:func:`naive_tensor_attn`) and closed-form backward; any device, any float dtype."""

    name = "naive"

    def not_supported_reasons(self, **problem: Any) -> List[str]:
        return []

    def fwd(self, q, k1, k2, v1, v2, *, scale, causal, window):
        return exact_torch.naive_fwd(q, k1, k2, v1, v2, scale=scale, causal=causal, window=window)

    def bwd(self, do, q, k1, k2, v1, v2, o, lse, *, scale, causal, window, deterministic=False):
        # deterministic either way: no atomics
        return exact_torch.naive_bwd(do, q, k1, k2, v1, v2, o, lse, scale=scale, causal=causal, window=window)


class TorchBackend(Backend):
    """Streaming pure-PyTorch forward and backward; any device, any float dtype."""

    name = "torch"

    def not_supported_reasons(self, **problem: Any) -> List[str]:
        return []

    def fwd(self, q, k1, k2, v1, v2, *, scale, causal, window):
        return exact_torch.torch_fwd(q, k1, k2, v1, v2, scale=scale, causal=causal, window=window)

    def bwd(self, do, q, k1, k2, v1, v2, o, lse, *, scale, causal, window, deterministic=False):
        # deterministic either way: no atomics
        return exact_torch.torch_bwd(do, q, k1, k2, v1, v2, o, lse, scale=scale, causal=causal, window=window)


class TritonBackend(Backend):
    """Fused Triton kernels: float32/bfloat16/float16, head dims up to 128, CUDA (or TRITON_INTERPRET=1 on CPU,
    float32 only: the interpreter's bfloat16/float16 products are wrong)."""

    name = "triton"
    DTYPES = (torch.float32, torch.bfloat16, torch.float16)
    MAX_HEAD_DIM = 128

    def not_supported_reasons(self, *, device: torch.device, dtype: torch.dtype, head_dim: int, head_dim_v: int,
                              **problem: Any) -> List[str]:
        reasons = triton_device_reasons(device, dtype)
        lens = [problem.get(k) or 0 for k in ("seq_len", "seq_len_k1", "seq_len_k2")]
        heads = max(problem.get("heads_q") or 1, problem.get("heads_kv") or 1)
        if max(lens) * heads * max(head_dim, head_dim_v) >= 1 << 31:
            reasons.append(f"one batch entry holds {max(lens) * heads * max(head_dim, head_dim_v):,} elements "
                           "(length x heads x head dim), at least 2^31: the kernels' per-position offsets are int32")
        if dtype not in self.DTYPES:
            reasons.append(f"dtype {dtype} is not supported (float32, bfloat16, float16)")
        if max(head_dim, head_dim_v) > self.MAX_HEAD_DIM:
            reasons.append(f"head dims ({head_dim}, {head_dim_v}) exceed {self.MAX_HEAD_DIM}")
        return reasons

    @staticmethod
    def _mods():
        return (importlib.import_module("tensorattn.triton.exact_fwd"),
                importlib.import_module("tensorattn.triton.exact_bwd"))

    def fwd(self, q, k1, k2, v1, v2, *, scale, causal, window, docs=None):
        return self._mods()[0].exact_fwd(q, k1, k2, v1, v2, scale=scale, causal=causal, window=window, docs=docs)

    def bwd(self, do, q, k1, k2, v1, v2, o, lse, *, scale, causal, window, docs=None, deterministic=False):
        return self._mods()[1].exact_bwd(do, q, k1, k2, v1, v2, o, lse, scale=scale, causal=causal, window=window,
                                         docs=docs, deterministic=deterministic)


BACKENDS: Dict[str, Backend] = {b.name: b for b in (TritonBackend(), TorchBackend(), NaiveBackend())}
AUTO_BACKENDS = ("triton", "torch")


def choose_backend(requested: str, problem: Dict[str, Any]) -> Backend:
    """The backend for ``problem`` (a dict with device, dtype, head_dim, head_dim_v, ...).

    ``"auto"`` tries :data:`AUTO_BACKENDS` in order; a name forces that backend and raises a
    ``ValueError`` with its reasons if it cannot run the call.
    """
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a str ('auto', 'triton', 'torch' or 'naive'), got {type(requested).__name__}")
    pool = [BACKENDS[n] for n in AUTO_BACKENDS] if requested == "auto" else list(BACKENDS.values())
    return choose(pool, requested, problem, op="tensor_attn")


class TensorAttnFunction(torch.autograd.Function):
    """Autograd wrapper: saves the inputs, the output and the natural-log LSE; the backward recomputes P.

    Differentiable once, on every backend: the backward is hand-written, so a double backward
    (``create_graph=True`` then differentiating the gradients) raises a ``RuntimeError`` instead of returning a
    wrong Hessian-vector product or treating the gradients as constants.
    """

    @staticmethod
    @no_autocast  # the backward must recompute exactly the scores whose log-sum-exp is saved here
    def forward(ctx, q, k1, k2, v1, v2, scale: float, causal: bool, window, backend: Backend,
                deterministic: bool = False):
        o, lse = backend.fwd(q, k1, k2, v1, v2, scale=scale, causal=causal, window=window)
        ctx.save_for_backward(q, k1, k2, v1, v2, o, lse)
        ctx.scale, ctx.causal, ctx.window, ctx.backend = scale, causal, window, backend
        ctx.kw = dict(deterministic=True) if deterministic else {}  # a backend's bwd need not know the flag
        return o

    @staticmethod
    @refuse_double_backward("tensor_attn")
    @no_autocast
    def backward(ctx, do):
        q, k1, k2, v1, v2, o, lse = ctx.saved_tensors
        grads = ctx.backend.bwd(do.contiguous(), q, k1, k2, v1, v2, o, lse, scale=ctx.scale, causal=ctx.causal,
                                window=ctx.window, **ctx.kw)
        return (*grads, None, None, None, None, None)


# --------------------------------------------------------------------------------------------------
# Custom ops (torch.library): what tensor_attn calls, so that torch.compile traces it as one opaque node
# --------------------------------------------------------------------------------------------------
def _window(window: Optional[List[int]]):
    return None if window is None else (int(window[0]), int(window[1]))


@torch.library.custom_op("tensorattn::exact_fwd", mutates_args=())
def exact_fwd_op(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor, scale: float,
                 causal: bool, window: Optional[List[int]], backend: str, doc_lo: Optional[torch.Tensor] = None,
                 doc_hi: Optional[torch.Tensor] = None, deterministic: bool = False
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward of :func:`tensor_attn` on the named backend (inputs validated by the caller): ``(o [B, T, Hq, Dv]``
    in the input dtype, ``lse [B, Hq, T]`` natural log in the accumulation dtype), both contiguous. Runs with
    autocast off (see :func:`tensorattn.dispatch.no_autocast`). ``doc_lo``, ``doc_hi``: packed documents on the
    fused kernels (int32 ``[T]``: each position's document start and end; :func:`tensorattn.packing.document_bounds`).
    ``deterministic``: for the backward (kept with the autograd context; the forward has no atomics)."""
    _check_docs(doc_lo, doc_hi, q)
    with autocast_off(q.device.type):
        o, lse = BACKENDS[backend].fwd(q, k1, k2, v1, v2, scale=scale, causal=causal, window=_window(window),
                                       **_docs(doc_lo, doc_hi))
    return o.contiguous(), lse.contiguous()


def _check_docs(doc_lo, doc_hi, q) -> None:
    """The document bounds' layout (no values read): both or neither, int32 ``[T]`` contiguous on q's device,
    the fused backend and one batch entry only."""
    if doc_lo is None and doc_hi is None:
        return
    T = q.shape[1]
    for name, x in (("doc_lo", doc_lo), ("doc_hi", doc_hi)):
        if x is None or x.dtype != torch.int32 or x.dim() != 1 or x.numel() != T or not x.is_contiguous() \
                or x.device != q.device:
            got = None if x is None else f"{x.dtype} {tuple(x.shape)} on {x.device}"
            raise ValueError(f"{name} must be a contiguous int32 tensor [T = {T}] on {q.device} (document bounds "
                             f"from tensorattn.packing.document_bounds), got {got}")
    if q.shape[0] != 1:
        raise ValueError(f"document bounds need one packed batch entry, got q with batch {q.shape[0]}")


def _docs(doc_lo, doc_hi):
    """The ``docs`` keyword of the Triton backend when documents are given (the other backends never get it: the
    op runs them once per document)."""
    return {} if doc_lo is None else {"docs": (doc_lo, doc_hi)}


@exact_fwd_op.register_fake
def _exact_fwd_fake(q, k1, k2, v1, v2, scale, causal, window, backend, doc_lo=None, doc_hi=None, deterministic=False):
    B, T, Hq, _ = q.shape
    return (q.new_empty(B, T, Hq, v1.shape[3]), q.new_empty(B, Hq, T, dtype=acc_dtype(q.dtype)))


@torch.library.custom_op("tensorattn::exact_bwd", mutates_args=())
def exact_bwd_op(do: torch.Tensor, q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v1: torch.Tensor,
                 v2: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, scale: float, causal: bool,
                 window: Optional[List[int]], backend: str, doc_lo: Optional[torch.Tensor] = None,
                 doc_hi: Optional[torch.Tensor] = None, deterministic: bool = False
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`tensor_attn`: ``(dq, dk1, dk2, dv1, dv2)`` in the inputs' dtypes, contiguous. Not
    differentiable: differentiating its outputs raises (a double backward of ``tensor_attn``). ``deterministic``:
    no floating-point atomics (bitwise the same gradients on every run)."""
    with autocast_off(q.device.type), torch.no_grad():
        grads = BACKENDS[backend].bwd(do.contiguous(), q, k1, k2, v1, v2, o, lse, scale=scale, causal=causal,
                                      window=_window(window), deterministic=deterministic, **_docs(doc_lo, doc_hi))
    return tuple(g.contiguous() for g in grads)


@exact_bwd_op.register_fake
def _exact_bwd_fake(do, q, k1, k2, v1, v2, o, lse, scale, causal, window, backend, doc_lo=None, doc_hi=None,
                    deterministic=False):
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k1, k2, v1, v2))


def _exact_setup_context(ctx, inputs, output):
    q, k1, k2, v1, v2, scale, causal, window, backend, doc_lo, doc_hi, deterministic = inputs
    o, lse = output
    ctx.save_for_backward(q, k1, k2, v1, v2, o, lse, doc_lo, doc_hi)  # the bounds: int32, or None
    ctx.mark_non_differentiable(lse)
    ctx.cfg = (scale, causal, window, backend, deterministic)


def _exact_backward(ctx, do, _dlse):
    q, k1, k2, v1, v2, o, lse, doc_lo, doc_hi = ctx.saved_tensors
    scale, causal, window, backend, deterministic = ctx.cfg
    grads = exact_bwd_op(do, q, k1, k2, v1, v2, o, lse, scale, causal, window, backend, doc_lo, doc_hi,
                         deterministic)
    return (*grads, None, None, None, None, None, None, None)


exact_fwd_op.register_autograd(_exact_backward, setup_context=_exact_setup_context)
refuse_double_backward_op(exact_bwd_op, "tensor_attn")


def tensor_attn(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor, *,
                scale: Optional[float] = None, causal: bool = False, window=None, backend: str = "auto",
                check_finite: Optional[bool] = None, cu_seqlens: Optional[torch.Tensor] = None,
                max_seqlen: Optional[int] = None, deterministic: bool = False) -> torch.Tensor:
    """Exact tensor (2-simplicial) attention with autograd.

    For each query ``i`` and visible key pair ``(j1, j2)``::

        s[i, j1, j2] = scale * sum_d q[i, d] * k1[j1, d] * k2[j2, d]
        o[i]         = sum_{j1, j2} softmax_{(j1, j2)}(s[i])[j1, j2] * v1[j1] * v2[j2]

    Visibility: everything without a mask; ``causal``: ``j1 <= i`` and ``j2 <= i``; ``window=(w1, w2)``:
    ``i - w1 < j1 <= i`` and ``i - w2 < j2 <= i`` (implies causal; an int ``w`` means ``(w, w)``).
    Query head ``h`` reads key/value head ``h // (Hq // Hkv)``. Identical to
    :func:`tensorattn.naive_tensor_attn`, which is the reference.

    Args:
        q: ``[B, T, Hq, D]`` queries.
        k1, v1: ``[B, S1, Hkv, D]`` and ``[B, S1, Hkv, Dv]``.
        k2, v2: ``[B, S2, Hkv, D]`` and ``[B, S2, Hkv, Dv]``. ``S1 == S2 == T`` with a mask; ``Hq % Hkv == 0``.
        scale: multiplies the trilinear score; default ``1 / sqrt(D)``. ``|scale|`` must be at most
            :func:`tensorattn._validate.scale_bound` (about 1.8e19; 1.3e154 for float64 inputs), above which the
            float32 scores would overflow.
        causal: causal mask on both key streams (a bool; numpy bools are accepted).
        window: ``None``, ``w`` or ``(w1, w2)`` with ``w1, w2 >= 1``.
        backend: ``"auto"`` (triton on CUDA, else torch), ``"triton"``, ``"torch"`` or ``"naive"``.
        check_finite: refuse NaN/Inf inputs with a ``ValueError``. ``None`` (default) checks CPU inputs only:
            on a GPU the check would synchronise every call. An unchecked non-finite value poisons the rows it
            reaches, and on the torch/naive backends also rows that cannot see it (0 · NaN in the masked sums).
        cu_seqlens: packed documents (:mod:`tensorattn.packing`): inputs ``[1, total, H, D]`` and an int32
            tensor of document starts with a leading 0 and ``total`` at the end; each query then sees only key
            pairs of its own document (masks and windows inside it). The fused kernels take the whole row in one
            launch (each position's document bounds in their masks); the other backends run once per document.
        max_seqlen: with ``cu_seqlens``, optionally the longest document's length (checked).
        deterministic: a backward without floating-point atomics, so gradients are bitwise the same on every run
            (a bool). Only the Triton backend has atomics (its dk1/dv1 adds); there it runs its key-major kernel
            a second time with the streams swapped instead (its cost: the deterministic rows of
            ``benchmarks/results/bench_exact_v10.md`` and ``bench_exact_v10_causal.md``).
            The torch and naive backends are deterministic either way.

    Differentiable once: double backward raises a ``RuntimeError`` on every backend.

    ``torch.compile(fullgraph=True)`` traces it without graph breaks: the validation below is static (shapes,
    dtypes, devices) except the non-finite check, which is skipped while compiling
    (:func:`tensorattn._validate.values_checkable`), and the computation is the custom op
    ``torch.ops.tensorattn.exact_fwd`` (backward ``torch.ops.tensorattn.exact_bwd``), one opaque node each, with
    fake (meta) implementations: meta inputs give a meta output of the right shape.

    Returns:
        ``o``: ``[B, T, Hq, Dv]`` in the input dtype (accumulated in float32; float64 for float64 inputs).

    Raises:
        TypeError, ValueError: bad inputs (naming the argument), or a forced backend that cannot run the
            call (the message lists its reasons).

    Examples:
        >>> q = k1 = k2 = v1 = v2 = torch.randn(1, 16, 2, 8)
        >>> tensor_attn(q, k1, k2, v1, v2, window=(4, 2)).shape
        torch.Size([1, 16, 2, 8])
    """
    causal = check_bool("causal", causal)
    deterministic = check_bool("deterministic", deterministic)
    B, T, Hq, Hkv, D, Dv, S1, S2, win = check_attn_inputs(q, k1, k2, v1, v2, causal=causal, window=window,
                                                          check_finite=check_finite)
    scale = check_scale(scale, D, dtype=q.dtype)
    check_no_max_seqlen(cu_seqlens, max_seqlen)
    bounds = None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, max_seqlen, B=B, T=T, S1=S1, S2=S2,
                                                                   device=q.device)
    packed_causal = causal
    if win is not None:
        # a window at least as long as the sequence is the causal mask; the fused kernels take the causal path
        win = None if (win[0] >= T and win[1] >= T) else win
        causal = True
    problem = dict(device=q.device, dtype=q.dtype, head_dim=D, head_dim_v=Dv, seq_len=T, seq_len_k1=S1,
                   seq_len_k2=S2, heads_q=Hq, heads_kv=Hkv, causal=causal, window=win)
    be = choose_backend(backend, problem)
    docs = None
    if bounds is not None and len(bounds) > 2:
        if BACKENDS.get("triton") is not be:  # the other backends run once per document
            return run_per_document(lambda *xs: tensor_attn(*xs, scale=scale, causal=packed_causal, window=window,
                                                            backend=backend, check_finite=False,
                                                            deterministic=deterministic), bounds,
                                    q, k1, k2, v1, v2)
        docs = document_bounds(cu_seqlens, T)  # the fused kernels: one launch, the boundaries in their masks
    if be.name not in BACKENDS or BACKENDS[be.name] is not be:  # a backend object not registered by name
        return TensorAttnFunction.apply(q, k1, k2, v1, v2, scale, causal, win, be, deterministic)
    o, _ = exact_fwd_op(q, k1, k2, v1, v2, scale, causal, None if win is None else list(win), be.name,
                        *(docs if docs is not None else (None, None)), deterministic)
    return o
