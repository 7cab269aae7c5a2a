"""Chunk-parallel Triton kernels for causal polynomial tensor attention (degree 2), forward and backward.

Math (see :mod:`tensorattn.poly` for the op): with features ``U1 = φ(scale q) / β!``, ``U2 = φ(k1)``,
``U3 = φ(k2)`` (exact degree-2 monomials, rank ``k = C(Dk + 2, 2)``), the causal numerator of query ``i`` is
``num_i = U1[i] · (L2_i ∘ L3_i)`` with prefix states ``L2_i = Σ_{j <= i} U2[j] ⊗ v1[j]`` (likewise ``L3``),
and the normaliser ``den_i = U1[i] · (l2_i ∘ l3_i)`` with ``l2_i = Σ_{j <= i} U2[j]`` (vectors).

Parallel over the sequence, in three levels:

* **state chunks** of ``F`` positions (``TUNE["F"]``, 64): :func:`_state_kernel` computes every chunk's contribution
  ``ΔS2[n] = U2_n^T v1_n`` (and ``ΔS3``, and the vector sums for the normaliser) for all chunks at once,
  with tensor-core products; an in-place ``cumsum`` over chunks turns them into the state before each
  chunk. The sequence is processed in *segments* of chunks whose states fit a fixed budget
  (:data:`SEG_BYTES`), the state at each segment's end starting the next: memory stays bounded at any T.
* **sub-chunks** of ``C = 16`` queries inside a state chunk: :func:`_fwd_kernel` runs one program per
  (state chunk, query head, value block) and walks the chunk's ``F / C`` sub-chunks; for each it loops over
  blocks of ``BK`` features, using the running state before the sub-chunk and then adding the sub-chunk's
  keys to it. For one sub-chunk with states ``A2, A3`` before it, the pairs split into (before, before),
  (before, inside), (inside, before) and (inside, inside)::

      BB:  U1 (A2 ∘ A3)                                               [C, BK] x [BK, EB]
      BW:  Σ_{j <= i} v2[j] ∘ ((U1[i] ∘ U3[j]) A2)   rows = the C² pairs (i, j): [C², BK] x [BK, EB]
      WB:  likewise with U2, v1, A3
      WW:  the exact polynomial on the C³ triples inside the sub-chunk (independent of the features)

  The normaliser is a vector scan (``cumsum`` of the features inside the sub-chunk): O(k) per position.
  The output is normalised in the kernel and written once in the input dtype; no float32 numerator.
* **backward**: per segment, last to first (the backward's segments are shorter than the forward's: each
  starts from a state the forward saved), the forward states are recomputed (state kernel + cumsum),
  :func:`_feat_kernel` writes the segment's features ``U1, U2, U3`` (float32 ``[B, TS, H, KP]``), and
  :func:`_bwd_kernel` runs twice, one program per (state chunk, query head, block of ``BK`` features: the
  tunables ``BK_BWD1``, ``BK_BWD``) with that block's states ``[BK, Dv]`` in float32 registers, walking the
  chunk one position at a time on the CUDA cores: first (``MODE=1``) it sums every chunk's contribution ``ΔR2[n] = Σ_{i in n} dL2_i``
  to the gradient of the states (``dL2_i = (U1[i] ⊗ G_i) ∘ L3_i``), a reversed in-place cumsum gives the
  suffix sums, then (``MODE=2``) it computes every row's feature gradients (stored: each row's block belongs
  to one program) and value gradients (atomics over feature blocks) from the forward state (by addition) and
  the inclusive suffix (by subtraction of the row's own part). :func:`_proj_kernel` takes the feature
  gradients through the monomials to dq, dk1, dk2 (one-hot products), summing GQA groups first. The walk does
  ``O(k Dv)`` CUDA-core work per row where the forward's pair products do ``O(C k Dv)`` on tensor cores: in
  the backward, pair products cost more in layout conversions and spills than the walk does in FLOPs.

Measured figures, the FLOP and byte counts and what limits the kernels: ``benchmarks/NOTES_poly.md``.

Accumulation: states, suffix states, outputs and gradients in float32; the backward computes in float32
throughout. The forward's matrix-product operands are bf16 for bf16/fp16 inputs (the states' range exceeds
fp16's), float32 for float32 inputs (exact ``ieee`` products unless ``torch.backends.cuda.matmul.allow_tf32``
is set, then tf32). Atomic adds are relaxed: their buffers are read only after the kernel ends.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..features import multi_indices
from ..poly.common import EPS as _EPS

C = 16  # queries per sub-chunk (the pair products have C² = 256 rows)
BK = 32  # features per block
EPS = tl.constexpr(_EPS)  # the op's normaliser guard, read by the forward kernel as a constexpr global
# The states of one segment (forward states, plus suffix states in the backward) take at most this many bytes.
SEG_BYTES = 1 << 30
# Tunables (the benchmark sweeps them): state-chunk length F, the forward's value block, the feature blocks of the
# backward walk's two passes (BK_BWD1 for the first, BK_BWD for the second), warps per kernel, a register cap for
# the walk's second pass (MAXNREG_BWD, 0: none), rows per program of the projection and feature kernels, the
# chunk scan's tile (SCAN_U chunks x SCAN_BW columns; 0 for SCAN_U: torch's cumsum_ instead).
TUNE = dict(F=64, EB_FWD=64, WARPS_FWD=8, WARPS_STATE=4, BK_BWD1=32, WARPS_BWD1=4, BK_BWD=16, WARPS_BWD=1,
            MAXNREG_BWD=0, R_PROJ=64, WARPS_PROJ=4, R_FEAT=64, WARPS_FEAT=4, SCAN_U=8, SCAN_BW=512)
for _k in list(TUNE):  # TENSORATTN_POLY_<KEY> overrides a default (benchmark sweeps)
    if os.environ.get(f"TENSORATTN_POLY_{_k}") is not None:
        TUNE[_k] = int(os.environ[f"TENSORATTN_POLY_{_k}"])


# --------------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------------
@triton.jit
def _tile(x_ptr, rows, rmask, stride, D: tl.constexpr):
    """Rows ``x[rows, :D]`` ``[R, D]`` in x's dtype, zero outside the rows."""
    return tl.load(x_ptr + rows[:, None] * stride + tl.arange(0, D)[None, :], mask=rmask[:, None], other=0.0)


