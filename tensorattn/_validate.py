"""Input checks shared by every public entry point.

Every error names the argument, what was expected and what was given, so that a user never has to
guess which of five tensors was wrong.

One rule for non-finite inputs, applied by every public entry point that takes floating-point tensors
(the five-tensor ops, ``naive_order_attn``, ``fast_order_attn`` and its siblings, the ``paper`` functions,
the layers and the models): NaN/Inf inputs are refused with a ``ValueError`` naming the argument when the
inputs are on the CPU (``check_finite=None``, the default), always with ``check_finite=True`` and never with
``check_finite=False``. On a GPU the check is opt-in because it forces a device synchronisation per call
(see :func:`maybe_check_finite`).

Flags are bools (Python or numpy bools, :func:`check_bool`): a string such as ``"False"`` is refused rather
than read by its truthiness. Every check here looks at types, shapes and dtypes only (static, so traceable
by ``torch.compile``), except the optional non-finite check, which is skipped while ``torch.compile`` traces
(:func:`values_checkable` says why).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every path accumulates in: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _desc(x: torch.Tensor) -> str:
    return f"shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"


def check_tensor(name: str, x, *, ndim: Optional[int] = None, floating: bool = True) -> None:
    """Type, rank and dtype of one tensor argument."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got {x.dim()} ({_desc(x)})")
    if floating and not x.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")


def check_same(names: Sequence[str], xs: Sequence[torch.Tensor], *, dtype: bool = True) -> None:
    """All tensors on one device (and of one dtype when ``dtype``)."""
    d0, t0 = names[0], xs[0]
    for n, x in zip(names[1:], xs[1:]):
        if x.device != t0.device:
            raise ValueError(f"{n} is on device {x.device} but {d0} is on {t0.device}; "
                             "all inputs must be on one device")
        if dtype and x.dtype != t0.dtype:
            raise TypeError(f"{n} has dtype {x.dtype} but {d0} has {t0.dtype}; all inputs must share a dtype")


def _type_name(value) -> str:
    t = type(value)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def check_bool(name: str, value) -> bool:
    """A flag: ``True``/``False`` or a numpy bool, returned as a Python bool.

    Anything else (``"False"``, ``0``, ``None``) is a ``TypeError`` naming the argument: truthiness would
    read ``"False"`` as true.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be a bool (True or False), got {_type_name(value)} {value!r}")


def check_optional_bool(name: str, value) -> Optional[bool]:
    """``None`` or a flag (:func:`check_bool`)."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be None or a bool, got {_type_name(value)} {value!r}")


def check_finite(names: Sequence[str], xs: Sequence[torch.Tensor]) -> None:
    """Reject NaN/Inf inputs, which would poison every output row they reach (forces a sync)."""
    for n, x in zip(names, xs):
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"{n} contains {bad} non-finite value(s) (NaN or Inf); expected finite values")


def normalize_window(window, seq_len: Optional[int] = None) -> Optional[Tuple[int, int]]:
    """``None`` | int w | (w1, w2) -> ``None`` | (w1, w2) with w1, w2 >= 1."""
    if window is None:
        return None
    if isinstance(window, bool):
        raise TypeError(f"window must be None, an int or a pair (w1, w2) of ints, got {window!r}")
    if isinstance(window, int):
        window = (window, window)
    try:
        w1, w2 = window
    except (TypeError, ValueError):
        raise TypeError(f"window must be None, an int or a pair (w1, w2) of ints, got {window!r}") from None
    for nm, w in (("window[0] (w1)", w1), ("window[1] (w2)", w2)):
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"{nm} must be an int, got {type(w).__name__} {w!r}")
        if w < 1:
            raise ValueError(f"{nm} must be >= 1 (the query's own position is always visible), got {w}")
    return int(w1), int(w2)


def scale_bound(dtype: torch.dtype) -> float:
    """Largest ``|scale|`` the exact ops accept for inputs of ``dtype``: ``sqrt`` of the largest finite value of
    the accumulation dtype (float32, or float64 for float64 inputs), about 1.8e19 (1.3e154 for float64).

    Scores ``scale * <q, k1 ∘ k2>`` are formed in that dtype; this bound keeps them finite whenever
    ``|<q, k1 ∘ k2>|`` is below the same number (a larger score sum is the caller's to avoid).
    """
    return math.sqrt(torch.finfo(acc_dtype(dtype)).max)


