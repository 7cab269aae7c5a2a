"""Chunk-parallel Triton kernels for causal polynomial tensor attention (degree 2, and degree 4 at Dk = 16), forward
and backward: the design, the tunables and the launchers (the ``@triton.jit`` code itself is in
:mod:`tensorattn.triton.poly_kernels`).

Math (see :mod:`tensorattn.poly` for the op): with features ``U1 = φ(scale q) / β!``, ``U2 = φ(k1)``,
``U3 = φ(k2)`` (exact monomials of degree <= g, rank ``k = C(Dk + g, g)``; each a product of g factors from the
index table of :func:`_tables`, the constant 1 among them), the causal numerator of query ``i`` is
``num_i = U1[i] · (L2_i ∘ L3_i)`` with prefix states ``L2_i = Σ_{j <= i} U2[j] ⊗ v1[j]`` (likewise ``L3``),
and the normaliser ``den_i = U1[i] · (l2_i ∘ l3_i)`` with ``l2_i = Σ_{j <= i} U2[j]`` (vectors).

Parallel over the sequence, in two levels:

* **state chunks** of ``F`` positions (``TUNE["F"]``, 64): :func:`_state_kernel` computes every chunk's contribution
  ``ΔS2[n] = U2_n^T v1_n`` (and ``ΔS3``, and the vector sums for the normaliser) for all chunks at once,
  with tensor-core products; a scan over chunks (:func:`_scan_kernel`) turns them into the state before each
  chunk. The sequence is processed in *segments* of chunks whose states fit a fixed budget
  (:data:`SEG_BYTES`), the state at each segment's end starting the next: memory stays bounded at any T.
* **walks** inside a chunk, one position at a time: per segment (of the backward's length, see below)
  :func:`_feat_kernel` writes the features ``U1, U2, U3`` (float32 ``[B, TS, H, KP]``), then one program per
  (state chunk, block of ``BK`` features, query head; the chunk's blocks adjacent on the grid) holds that block's
  states ``[BK, Dv]`` in float32 registers and walks the chunk's rows on the CUDA cores. The forward
  (:func:`_fwd_walk_kernel`) adds ``U2[i] ⊗ v1[i]`` to ``L2`` (likewise ``L3``) and adds its block's part of
  ``num_i`` and ``den_i`` into float32 row buffers by atomics; ``o = num / (den + eps)`` is written in the input
  dtype after the walk. This does ``O(k Dv)`` work per row where pair products (the forward of earlier versions:
  rows = the C² query-key pairs of a sub-chunk, ``O(C k Dv)`` per row on tensor cores) did C times as much: those
  sat at 255 registers with spills and took 1.6-1.9x the walk's time (``benchmarks/NOTES_poly.md``, v10).
* **backward**: per segment, last to first (the backward's segments are shorter than the forward's: each
  starts from a state the forward saved), the forward states are recomputed (state kernel + scan), the features
  written again, and :func:`_bwd_kernel` runs twice (feature blocks ``BK_BWD1``, ``BK_BWD``): first (``MODE=1``)
  it sums every chunk's contribution ``ΔR2[n] = Σ_{i in n} dL2_i`` to the gradient of the states
  (``dL2_i = (U1[i] ⊗ G_i) ∘ L3_i``), a reversed scan gives the suffix sums, then (``MODE=2``) it computes every
  row's feature gradients (stored: each row's block belongs to one program) and value gradients (atomics over
  feature blocks) from the forward state (by addition) and the inclusive suffix (by subtraction of the row's own
  part). :func:`_proj_kernel` takes the feature gradients through the monomials to dq, dk1, dk2 (one-hot
  products) and writes dv1, dv2, summing GQA groups first.
* **launches**: the three inputs' features are one :func:`_feat_kernel` launch, a segment's two chunk scans (states
  and normaliser vectors) one :func:`_scan_kernel` launch that also takes the segment's initial state and writes its
  final one, the three projections one :func:`_proj_kernel` launch: 6 launches per forward segment, 8 per backward
  segment (21 before; at 16K tokens the host's enqueue time fell from 4.0 to 3.0 ms for a forward + backward that
  runs 9.3 ms on an H200, ``benchmarks/NOTES_poly.md``).

Packed documents (``cu_seqlens``, batch 1): :func:`chunk_table` cuts every document into its own chunks of ``F``
rows (its last one shorter), so no chunk straddles a boundary; the state and walk kernels read each chunk's rows
from the table (``VARLEN``), the chunk scans restart at a document's first chunk (forward) and at its last (the
backward's suffixes), and a segment's buffers hold its rows contiguously from its first one, as without
documents. The chunk count is bounded from the shapes (``T // F + documents``), so the grids and the saved states
do not depend on the lengths.

Measured figures, the FLOP and byte counts and what limits the kernels: ``benchmarks/NOTES_poly.md``.

Accumulation: states, suffix states, outputs and gradients in float32; the walks compute in float32 throughout.
The state kernel's matrix-product operands are bf16 for bf16/fp16 inputs (the states' range exceeds fp16's),
float32 for float32 inputs (exact ``ieee`` products unless ``torch.backends.cuda.matmul.allow_tf32`` is set, then
tf32). Atomic adds are relaxed: their buffers are read only after the kernel ends.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..dispatch import triton_interpret
from ..features import multi_indices
from ..poly.common import EPS
from .poly_kernels import (_bwd_kernel, _feat_kernel, _fwd_walk_kernel, _normalize_kernel, _proj_kernel, _rowdot_kernel,
                           _scan_kernel, _state_kernel, _totals_bwd_kernel)

BK = 32  # features per block of the state, feature and projection kernels (the feature padding)
_R_ROWS = 32  # (row, head) pairs per program of the row-wise kernels (_normalize_kernel, _rowdot_kernel)
# The states of one segment (forward states, plus suffix states in the backward) take at most this many bytes.
SEG_BYTES = 1 << 30
# Tunables (the benchmark sweeps them): state-chunk length F, the feature blocks of the forward walk (BK_FWD) and of
# the backward walk's two passes (BK_BWD1 for the first, BK_BWD for the second), warps per kernel, a register cap
# for the walk's second pass (MAXNREG_BWD, 0: none), rows per program of the projection and feature kernels, the
# chunk scan's tile (SCAN_U chunks x SCAN_BW columns).
# PROJ_X3: the chain rule's one-hot products as three bf16 tensor-core products on CUDA (1; float32-accurate, not
# bitwise the ieee product) or one float32 FMA product (0, and always under the interpreter); measured
# (poly_tune_sweep15.md): _proj_kernel 3.56 -> 1.75 ms, fwd+bwd 46.8 -> 44.7 ms at 64K.
# The forward walk's blocks, measured on an H200 at 64K (poly_tune_sweep16.md): 16 features, one warp: 5.70 ms;
# 32 features: 6.41; 8 features: 11.1.
TUNE = dict(F=64, WARPS_STATE=4, BK_FWD=16, WARPS_FWD=1, BK_BWD1=32, WARPS_BWD1=4, BK_BWD=16, WARPS_BWD=1,
            MAXNREG_BWD=0, R_PROJ=64, WARPS_PROJ=4, R_FEAT=64, WARPS_FEAT=4, SCAN_U=8, SCAN_BW=512, PROJ_X3=1)
for _k in list(TUNE):  # TENSORATTN_POLY_<KEY> overrides a default (benchmark sweeps)
    if os.environ.get(f"TENSORATTN_POLY_{_k}") is not None:
        TUNE[_k] = int(os.environ[f"TENSORATTN_POLY_{_k}"])


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
_TABLES = {}


def _chunk_scan_(st: torch.Tensor, sd: torch.Tensor, init: tuple, fin: Optional[tuple] = None,
                 flags: Optional[torch.Tensor] = None, seg: int = 0) -> None:
    """In place, the prefix sums over the chunk axis of a segment's two float32 buffers ``st [BH, N, ...]`` and
    ``sd [BH, N, ...]`` (contiguous; the states and the normaliser's vectors), one :func:`_scan_kernel` launch
    for both: slot 0 becomes ``init`` (``(for st [BH, ...], for sd)``) and slot n ``init`` plus slots 1..n; with
    ``fin`` (two buffers like init) the last slot is written there too. Every element read and written once,
    ``TUNE["SCAN_U"]`` chunks of loads in flight per program, ``TUNE["SCAN_BW"]`` columns. With ``flags`` (int32
    ``[N]``, packed documents) the sums restart where they are nonzero: at zero (``seg=1``) or at the slot's own
    value (``seg=2``)."""
    U, BW = int(TUNE["SCAN_U"]), int(TUNE["SCAN_BW"])
    if U < 1 or U & (U - 1) or BW < 16 or BW & (BW - 1):
        raise ValueError(f"TUNE['SCAN_U'] and TUNE['SCAN_BW'] must be powers of two, SCAN_BW >= 16, got {U} and {BW}")
    BH, N = st.shape[0], st.shape[1]
    WX, WY = st.numel() // max(1, BH * N), sd.numel() // max(1, BH * N)
    BW = min(BW, max(16, triton.next_power_of_2(max(WX, WY))))
    nbx = triton.cdiv(WX, BW)
    fo = init if fin is None else fin
    _scan_kernel[(BH, nbx + triton.cdiv(WY, BW))](st, init[0], fo[0], sd, init[1], fo[1],
                                                  st if flags is None else flags, N, WX, WY, nbx, U=U, BW=BW,
                                                  SEG=0 if flags is None else seg, FIN=fin is not None, num_warps=4)


def chunk_table(cu_seqlens: torch.Tensor, T: int, F: int) -> torch.Tensor:
    """The state chunks of packed documents (``cu_seqlens`` as the op has checked it): int32 ``[3, NF]``, each
    chunk's first row, its end (one past its last row) and its document, every document cut into chunks of ``F``
    rows from its start (its last one shorter), so that no chunk straddles a boundary. ``NF = T // F + documents``
    (a bound on the chunks the documents need, from the shapes alone: the kernels' grids and saved states do not
    depend on the lengths); the chunks past the last document are empty (first row = end = T), each its own
    document. On cu_seqlens' device, no host synchronisation."""
    cu = cu_seqlens.to(torch.int64)
    nd = cu.numel() - 1
    nch = (cu[1:] - cu[:-1] + F - 1) // F  # chunks per document
    past = torch.cumsum(nch, 0)  # one past each document's last chunk
    c = torch.arange(T // F + nd, device=cu.device)
    doc = torch.searchsorted(past, c, right=True)
    d = doc.clamp(max=nd - 1)
    start = cu[d] + (c - (past[d] - nch[d])) * F
    end = torch.minimum(cu[d + 1], start + F)
    pad = doc >= nd
    tail = torch.full_like(start, T)
    return torch.stack([torch.where(pad, tail, start), torch.where(pad, tail, end),
                        torch.where(pad, nd + c, doc)]).to(torch.int32).contiguous()


def _tables(D: int, device, degree: int = 2):
    """The index table ``ix`` int32 ``[degree, KP]`` (row t: the coordinate of each monomial's t-th factor, D for
    the constant 1) and the query weights ``1/β!`` of the monomials of degree <= ``degree``, padded to the
    kernels' feature count (:func:`padded_dims`; padded features: query weight 0, finite key features, so they
    add nothing)."""
    key = (D, str(device), degree)
    if key not in _TABLES:
        beta = multi_indices(D, degree)  # [K, D]
        K = beta.shape[0]
        KP = padded_dims(D, 1, degree)[0]
        ix = torch.full((degree, KP), D, dtype=torch.int32)
        wq = torch.zeros(KP, dtype=torch.float32)
        for m in range(K):
            idx = [d for d in range(D) for _ in range(int(beta[m, d]))]
            ix[:len(idx), m] = torch.tensor(idx, dtype=torch.int32)
            wq[m] = 1.0 / math.prod(math.factorial(int(x)) for x in beta[m].tolist())
        _TABLES[key] = (ix.to(device), wq.to(device))
    return _TABLES[key]


class _Cfg:
    """Shapes, block sizes and product precision of one call."""

    def __init__(self, q, k1, v1, F: int, seg_bytes: int, chunks: Optional[torch.Tensor] = None, degree: int = 2):
        self.B, self.T, self.HQ, self.D = q.shape
        self.HK, self.DV = k1.shape[2], v1.shape[3]
        self.G = self.HQ // self.HK
        if self.B * self.HQ > 65535:  # the walks' grid axis 1 (CUDA's limit on it)
            raise ValueError(f"poly_tensor_attn (triton): batch x query heads must be at most 65535, got "
                             f"{self.B} x {self.HQ} = {self.B * self.HQ} (split the batch)")
        if degree not in (2, 4):
            raise ValueError(f"poly_tensor_attn (triton): degree must be 2 or 4, got {degree}")
        self.degree = degree
        # the kernels take the index table's rows 0 and 1 (and, at degree 4, read rows 2 and 3 after them)
        self.ix, self.wq = _tables(self.D, q.device, degree)
        self.ia, self.ib = self.ix[0], self.ix[1]
        self.KP, self.DVP = padded_dims(self.D, self.DV, degree)
        self.NKB = self.KP // BK
        self.F, self.seg_bytes = int(F), int(seg_bytes)
        if self.F < 16 or self.F & (self.F - 1):  # the state kernel's products run over a chunk's F rows
            raise ValueError(f"TUNE['F'] must be a power of two >= 16, got {self.F}")
        # packed documents: the chunk table (chunk_table) and the restart flags of the chunk scans, forward (a
        # document's first chunk, slots 0..NF: the state before each chunk) and backward (its last chunk)
        self.ct = chunks
        if chunks is None:
            self.NF = -(-self.T // self.F)
            self.ct_arg = self.ia  # any pointer: the kernels do not read it
        else:
            if chunks.dtype != torch.int32 or chunks.dim() != 2 or chunks.shape[0] != 3 or chunks.device != q.device:
                raise ValueError(f"poly_tensor_attn (triton): chunks must be an int32 [3, NF] chunk table on "
                                 f"{q.device}, got {chunks.dtype} {tuple(chunks.shape)} on {chunks.device}")
            self.NF = chunks.shape[1]
            self.ct_arg = chunks.contiguous()
            doc = self.ct_arg[2]
            new = torch.ones_like(doc)
            new[1:] = (doc[1:] != doc[:-1]).to(torch.int32)
            self.first = torch.cat([new, new.new_zeros(1)])
            self.last = torch.cat([new[1:], new.new_ones(1)])
        self.varlen = chunks is not None
        if q.dtype == torch.float32:
            self.DT = tl.float32
            tf32 = q.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
            self.PREC = "tf32" if tf32 else "ieee"
        else:  # bf16 operands for bf16 and fp16 inputs: the states outgrow fp16's range
            self.DT, self.PREC = tl.bfloat16, "ieee"
        self.kw = dict(D=self.D, DV=self.DV, DVP=self.DVP, F=self.F, BK=BK, DT=self.DT, PREC=self.PREC,
                       VARLEN=self.varlen, DEG=degree)
        self.walk = []  # (feature blocks, kernel keywords) of the walk's passes 1 and 2 and of the forward walk
        for key, warps, extra in (("BK_BWD1", "WARPS_BWD1", {}),
                                  ("BK_BWD", "WARPS_BWD", {"maxnreg": TUNE["MAXNREG_BWD"]}),
                                  ("BK_FWD", "WARPS_FWD", {})):
            bkb = int(TUNE[key])
            if bkb not in (8, 16, 32):
                raise ValueError(f"TUNE[{key!r}] must be 8, 16 or 32 (a divisor of the feature padding {BK}), "
                                 f"got {bkb}")
            kw = dict(DV=self.DV, DVP=self.DVP, F=self.F, BK=bkb, num_warps=int(TUNE[warps]))
            kw.update({k: int(v) for k, v in extra.items() if v})
            self.walk.append((self.KP // bkb, kw))
        # never under the interpreter (whose bf16 products are not exact, on CUDA tensors too), and only where bf16
        # tensor cores exist (compute capability 8.0 on)
        self.x3 = (bool(TUNE["PROJ_X3"]) and q.device.type == "cuda" and not triton_interpret()
                   and torch.cuda.get_device_capability(q.device)[0] >= 8)

    def walk_grid(self, nf: int, nb: int) -> tuple:
        """The grid of a walk over ``nf`` chunks in ``nb`` feature blocks (:func:`_walk_ids`)."""
        return (nf * nb, self.B * self.HQ)

    def flags(self, c0: int, nf: int, backward: bool):
        """The restart flags of a segment's chunk scans (``None`` without packed documents): forward slots
        ``0..nf`` are the states before chunks ``c0..c0 + nf``; backward slot ``nf - n`` is the suffix from chunk
        ``c0 + n`` and slot 0 the carry from the later segments."""
        if not self.varlen:
            return None
        if not backward:
            return self.first[c0:c0 + nf + 1].contiguous()
        return torch.cat([self.last.new_zeros(1), self.last[c0:c0 + nf].flip(0)])

    def seg_chunks(self, backward: bool) -> int:
        return _seg_chunks(self.B, self.HQ, self.HK, self.KP, self.DVP, self.DV, self.F, self.NF, backward,
                           self.seg_bytes)


def padded_dims(D: int, DV: int, degree: int = 2):
    """``(KP, DVP)``: the kernels' feature count (the rank ``C(D + degree, degree)`` padded to a multiple of BK) and
    value width (``Dv`` padded to a power of two >= 16); the layout of their state buffers."""
    return -(-math.comb(D + degree, degree) // BK) * BK, max(16, triton.next_power_of_2(DV))


def _seg_chunks(B: int, HQ: int, HK: int, KP: int, DVP: int, DV: int, F: int, NF: int, backward: bool,
                seg_bytes: int) -> int:
    """State chunks per segment so that a segment's buffers fit ``seg_bytes`` (:data:`SEG_BYTES` by default).
    Forward: the states (per kv head) ``[2, KP, DVP + 1]`` per chunk; its walk's buffers (features, numerator) come
    on top, the backward's segment length at a time, within the backward's budget: the forward holds up to twice
    ``seg_bytes``. Backward: the forward states and the suffix states
    (per query head), plus the features and their gradients (``4 Hq + 2 Hkv`` rows of ``KP``) and the value
    gradients (``2 Hq`` rows of ``Dv``) per position."""
    per_chunk = 4 * B * HK * 2 * KP * (DVP + 1)
    if backward:
        per_chunk += 4 * B * HQ * 2 * KP * (DVP + 1) + 4 * B * F * ((4 * HQ + 2 * HK) * KP + 2 * HQ * DV)
    return max(1, min(NF, seg_bytes // per_chunk))


def _saved_ranges(B: int, T: int, HQ: int, HK: int, D: int, DV: int, F: int, seg_bytes: int,
                  NF: Optional[int] = None, degree: int = 2) -> list:
    """``(first chunk, chunks)`` of each backward segment, the forward's segments cut to the backward's length
    (pure ints: the fake implementation of the forward op sizes its outputs with it). ``NF``: the chunks (default
    ``ceil(T / F)``; packed documents: their chunk table's)."""
    KP, DVP = padded_dims(D, DV, degree)
    NF = -(-T // F) if NF is None else NF
    seg = _seg_chunks(B, HQ, HK, KP, DVP, DV, F, NF, False, seg_bytes)
    segb = _seg_chunks(B, HQ, HK, KP, DVP, DV, F, NF, True, seg_bytes)
    return [(c0 + j, min(segb, min(seg, NF - c0) - j)) for c0 in range(0, NF, seg)
            for j in range(0, min(seg, NF - c0), segb)]


def _chunk_contributions(cfg: _Cfg, k1, k2, v1, v2, c0: int, nf: int):
    """``(st [B * Hkv, nf + 1, 2, KP, DVP], sd [B * Hkv, nf + 1, 2, KP])`` float32 with chunk ``c0 + n``'s
    contributions (:func:`_state_kernel`) in slot ``n + 1``; slot 0 is left unwritten."""
    dev = k1.device
    st = torch.empty(cfg.B * cfg.HK, nf + 1, 2, cfg.KP, cfg.DVP, dtype=torch.float32, device=dev)
    sd = torch.empty(cfg.B * cfg.HK, nf + 1, 2, cfg.KP, dtype=torch.float32, device=dev)
    _state_kernel[(nf, cfg.B * cfg.HK, cfg.NKB)](k1, k2, v1, v2, st, sd, cfg.ia, cfg.ib, cfg.ct_arg, cfg.T,
                                                 c0 * cfg.F, c0, cfg.NF, nf + 1, cfg.HK, cfg.KP,
                                                 num_warps=TUNE["WARPS_STATE"], **cfg.kw)
    return st, sd


def _segment_states(cfg: _Cfg, k1, k2, v1, v2, c0: int, nf: int, prefix, prefd, fin: bool = False):
    """Forward states before each of chunks ``c0 .. c0 + nf - 1`` (slots 0..nf-1) and after them (slot nf), from
    the states ``prefix``, ``prefd`` before chunk c0; with ``fin`` also the states after the segment as two new
    tensors (the next segment's prefix): ``(st, sd, (after, after_d) or None)``."""
    st, sd = _chunk_contributions(cfg, k1, k2, v1, v2, c0, nf)
    out = (torch.empty_like(prefix), torch.empty_like(prefd)) if fin else None
    _chunk_scan_(st, sd, (prefix, prefd), out, cfg.flags(c0, nf, backward=False), 1)
    return st, sd, out


def poly_totals(k1, k2, v1, v2, F: int, seg_bytes: int):
    """The totals of all rows' keys (a context-parallel shard's contribution to the later ranks' prefix):
    ``([B * Hkv, 2, KP, DVP], [B * Hkv, 2, KP])`` float32, ``Σ_j U2[j] ⊗ v1[j]`` and ``Σ_j U2[j]`` (then the
    same of k2, v2), the layout of :func:`poly_fwd`'s ``prefix``: the state kernel's chunk contributions summed
    over chunks, segment by segment (:func:`_seg_chunks`)."""
    k1, k2, v1, v2 = (x.contiguous() for x in (k1, k2, v1, v2))
    cfg = _Cfg(k1, k1, v1, F, seg_bytes)
    tot = torch.zeros(cfg.B * cfg.HK, 2, cfg.KP, cfg.DVP, dtype=torch.float32, device=k1.device)
    totd = torch.zeros(cfg.B * cfg.HK, 2, cfg.KP, dtype=torch.float32, device=k1.device)
    seg = cfg.seg_chunks(backward=False)
    for c0 in range(0, cfg.NF, seg):
        st, sd = _chunk_contributions(cfg, k1, k2, v1, v2, c0, min(seg, cfg.NF - c0))
        tot += st[:, 1:].sum(1)  # slot 0 is not written
        totd += sd[:, 1:].sum(1)
    return tot, totd


def poly_totals_bwd(k1, k2, v1, v2, gst, gsd):
    """Gradients of k1, k2, v1, v2 (their dtypes) from the gradients of :func:`poly_totals`' two outputs
    (:func:`_totals_bwd_kernel`, once per stream; nothing of size rows x features is formed)."""
    k1, k2, v1, v2 = (x.contiguous() for x in (k1, k2, v1, v2))
    cfg = _Cfg(k1, k1, v1, int(TUNE["F"]), SEG_BYTES)
    R = int(TUNE["R_PROJ"])
    out = []
    for s, (k, v) in enumerate(((k1, v1), (k2, v2))):
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        _totals_bwd_kernel[(-(-cfg.T // R), cfg.B * cfg.HK)](
            k, v, gst[:, s].float().contiguous(), gsd[:, s].float().contiguous(), dk, dv, cfg.ia, cfg.ib, cfg.T,
            cfg.HK, cfg.KP, cfg.NKB, D=cfg.D, DV=cfg.DV, DVP=cfg.DVP, R=R, BK=BK, X3=cfg.x3,
            num_warps=TUNE["WARPS_PROJ"])
        out.append((dk, dv))
    (dk1, dv1), (dk2, dv2) = out
    return dk1, dk2, dv1, dv2


def _segment_rows(cfg: _Cfg, c0: int, nf: int, ct_host) -> tuple:
    """``(t0, r1)``: the first row of the segment of chunks ``c0 .. c0 + nf - 1`` and one past its last
    (``ct_host``: packed documents' chunk table as lists, else None)."""
    if ct_host is None:
        t0 = c0 * cfg.F
        return t0, min(cfg.T, t0 + nf * cfg.F)
    return ct_host[0][c0], ct_host[1][c0 + nf - 1]


def _segment_features(cfg: _Cfg, q, k1, k2, t0: int, r1: int, TS: int, scale: float) -> list:
    """The features ``U1`` (query weights and scale in), ``U2``, ``U3`` of a segment's rows ``[t0, r1)``: float32
    ``[B, TS, H, KP]`` each, zero from row ``r1 - t0`` on (one :func:`_feat_kernel` launch for the three)."""
    RF = int(TUNE["R_FEAT"])
    feats = [torch.empty(cfg.B, TS, h, cfg.KP, dtype=torch.float32, device=q.device) for h in (cfg.HQ, cfg.HK, cfg.HK)]
    _feat_kernel[(cfg.B * (cfg.HQ + 2 * cfg.HK) * -(-TS // RF), cfg.NKB)](
        q, k1, k2, *feats, cfg.ia, cfg.ib, cfg.wq, cfg.T, t0, r1, TS, cfg.B, cfg.HQ, cfg.HK, cfg.KP, scale, D=cfg.D,
        R=RF, BK=BK, DEG=cfg.degree, num_warps=TUNE["WARPS_FEAT"])
    return feats


def _walk_forward(cfg: _Cfg, q, k1, k2, v1, v2, st, sd, ns1: int, c0: int, nf: int, o, den, scale: float,
                  ct_host) -> None:
    """Output rows and normaliser of chunks ``c0 .. c0 + nf - 1`` by :func:`_fwd_walk_kernel`, from the states
    before each chunk (``st``, ``sd`` start at chunk c0's slot; ``ns1`` slots per kv head): the segment's features,
    the float32 numerator and normaliser summed over feature blocks, then ``o = num / (den + EPS)`` in o's dtype
    (:func:`_normalize_kernel`, one pass over the sums)."""
    TS = nf * cfg.F
    t0, r1 = _segment_rows(cfg, c0, nf, ct_host)
    feats = _segment_features(cfg, q, k1, k2, t0, r1, TS, scale)
    nn = cfg.B * TS * cfg.HQ
    sums = torch.zeros(nn * (cfg.DV + 1), dtype=torch.float32, device=q.device)  # one fill for both
    num, dsum = sums[:nn * cfg.DV].view(cfg.B, TS, cfg.HQ, cfg.DV), sums[nn * cfg.DV:].view(cfg.B, TS, cfg.HQ)
    nkb, kw = cfg.walk[2]
    _fwd_walk_kernel[cfg.walk_grid(nf, nkb)](*feats, v1, v2, st, sd, num, dsum, cfg.ct_arg, cfg.T, t0, c0, cfg.NF,
                                             ns1, TS, cfg.HQ, cfg.G, cfg.KP, VARLEN=cfg.varlen, **kw)
    del feats
    nr = (r1 - t0) * cfg.HQ
    _normalize_kernel[(-(-nr // _R_ROWS), cfg.B)](num, dsum, o, den, nr, TS, cfg.T, t0, cfg.HQ, EPS, DV=cfg.DV,
                                                   DVP=cfg.DVP, R=_R_ROWS, num_warps=4)


def poly_fwd(q, k1, k2, v1, v2, scale: float, F: int, seg_bytes: int, *, save: bool = True, prefix=None,
             chunks: Optional[torch.Tensor] = None, degree: int = 2):
    """Forward: ``o`` ``[B, T, Hq, Dv]`` in q's dtype, the normaliser ``den`` float32 ``[B, T, Hq]``, and (when
    ``save``) the state at each segment's start with the segment's chunk range, for the backward. ``F``: the state
    chunk length (:data:`TUNE`), ``seg_bytes``: the segments' budget (:data:`SEG_BYTES`). ``prefix``: ``(states
    [B * Hkv, 2, KP, DVP], vector sums [B * Hkv, 2, KP])`` float32 before the first position (default zero; context
    parallelism passes the earlier ranks' sums), in this module's feature order. ``chunks``: packed documents'
    chunk table (:func:`chunk_table`; batch 1): the states restart at every document, inside the kernels.
    ``degree``: 2 or 4 (the polynomial of exp; degree 4 has rank ``C(Dk + 4, 4)``)."""
    if chunks is not None and prefix is not None:
        raise ValueError("poly_fwd: a prefix state and packed documents (chunks) cannot be combined: the first "
                         "document's state starts at zero")
    cfg = _Cfg(q, k1, v1, F, seg_bytes, chunks, degree)
    dev = q.device
    o = torch.empty(cfg.B, cfg.T, cfg.HQ, cfg.DV, dtype=q.dtype, device=dev)
    den = torch.empty(cfg.B, cfg.T, cfg.HQ, dtype=torch.float32, device=dev)
    if prefix is None:  # the states before the first position: zero, or (context parallelism) the earlier ranks'
        prefix = torch.zeros(cfg.B * cfg.HK, 2, cfg.KP, cfg.DVP, dtype=torch.float32, device=dev)
        prefd = torch.zeros(cfg.B * cfg.HK, 2, cfg.KP, dtype=torch.float32, device=dev)
    else:
        # the scan reads them as contiguous float32 rows and they are saved as they are: private copies
        prefix, prefd = (t.detach().to(torch.float32).contiguous().clone() for t in prefix)
    seg = cfg.seg_chunks(backward=False)
    segb = cfg.seg_chunks(backward=True)  # the backward's segments are shorter: each starts from a saved state
    saved = []
    ct_host = cfg.ct.cpu().tolist() if cfg.varlen else None  # one host sync, as in the backward
    for c0 in range(0, cfg.NF, seg):
        nf = min(seg, cfg.NF - c0)
        st, sd, after = _segment_states(cfg, k1, k2, v1, v2, c0, nf, prefix, prefd, fin=c0 + nf < cfg.NF)
        if save:  # the order of _saved_ranges; the first is the segment's prefix itself (never written)
            saved.append((c0, min(segb, nf), prefix, prefd))
            for j in range(segb, nf, segb):
                saved.append((c0 + j, min(segb, nf - j), st[:, j].clone(), sd[:, j].clone()))
        for j in range(0, nf, segb):  # the backward's segment length at a time: its buffers fit that budget
            _walk_forward(cfg, q, k1, k2, v1, v2, st[:, j:], sd[:, j:], nf + 1, c0 + j, min(segb, nf - j), o, den,
                          scale, ct_host)
        del st, sd
        if after is not None:
            prefix, prefd = after
    return o, den, saved


def poly_fwd_saved(q, k1, k2, v1, v2, scale: float, F: int, seg_bytes: int, *, save: bool = True, prefix=None,
                   chunks: Optional[torch.Tensor] = None, degree: int = 2):
    """:func:`poly_fwd` on contiguous inputs with what the backward needs as one flat list: ``(o, [den, then the
    two states of each backward segment (when save)])``, the form :func:`poly_bwd_saved` takes back."""
    o, den, states = poly_fwd(*(x.contiguous() for x in (q, k1, k2, v1, v2)), scale, F, seg_bytes, save=save,
                              prefix=prefix, chunks=chunks, degree=degree)
    return o, [den] + [t for _, _, p, pd in states for t in (p, pd)]


def poly_bwd_saved(do, q, k1, k2, v1, v2, o, saved, scale: float, F: int, seg_bytes: int, *,
                   prefix_grad: bool = False, chunks: Optional[torch.Tensor] = None, degree: int = 2):
    """:func:`poly_bwd` from :func:`poly_fwd_saved`'s list and output ``o`` (the segment ranges follow from the
    shapes and the forward's ``F``, ``seg_bytes``; ``<dO, o>`` is computed here)."""
    q, k1, k2, v1, v2, do = (x.contiguous() for x in (q, k1, k2, v1, v2, do))
    den, states = saved[0], saved[1:]
    B, T, HQ, D = q.shape
    ranges = _saved_ranges(B, T, HQ, k1.shape[2], D, v1.shape[3], F, seg_bytes,
                           None if chunks is None else chunks.shape[1], degree)
    if len(states) != 2 * len(ranges):
        raise ValueError(f"poly_tensor_attn (triton): {len(states)} saved states for {len(ranges)} backward "
                         f"segments (expected {2 * len(ranges)})")
    segs = [(c0, nf, states[2 * i], states[2 * i + 1]) for i, (c0, nf) in enumerate(ranges)]
    o = o.contiguous()
    delta = torch.empty(B, T, HQ, dtype=torch.float32, device=q.device)  # <dO, o> per (row, head), float32
    _rowdot_kernel[(-(-B * T * HQ // _R_ROWS),)](do, o, delta, B * T * HQ, DV=v1.shape[3],
                                                  DVP=padded_dims(D, v1.shape[3], degree)[1], R=_R_ROWS, num_warps=4)
    return poly_bwd(q, k1, k2, v1, v2, do, den, delta, segs, scale, F, seg_bytes, prefix_grad=prefix_grad,
                    chunks=chunks, degree=degree)


def poly_bwd(q, k1, k2, v1, v2, do, den, delta, saved, scale: float, F: int, seg_bytes: int, *,
             prefix_grad: bool = False, chunks: Optional[torch.Tensor] = None, degree: int = 2):
    """Backward: gradients of q, k1, k2, v1, v2 in their dtypes (k/v gradients summed over GQA groups); with
    ``prefix_grad`` also the gradient of the states before the first position (``prefix`` of :func:`poly_fwd`),
    ``([B * Hkv, 2, KP, DVP], [B * Hkv, 2, KP])`` float32: the suffix sums of the state gradients over the
    whole sequence, summed over each kv head's query heads. ``chunks``, ``degree``: as for :func:`poly_fwd`."""
    if chunks is not None and prefix_grad:
        raise ValueError("poly_bwd: prefix_grad and packed documents (chunks) cannot be combined (the forward takes "
                         "no prefix state with them)")
    cfg = _Cfg(q, k1, v1, F, seg_bytes, chunks, degree)
    dev = q.device
    B, T, HQ, HK, D, DV, F, KP = cfg.B, cfg.T, cfg.HQ, cfg.HK, cfg.D, cfg.DV, cfg.F, cfg.KP
    dq = torch.empty_like(q)
    dk1, dk2 = torch.empty_like(k1), torch.empty_like(k2)
    dv1, dv2 = torch.empty_like(v1), torch.empty_like(v2)
    carry = torch.zeros(B * HQ, 2, KP, cfg.DVP, dtype=torch.float32, device=dev)
    carryd = torch.zeros(B * HQ, 2, KP, dtype=torch.float32, device=dev)
    f32 = dict(dtype=torch.float32, device=dev)
    RP = int(TUNE["R_PROJ"])  # rows per program of the projection kernel
    # packed documents: each segment's chunks cover the rows [t0, r1) (read once from the table: one host sync)
    ct_host = cfg.ct.cpu().tolist() if cfg.varlen else None
    for c0, nf, prefix, prefd in reversed(saved):
        st, sd, _ = _segment_states(cfg, k1, k2, v1, v2, c0, nf, prefix, prefd)
        TS = nf * F
        t0, r1 = _segment_rows(cfg, c0, nf, ct_host)
        feats = _segment_features(cfg, q, k1, k2, t0, r1, TS, scale)
        rs = torch.empty(B * HQ, nf + 1, 2, KP, cfg.DVP, **f32)
        rd = torch.empty(B * HQ, nf + 1, 2, KP, **f32)
        args = (cfg.ct_arg, T, t0, c0, cfg.NF, nf + 1, HQ, cfg.G, KP)
        (nb1, kw1), (nb2, kw2) = cfg.walk[:2]
        _bwd_kernel[cfg.walk_grid(nf, nb1)](*feats, v1, v2, do, den, delta, st, sd, rs, rd, rs, rs, rs, rs, 0, *args,
                                            MODE=1, VARLEN=cfg.varlen, **kw1)
        # the suffixes: slot 0 the carry from the later segments, the last slot the carry to the earlier ones
        after = (torch.empty_like(carry), torch.empty_like(carryd))
        _chunk_scan_(rs, rd, (carry, carryd), after, cfg.flags(c0, nf, backward=True), 2)
        carry, carryd = after
        dus = [torch.empty(B, TS, HQ, KP, **f32) for _ in range(3)]
        gv = torch.zeros(2, B, TS, HQ, DV, **f32)
        _bwd_kernel[cfg.walk_grid(nf, nb2)](*feats, v1, v2, do, den, delta, st, sd, rs, rd, *dus, gv, gv[0].numel(),
                                            *args, MODE=2, VARLEN=cfg.varlen, **kw2)
        del st, sd, rs, rd, feats
        # dq, dk1, dk2 and dv1, dv2 (GQA groups summed) of the segment's rows, one launch
        _proj_kernel[(B * (HQ + 2 * HK) * -(-TS // RP),)](q, k1, k2, *dus, dq, dk1, dk2, gv, dv1, dv2, gv[0].numel(),
                                                       cfg.ia, cfg.ib, cfg.wq, T, t0, r1, TS, B, HQ, HK, cfg.G, KP,
                                                       cfg.NKB, scale, D=D, DV=DV, DVP=cfg.DVP, R=RP, BK=BK,
                                                       DEG=cfg.degree, X3=cfg.x3, num_warps=TUNE["WARPS_PROJ"])
        del dus, gv
    if prefix_grad:
        G = cfg.G
        return (dq, dk1, dk2, dv1, dv2, carry.view(B * HK, G, 2, KP, cfg.DVP).sum(1),
                carryd.view(B * HK, G, 2, KP).sum(1))
    return dq, dk1, dk2, dv1, dv2
