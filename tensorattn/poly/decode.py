"""Decoding: the causal op as a recurrence (:class:`PolyTensorAttnState`, :func:`poly_tensor_attn_step`); the
state is ``2 k (Dv + 1)`` floats per (batch, kv head) whatever the length decoded."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .._validate import acc_dtype, check_same, check_scale, check_tensor, maybe_check_finite
from .common import EPS, _Feat, _check_degree, _check_rank, _with_ones, poly_rank


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
        acc = acc_dtype(k1.dtype)
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
