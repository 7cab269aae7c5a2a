"""Attention layers: exact tensor attention, fast (polynomial) tensor attention and a softmax baseline.

Every layer maps ``x: [B, T, dim]`` to ``[B, T, dim]`` and can also run as cross-attention. The three
layers share one calling convention, so a model can swap them by a letter of its pattern string:

* :class:`SoftmaxAttention` (``S``): matrix attention; keys and values come from ``y`` (default ``x``).
* :class:`TensorAttention` (``T``): exact tensor (2-simplicial) attention; ``k1, v1`` come from ``y`` and
  ``k2, v2`` from ``z`` (both default to ``x``), so three distinct inputs give the multi-view case of
  the paper (A1 = x, A2 = A4 = y, A3 = A5 = z).
* :class:`PolyTensorAttention` (``P``): the same layer computed with the polynomial method in
  ``O(T · k · Dv)`` per head, ``k = C(Dk + degree, degree)``, with its own (usually small) key dim ``Dk``.

Semantics of the ops (score, joint softmax over pairs, visibility, GQA) are those of
:func:`tensorattn.naive_tensor_attn`. Layout inside the layers is ``[B, T, H, D]``.

Checks: constructor sizes are ints ``>= 1`` and flags are bools (numpy bools accepted); ``forward`` checks
that ``x, y, z`` are floating ``[B, T, dim]`` tensors with one batch size, on the parameters' device and (outside
autocast) of their dtype, and, by the library's non-finite rule, refuses NaN/Inf inputs on the CPU
(``check_finite=None``; ``True``/``False`` to always/never check), except while ``torch.compile`` traces.

``torch.compile(layer, fullgraph=True)`` traces every layer's forward (no cache) without graph breaks: the ops
are custom ops (``torch.ops.tensorattn.*``), one opaque node each; meta tensors give meta outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._validate import (acc_dtype, check_bool, check_cu_seqlens, check_cu_seqlens_layout, check_optional_bool,
                        check_tensor, maybe_check_finite, normalize_window)
from .exact import tensor_attn
from .naive import causal_keys, expand_kv, naive_tensor_attn
from .packing import positions_in_documents, run_per_document
from .poly import PolyTensorAttnState, poly_tensor_attn, poly_tensor_attn_step

__all__ = ["RotaryEmbedding", "SoftmaxAttention", "TensorAttention", "PolyTensorAttention", "DecodeCache"]


@dataclass
class DecodeCache:
    """What one causal layer keeps between incremental calls (``layer(x, cache=cache)``; ``layer.new_cache()``):
    the keys and values it has seen (rotated where the layer uses RoPE), or, for :class:`PolyTensorAttention`, the
    fixed-size polynomial state. ``length`` is the number of positions seen so far, i.e. the absolute position
    of the next token.

    * softmax layer: ``tensors = (k, v)`` ``[B, S, Hkv, D]``; with ``window = w`` only the last ``w`` positions;
    * exact tensor layer: ``tensors = (k1, k2, v1, v2)``; with ``window = (w1, w2)`` the last ``max(w1, w2)``
      positions, else all of them (each new token then costs ``O(S² D)`` per head);
    * fast tensor layer: ``state`` (:class:`tensorattn.poly.PolyTensorAttnState`), ``2 k (Dv + 1)`` floats per
      (batch, kv head) whatever the length.
    """

    tensors: Optional[Tuple[torch.Tensor, ...]] = None
    state: Any = None
    length: int = 0

    def nbytes(self) -> int:
        if self.state is not None:
            return self.state.nbytes()
        return sum(t.numel() * t.element_size() for t in self.tensors or ())


def _check_cache(layer: nn.Module, cache, y, z=None) -> int:
    """A cache is for causal self-attention: returns the position of the first new token."""
    if not isinstance(cache, DecodeCache):
        raise TypeError(f"cache must be a DecodeCache (from {type(layer).__name__}.new_cache()), got "
                        f"{type(cache).__name__}")
    if y is not None or z is not None:
        raise ValueError("cache: incremental decoding is causal self-attention, so y and z must be None")
    if not layer.causal:
        raise ValueError(f"cache: {type(layer).__name__} was built with causal=False; incremental decoding needs a "
                         "causal layer")
    return cache.length


def _append(cache: DecodeCache, new, keep: Optional[int]):
    """The cached tensors followed by the new ones (every position the new queries may see); the cache keeps
    the last ``keep`` positions (all if ``None``)."""
    full = new if cache.tensors is None else tuple(torch.cat([a, b], 1) for a, b in zip(cache.tensors, new))
    cache.tensors = tuple(t if keep is None or t.shape[1] <= keep else t[:, -keep:] for t in full)
    return full


def _visible(q_pos0: int, T: int, k_pos0: int, S: int, window: Optional[int], device) -> torch.Tensor:
    """``[T, S]``: key position ``j`` visible from query position ``i`` (``j <= i``, and ``i - w < j``)."""
    return causal_keys(q_pos0 + torch.arange(T, device=device), k_pos0 + torch.arange(S, device=device), window)


def _cached_tensor_attn(q, k1, k2, v1, v2, q_pos0: int, window, scale: Optional[float]) -> torch.Tensor:
    """Exact tensor attention of new queries (absolute positions ``q_pos0 ..``) over cached keys that end at the last
    query: each query runs :func:`tensorattn.naive_tensor_attn` unmasked on the keys visible from it (those up to its
    own position, the last ``w1``/``w2`` of them with a window). ``[B, T, Hq, Dv]``."""
    T, S = q.shape[1], k1.shape[1]
    k_pos0 = q_pos0 + T - S  # absolute position of the first cached key (k1 and k2 keep the same positions)
    outs = []
    for t in range(T):
        end = q_pos0 + t - k_pos0 + 1  # cached keys up to the query's own position
        w1, w2 = (end, end) if window is None else window
        s1, s2 = max(0, end - w1), max(0, end - w2)
        outs.append(naive_tensor_attn(q[:, t:t + 1], k1[:, s1:end], k2[:, s2:end], v1[:, s1:end], v2[:, s2:end],
                                      scale=scale, check_finite=False))  # the layer checked its input
    return torch.cat(outs, 1)


def _packed(layer: nn.Module, cu_seqlens, x, others, cache) -> bool:
    """Whether this is a packed self-attention call, after the checks that read no values (the op that gets
    ``cu_seqlens`` reads and checks the boundaries once)."""
    if cu_seqlens is None:
        return False
    if cache is not None:
        raise ValueError(f"{type(layer).__name__}: cu_seqlens (packed documents) and cache cannot be combined")
    if any(t is not None for t in others):
        raise ValueError(f"{type(layer).__name__}: cu_seqlens (packed documents) needs self-attention (no y/z)")
    T = x.shape[1]
    check_cu_seqlens_layout(cu_seqlens, B=x.shape[0], T=T, S1=T, S2=T, device=x.device)
    return True


def _check_dims(**dims: int) -> None:
    for name, v in dims.items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")


def _check_inputs(layer: nn.Module, named, keys, check_finite: Optional[bool]) -> None:
    """``named``: ``[(name, tensor)]`` of a layer's inputs, the queries first: each a floating ``[B, T, dim]`` tensor
    with the queries' batch size, on the parameters' device and of their dtype (unless autocast is on); those
    named in ``keys`` (the ones keys and values come from) with at least one position; then the non-finite rule,
    which is skipped while ``torch.compile`` traces (a data-dependent check would break the graph:
    :func:`tensorattn._validate.values_checkable`) and for meta tensors."""
    w = next(layer.parameters())
    ref_name, ref = named[0]
    for nm, x in named:
        check_tensor(nm, x, ndim=3)
        if x.shape[2] != layer.dim:
            raise ValueError(f"{nm} must have shape [B, T, dim] with dim = {layer.dim} (the layer's width), got "
                             f"shape {tuple(x.shape)}")
        if x.shape[0] != ref.shape[0]:
            raise ValueError(f"{nm} has batch size {x.shape[0]} but {ref_name} has {ref.shape[0]}; the inputs must "
                             "share the batch dim")
        if x.device != w.device:
            raise ValueError(f"{nm} is on device {x.device} but the layer's parameters are on {w.device}")
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"{nm} has dtype {x.dtype} but the layer's parameters are {w.dtype}; cast the input "
                            "or the layer (or run under torch.autocast)")
    for nm, x in named:
        if nm in keys and x.shape[1] == 0:
            raise ValueError(f"{nm} must have at least one position (the keys and values come from it), got shape "
                             f"{tuple(x.shape)}")
    maybe_check_finite(check_finite, [n for n, _ in named], [x for _, x in named])


def _check_heads(n_heads: int, n_kv_heads: int) -> None:
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads}) for grouped-query "
                         "attention")


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE, Su et al. 2021) for ``[B, T, H, D]`` tensors, D even.

    Rotates each pair of channels ``(2m, 2m+1)`` of the vector at position ``t`` by the angle
    ``t · base^(-2m/D)``. For matrix attention the score ``<R_i q, R_j k>`` then depends on ``i - j``
    only. For the trilinear score ``sum_d q_d k1_d k2_d`` of tensor attention there is no such identity:
    rotating q, k1 and k2 gives a position-dependent score, not an exactly relative one.

    Args:
        dim: the head dim D (even).
        base: the frequency base.
    """

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        _check_dims(dim=dim)
        if dim % 2:
            raise ValueError(f"RotaryEmbedding needs an even head dim, got {dim}")
        inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # [D/2]
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x``: ``[B, T, H, D]``; position ``t`` of ``x`` is ``offset + t``, or ``positions[t]`` when given (a
        ``[T]`` integer tensor, e.g. positions inside packed documents)."""
        T = x.shape[1]
        if positions is not None:
            t = positions.to(device=x.device, dtype=torch.float32)
        else:
            t = torch.arange(offset, offset + T, device=x.device, dtype=torch.float32)
        ang = t[:, None] * self.inv_freq.to(x.device)  # [T, D/2]
        cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]  # [1, T, 1, D/2]
        x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]  # [B, T, H, D/2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
        return out.to(x.dtype)


class SoftmaxAttention(nn.Module):
    """Multi-head matrix (softmax) attention, the baseline: ``o_i = sum_j softmax_j(<q_i, k_j> / sqrt(D)) v_j``.

    Self-attention by default; ``forward(x, y)`` attends from the queries of ``x`` to the keys and
    values of ``y``. ``causal`` keeps ``j <= i``; ``window = w`` keeps ``i - w < j <= i`` (causal too).

    Args:
        dim: model width; input and output are ``[B, T, dim]``.
        n_heads: query heads Hq.
        head_dim: per-head dim D (default ``dim // n_heads``).
        n_kv_heads: key/value heads Hkv (GQA: query head ``h`` reads kv head ``h // (Hq // Hkv)``);
            default ``n_heads``.
        causal, window: visibility, as above (``window`` needs self-attention lengths).
        rope: rotate q and k with :class:`RotaryEmbedding`.
        bias: bias in the projections.
        check_finite: refuse NaN/Inf in ``x``/``y`` (``None``: only for CPU tensors).
    """

    def __init__(self, dim: int, n_heads: int, *, head_dim: Optional[int] = None, n_kv_heads: Optional[int] = None,
                 causal: bool = False, window: Optional[int] = None, rope: bool = False, bias: bool = False,
                 check_finite: Optional[bool] = None):
        super().__init__()
        _check_dims(dim=dim, n_heads=n_heads)
        head_dim = dim // n_heads if head_dim is None else head_dim
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        _check_dims(head_dim=head_dim, n_kv_heads=n_kv_heads)
        causal, rope, bias = check_bool("causal", causal), check_bool("rope", rope), check_bool("bias", bias)
        self.check_finite = check_optional_bool("check_finite", check_finite)
        _check_heads(n_heads, n_kv_heads)
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be None or an int >= 1 for SoftmaxAttention, got {window!r}")
        self.dim, self.n_heads, self.n_kv_heads, self.head_dim = dim, n_heads, n_kv_heads, head_dim
        self.causal, self.window = causal, window
        self.q = nn.Linear(dim, n_heads * head_dim, bias=bias)
        self.k = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.v = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.o = nn.Linear(n_heads * head_dim, dim, bias=bias)
        self.rope = RotaryEmbedding(head_dim) if rope else None

    def new_cache(self) -> DecodeCache:
        """An empty cache for incremental decoding: ``layer(x_new, cache=cache)`` returns the rows of the full
        causal forward for the new positions (a prompt at once, then one token at a time)."""
        return DecodeCache()

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, *,
                cache: Optional[DecodeCache] = None, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x``: ``[B, T, dim]`` (queries); ``y``: ``[B, S, dim]`` (keys/values, default ``x``).

        With ``cache`` (causal self-attention only), ``x`` holds the next ``T`` positions after those the cache
        has seen; their keys and values join the cache (the last ``window`` of them with a window). With
        ``cu_seqlens`` (self-attention, ``x`` ``[1, total, dim]``: see :mod:`tensorattn.packing`) attention and
        RoPE positions stay inside each packed document."""
        _check_inputs(self, [("x", x)] if y is None else [("x", x), ("y", y)], ("x" if y is None else "y",),
                      self.check_finite)
        if _packed(self, cu_seqlens, x, (y,), cache):  # each document alone: no [total, total] mask over the row
            T = x.shape[1]
            return run_per_document(lambda xd: self(xd), check_cu_seqlens(cu_seqlens, None, B=1, T=T, S1=T, S2=T,
                                                                          device=x.device), x)
        L = 0 if cache is None else _check_cache(self, cache, y)
        y = x if y is None else y
        B, T, _ = x.shape
        S = y.shape[1]
        q = self.q(x).view(B, T, self.n_heads, self.head_dim)  # [B, T, Hq, D]
        k = self.k(y).view(B, S, self.n_kv_heads, self.head_dim)  # [B, S, Hkv, D]
        v = self.v(y).view(B, S, self.n_kv_heads, self.head_dim)
        if self.rope is not None:
            q, k = self.rope(q, offset=L), self.rope(k, offset=L)
        mask = None
        if cache is not None:
            k, v = _append(cache, (k, v), self.window)
            cache.length = L + T
            S = k.shape[1]
            mask = _visible(L, T, L + T - S, S, self.window, x.device)
        elif self.causal or self.window is not None:
            if S != T:
                raise ValueError(f"causal/window attention needs y as long as x, got T={T}, S={S}")
            mask = _visible(0, T, 0, T, self.window, x.device)
        g = self.n_heads // self.n_kv_heads
        # SDPA wants [B, H, T, D]; expand kv heads for GQA (tiny models: the copy is cheap)
        qh = q.transpose(1, 2)
        kh, vh = expand_kv(k, g), expand_kv(v, g)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)  # [B, Hq, T, D]
        return self.o(o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class TensorAttention(nn.Module):
    """Exact tensor (2-simplicial) attention with projections, heads, GQA and an output projection.

    For query position ``i`` and every visible pair ``(j1, j2)``::

        s[i, j1, j2] = scale * sum_d q[i, d] k1[j1, d] k2[j2, d]
        o[i]         = sum_{j1, j2} softmax_{(j1, j2)}(s[i]) * (v1[j1] * v2[j2])     (per head)

    with ``q = x W_q``, ``k1 = y W_k1``, ``v1 = y W_v1``, ``k2 = z W_k2``, ``v2 = z W_v2`` (``y`` and ``z``
    default to ``x``), then the heads are concatenated and projected back to ``dim``. ``causal`` keeps
    ``j1, j2 <= i``; ``window = w`` or ``(w1, w2)`` keeps ``i - w1 < j1 <= i`` and ``i - w2 < j2 <= i``,
    so each query costs ``w1 · w2`` pairs instead of ``T²``.

    Args:
        dim: model width; input and output are ``[B, T, dim]``.
        n_heads: query heads Hq.
        head_dim: per-head dim Dv of v1, v2 and the output, and D of q, k1, k2 unless ``key_dim`` (default
            ``dim // n_heads``).
        key_dim: per-head dim of q, k1, k2 when it differs from ``head_dim`` (default ``head_dim``).
        n_kv_heads: heads of k1, k2, v1, v2 (GQA, ``Hq % Hkv == 0``); default ``n_heads``.
        causal, window: visibility, as above (both need ``y`` and ``z`` as long as ``x``).
        rope: rotate q, k1 and k2 with :class:`RotaryEmbedding` (see its note on the trilinear score).
        scale: the score scale; default ``1 / sqrt(D)``.
        backend: passed to :func:`tensorattn.exact.tensor_attn` (``"auto"`` picks the fastest that fits).
        bias: bias in the projections.
        check_finite: refuse NaN/Inf in ``x``/``y``/``z`` (``None``: only for CPU tensors).
        deterministic: bitwise reproducible gradients (see :func:`tensorattn.exact.tensor_attn`).

    Parameters: ``6 · dim · H · D`` without GQA (five input projections and the output), versus
    ``4 · dim · H · D`` for :class:`SoftmaxAttention`.
    """

    def __init__(self, dim: int, n_heads: int, *, head_dim: Optional[int] = None, n_kv_heads: Optional[int] = None,
                 causal: bool = False, window=None, rope: bool = False, scale: Optional[float] = None,
                 backend: str = "auto", bias: bool = False, key_dim: Optional[int] = None,
                 check_finite: Optional[bool] = None, deterministic: bool = False):
        super().__init__()
        _check_dims(dim=dim, n_heads=n_heads)
        self.deterministic = check_bool("deterministic", deterministic)
        head_dim = dim // n_heads if head_dim is None else head_dim
        key_dim = head_dim if key_dim is None else key_dim
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        _check_dims(head_dim=head_dim, n_kv_heads=n_kv_heads, key_dim=key_dim)
        _check_heads(n_heads, n_kv_heads)
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, got {type(backend).__name__}")
        causal, rope, bias = check_bool("causal", causal), check_bool("rope", rope), check_bool("bias", bias)
        self.check_finite = check_optional_bool("check_finite", check_finite)
        self.window = normalize_window(window)
        self.dim, self.n_heads, self.n_kv_heads, self.head_dim, self.key_dim = dim, n_heads, n_kv_heads, head_dim, key_dim
        self.causal, self.scale, self.backend = causal, scale, backend
        self.q = nn.Linear(dim, n_heads * key_dim, bias=bias)
        self.k1 = nn.Linear(dim, n_kv_heads * key_dim, bias=bias)
        self.k2 = nn.Linear(dim, n_kv_heads * key_dim, bias=bias)
        self.v1 = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.v2 = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.o = nn.Linear(n_heads * head_dim, dim, bias=bias)
        if rope and key_dim % 2:
            raise ValueError(f"rope needs an even key/head dim, got {key_dim}")
        self.rope = RotaryEmbedding(key_dim) if rope else None

    def _project(self, x, y, z, offset: int = 0, positions: Optional[torch.Tensor] = None):
        y = x if y is None else y
        z = x if z is None else z
        B, T, _ = x.shape
        S1, S2 = y.shape[1], z.shape[1]
        Hq, Hkv, Dk, Dv = self.n_heads, self.n_kv_heads, self.key_dim, self.head_dim
        q = self.q(x).view(B, T, Hq, Dk)  # [B, T, Hq, Dk]
        k1 = self.k1(y).view(B, S1, Hkv, Dk)  # [B, S1, Hkv, Dk]
        k2 = self.k2(z).view(B, S2, Hkv, Dk)  # [B, S2, Hkv, Dk]
        v1 = self.v1(y).view(B, S1, Hkv, Dv)  # [B, S1, Hkv, Dv]
        v2 = self.v2(z).view(B, S2, Hkv, Dv)  # [B, S2, Hkv, Dv]
        if self.rope is not None:
            q, k1, k2 = (self.rope(t, offset=offset, positions=positions) for t in (q, k1, k2))
        return q, k1, k2, v1, v2

    def _attend(self, q, k1, k2, v1, v2, cu_seqlens=None):
        return tensor_attn(q, k1, k2, v1, v2, scale=self.scale, causal=self.causal, window=self.window,
                           backend=self.backend, cu_seqlens=cu_seqlens, deterministic=self.deterministic)

    def new_cache(self) -> DecodeCache:
        """An empty cache for incremental decoding (see :class:`DecodeCache` for what it keeps and costs)."""
        return DecodeCache()

    def _attend_cached(self, q, k1, k2, v1, v2, cache: DecodeCache, L: int):
        """New positions ``L ..`` against the cache: the parallel op for a prompt on an empty cache, then the
        exact scores over the kept window."""
        keep = None if self.window is None else max(self.window)
        full = _append(cache, (k1, k2, v1, v2), keep)
        if L == 0:
            return self._attend(q, k1, k2, v1, v2)
        return _cached_tensor_attn(q, *full, L, self.window, self.scale)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None, *,
                cache: Optional[DecodeCache] = None, cu_seqlens: Optional[torch.Tensor] = None):
        """``x``: ``[B, T, dim]`` queries; ``y``: ``[B, S1, dim]`` for k1/v1; ``z``: ``[B, S2, dim]`` for k2/v2.

        With ``cache`` (causal self-attention only), ``x`` holds the next ``T`` positions after those the cache
        has seen; the output equals those rows of the full causal forward. With ``cu_seqlens`` (self-attention,
        ``x`` ``[1, total, dim]``: see :mod:`tensorattn.packing`) the key pairs and RoPE positions stay inside
        each packed document. Returns ``[B, T, dim]``.
        """
        named = [("x", x)] + [(n, t) for n, t in (("y", y), ("z", z)) if t is not None]
        _check_inputs(self, named, ("x" if y is None else "y", "x" if z is None else "z"), self.check_finite)
        B, T = x.shape[:2]
        if _packed(self, cu_seqlens, x, (y, z), cache):
            o = self._attend(*self._project(x, None, None, positions=positions_in_documents(cu_seqlens, T)),
                             cu_seqlens=cu_seqlens)
        elif cache is None:
            o = self._attend(*self._project(x, y, z))  # [B, T, Hq, Dv]
        else:
            L = _check_cache(self, cache, y, z)
            o = self._attend_cached(*self._project(x, None, None, offset=L), cache, L)
            cache.length = L + T

        return self.o(o.reshape(B, T, self.n_heads * self.head_dim))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
                f"key_dim={self.key_dim}, causal={self.causal}, window={self.window}, backend={self.backend!r}")