@triton.jit
def _gather(xt, ia, ib, D: tl.constexpr, scale):
    """Monomial factors ``ya = scale x[:, ia]`` (1 where ``ia == D``, the constant), likewise ``yb``, of a row
    tile ``xt [R, D]``, float32: products with one-hot matrices, which are exact (one nonzero term per entry;
    float32 tiles in ieee float32). Element-wise gathers were bound by the L1's request rate (Nsight Compute:
    L1 89-93 % busy, DRAM 6-16 %, in every kernel that gathered)."""
    dk = tl.arange(0, D)
    ya = tl.dot(xt, (dk[:, None] == ia[None, :]).to(xt.dtype), input_precision="ieee")
    yb = tl.dot(xt, (dk[:, None] == ib[None, :]).to(xt.dtype), input_precision="ieee")
    return tl.where(ia[None, :] < D, ya * scale, 1.0), tl.where(ib[None, :] < D, yb * scale, 1.0)


@triton.jit
def _feature(xt, rmask, ia, ib, D: tl.constexpr, scale):
    """Degree-2 monomial features ``ya * yb`` ``[R, BK]`` of a row tile (zero outside the rows)."""
    ya, yb = _gather(xt, ia, ib, D, scale)
    return tl.where(rmask[:, None], ya * yb, 0.0)


@triton.jit
def _rows(x_ptr, rows, rmask, stride, cols, ncols):
    """``x[rows, cols]`` as float32, zero outside the rows and columns."""
    x = tl.load(x_ptr + rows[:, None] * stride + cols[None, :], mask=rmask[:, None] & (cols[None, :] < ncols),
                other=0.0)
    return x.to(tl.float32)