def check_scale(scale, head_dim: int, *, dtype: Optional[torch.dtype] = None) -> float:
    """Default 1/sqrt(head_dim); an explicit scale must be a finite real number, and, when the inputs' ``dtype``
    is given (the exact ops), ``|scale| <= scale_bound(dtype)``."""
    if scale is None:
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"the head dim must be >= 1 for the default scale 1/sqrt(head dim), got {head_dim!r}")
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a scalar, got a tensor of shape {tuple(scale.shape)}")
        scale = float(scale)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if dtype is not None and abs(scale) > scale_bound(dtype):
        acc = "float64" if dtype == torch.float64 else "float32"
        raise ValueError(f"|scale| must be <= {scale_bound(dtype):.3g} for {dtype} inputs, got scale={scale:g}: "
                         f"larger scales overflow the scores scale * <q, k1 * k2> in the {acc} accumulator (the "
                         "result would be NaN); use a smaller scale"
                         + ("" if dtype == torch.float64 else " or float64 inputs (bound 1.3e154)"))
    return float(scale)


def values_checkable() -> bool:
    """Whether a check that reads tensor *values* (NaN/Inf, token-id range) may run here: not while
    ``torch.compile`` traces (:func:`torch.compiler.is_compiling`).

    Why the value checks are skipped under tracing: they branch in Python on a tensor's contents
    (``bool(torch.isfinite(x).all())``), which a graph cannot express; dynamo would break the graph there (and
    ``fullgraph=True`` would fail), splitting every layer into pieces. The shape, dtype and device checks stay
    (they are static and traced as guards). A compiled model therefore does not refuse NaN/Inf inputs or bad
    token ids itself: run the eager model (or the check functions) on suspect data."""
    return not torch.compiler.is_compiling()


def maybe_check_finite(flag: Optional[bool], names: Sequence[str], xs: Sequence[torch.Tensor]) -> None:
    """``check_finite`` policy of the public ops: ``True`` always, ``False`` never, ``None`` only for CPU tensors
    (on a GPU the check costs a device synchronisation per call).

    Skipped (whatever the flag) while ``torch.compile`` traces, because the check is data-dependent and would
    break the graph (:func:`values_checkable` gives the reason), and for meta tensors, which have no values."""
    flag = check_optional_bool("check_finite", flag)
    if not values_checkable() or xs[0].device.type == "meta":
        return
    if flag or (flag is None and xs[0].device.type == "cpu"):
        check_finite(names, xs)


def check_attn_inputs(q, k1, k2, v1, v2, *, causal: bool = False, window=None, same_dtype: bool = True,
                      check_finite: Optional[bool] = False):
    """Validate the five [B, T, H, D] inputs of tensor attention.

    Returns ``(B, T, Hq, Hkv, D, Dv, S1, S2, window)`` with the window normalised.

    Rules: q, k1, k2 share the head dim D; v1, v2 share Dv (which may differ from D);
    k1/v1 share a length S1 and k2/v2 a length S2; K/V share a head count Hkv that divides Hq (GQA);
    a causal mask or a window needs S1 == S2 == T.
    """
    names = ("q", "k1", "k2", "v1", "v2")
    xs = (q, k1, k2, v1, v2)
    for n, x in zip(names, xs):
        check_tensor(n, x, ndim=4)
    check_same(names, xs, dtype=same_dtype)
    B, T, Hq, D = q.shape
    if D < 1:
        raise ValueError(f"q must have a head dim D >= 1 (q.shape[3]), got {D}")
    if v1.shape[3] < 1:
        raise ValueError(f"v1 must have a value head dim Dv >= 1 (v1.shape[3]), got {v1.shape[3]}")
    for n, x in zip(names[1:], xs[1:]):
        if x.shape[0] != B:
            raise ValueError(f"{n} has batch size {x.shape[0]} but q has {B} (layout [B, T, H, D])")
    for n, x in (("k1", k1), ("k2", k2)):
        if x.shape[3] != D:
            raise ValueError(f"{n} has head dim {x.shape[3]} but q has {D}; q, k1 and k2 must share the last dim")
    Dv = v1.shape[3]
    if v2.shape[3] != Dv:
        raise ValueError(f"v2 has head dim {v2.shape[3]} but v1 has {Dv}; v1 and v2 must share the last dim")
    Hkv = k1.shape[2]
    for n, x in (("k2", k2), ("v1", v1), ("v2", v2)):
        if x.shape[2] != Hkv:
            raise ValueError(f"{n} has {x.shape[2]} heads but k1 has {Hkv}; k1, k2, v1 and v2 must share a head count")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"the number of query heads ({Hq}, q.shape[2]) must be a multiple of the number of "
                         f"key/value heads ({Hkv}, k1.shape[2]) for grouped-query attention")
    S1, S2 = k1.shape[1], k2.shape[1]
    if v1.shape[1] != S1:
        raise ValueError(f"v1 has length {v1.shape[1]} but k1 has {S1}; k1 and v1 must have one length")
    if v2.shape[1] != S2:
        raise ValueError(f"v2 has length {v2.shape[1]} but k2 has {S2}; k2 and v2 must have one length")
    if S1 == 0 or S2 == 0:
        raise ValueError(f"k1 and k2 must have at least one position, got lengths {S1} and {S2}")
    win = normalize_window(window)
    maybe_check_finite(check_finite, names, xs)
    causal = check_bool("causal", causal)
    if (causal or win is not None) and not (S1 == T and S2 == T):
        raise ValueError(f"causal masking and windows need k1/v1 and k2/v2 as long as q: got T={T}, "
                         f"len(k1)={S1}, len(k2)={S2}")
    return B, T, Hq, Hkv, D, Dv, S1, S2, win


