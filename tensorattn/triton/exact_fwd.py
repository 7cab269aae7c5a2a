"""Fused forward of exact tensor attention (Triton).

Tiling. One program owns a block of ``BT`` query tokens of one batch entry and one key/value head, and all
``G = Hq / Hkv`` query heads that read that head (GQA packing, after FBGEMM's 2-simplicial kernel): its
``M = BT * GP`` rows (``GP`` = G rounded up to a power of two) are the rows of every matrix product, row
``m`` being token ``m // GP`` and head ``m % GP``. The program walks the first key stream one position
at a time (the "outer" loop, done on CUDA cores: ``qk1 = q * k1[j1]``) and the second in blocks of ``BN``
positions through the tensor cores (``s = qk1 @ k2^T``, ``acc += (p @ v2) * v1[j1]``), with one online
softmax over all ``(j1, j2)``.

Three visibility modes (constexpr ``MODE``):

* ``WINDOW`` (2-D sliding window): the outer index is relative, ``j1 = i - r`` for ``r < w1``, so every row
  does exactly ``w1`` outer steps whatever ``BT`` is (a per-row gather of k1/v1); the inner loop covers the
  union of the rows' ``j2`` windows, ``[i0 - w2 + 1, i0 + BT)``. The launcher swaps the two streams so that
  the smaller window is the outer one (the op is symmetric in ``(k1, v1) <-> (k2, v2)``).
* ``CAUSAL``: absolute ``j1 < i0 + BT`` masked by ``j1 <= i``; inner ``j2 < i0 + BT`` masked by ``j2 <= i``.
* ``FULL`` (no mask): ``j1 < S1``, ``j2 < S2``.

Packed documents (constexpr ``VARLEN``; ``B = 1``): each row also keeps only keys of its own document,
``lo_i <= j < hi_i`` (per-position arrays from :func:`tensorattn.packing.document_bounds`), and the loops start
and end at the documents of the block's first and last rows (positions are sorted), so a packed row costs what
its documents cost, in one launch.

Numerics: scores are formed in base 2 (``qk1`` carries ``scale * log2(e)``) and exponentiated with ``exp2``;
``s``/``p``/``acc`` accumulate in float32, the two products take the input dtype (float32 inputs use
full-precision "ieee" products, not tf32). The saved log-sum-exp is converted to the NATURAL log before it
is stored (``lse = (m2 + log2 l) * ln 2``), the same base as the references; the backward multiplies it by
``log2(e)`` again. Head dims are padded to a power of two >= 16 by masked loads; ragged tails are masked.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # the kernels read these as constexpr globals; the host as .value
LN2 = tl.constexpr(0.6931471805599453)

MODE_FULL, MODE_CAUSAL, MODE_WINDOW = 0, 1, 2

# The outer step's k1 / v1 as one row broadcast over the program's rows where they all read the same position
# (causal and full attention; windows with one token per program, as GQA 64 at D = 128): as FBGEMM's kernel does.
# The forward and both backward kernels; TENSORATTN_EXACT_ROW1=0 gathers one row per program row instead (the A/B of
# the benchmarks).
ROW1 = os.environ.get("TENSORATTN_EXACT_ROW1", "1") != "0"
# Inner key blocks that every row of the program sees whole (no tail, no mask edge, outer key visible to all rows)
# skip the mask (the forward; in the backward only the key-major kernel under full causal attention, where it was
# measured faster); TENSORATTN_EXACT_FAST=0 masks every block. Software-pipelining stages of the forward's outer and
# inner loops, TENSORATTN_EXACT_STAGES="outer,inner": 2,3 measured best overall on an H200 (FBGEMM's 16,1 gains
# 2 % at D = 128 with window (32, 512), none at (512, 32), and loses 16 % on full causal; benchmarks/NOTES_exact.md).
FAST = os.environ.get("TENSORATTN_EXACT_FAST", "1") != "0"
_stages = os.environ.get("TENSORATTN_EXACT_STAGES", "2,3")
try:
    STAGES = tuple(int(x) for x in _stages.split(","))
except ValueError:
    STAGES = ()
if len(STAGES) != 2 or min(STAGES) < 1:
    raise ValueError(f"TENSORATTN_EXACT_STAGES must be two positive integers 'outer,inner', got {_stages!r}")

# The last compiled kernel of each name (registers, spills: read by the benchmark's report).
COMPILED = {}


def resources():
    """``{kernel: {"n_regs", "n_spills", "shared"}}`` of the last launches (on CUDA)."""
    out = {}
    for k, c in COMPILED.items():
        out[k] = {a: getattr(c, a, None) for a in ("n_regs", "n_spills", "shared")}
    return out


def plan(q, k1, k2, *, causal, window):
    """Mode, the two windows after the swap, and whether the streams are swapped (smaller window outer)."""
    T, S1, S2 = q.shape[1], k1.shape[1], k2.shape[1]
    if window is not None:
        w1, w2 = min(window[0], T), min(window[1], T)
        return MODE_WINDOW, (w2, w1) if w1 > w2 else (w1, w2), w1 > w2
    if causal:
        return MODE_CAUSAL, (T, T), False
    return MODE_FULL, (S1, S2), S1 > S2


def row_broadcast(mode: int, BT: int) -> bool:
    """Whether the kernels load the outer step's k1/v1 as one row broadcast over a block (``ROW1``): every row of
    the block reads the same outer position (causal and full attention; windows with one token per block)."""
    return ROW1 and (mode != MODE_WINDOW or BT == 1)


def block_sizes(G: int, D: int, Dv: int, *, interpret: bool, forward: bool = False):
    """(BT, GP, BN, BD, BDV, num_warps): about 64 rows per program, 64 keys per inner block; 8 warps for head dims of
    128 in the backward, 4 in the forward (measured on an H200 at D = 128, GQA 64, bf16: forward 172 -> 275
    TFLOP/s with 4 warps, where the backward falls from 166 to 107; ``benchmarks/results/bench_exact_row1.md``,
    ``benchmarks/NOTES_exact.md``)."""
    GP = triton.next_power_of_2(G)
    BD, BDV = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(Dv))
    if interpret:  # tiny tiles: the interpreter's cost grows with the tile area
        return max(1, 16 // GP), GP, 16, BD, BDV, 4
    rows = 64
    BT = max(1, rows // GP)
    BN = 64
    warps = 8 if max(BD, BDV) >= (256 if forward else 128) else 4
    return BT, GP, BN, BD, BDV, warps


@triton.jit
def _doc_loops(DOC_LO, DOC_HI, i0, i_last, lo2, hi2, n_outer, MODE: tl.constexpr):
    """The loop bounds of a query block ``[i0, i_last)`` narrowed to its documents (positions are sorted, so the
    block's first row has the smallest document start and its last row the largest end): the inner range, the
    first outer step and the outer end (for absolute outer indices: causal and full)."""
    first = tl.load(DOC_LO + i0)
    last = tl.load(DOC_HI + i_last - 1)
    lo2 = tl.maximum(lo2, first)
    hi2 = tl.minimum(hi2, last)
    r0 = 0
    if MODE != 2:
        r0 = first
        n_outer = tl.minimum(n_outer, last)
    else:  # relative outer index j1 = i - r >= first: r < i_last - first (short documents, long windows)
        n_outer = tl.minimum(n_outer, i_last - first)
    return lo2, hi2, r0, n_outer


# --------------------------------------------------------------------------------------------------
# Prologues shared by the forward and the two backward kernels (inlined by the compiler)
# --------------------------------------------------------------------------------------------------
@triton.jit
def _block_rows(i0, hk, T, G, D, Dv, BT: tl.constexpr, GP: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
    """The ``M = BT * GP`` rows of a query block (GQA packing: row ``m`` is token ``i0 + m // GP``, head
    ``hk * G + m % GP``) and the head-dim lanes: ``tok, g, row_ok, hq, d, e, d_ok, e_ok``."""
    rows = tl.arange(0, BT * GP)
    tok = i0 + rows // GP
    g = rows % GP
    row_ok = (tok < T) & (g < G)
    d = tl.arange(0, BD)
    e = tl.arange(0, BDV)
    return tok, g, row_ok, hk * G + g, d, e, d < D, e < Dv


@triton.jit
def _query_loops(DOC_LO, DOC_HI, i0, tok, row_ok, T, S1, S2, W1, W2, BT: tl.constexpr, MODE: tl.constexpr,
                 VARLEN: tl.constexpr):
    """Loop bounds of a query block: the outer steps ``r0 .. n_outer`` (relative ``j1 = i - r`` in window mode,
    absolute else), the inner key range ``[lo2, hi2)`` (the union of the rows' ``j2`` ranges), and each row's
    document ``[doc_lo, doc_hi)`` (packed documents; without them ``tok`` twice, unused)."""
    i_last = tl.minimum(T, i0 + BT)  # one past the last query of the block
    if MODE == 2:
        n_outer = W1
        lo2 = tl.maximum(0, i0 - W2 + 1)
        hi2 = i_last
    elif MODE == 1:
        n_outer = i_last
        lo2 = 0
        hi2 = i_last
    else:
        n_outer = S1
        lo2 = 0
        hi2 = S2
    r0 = 0
    doc_lo = tok
    doc_hi = tok
    if VARLEN:  # packed documents: row i sees keys of its own document only, [lo_i, hi_i)
        doc_lo = tl.load(DOC_LO + tok, mask=row_ok, other=0)  # empty documents off the rows
        doc_hi = tl.load(DOC_HI + tok, mask=row_ok, other=0)
        lo2, hi2, r0, n_outer = _doc_loops(DOC_LO, DOC_HI, i0, i_last, lo2, hi2, n_outer, MODE)
    return r0, n_outer, lo2, hi2, doc_lo, doc_hi


@triton.jit
def _outer_keys(r, tok, row_ok, doc_lo, doc_hi, M: tl.constexpr, MODE: tl.constexpr, VARLEN: tl.constexpr):
    """Outer step ``r``: each row's first-stream position ``j1`` and whether it is visible (``ok1``)."""
    if MODE == 2:
        j1 = tok - r  # [M] relative: row i visits j1 = i - r
        ok1 = row_ok & (j1 >= 0)
    elif MODE == 1:
        j1 = tl.zeros([M], tl.int32) + r
        ok1 = row_ok & (j1 <= tok)
    else:
        j1 = tl.zeros([M], tl.int32) + r
        ok1 = row_ok
    if VARLEN:
        ok1 = ok1 & (j1 >= doc_lo) & (j1 < doc_hi)
    return j1, ok1


@triton.jit
def _pair_mask(vis, j2, tok, W2, doc_lo, doc_hi, MODE: tl.constexpr, VARLEN: tl.constexpr):
    """``vis [M, BN]`` narrowed by the second stream's mask: ``j2 <= i`` (causal), ``i - w2 < j2 <= i`` (window),
    the row's document (packed)."""
    if MODE == 2:
        vis = vis & (j2[None, :] <= tok[:, None]) & (j2[None, :] > tok[:, None] - W2)
    elif MODE == 1:
        vis = vis & (j2[None, :] <= tok[:, None])
    if VARLEN:
        vis = vis & (j2[None, :] >= doc_lo[:, None]) & (j2[None, :] < doc_hi[:, None])
    return vis


@triton.jit
def _partial_block(r, c0, i0, hi2, W2, BT: tl.constexpr, BN: tl.constexpr, MODE: tl.constexpr):
    """Whether some row of the query block ``[i0, i0 + BT)`` does not see all of the inner key block
    ``[c0, c0 + BN)`` at outer step ``r`` (so the block needs the mask; without documents): the tail
    (``c0 + BN > hi2``), the diagonal (``j2 > i0``), the window's far edge (``j2 <= i - w2`` for the last row), an
    outer key after a row's own position (``r > i0``: causal ``j1 = r``, window ``j1 = i - r < 0``). Rows past
    ``T`` or past the head group are not counted. In the forward their values are never stored; in the key-major
    backward kernel they do enter the stored products, and add nothing only because their q and dO load as zero
    (and their LSE and Delta as zero, so P = 1 times dS = 0): keep those fill values."""
    edge = c0 + BN > hi2
    if MODE != 0:
        edge = edge | (r > i0) | (c0 + BN - 1 > i0)
    if MODE == 2:
        edge = edge | (c0 < i0 + BT - W2)
    return edge


@triton.jit
def _outer_row(K1, V1, r, i0, d, e, d_ok, e_ok, sk1_t, sk1_d, sv1_t, sv1_d, MODE: tl.constexpr):
    """The outer step's k1 and v1 as one row ``[1, BD]``, ``[1, BDV]``, for a block whose rows all read the same
    position (``j1 = r``; window with one token per program: ``j1 = i0 - r``, zero before the sequence start)."""
    js = r
    mk, me = d_ok, e_ok
    if MODE == 2:
        js = i0 - r
        mk, me = d_ok & (js + 0 * d >= 0), e_ok & (js + 0 * e >= 0)
    k1 = tl.load(K1 + js * sk1_t + d * sk1_d, mask=mk, other=0.0)[None, :]
    v1 = tl.load(V1 + js * sv1_t + e * sv1_d, mask=me, other=0.0)[None, :]
    return k1, v1


@triton.jit
def _outer_tokens(K1, V1, r, i0, T, d, e, d_ok, e_ok, sk1_t, sk1_d, sv1_t, sv1_d, BT: tl.constexpr):
    """Window mode, several tokens per block: the outer step's k1 and v1 rows of each token, ``j1 = i - r``
    (``[BT, BD]``, ``[BT, BDV]``; zero before the sequence start and past ``T``), for a broadcast over the token's
    heads instead of a gather per row."""
    tk = i0 + tl.arange(0, BT)
    js = tk - r
    ok = (tk < T) & (js >= 0)
    k1 = tl.load(K1 + js[:, None] * sk1_t + d[None, :] * sk1_d, mask=ok[:, None] & d_ok[None, :], other=0.0)
    v1 = tl.load(V1 + js[:, None] * sv1_t + e[None, :] * sv1_d, mask=ok[:, None] & e_ok[None, :], other=0.0)
    return k1, v1


@triton.jit
def _masked(s, ok1, ok2, j2, tok, W2, doc_lo, doc_hi, MODE: tl.constexpr, VARLEN: tl.constexpr):
    """Scores ``s [M, BN]`` with the pairs a row does not see at -inf (:func:`_pair_mask`)."""
    vis = _pair_mask(ok1[:, None] & ok2[None, :], j2, tok, W2, doc_lo, doc_hi, MODE, VARLEN)
    return tl.where(vis, s, float("-inf"))


@triton.jit
def _exact_fwd_kernel(
    Q, K1, K2, V1, V2, O, LSE, DOC_LO, DOC_HI,
    sq_b, sq_t, sq_h, sq_d,
    sk1_b, sk1_t, sk1_h, sk1_d,
    sk2_b, sk2_t, sk2_h, sk2_d,
    sv1_b, sv1_t, sv1_h, sv1_d,
    sv2_b, sv2_t, sv2_h, sv2_d,
    so_b, so_t, so_h, so_d,
    sl_b, sl_h, sl_t,
    T, S1, S2, Hkv, G, D, Dv, W1, W2, qk_scale,
    MODE: tl.constexpr, BT: tl.constexpr, GP: tl.constexpr, BN: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    VARLEN: tl.constexpr, ROW1: tl.constexpr, FAST: tl.constexpr, S_OUT: tl.constexpr, S_IN: tl.constexpr,
):
    M: tl.constexpr = BT * GP
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    i0 = pid_t * BT
    tok, g, row_ok, hq, d, e, d_ok, e_ok = _block_rows(i0, hk, T, G, D, Dv, BT, GP, BD, BDV)
    # 64-bit batch offsets: B * T * H * D can pass 2^31 elements
    b64 = b.to(tl.int64)
    Q += b64 * sq_b
    K1 += b64 * sk1_b + hk * sk1_h
    K2 += b64 * sk2_b + hk * sk2_h
    V1 += b64 * sv1_b + hk * sv1_h
    V2 += b64 * sv2_b + hk * sv2_h

    # kept in the input dtype (half the registers of float32); scaled when qk1 is formed
    q = tl.load(Q + tok[:, None] * sq_t + hq[:, None] * sq_h + d[None, :] * sq_d,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, BDV], tl.float32)

    r0, n_outer, lo2, hi2, doc_lo, doc_hi = _query_loops(DOC_LO, DOC_HI, i0, tok, row_ok, T, S1, S2, W1, W2, BT,
                                                         MODE, VARLEN)
    for r in tl.range(r0, n_outer, num_stages=S_OUT):
        j1, ok1 = _outer_keys(r, tok, row_ok, doc_lo, doc_hi, M, MODE, VARLEN)
        if ROW1:  # every row has the same j1: one row of k1 and v1, broadcast over the M rows
            k1, v1 = _outer_row(K1, V1, r, i0, d, e, d_ok, e_ok, sk1_t, sk1_d, sv1_t, sv1_d, MODE)
        else:
            k1 = tl.load(K1 + j1[:, None] * sk1_t + d[None, :] * sk1_d, mask=ok1[:, None] & d_ok[None, :], other=0.0)
            v1 = tl.load(V1 + j1[:, None] * sv1_t + e[None, :] * sv1_d, mask=ok1[:, None] & e_ok[None, :], other=0.0)
        qk1 = (q.to(tl.float32) * k1.to(tl.float32) * qk_scale).to(DOT_DTYPE)  # [M, BD], base-2 logits
        for c0 in tl.range(lo2, hi2, BN, num_stages=S_IN):
            j2 = c0 + tl.arange(0, BN)
            ok2 = j2 < hi2
            k2t = tl.load(K2 + j2[None, :] * sk2_t + d[:, None] * sk2_d, mask=ok2[None, :] & d_ok[:, None],
                          other=0.0).to(DOT_DTYPE)  # [BD, BN]
            v2 = tl.load(V2 + j2[:, None] * sv2_t + e[None, :] * sv2_d, mask=ok2[:, None] & e_ok[None, :],
                         other=0.0).to(DOT_DTYPE)  # [BN, BDV]
            s = tl.dot(qk1, k2t, input_precision=PRECISION)  # [M, BN], base-2 logits
            if FAST and not VARLEN:  # masked only where some row does not see all of the block
                if _partial_block(r, c0, i0, hi2, W2, BT, BN, MODE):
                    s = _masked(s, ok1, ok2, j2, tok, W2, doc_lo, doc_hi, MODE, VARLEN)
            else:
                s = _masked(s, ok1, ok2, j2, tok, W2, doc_lo, doc_hi, MODE, VARLEN)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            pv2 = tl.dot(p.to(DOT_DTYPE), v2, input_precision=PRECISION)  # [M, BDV]
            acc = acc * alpha[:, None] + pv2 * v1.to(tl.float32)
            m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    O += b64 * so_b
    tl.store(O + tok[:, None] * so_t + hq[:, None] * so_h + e[None, :] * so_d, o.to(O.dtype.element_ty),
             mask=row_ok[:, None] & e_ok[None, :])
    lse = (m_i + tl.math.log2(l_safe)) * LN2  # natural log
    LSE += b64 * sl_b
    tl.store(LSE + hq * sl_h + tok * sl_t, lse, mask=row_ok)


def dot_dtype(dtype: torch.dtype):
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


def exact_fwd(q, k1, k2, v1, v2, *, scale: float, causal: bool, window, block=None, docs=None):
    """Launch the fused forward. Inputs ``[B, T, H, D]`` (any strides), validated by the caller.

    Args:
        q: ``[B, T, Hq, D]``; k1, k2: ``[B, S, Hkv, D]``; v1, v2: ``[B, S, Hkv, Dv]``.
        scale: score scale; causal / window: visibility (window ``None`` or ``(w1, w2)``, implies causal).
        block: optional ``(BT, GP, BN, BD, BDV, num_warps)`` override (benchmarks, tests).
        docs: packed documents (``B = 1``, ``S1 = S2 = T``): ``(lo, hi)`` int32 ``[T]``, each position's document
            start and end; the masks above apply inside each document.

    Returns:
        ``o`` ``[B, T, Hq, Dv]`` in the input dtype and ``lse`` ``[B, Hq, T]`` float32, natural log.
    """
    B, T, Hq, D = q.shape
    Hkv, Dv = k1.shape[2], v1.shape[3]
    G = Hq // Hkv
    mode, (w1, w2), swap = plan(q, k1, k2, causal=causal, window=window)
    if swap:
        k1, k2, v1, v2 = k2, k1, v2, v1
    interpret = q.device.type == "cpu"
    BT, GP, BN, BD, BDV, warps = block or block_sizes(G, D, Dv, interpret=interpret, forward=True)
    o = torch.empty(B, T, Hq, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(T, BT), B * Hkv)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    lo, hi = docs if docs is not None else (lse, lse)  # unused without documents
    COMPILED['_exact_fwd_kernel'] = _exact_fwd_kernel[grid](
        q, k1, k2, v1, v2, o, lse, lo, hi,
        *q.stride(), *k1.stride(), *k2.stride(), *v1.stride(), *v2.stride(), *o.stride(), *lse.stride(),
        T, k1.shape[1], k2.shape[1], Hkv, G, D, Dv, w1, w2, scale * LOG2E.value,
        MODE=mode, BT=BT, GP=GP, BN=BN, BD=BD, BDV=BDV, DOT_DTYPE=dot_dtype(q.dtype), PRECISION=prec,
        VARLEN=docs is not None, ROW1=row_broadcast(mode, BT), FAST=FAST,
        S_OUT=STAGES[0], S_IN=STAGES[1], num_warps=warps,
    )
    return o, lse


__all__ = ["exact_fwd", "resources", "COMPILED", "plan", "block_sizes", "LOG2E", "LN2", "MODE_FULL", "MODE_CAUSAL", "MODE_WINDOW"]