class PolyTensorAttention(TensorAttention):
    """Tensor attention computed with the polynomial method (the paper's almost-linear algorithm).

    Same layer as :class:`TensorAttention`, except that ``exp`` of the score is replaced by a degree-``g``
    polynomial, so the joint softmax over ``(j1, j2)`` factorises into rank
    ``k = C(Dk + g, g)`` features and a forward or backward pass costs ``O(T · k · Dv)`` per head instead of
    ``O(T³ · D)`` (or ``O(T · w1 · w2 · D)`` with a window). No window: the fast method sees every
    visible pair, causal or not. Accuracy depends on the score range: keep ``Dk`` small and scores O(1)
    (see docs/math.md#polynomial and docs/math.md#rank-table). With ``key_dim == head_dim`` the parameters have the same names and shapes
    as :class:`TensorAttention`, so one state dict loads into either.

    Args:
        dim: model width; input and output are ``[B, T, dim]``.
        n_heads: query heads Hq.
        head_dim: per-head value dim Dv (default ``dim // n_heads``).
        key_dim: per-head dim Dk of q, k1, k2 (default ``head_dim``); the feature count grows as
            ``C(Dk + degree, degree)``.
        n_kv_heads: heads of k1, k2, v1, v2 (GQA); default ``n_heads``.
        degree: polynomial degree ``g`` (even degrees keep the normaliser positive).
        causal: keep ``j1, j2 <= i``.
        rope: rotate q, k1 and k2.
        scale: the score scale; default ``1 / sqrt(Dk)``.
        backend: passed to :func:`tensorattn.poly.poly_tensor_attn`.
        bias: bias in the projections.
        check_finite: refuse NaN/Inf in ``x``/``y``/``z`` (``None``: only for CPU tensors).
    """

    def __init__(self, dim: int, n_heads: int, *, head_dim: Optional[int] = None, key_dim: Optional[int] = None,
                 n_kv_heads: Optional[int] = None, degree: int = 2, causal: bool = False, rope: bool = False,
                 scale: Optional[float] = None, backend: str = "auto", bias: bool = False,
                 check_finite: Optional[bool] = None):
        super().__init__(dim, n_heads, head_dim=head_dim, n_kv_heads=n_kv_heads, causal=causal, window=None,
                         rope=rope, scale=scale, backend=backend, bias=bias, key_dim=key_dim,
                         check_finite=check_finite)
        _check_dims(degree=degree)
        self.degree = degree

    def _attend(self, q, k1, k2, v1, v2, cu_seqlens=None):
        return poly_tensor_attn(q, k1, k2, v1, v2, degree=self.degree, causal=self.causal, scale=self.scale,
                                backend=self.backend, cu_seqlens=cu_seqlens)

    def _attend_cached(self, q, k1, k2, v1, v2, cache: DecodeCache, L: int):
        """A prompt on an empty cache by the parallel op, the state from the prompt's keys; later tokens one at a
        time through :func:`tensorattn.poly.poly_tensor_attn_step` (constant memory, ``O(Hq k Dv)`` a token)."""
        if cache.state is None and L == 0 and q.shape[1] > 1:
            o = self._attend(q, k1, k2, v1, v2)
            cache.state = PolyTensorAttnState.from_keys(k1, k2, v1, v2, degree=self.degree, scale=self.scale)
            return o
        if cache.state is None:
            B, _, Hkv, Dk = k1.shape
            cache.state = PolyTensorAttnState.empty(B, Hkv, Dk, v1.shape[3], degree=self.degree, scale=self.scale,
                                                    dtype=acc_dtype(q.dtype), device=q.device)
        outs = []
        for t in range(q.shape[1]):
            o, cache.state = poly_tensor_attn_step(cache.state, q[:, t], k1[:, t], k2[:, t], v1[:, t], v2[:, t],
                                                   check_finite=False)  # the layer checked its input
            outs.append(o)
        return torch.stack(outs, 1)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", degree={self.degree}"



def param_count(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _init_like_gpt(module: nn.Module, std: float = 0.02) -> None:
    # nanoGPT's init: small normal weights keep the trilinear scores near 0 at the start, so the joint
    # softmax starts close to uniform (and inside the polynomial method's accurate range)
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)

