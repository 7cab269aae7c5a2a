"""Packed variable-length documents (flash-attention's ``cu_seqlens`` convention).

Several documents are packed into one row ``[1, total, H, D]``; ``cu_seqlens`` (int32) holds their starts with a
leading 0 and the total at the end, e.g. ``[0, 3, 10]`` for documents of 3 and 7 tokens. Attention then stays
inside each document: a query sees only key pairs of its own document (causal masks and windows apply inside
it), and the polynomial op's state restarts at every boundary.

Two ways to run a packed row:

* the fused kernels take it in one set of launches: for the exact op, :func:`document_bounds` gives each position's
  document start and end, which sit in the kernels' masks (:mod:`tensorattn.triton.exact_fwd`); for the
  polynomial op, :func:`tensorattn.triton.poly.chunk_table` cuts every document into its own state chunks and the
  chunk scans restart at each document;
* the torch backends run once per document (:func:`run_per_document`: a Python loop over the documents' slices,
  so autograd gives all five gradients; one set of launches per document).

Either way the boundaries are read on the host once per call (a GPU synchronisation, and a graph break under
``torch.compile``); the fused polynomial forward and backward each read its chunk table on the host once more.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

__all__ = ["cu_seqlens_from_lengths", "positions_in_documents", "document_bounds", "run_per_document",
           "check_no_max_seqlen"]


def cu_seqlens_from_lengths(lengths, device=None) -> torch.Tensor:
    """``cu_seqlens`` (int32) of documents of the given positive lengths, e.g. ``[3, 7] -> [0, 3, 10]``."""
    lens = [int(n) for n in lengths]
    if not lens or any(n < 1 for n in lens):
        raise ValueError(f"lengths must be a non-empty list of positive ints, got {lens}")
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


def positions_in_documents(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position of each of the ``total`` packed tokens inside its own document (``[total]`` int64, on cu_seqlens'
    device; no host synchronisation): ``[0, 3, 10] -> 0 1 2 0 1 .. 6``."""
    idx, doc = _documents(cu_seqlens, total)
    return idx - cu_seqlens.long()[doc]


def _documents(cu_seqlens: torch.Tensor, total: int):
    """The positions ``0 .. total - 1`` and the document index of each (on cu_seqlens' device)."""
    idx = torch.arange(total, device=cu_seqlens.device)
    return idx, torch.searchsorted(cu_seqlens[1:], idx.to(cu_seqlens.dtype), right=True)


def document_bounds(cu_seqlens: torch.Tensor, total: int):
    """``(lo, hi)``: int32 ``[total]``, the first and one-past-the-last position of each packed token's document
    (on cu_seqlens' device; no host synchronisation): ``[0, 3, 10] -> lo 0 0 0 3 .. 3, hi 3 3 3 10 .. 10``. The fused
    exact kernels mask pairs to ``lo_i <= j < hi_i``."""
    _, doc = _documents(cu_seqlens, total)
    cu = cu_seqlens.to(torch.int32)
    return cu[doc].contiguous(), cu[doc + 1].contiguous()


def run_per_document(fn: Callable[..., torch.Tensor], bounds: List[int], *tensors: torch.Tensor,
                     dim: int = 1) -> torch.Tensor:
    """``fn`` on each document's slice ``[b_i, b_{i+1})`` of every tensor along ``dim``, concatenated along ``dim``."""
    outs = [fn(*(t.narrow(dim, s, e - s) for t in tensors)) for s, e in zip(bounds[:-1], bounds[1:])]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=dim)


def check_no_max_seqlen(cu_seqlens: Optional[torch.Tensor], max_seqlen) -> None:
    if cu_seqlens is None and max_seqlen is not None:
        raise ValueError("max_seqlen is given without cu_seqlens; it describes packed documents only")