@triton.jit
def _row(ptr, cols, DV: tl.constexpr, DVP: tl.constexpr):
    """One row of ``DV`` values as float32 ``[DVP]``, zero past DV (no mask when DV is the padded width)."""
    if DV == DVP:
        x = tl.load(ptr + cols)
    else:
        x = tl.load(ptr + cols, mask=cols < DV, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _mm(a, b, DT: tl.constexpr, PREC: tl.constexpr):
    return tl.dot(a.to(DT), b.to(DT), input_precision=PREC)


@triton.jit
def _pairs(a, b, C: tl.constexpr, W: tl.constexpr):
    """``[C², W]`` rows ``(i, j) -> a[i] * b[j]``."""
    return tl.reshape(a[:, None, :] * b[None, :, :], (C * C, W))


@triton.jit
def _sub_feats(qt, k1t, k2t, rmask, ia, ib, wq, D: tl.constexpr, scale):
    """One sub-chunk's features in one feature block: ``U1``, ``U2``, ``U3`` ``[C, BK]`` (zero past T)."""
    return (_feature(qt, rmask, ia, ib, D, scale) * wq[None, :], _feature(k1t, rmask, ia, ib, D, 1.0),
            _feature(k2t, rmask, ia, ib, D, 1.0))


@triton.jit
def _head_states(st_ptr, sd_ptr, n, bh, HQ, GROUPS, NS1, KP, DVP: tl.constexpr):
    """Batch ``b``, query head ``h``, its kv head ``hk`` and their count ``HK``, and the states before chunk ``n``
    of the kv head (``st [B * HK, NS1, 2, KP, DVP]``, ``sd [B * HK, NS1, 2, KP]``)."""
    b = bh // HQ
    h = bh % HQ
    hk = h // GROUPS
    HK = HQ // GROUPS
    stb = st_ptr + ((b * HK + hk) * NS1 + n) * 2 * KP * DVP
    sdb = sd_ptr + ((b * HK + hk) * NS1 + n) * 2 * KP
    return b, h, hk, HK, stb, sdb


@triton.jit
def _bases(q_ptr, k1_ptr, k2_ptr, v1_ptr, v2_ptr, st_ptr, sd_ptr, n, bh, HQ, GROUPS, T, NS1, KP,
           D: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr):
    """Batch ``b``, query head ``h``, the row strides, this head's input pointers, the offset of its output rows
    and the states before chunk ``n`` of its kv head."""
    b, h, hk, HK, stb, sdb = _head_states(st_ptr, sd_ptr, n, bh, HQ, GROUPS, NS1, KP, DVP)
    sq = HQ * D
    sk = HK * D
    sv = HK * DV
    so = HQ * DV
    ko = b * T * sk + hk * D
    vo = b * T * sv + hk * DV
    return (b, h, sq, sk, sv, so, q_ptr + b * T * sq + h * D, k1_ptr + ko, k2_ptr + ko, v1_ptr + vo, v2_ptr + vo,
            b * T * so + h * DV, stb, sdb)


@triton.jit
def _ww_fwd(qt, k1t, k2t, v1c, v2c, scale, m3, D: tl.constexpr, C: tl.constexpr, EB: tl.constexpr,
            DT: tl.constexpr, PREC: tl.constexpr):
    """(inside, inside): ``Σ_{j1, j2 <= i} P(z) v1[j1] ∘ v2[j2]`` of one sub-chunk, ``[C, EB]``."""
    qc = qt.to(tl.float32) * scale
    k1c = k1t.to(tl.float32)
    k2c = k2t.to(tl.float32)
    z = _mm(_pairs(qc, k1c, C, D), tl.trans(k2c), DT, PREC)  # [(i, j1), j2]
    p = tl.where(m3, 1.0 + z + 0.5 * z * z, 0.0)
    pv2 = tl.reshape(_mm(p, v2c, DT, PREC), (C, C, EB))
    return tl.sum(pv2 * v1c[None, :, :], axis=1)


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _state_kernel(k1_ptr, k2_ptr, v1_ptr, v2_ptr, st_ptr, sd_ptr, ia_ptr, ib_ptr, T, t0, NS1, HK, KP,
                  D: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, F: tl.constexpr, BK: tl.constexpr,
                  DT: tl.constexpr, PREC: tl.constexpr):
    """Chunk n's contributions ``U2_n^T v1_n``, ``U3_n^T v2_n`` and ``Σ U2_n``, ``Σ U3_n`` -> slot n + 1."""
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    kb = tl.program_id(2)
    b = bh // HK
    hk = bh % HK
    sk = HK * D
    sv = HK * DV
    rows = (t0 + n * F).to(tl.int64) + tl.arange(0, F)  # int64: T * H * D may pass 2^31
    rmask = rows < T
    m = kb * BK + tl.arange(0, BK)
    ia = tl.load(ia_ptr + m)
    ib = tl.load(ib_ptr + m)
    cols = tl.arange(0, DVP)
    slot = (bh * NS1 + n + 1) * 2
    soff = m[:, None] * DVP + cols[None, :]
    kb_off = b * T * sk + hk * D
    vb_off = b * T * sv + hk * DV
    _state_one(k1_ptr + kb_off, v1_ptr + vb_off, st_ptr + slot * KP * DVP + soff, sd_ptr + slot * KP + m, rows, rmask,
               sk, sv, ia, ib, cols, D, DV, DT, PREC)
    _state_one(k2_ptr + kb_off, v2_ptr + vb_off, st_ptr + (slot + 1) * KP * DVP + soff, sd_ptr + (slot + 1) * KP + m,
               rows, rmask, sk, sv, ia, ib, cols, D, DV, DT, PREC)


@triton.jit
def _state_one(kp, vp, st_out, sd_out, rows, rmask, sk, sv, ia, ib, cols, D: tl.constexpr, DV: tl.constexpr,
               DT: tl.constexpr, PREC: tl.constexpr):
    u = _feature(_tile(kp, rows, rmask, sk, D), rmask, ia, ib, D, 1.0)
    v = _rows(vp, rows, rmask, sv, cols, DV)
    tl.store(st_out, _mm(tl.trans(u), v, DT, PREC))
    tl.store(sd_out, tl.sum(u, axis=0))


@triton.jit
def _fwd_kernel(q_ptr, k1_ptr, k2_ptr, v1_ptr, v2_ptr, st_ptr, sd_ptr, sc_ptr, o_ptr, den_ptr, ia_ptr, ib_ptr,
                wq_ptr, T, t0, NS1, HQ, GROUPS, KP, NKB, scale,
                D: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, F: tl.constexpr, C: tl.constexpr,
                BK: tl.constexpr, EB: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """Output rows of chunk n for one query head and value block: sub-chunks outside, feature blocks inside, so
    that the pair products of all feature blocks add up in the product accumulators before one reduction per
    sub-chunk. The running state of each feature block passes from one sub-chunk to the next through this
    program's scratch ``sc`` ``[NKB, 2, BK, EB]`` + ``[2, KP]`` (float32, L2-resident; a barrier after each
    sub-chunk makes the writes visible to all of the program's threads)."""
    NSUB: tl.constexpr = F // C
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    pe = tl.program_id(2)
    b, h, sq, sk, sv, so, qb, k1b, k2b, v1b, v2b, oo, stb, sdb = _bases(q_ptr, k1_ptr, k2_ptr, v1_ptr, v2_ptr, st_ptr,
                                                                         sd_ptr, n, bh, HQ, GROUPS, T, NS1, KP, D, DV,
                                                                         DVP)
    scb = sc_ptr + ((n * tl.num_programs(1) + bh) * tl.num_programs(2) + pe) * (NKB * 2 * BK * EB + 2 * KP)

    ci = tl.arange(0, C)
    cols = pe * EB + tl.arange(0, EB)
    pi = tl.arange(0, C * C) // C
    pj = tl.arange(0, C * C) % C
    m2 = (ci[None, :] <= ci[:, None]).to(tl.float32)
    m3 = (pj[:, None] <= pi[:, None]) & (ci[None, :] <= pi[:, None])
    se = tl.arange(0, BK)[:, None] * EB + tl.arange(0, EB)[None, :]
    r0 = (t0 + n * F).to(tl.int64)  # int64 row offsets: T * H * D may pass 2^31
    for s in range(NSUB):
        rows = r0 + s * C + ci
        rmask = rows < T
        v1c = _rows(v1b, rows, rmask, sv, cols, DV)
        v2c = _rows(v2b, rows, rmask, sv, cols, DV)
        qt = _tile(qb, rows, rmask, sq, D)
        k1t = _tile(k1b, rows, rmask, sk, D)
        k2t = _tile(k2b, rows, rmask, sk, D)
        part = tl.zeros((C, EB), tl.float32)
        t2 = tl.zeros((C * C, EB), tl.float32)
        t3 = tl.zeros((C * C, EB), tl.float32)
        dpart = tl.zeros((C,), tl.float32)
        for kb in range(NKB):
            m = kb * BK + tl.arange(0, BK)
            ia = tl.load(ia_ptr + m)
            ib = tl.load(ib_ptr + m)
            wq = tl.load(wq_ptr + m)
            sck = scb + kb * 2 * BK * EB
            if s == 0:
                soff = m[:, None] * DVP + cols[None, :]
                a2 = tl.load(stb + soff)
                a3 = tl.load(stb + KP * DVP + soff)
                a2d = tl.load(sdb + m)
                a3d = tl.load(sdb + KP + m)
            else:
                a2 = tl.load(sck + se)
                a3 = tl.load(sck + BK * EB + se)
                a2d = tl.load(scb + NKB * 2 * BK * EB + m)
                a3d = tl.load(scb + NKB * 2 * BK * EB + KP + m)
            u1, u2, u3 = _sub_feats(qt, k1t, k2t, rmask, ia, ib, wq, D, scale)
            part += _mm(u1, a2 * a3, DT, PREC)  # (before, before)
            t2 = tl.dot(_pairs(u1, u3, C, BK).to(DT), a2.to(DT), t2, input_precision=PREC)
            t3 = tl.dot(_pairs(u1, u2, C, BK).to(DT), a3.to(DT), t3, input_precision=PREC)
            l2 = a2d[None, :] + tl.cumsum(u2, axis=0)  # normaliser: inclusive vector scan
            l3 = a3d[None, :] + tl.cumsum(u3, axis=0)
            dpart += tl.sum(u1 * l2 * l3, axis=1)
            if s + 1 < NSUB:
                tl.store(sck + se, a2 + _mm(tl.trans(u2), v1c, DT, PREC))
                tl.store(sck + BK * EB + se, a3 + _mm(tl.trans(u3), v2c, DT, PREC))
                tl.store(scb + NKB * 2 * BK * EB + m, a2d + tl.sum(u2, axis=0))
                tl.store(scb + NKB * 2 * BK * EB + KP + m, a3d + tl.sum(u3, axis=0))
        tl.debug_barrier()  # this sub-chunk's state updates are visible to every thread of the program
        part += tl.sum(tl.reshape(t2, (C, C, EB)) * v2c[None, :, :] * m2[:, :, None], axis=1)  # (before, inside)
        part += tl.sum(tl.reshape(t3, (C, C, EB)) * v1c[None, :, :] * m2[:, :, None], axis=1)  # (inside, before)
        part += _ww_fwd(qt, k1t, k2t, v1c, v2c, scale, m3, D, C, EB, DT, PREC)
        den = dpart + EPS
        tl.store(o_ptr + oo + rows[:, None] * so + cols[None, :],
                 (part / den[:, None]).to(o_ptr.dtype.element_ty), mask=rmask[:, None] & (cols[None, :] < DV))
        if pe == 0:
            tl.store(den_ptr + b * T * HQ + h + rows * HQ, den, mask=rmask)


# --------------------------------------------------------------------------------------------------
# Backward: one position at a time inside a chunk, the states of one feature block in registers
# --------------------------------------------------------------------------------------------------
@triton.jit
def _feat_kernel(x_ptr, u_ptr, ia_ptr, ib_ptr, wq_ptr, T, t0, TS, H, KP, scale, D: tl.constexpr, R: tl.constexpr,
                 BK: tl.constexpr, QW: tl.constexpr):
    """Features ``ya yb`` (times the query weights when ``QW``) of the segment's rows ``t0 + [0, TS)`` of
    ``x [B, T, H, D]`` -> ``u [B, TS, H, KP]`` float32, zero past T: one ``[R, BK]`` block per program."""
    rb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    kb = tl.program_id(2)
    b = bh // H
    h = bh % H
    rl = rb * R + tl.arange(0, R)
    rows = rl.to(tl.int64) + t0  # int64: T * H * D may pass 2^31
    rmask = (rows < T) & (rl < TS)
    m = kb * BK + tl.arange(0, BK)
    u = _feature(_tile(x_ptr + b * T * H * D + h * D, rows, rmask, H * D, D), rmask, tl.load(ia_ptr + m),
                 tl.load(ib_ptr + m), D, scale)
    if QW:
        u = u * tl.load(wq_ptr + m)[None, :]
    tl.store(u_ptr + ((b * TS + rl)[:, None] * H + h) * KP + m[None, :], u, mask=(rl < TS)[:, None])


@triton.jit
def _proj_kernel(x_ptr, du_ptr, dx_ptr, ia_ptr, ib_ptr, wq_ptr, T, t0, TS, HX, HQ, GROUPS, KP, NKB, scale,
                 D: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, QW: tl.constexpr):
    """Chain rule through the features: ``dx = Σ_m du[m] (yb[m] e_ia[m] + ya[m] e_ib[m])`` (times the query
    weights and the scale when ``QW``) for ``R`` rows of one head ``hx`` of ``x [B, T, HX, D]``, the feature
    gradients ``du [B, TS, HQ, KP]`` summed over the ``GROUPS`` query heads of ``hx`` first; written into ``dx``
    (x's layout and dtype). One-hot products in float32 (``ieee``; tf32x3 measured slower)."""
    rb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // HX
    hx = bh % HX
    rl = rb * R + tl.arange(0, R)
    rows = rl.to(tl.int64) + t0  # int64: T * H * D may pass 2^31
    rmask = (rows < T) & (rl < TS)
    dk = tl.arange(0, D)
    xt = _tile(x_ptr + b * T * HX * D + hx * D, rows, rmask, HX * D, D)
    acc = tl.zeros((R, D), tl.float32)
    for kb in range(NKB):
        m = kb * BK + tl.arange(0, BK)
        ia = tl.load(ia_ptr + m)
        ib = tl.load(ib_ptr + m)
        ya, yb = _gather(xt, ia, ib, D, scale)
        du = tl.zeros((R, BK), tl.float32)
        for g in range(GROUPS):
            du += tl.load(du_ptr + ((b * TS + rl)[:, None] * HQ + hx * GROUPS + g) * KP + m[None, :],
                          mask=rmask[:, None], other=0.0)
        if QW:
            du = du * (tl.load(wq_ptr + m) * scale)[None, :]
        ea = (ia[:, None] == dk[None, :]).to(tl.float32)
        eb = (ib[:, None] == dk[None, :]).to(tl.float32)
        acc = tl.dot(du * yb, ea, acc, input_precision="ieee")
        acc = tl.dot(du * ya, eb, acc, input_precision="ieee")
    tl.store(dx_ptr + (b * T + rows)[:, None] * HX * D + hx * D + dk[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=rmask[:, None])


@triton.jit
def _bwd_kernel(u1_ptr, u2_ptr, u3_ptr, v1_ptr, v2_ptr, do_ptr, den_ptr, delta_ptr, st_ptr, sd_ptr, rs_ptr, rd_ptr,
                du1_ptr, du2_ptr, du3_ptr, gv_ptr, GV2, T, t0, NS1, HQ, GROUPS, KP,
                DV: tl.constexpr, DVP: tl.constexpr, F: tl.constexpr, BK: tl.constexpr, MODE: tl.constexpr):
    """One chunk n, one query head, one feature block of ``BK`` features: the states ``[BK, DVP]`` in registers
    (float32, CUDA cores), one position per step (forward states ``L += u ⊗ v`` by addition from the chunk's
    start); the features come from the segment's buffers ``u1 [B, TS, Hq, KP]``, ``u2``, ``u3 [B, TS, Hkv, KP]``.

    * ``MODE == 1`` (state gradients): the chunk's contribution ``Σ_{i in n} dL2_i`` with
      ``dL2_i = (U1[i] ⊗ G_i) ∘ L3_i`` (likewise dL3, and the normaliser's vectors), per query head -> slot
      ``NS1 - 1 - n`` of ``rs``, ``rd`` (reversed, so a forward cumsum gives suffixes).
    * ``MODE == 2`` (input gradients): suffix states (inclusive, from the reversed cumsum) less each row's own
      part; the feature gradients ``du1..3`` of every row stored into ``[B, TS, Hq, KP]`` (each row's block
      belongs to this program alone), the value gradients added into ``gv [2, B, TS, Hq, Dv]`` (``GV2`` apart)
      by atomics (feature blocks add up; the launcher sums GQA groups). With one warp per program (the default
      of this pass) every reduction stays inside the warp: no exchange through shared memory per row.

    Only the chunk's rows before T are walked: past T nothing is read or written (their features are zero and
    their gradients are never read), so the loop body has no row masks."""
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    kb = tl.program_id(2)
    b, h, hk, HK, stb, sdb = _head_states(st_ptr, sd_ptr, n, bh, HQ, GROUPS, NS1, KP, DVP)
    sv = HK * DV
    so = HQ * DV
    TS = (NS1 - 1) * F
    m = kb * BK + tl.arange(0, BK)
    cols = tl.arange(0, DVP)
    cm = cols < DV
    soff = m[:, None] * DVP + cols[None, :]
    L2 = tl.load(stb + soff)
    L3 = tl.load(stb + KP * DVP + soff)
    l2 = tl.load(sdb + m)
    l3 = tl.load(sdb + KP + m)
    rsb = rs_ptr + (bh * NS1 + NS1 - 1 - n) * 2 * KP * DVP
    rdb = rd_ptr + (bh * NS1 + NS1 - 1 - n) * 2 * KP
    if MODE == 2:  # inclusive suffix from chunk n
        R2 = tl.load(rsb + soff)
        R3 = tl.load(rsb + KP * DVP + soff)
        r2d = tl.load(rdb + m)
        r3d = tl.load(rdb + KP + m)
    else:
        R2 = tl.zeros((BK, DVP), tl.float32)
        R3 = tl.zeros((BK, DVP), tl.float32)
        r2d = tl.zeros((BK,), tl.float32)
        r3d = tl.zeros((BK,), tl.float32)
    v1b = v1_ptr + b * T * sv + hk * DV
    v2b = v2_ptr + b * T * sv + hk * DV
    dob = do_ptr + b * T * so + h * DV
    rb = b * T * HQ + h
    tq = n * F  # this chunk's first row in the segment
    u1b = u1_ptr + ((b * TS + tq) * HQ + h) * KP + m
    u2b = u2_ptr + ((b * TS + tq) * HK + hk) * KP + m
    u3b = u3_ptr + ((b * TS + tq) * HK + hk) * KP + m
    gub = ((b * TS + tq) * HQ + h) * KP + m
    gvb = ((b * TS + tq) * HQ + h) * DV + cols
    r0 = (t0 + n * F).to(tl.int64)
    nt = tl.minimum(T - t0 - n * F, F)  # rows of this chunk before T
    for t in range(nt):
        i = r0 + t
        u1 = tl.load(u1b + t * HQ * KP)
        u2 = tl.load(u2b + t * HK * KP)
        u3 = tl.load(u3b + t * HK * KP)
        v1r = _row(v1b + i * sv, cols, DV, DVP)
        v2r = _row(v2b + i * sv, cols, DV, DVP)
        rden = 1.0 / tl.load(den_ptr + rb + i * HQ)  # one division per row
        g = _row(dob + i * so, cols, DV, DVP) * rden
        gd = -tl.load(delta_ptr + rb + i * HQ) * rden
        L2 += u2[:, None] * v1r[None, :]
        L3 += u3[:, None] * v2r[None, :]
        l2 += u2
        l3 += u3
        gl3 = g[None, :] * L3
        gl2 = g[None, :] * L2
        if MODE == 1:
            R2 += u1[:, None] * gl3
            R3 += u1[:, None] * gl2
            r2d += gd * u1 * l3
            r3d += gd * u1 * l2
        else:
            tl.store(du1_ptr + gub + t * HQ * KP, tl.sum(gl3 * L2, axis=1) + gd * l2 * l3)
            tl.store(du2_ptr + gub + t * HQ * KP, tl.sum(R2 * v1r[None, :], axis=1) + r2d)
            tl.store(du3_ptr + gub + t * HQ * KP, tl.sum(R3 * v2r[None, :], axis=1) + r3d)
            gvp = gv_ptr + gvb + t * so
            tl.atomic_add(gvp, tl.sum(R2 * u2[:, None], axis=0), mask=cm, sem="relaxed")
            tl.atomic_add(gvp + GV2, tl.sum(R3 * u3[:, None], axis=0), mask=cm, sem="relaxed")
            R2 -= u1[:, None] * gl3
            R3 -= u1[:, None] * gl2
            r2d -= gd * u1 * l3
            r3d -= gd * u1 * l2
    if MODE == 1:
        tl.store(rsb + soff, R2)
        tl.store(rsb + KP * DVP + soff, R3)
        tl.store(rdb + m, r2d)
        tl.store(rdb + KP + m, r3d)


@triton.jit
def _scan_kernel(x_ptr, N, W, U: tl.constexpr, BW: tl.constexpr):
    """In place, the inclusive prefix sum over the chunk axis of ``x [BH, N, W]`` (float32) for ``BW`` columns of
    one ``bh``: ``U`` chunks per step as one ``[U, BW]`` tile (``U * BW`` loads in flight, a scan inside the
    tile), the running sum carried in registers from one step to the next."""
    bh = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BW + tl.arange(0, BW)
    cm = cols < W
    r = tl.arange(0, U)
    base = x_ptr + bh * N * W + cols[None, :]
    acc = tl.zeros((BW,), tl.float32)
    for n0 in range(0, N, U):
        rows = n0 + r
        msk = (rows < N)[:, None] & cm[None, :]
        ptr = base + rows.to(tl.int64)[:, None] * W
        cs = tl.cumsum(tl.load(ptr, mask=msk, other=0.0), axis=0) + acc[None, :]
        tl.store(ptr, cs, mask=msk)
        acc = tl.sum(tl.where(r[:, None] == U - 1, cs, 0.0), axis=0)  # the tile's last row (zero rows past N)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
_TABLES = {}


def _chunk_cumsum_(x: torch.Tensor) -> torch.Tensor:
    """``x.cumsum_(1)`` for a contiguous float32 ``[BH, N, ...]`` (the chunk states) with :func:`_scan_kernel`:
    every element read and written once, ``U`` chunks of loads in flight per program (``TUNE["SCAN_U"]``,
    ``TUNE["SCAN_BW"]``)."""
    U, BW = int(TUNE["SCAN_U"]), int(TUNE["SCAN_BW"])
    if U == 0:  # the sweeps' baseline
        return x.cumsum_(1)
    if U & (U - 1) or BW < 16 or BW & (BW - 1):
        raise ValueError(f"TUNE['SCAN_U'] must be 0 or a power of two and TUNE['SCAN_BW'] a power of two >= 16, got "
                         f"{U} and {BW}")
    BH, N = x.shape[0], x.shape[1]
    W = x.numel() // max(1, BH * N)
    BW = min(BW, max(16, triton.next_power_of_2(W)))
    _scan_kernel[(BH, triton.cdiv(W, BW))](x, N, W, U=U, BW=BW, num_warps=4)
    return x


def _tables(D: int, device):
    """index_a, index_b (coordinate D = the constant 1) and query weights 1/β! of the degree-2 monomials,
    padded to a multiple of BK (padded features: query weight 0, finite key features, so they add nothing)."""
    key = (D, str(device))
    if key not in _TABLES:
        beta = multi_indices(D, 2)  # [K, D]
        K = beta.shape[0]
        KP = -(-K // BK) * BK
        ia = torch.full((KP,), D, dtype=torch.int32)
        ib = torch.full((KP,), D, dtype=torch.int32)
        wq = torch.zeros(KP, dtype=torch.float32)
        for m in range(K):
            idx = [d for d in range(D) for _ in range(int(beta[m, d]))]
            idx += [D] * (2 - len(idx))
            ia[m], ib[m] = idx[0], idx[1]
            wq[m] = 1.0 / math.prod(math.factorial(int(x)) for x in beta[m].tolist())
        _TABLES[key] = (ia.to(device), ib.to(device), wq.to(device), KP)
    return _TABLES[key]


class _Cfg:
    """Shapes, block sizes and product precision of one call."""

    def __init__(self, q, k1, v1, F: int, seg_bytes: int):
        self.B, self.T, self.HQ, self.D = q.shape
        self.HK, self.DV = k1.shape[2], v1.shape[3]
        self.G = self.HQ // self.HK
        self.ia, self.ib, self.wq, self.KP = _tables(self.D, q.device)
        self.NKB = self.KP // BK
        self.DVP = padded_dims(self.D, self.DV)[1]
        self.F, self.seg_bytes = int(F), int(seg_bytes)
        if self.F % C or self.F < C or self.F & (self.F - 1):
            raise ValueError(f"TUNE['F'] must be a power of two >= {C}, got {self.F}")
        self.EBF = min(self.DVP, int(TUNE["EB_FWD"]))
        self.NF = -(-self.T // self.F)
        if q.dtype == torch.float32:
            self.DT = tl.float32
            tf32 = q.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
            self.PREC = "tf32" if tf32 else "ieee"
        else:  # bf16 operands for bf16 and fp16 inputs: the states outgrow fp16's range
            self.DT, self.PREC = tl.bfloat16, "ieee"
        self.kw = dict(D=self.D, DV=self.DV, DVP=self.DVP, F=self.F, BK=BK, DT=self.DT, PREC=self.PREC)
        self.walk = []  # (feature blocks, kernel keywords) of the walk's passes 1 and 2
        for key, warps, extra in (("BK_BWD1", "WARPS_BWD1", {}),
                                  ("BK_BWD", "WARPS_BWD", {"maxnreg": TUNE["MAXNREG_BWD"]})):
            bkb = int(TUNE[key])
            if bkb not in (8, 16, 32):
                raise ValueError(f"TUNE[{key!r}] must be 8, 16 or 32 (a divisor of the feature padding {BK}), "
                                 f"got {bkb}")
            kw = dict(DV=self.DV, DVP=self.DVP, F=self.F, BK=bkb, num_warps=int(TUNE[warps]))
            kw.update({k: int(v) for k, v in extra.items() if v})
            self.walk.append((self.KP // bkb, kw))

    def seg_chunks(self, backward: bool) -> int:
        return _seg_chunks(self.B, self.HQ, self.HK, self.KP, self.DVP, self.DV, self.F, self.NF, backward,
                           self.seg_bytes)


def padded_dims(D: int, DV: int):
    """``(KP, DVP)``: the kernels' feature count (the degree-2 rank ``C(D + 2, 2)`` padded to a multiple of BK) and
    value width (``Dv`` padded to a power of two >= 16); the layout of their state buffers."""
    return -(-math.comb(D + 2, 2) // BK) * BK, max(16, triton.next_power_of_2(DV))


def _seg_chunks(B: int, HQ: int, HK: int, KP: int, DVP: int, DV: int, F: int, NF: int, backward: bool,
                seg_bytes: int) -> int:
    """State chunks per segment so that a segment's buffers fit ``seg_bytes`` (:data:`SEG_BYTES` by default).
    Forward: the states (per kv head) ``[2, KP, DVP + 1]`` per chunk and the kernel's scratch (per query head, as
    large). Backward: the forward states and the suffix states (per query head), plus the features and their
    gradients (``4 Hq + 2 Hkv`` rows of ``KP``) and the value gradients (``2 Hq`` rows of ``Dv``) per position."""
    per_chunk = 4 * B * (HK + HQ) * 2 * KP * (DVP + 1)
    if backward:
        per_chunk += 4 * B * F * ((4 * HQ + 2 * HK) * KP + 2 * HQ * DV)
    return max(1, min(NF, seg_bytes // per_chunk))


def _saved_ranges(B: int, T: int, HQ: int, HK: int, D: int, DV: int, F: int, seg_bytes: int) -> list:
    """``(first chunk, chunks)`` of each backward segment, the forward's segments cut to the backward's length
    (pure ints: the fake implementation of the forward op sizes its outputs with it)."""
    KP, DVP = padded_dims(D, DV)
    NF = -(-T // F)
    seg = _seg_chunks(B, HQ, HK, KP, DVP, DV, F, NF, False, seg_bytes)
    segb = _seg_chunks(B, HQ, HK, KP, DVP, DV, F, NF, True, seg_bytes)
    return [(c0 + j, min(segb, min(seg, NF - c0) - j)) for c0 in range(0, NF, seg)
            for j in range(0, min(seg, NF - c0), segb)]


def _segment_states(cfg: _Cfg, k1, k2, v1, v2, c0: int, nf: int, prefix, prefd):
    """Forward states before each of chunks ``c0 .. c0 + nf - 1`` (slots 0..nf-1) and after them (slot nf)."""
    dev = k1.device
    st = torch.empty(cfg.B * cfg.HK, nf + 1, 2, cfg.KP, cfg.DVP, dtype=torch.float32, device=dev)
    sd = torch.empty(cfg.B * cfg.HK, nf + 1, 2, cfg.KP, dtype=torch.float32, device=dev)
    st[:, 0] = prefix
    sd[:, 0] = prefd
    _state_kernel[(nf, cfg.B * cfg.HK, cfg.NKB)](k1, k2, v1, v2, st, sd, cfg.ia, cfg.ib, cfg.T, c0 * cfg.F, nf + 1,
                                                 cfg.HK, cfg.KP, num_warps=TUNE["WARPS_STATE"], **cfg.kw)
    _chunk_cumsum_(st)
    _chunk_cumsum_(sd)
    return st, sd


def poly_fwd(q, k1, k2, v1, v2, scale: float, F: int, seg_bytes: int, *, save: bool = True, prefix=None):
    """Forward: ``o`` ``[B, T, Hq, Dv]`` in q's dtype, the normaliser ``den`` float32 ``[B, T, Hq]``, and (when
    ``save``) the state at each segment's start with the segment's chunk range, for the backward. ``F``: the state
    chunk length (:data:`TUNE`), ``seg_bytes``: the segments' budget (:data:`SEG_BYTES`). ``prefix``: ``(states
    [B * Hkv, 2, KP, DVP], vector sums [B * Hkv, 2, KP])`` float32 before the first position (default zero; context
    parallelism passes the earlier ranks' sums), in this module's feature order."""
    cfg = _Cfg(q, k1, v1, F, seg_bytes)
    dev = q.device
    o = torch.empty(cfg.B, cfg.T, cfg.HQ, cfg.DV, dtype=q.dtype, device=dev)
    den = torch.empty(cfg.B, cfg.T, cfg.HQ, dtype=torch.float32, device=dev)
    if prefix is None:  # the states before the first position: zero, or (context parallelism) the earlier ranks'
        prefix = torch.zeros(cfg.B * cfg.HK, 2, cfg.KP, cfg.DVP, dtype=torch.float32, device=dev)
        prefd = torch.zeros(cfg.B * cfg.HK, 2, cfg.KP, dtype=torch.float32, device=dev)
    else:
        prefix, prefd = prefix
    seg = cfg.seg_chunks(backward=False)
    segb = cfg.seg_chunks(backward=True)  # the backward's segments are shorter: each starts from a saved state
    saved = []
    NE = cfg.DVP // cfg.EBF
    for c0 in range(0, cfg.NF, seg):
        nf = min(seg, cfg.NF - c0)
        st, sd = _segment_states(cfg, k1, k2, v1, v2, c0, nf, prefix, prefd)
        if save:  # the order of _saved_ranges
            for j in range(0, nf, segb):
                saved.append((c0 + j, min(segb, nf - j), st[:, j].clone(), sd[:, j].clone()))
        grid = (nf, cfg.B * cfg.HQ, NE)
        args = (cfg.ia, cfg.ib, cfg.wq, cfg.T, c0 * cfg.F, nf + 1, cfg.HQ, cfg.G, cfg.KP, cfg.NKB, scale)
        kw = dict(C=C, EB=cfg.EBF, num_warps=TUNE["WARPS_FWD"], **cfg.kw)
        sc = torch.empty(nf * cfg.B * cfg.HQ * NE * (cfg.NKB * 2 * BK * cfg.EBF + 2 * cfg.KP), dtype=torch.float32,
                         device=dev)
        _fwd_kernel[grid](q, k1, k2, v1, v2, st, sd, sc, o, den, *args, **kw)
        del sc
        prefix, prefd = st[:, nf].clone(), sd[:, nf].clone()
        del st, sd
    return o, den, saved


def poly_fwd_saved(q, k1, k2, v1, v2, scale: float, F: int, seg_bytes: int, *, save: bool = True, prefix=None):
    """:func:`poly_fwd` on contiguous inputs with what the backward needs as one flat list: ``(o, [den, then the
    two states of each backward segment (when save)])``, the form :func:`poly_bwd_saved` takes back."""
    o, den, states = poly_fwd(*(x.contiguous() for x in (q, k1, k2, v1, v2)), scale, F, seg_bytes, save=save,
                              prefix=prefix)
    return o, [den] + [t for _, _, p, pd in states for t in (p, pd)]


def poly_bwd_saved(do, q, k1, k2, v1, v2, o, saved, scale: float, F: int, seg_bytes: int, *,
                   prefix_grad: bool = False):
    """:func:`poly_bwd` from :func:`poly_fwd_saved`'s list and output ``o`` (the segment ranges follow from the
    shapes and the forward's ``F``, ``seg_bytes``; ``<dO, o>`` is computed here)."""
    q, k1, k2, v1, v2, do = (x.contiguous() for x in (q, k1, k2, v1, v2, do))
    den, states = saved[0], saved[1:]
    B, T, HQ, D = q.shape
    ranges = _saved_ranges(B, T, HQ, k1.shape[2], D, v1.shape[3], F, seg_bytes)
    if len(states) != 2 * len(ranges):
        raise ValueError(f"poly_tensor_attn (triton): {len(states)} saved states for {len(ranges)} backward "
                         f"segments (expected {2 * len(ranges)})")
    segs = [(c0, nf, states[2 * i], states[2 * i + 1]) for i, (c0, nf) in enumerate(ranges)]
    delta = (do.float() * o.float()).sum(-1).contiguous()  # <dO, o> per row: [B, T, Hq]
    return poly_bwd(q, k1, k2, v1, v2, do, den, delta, segs, scale, F, seg_bytes, prefix_grad=prefix_grad)


def poly_bwd(q, k1, k2, v1, v2, do, den, delta, saved, scale: float, F: int, seg_bytes: int, *,
             prefix_grad: bool = False):
    """Backward: gradients of q, k1, k2, v1, v2 in their dtypes (k/v gradients summed over GQA groups); with
    ``prefix_grad`` also the gradient of the states before the first position (``prefix`` of :func:`poly_fwd`),
    ``([B * Hkv, 2, KP, DVP], [B * Hkv, 2, KP])`` float32: the suffix sums of the state gradients over the
    whole sequence, summed over each kv head's query heads."""
    cfg = _Cfg(q, k1, v1, F, seg_bytes)
    dev = q.device
    B, T, HQ, HK, D, DV, F, KP = cfg.B, cfg.T, cfg.HQ, cfg.HK, cfg.D, cfg.DV, cfg.F, cfg.KP
    dq = torch.empty_like(q)
    dk1, dk2 = torch.empty_like(k1), torch.empty_like(k2)
    dv1, dv2 = torch.empty_like(v1), torch.empty_like(v2)
    carry = torch.zeros(B * HQ, 2, KP, cfg.DVP, dtype=torch.float32, device=dev)
    carryd = torch.zeros(B * HQ, 2, KP, dtype=torch.float32, device=dev)
    f32 = dict(dtype=torch.float32, device=dev)
    RF, RP = int(TUNE["R_FEAT"]), int(TUNE["R_PROJ"])  # rows per program of the feature and projection kernels
    for c0, nf, prefix, prefd in reversed(saved):
        st, sd = _segment_states(cfg, k1, k2, v1, v2, c0, nf, prefix, prefd)
        TS, t0 = nf * F, c0 * F
        r1 = min(T, t0 + TS)
        feats = []
        for x, h, qw, sc in ((q, HQ, 1, scale), (k1, HK, 0, 1.0), (k2, HK, 0, 1.0)):
            u = torch.empty(B, TS, h, KP, **f32)
            _feat_kernel[(-(-TS // RF), B * h, cfg.NKB)](x, u, cfg.ia, cfg.ib, cfg.wq, T, t0, TS, h, KP, sc, D=D, R=RF,
                                                         BK=BK, QW=qw, num_warps=TUNE["WARPS_FEAT"])
            feats.append(u)
        rs = torch.empty(B * HQ, nf + 1, 2, KP, cfg.DVP, **f32)
        rd = torch.empty(B * HQ, nf + 1, 2, KP, **f32)
        rs[:, 0] = carry
        rd[:, 0] = carryd
        args = (T, t0, nf + 1, HQ, cfg.G, KP)
        (nb1, kw1), (nb2, kw2) = cfg.walk
        _bwd_kernel[(nf, B * HQ, nb1)](*feats, v1, v2, do, den, delta, st, sd, rs, rd, rs, rs, rs, rs, 0, *args, MODE=1,
                                       **kw1)
        _chunk_cumsum_(rs)
        _chunk_cumsum_(rd)
        dus = [torch.empty(B, TS, HQ, KP, **f32) for _ in range(3)]
        gv = torch.zeros(2, B, TS, HQ, DV, **f32)
        _bwd_kernel[(nf, B * HQ, nb2)](*feats, v1, v2, do, den, delta, st, sd, rs, rd, *dus, gv, gv[0].numel(), *args,
                                       MODE=2, **kw2)
        carry, carryd = rs[:, nf].clone(), rd[:, nf].clone()
        del st, sd, rs, rd, feats
        for x, du, dx, h, g, qw, sc in ((q, dus[0], dq, HQ, 1, 1, scale), (k1, dus[1], dk1, HK, cfg.G, 0, 1.0),
                                        (k2, dus[2], dk2, HK, cfg.G, 0, 1.0)):
            _proj_kernel[(-(-TS // RP), B * h)](x, du, dx, cfg.ia, cfg.ib, cfg.wq, T, t0, TS, h, HQ, g, KP, cfg.NKB, sc,
                                               D=D, R=RP, BK=BK, QW=qw, num_warps=TUNE["WARPS_PROJ"])
        del dus
        n = r1 - t0
        for dst, src in ((dv1, gv[0]), (dv2, gv[1])):
            src = src[:, :n]
            if cfg.G > 1:
                src = src.view(B, n, HK, cfg.G, DV).sum(3)
            dst[:, t0:r1] = src
    if prefix_grad:
        G = cfg.G
        return (dq, dk1, dk2, dv1, dv2, carry.view(B * HK, G, 2, KP, cfg.DVP).sum(1),
                carryd.view(B * HK, G, 2, KP).sum(1))
    return dq, dk1, dk2, dv1, dv2