def check_cu_seqlens_layout(cu_seqlens, *, B: int, T: int, S1: int, S2: int, device) -> None:
    """The checks of :func:`check_cu_seqlens` that read no values (type, dtype, shape, device, the packed inputs'
    shapes): no GPU synchronisation."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor of int32 document starts, got {_type_name(cu_seqlens)}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must have dtype torch.int32 (flash-attention's convention), got "
                        f"{cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries ([0, ..., total]), got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != torch.device(device):
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the inputs are on {device}")
    if B != 1:
        raise ValueError(f"packed documents (cu_seqlens) need the inputs as [1, total, H, D], got batch size {B}")
    if not (S1 == T and S2 == T):
        raise ValueError(f"packed documents (cu_seqlens) need k1/v1 and k2/v2 packed like q: got T={T}, "
                         f"len(k1)={S1}, len(k2)={S2}")


def check_cu_seqlens(cu_seqlens, max_seqlen, *, B: int, T: int, S1: int, S2: int, device) -> List[int]:
    """Validate packed-document boundaries (flash-attention's ``cu_seqlens`` convention) and return them as a
    list ``[0, e_1, ..., T]``.

    ``cu_seqlens``: a 1-D int32 tensor on the inputs' device, starting at 0, strictly increasing (no empty
    document), ending at the packed length ``T``; inputs packed as ``[1, T, H, D]`` with
    ``k1``/``k2`` packed like ``q`` (``S1 == S2 == T``). ``max_seqlen``: ``None`` or an int at least the longest
    document (flash-attention's hint; checked here, not needed). Reading the boundaries synchronises a GPU.
    """
    check_cu_seqlens_layout(cu_seqlens, B=B, T=T, S1=S1, S2=S2, device=device)
    b = [int(x) for x in cu_seqlens.tolist()]
    if b[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {b[0]}")
    if b[-1] != T:
        raise ValueError(f"cu_seqlens must end at the packed length {T} (q.shape[1]), got {b[-1]}")
    bad = next((i for i in range(1, len(b)) if b[i] <= b[i - 1]), None)
    if bad is not None:
        raise ValueError(f"cu_seqlens must be strictly increasing (no empty document), got {b[bad - 1]} then "
                         f"{b[bad]} at index {bad}")
    if max_seqlen is not None:
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
            raise TypeError(f"max_seqlen must be an int or None, got {_type_name(max_seqlen)}")
        longest = max(b[i] - b[i - 1] for i in range(1, len(b)))
        if max_seqlen < longest:
            raise ValueError(f"max_seqlen ({max_seqlen}) is shorter than the longest document ({longest})")
    return b
