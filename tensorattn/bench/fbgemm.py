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
import math
import os
from typing import Any, Callable, Dict, Tuple

import torch

DEFAULT_DIR = ".peers/fbgemm"


def load(folder: str = DEFAULT_DIR) -> Tuple[Any, Any]:
    """The peer's forward and backward modules from ``folder`` (``fwd.py``, ``bwd.py``); ``FileNotFoundError``
    naming what is missing."""
    mods = []
    for name in ("fwd", "bwd"):
        path = os.path.join(folder, f"{name}.py")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"FBGEMM's simplicial Triton kernels not found: no {path} (copy "
                                    f"simplicial/ops/triton/{name}.py from pytorch/FBGEMM there; see "
                                    f"tensorattn.bench.fbgemm)")
        spec = importlib.util.spec_from_file_location(f"_fbgemm_simplicial_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mods.append(mod)
    return mods[0], mods[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


def peer_row(row: Dict[str, Any], xs, do, window, ours_o, ours_grads, measure: Callable, folder: str = DEFAULT_DIR
             ) -> Dict[str, Any]:
    """Fill ``row`` (config fields set by the caller) with the peer's times (``measure(fwd, bwd, fwdbwd)``) and its
    errors against ours (``err_o``, ``err_grads``: the largest of the five), or a ``note`` saying why it did not
    run. ``xs``: q, k1, k2, v1, v2 ``[B, T, H, D]`` as tensorattn got them."""
    q, k1, k2, v1, v2 = xs
    notes = []
    if window is None:
        raise RuntimeError("the peer kernels have no full-causal (unwindowed) path")
    if q.dtype != torch.bfloat16:
        raise RuntimeError(f"the peer kernels are bf16 only, got {q.dtype}")
    if k1.shape[2] != 1:
        raise RuntimeError(f"the peer's forward needs one kv head (GQA packing of all query heads), got "
                           f"Hkv = {k1.shape[2]}")
    fwd_mod, bwd_mod = load(folder)
    w1, w2 = int(window[0]), int(window[1])

    def fwd():
        return fwd_mod.triton_fwd(q, k1, k2, v1, v2, w1, w2)

    o, m = fwd()
    row["err_o"] = _rel(o, ours_o)
    bwd = ex = None
    if w2 != 32:
        notes.append(f"backward not run: the peer's backward asserts w2 == 32, window is {window}")
    else:
        Hq = q.shape[2]
        ex = [x.expand(-1, -1, Hq, -1).contiguous() for x in (k1, k2, v1, v2)]
        bwd = lambda: bwd_mod.triton_bwd(q, *ex, o, do, m, w1, w2)  # noqa: E731
        grads = bwd()
        grads = [grads[0]] + [g.float().sum(2, keepdim=True) for g in grads[1:]]  # per query head -> the kv head
        row["err_grads"] = max(_rel(a, b) for a, b in zip(grads, ours_grads))
        notes.append("backward on k, v expanded to Hq heads (the peer indexes them by the query head)")

    def fwdbwd():
        out = fwd()
        if ex is not None:
            bwd_mod.triton_bwd(q, *ex, out[0], do, out[1], w1, w2)

    row.update(measure(fwd, bwd, fwdbwd))
    if bwd is None:  # the fwd+bwd column would be the forward alone
        row.update(bwd_ms=math.nan, fwdbwd_ms=math.nan, peak_gib=math.nan)
    row["note"] = "; ".join(notes)
    return row
