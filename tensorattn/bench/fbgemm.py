"""Meta's FBGEMM 2-simplicial Triton kernels as an optional peer row of ``tensorattn bench exact``.

They are not on PyPI and none of their code is part of tensorattn: to put them in the table, copy
``fbgemm_gpu/experimental/simplicial_attention/simplicial/ops/triton/fwd.py`` and ``bwd.py`` from pytorch/FBGEMM
into a git-ignored folder (default ``.peers/fbgemm``, or ``--fbgemm-dir``); a missing folder or file is a note in
the row. What the adapter assumes of them (read from their code; each is checked before a call and a mismatch
is a note): ``triton_fwd(q, k1, k2, v1, v2, w1, w2) -> (o, m)`` and ``triton_bwd(q, k1, k2, v1, v2, o, dO, m, w1,
w2) -> (dq, dk1, dk2, dv1, dv2)``; bf16 only; windows ``q - w < j <= q`` on both keys, as tensorattn's; scale
``1 / sqrt(D)``, as tensorattn's default; the forward packs all query heads of *one* kv head into a tile (``Hkv
== 1``); the backward indexes k and v by the query head and asserts ``w2 == 32``, so it gets k and v expanded to
``Hq`` heads (built outside the timing; its k/v gradients are then per query head and summed before they are
compared). Every row carries the peer's relative error against tensorattn's output (and gradients, where its
backward ran) on the same inputs, so a convention that differs shows in the table instead of in a wrong timing.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable, Dict

import torch

DEFAULT_DIR = ".peers/fbgemm"


def load(folder: str = DEFAULT_DIR, name: str = "fwd") -> Any:
    """The peer's ``name`` module (``fwd`` or ``bwd``) from ``folder``; ``FileNotFoundError`` naming a missing
    file (an import error of the file itself propagates: the caller notes it)."""
    path = os.path.join(folder, f"{name}.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FBGEMM's simplicial Triton kernels not found: no {path} (copy "
                                f"simplicial/ops/triton/{name}.py from pytorch/FBGEMM there; see "
                                f"tensorattn.bench.fbgemm)")
    spec = importlib.util.spec_from_file_location(f"_fbgemm_simplicial_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


def refusal(xs, window) -> str:
    """Why the peer cannot run this call ('' when it can): checked before anything is computed for it."""
    q, k1 = xs[0], xs[1]
    if window is None:
        return "the peer kernels have no full-causal (unwindowed) path"
    if q.dtype != torch.bfloat16:
        return f"the peer kernels are bf16 only, got {q.dtype}"
    if k1.shape[2] != 1:
        return f"the peer's forward needs one kv head (GQA packing of all query heads), got Hkv = {k1.shape[2]}"
    return ""


def peer_row(row: Dict[str, Any], xs, do, window, ours_o, ours_grads: Callable, measure: Callable,
             folder: str = DEFAULT_DIR) -> Dict[str, Any]:
    """Fill ``row`` (config fields set by the caller) with the peer's times (``measure(fwd, bwd, fwdbwd)``, where
    ``bwd`` and ``fwdbwd`` are None when its backward cannot run) and its errors against ours (``err_o``;
    ``err_grads``, the largest of the five, from ``ours_grads()``, called only when the peer's backward runs), or
    raise ``RuntimeError`` with :func:`refusal`'s reason. ``xs``: q, k1, k2, v1, v2 ``[B, T, H, D]`` as
    tensorattn got them."""
    why = refusal(xs, window)
    if why:
        raise RuntimeError(why)
    q, k1, k2, v1, v2 = xs
    fwd_mod = load(folder, "fwd")
    w1, w2 = int(window[0]), int(window[1])

    def fwd():
        return fwd_mod.triton_fwd(q, k1, k2, v1, v2, w1, w2)

    o, m = fwd()
    row["err_o"] = _rel(o, ours_o)
    notes, bwd, fwdbwd = [], None, None
    if w2 != 32:
        notes.append(f"backward not run: the peer's backward asserts w2 == 32, window is {window}")
    elif q.shape[0] != 1:  # its pre-kernel offsets the row sums by dO's batch stride
        notes.append(f"backward not run: the peer's backward indexes its row sums by dO's batch stride, B = "
                     f"{q.shape[0]}")
    else:
        try:
            bwd_mod = load(folder, "bwd")
        except Exception as e:  # e.g. an autotune key this Triton refuses: the forward still counts
            notes.append(f"backward not run: its module did not load ({type(e).__name__}: {e})"[:200])
        else:
            ex = [x.expand(-1, -1, q.shape[2], -1).contiguous() for x in (k1, k2, v1, v2)]

            def peer_bwd(out=o, lse=m):
                return bwd_mod.triton_bwd(q, *ex, out, do, lse, w1, w2)

            bwd, fwdbwd = peer_bwd, lambda: peer_bwd(*fwd())
            grads = bwd()
            grads = [grads[0]] + [g.float().sum(2, keepdim=True) for g in grads[1:]]  # per query head -> kv head
            row["err_grads"] = max(_rel(a, b) for a, b in zip(grads, ours_grads()))
            notes.append("backward on k, v expanded to Hq heads (the peer indexes them by the query head)")
    row.update(measure(fwd, bwd, fwdbwd))
    row["note"] = "; ".join(notes)
    return row
