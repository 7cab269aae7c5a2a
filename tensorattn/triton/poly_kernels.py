"""The Triton kernels of the chunk-parallel polynomial tensor attention (device helpers, the state and scan kernels,
the feature kernel, the forward and backward walks, and the projection kernels). What they compute, how they are
tiled and launched: :mod:`tensorattn.triton.poly`, whose launchers are the only callers."""
from __future__ import annotations

import triton
import triton.language as tl


# --------------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------------
@triton.jit
def _tile(x_ptr, rows, rmask, stride, D: tl.constexpr):
    """Rows ``x[rows, :D]`` ``[R, D]`` in x's dtype, zero outside the rows."""
    return tl.load(x_ptr + rows[:, None] * stride + tl.arange(0, D)[None, :], mask=rmask[:, None], other=0.0)


@triton.jit
def _factor(xt, ix, D: tl.constexpr, scale):
    """One monomial factor ``scale x[:, ix]`` (1 where ``ix == D``, the constant) of a row tile ``xt [R, D]``,
    float32: a product with a one-hot matrix, which is exact (one nonzero term per entry; float32 tiles in ieee
    float32). Element-wise gathers were bound by the L1's request rate (Nsight Compute: L1 89-93 % busy, DRAM
    6-16 %, in every kernel that gathered)."""
    dk = tl.arange(0, D)
    y = tl.dot(xt, (dk[:, None] == ix[None, :]).to(xt.dtype), input_precision="ieee")
    return tl.where(ix[None, :] < D, y * scale, 1.0)


@triton.jit
def _gather(xt, ia, ib, D: tl.constexpr, scale):
    """The first two monomial factors ``ya``, ``yb`` (:func:`_factor`) of a row tile."""
    return _factor(xt, ia, D, scale), _factor(xt, ib, D, scale)


@triton.jit
def _feature(xt, rmask, ia, ib, ix_ptr, m, KP, D: tl.constexpr, scale, DEG: tl.constexpr):
    """Monomial features ``[R, BK]`` of a row tile for features ``m`` (zero outside the rows): ``ya * yb`` at
    degree 2; at degree 4 times the factors of rows 2 and 3 of the index table ``ix [4, KP]`` (``ix_ptr``)."""
    ya, yb = _gather(xt, ia, ib, D, scale)
    u = ya * yb
    if DEG == 4:
        u = u * _factor(xt, tl.load(ix_ptr + 2 * KP + m), D, scale) * _factor(xt, tl.load(ix_ptr + 3 * KP + m), D,
                                                                             scale)
    return tl.where(rmask[:, None], u, 0.0)


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
def _chunk_rows(ct_ptr, NFT, c0, n, t0, T, F: tl.constexpr, VARLEN: tl.constexpr):
    """First row (int64: T * H * D may pass 2^31) and end (one past its last row) of the segment's chunk ``n``:
    ``t0 + n F`` and T, or with packed documents (``VARLEN``) row 0 and 1 of the chunk table ``ct [3, NFT]`` at
    chunk ``c0 + n`` (no chunk straddles a document)."""
    if VARLEN:
        r0 = tl.load(ct_ptr + c0 + n).to(tl.int64)
        r1 = tl.load(ct_ptr + NFT + c0 + n).to(tl.int64)
    else:
        r0 = (t0 + n * F).to(tl.int64)
        r1 = T
    return r0, r1


@triton.jit
def _onehot_dot(p, ix, acc, D: tl.constexpr, X3: tl.constexpr):
    """``acc + p @ onehot(ix)`` (``p [R, BK]`` float32, ``ix [BK]``: the column of each feature's 1) in float32.
    ``X3``: three bf16 tensor-core products of ``p = hi + mid + lo`` (3 x 8 bits hold float32's 24, so the split is
    exact for 2^-111 <= |p| < 3.4e38; a product with 0 or 1 is exact; the three partial sums are rounded apart,
    so the result is float32-accurate, not bitwise the ``ieee`` one), else one ``ieee`` product (CUDA-core FMAs;
    always under the interpreter, whose bf16 products are not exact)."""
    e = ix[:, None] == tl.arange(0, D)[None, :]
    if X3:
        eb = e.to(tl.bfloat16)
        hi = p.to(tl.bfloat16)
        r = p - hi.to(tl.float32)
        mid = r.to(tl.bfloat16)
        acc = tl.dot((r - mid.to(tl.float32)).to(tl.bfloat16), eb, acc)
        acc = tl.dot(mid, eb, acc)
        acc = tl.dot(hi, eb, acc)
    else:
        acc = tl.dot(p, e.to(tl.float32), acc, input_precision="ieee")
    return acc


@triton.jit
def _chain(acc, du, xt, ya, yb, ia, ib, ix_ptr, m, KP, D: tl.constexpr, scale, DEG: tl.constexpr,
           X3: tl.constexpr):
    """``acc`` ``[R, D]`` plus the chain rule of feature gradients ``du [R, BK]`` through the monomials ``m`` of a
    row tile ``xt``: ``Σ_m du[m] Σ_t e_{i_t[m]} Π_{s != t} y_s[m]``, the factors ``ya``, ``yb`` of :func:`_gather`
    and, at degree 4, those of rows 2 and 3 of the index table (``ix_ptr``). One-hot products
    (:func:`_onehot_dot`, exact in float32 either way; tf32x3 measured slower than ``ieee``); a constant factor
    (index D) matches no column."""
    if DEG == 2:
        acc = _onehot_dot(du * yb, ia, acc, D, X3)
        acc = _onehot_dot(du * ya, ib, acc, D, X3)
    else:  # degree 4: each factor's term carries the product of the other three
        i3 = tl.load(ix_ptr + 2 * KP + m)
        i4 = tl.load(ix_ptr + 3 * KP + m)
        yc = _factor(xt, i3, D, scale)
        yd = _factor(xt, i4, D, scale)
        ab = ya * yb
        cd = yc * yd
        acc = _onehot_dot(du * yb * cd, ia, acc, D, X3)
        acc = _onehot_dot(du * ya * cd, ib, acc, D, X3)
        acc = _onehot_dot(du * ab * yd, i3, acc, D, X3)
        acc = _onehot_dot(du * ab * yc, i4, acc, D, X3)
    return acc


@triton.jit
def _mm(a, b, DT: tl.constexpr, PREC: tl.constexpr):
    return tl.dot(a.to(DT), b.to(DT), input_precision=PREC)


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


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["c0", "NFT"])  # read only with packed documents
def _state_kernel(k1_ptr, k2_ptr, v1_ptr, v2_ptr, st_ptr, sd_ptr, ia_ptr, ib_ptr, ct_ptr, T, t0, c0, NFT, NS1, HK, KP,
                  D: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, F: tl.constexpr, BK: tl.constexpr,
                  DT: tl.constexpr, PREC: tl.constexpr, VARLEN: tl.constexpr, DEG: tl.constexpr):
    """Chunk n's contributions ``U2_n^T v1_n``, ``U3_n^T v2_n`` and ``Σ U2_n``, ``Σ U3_n`` -> slot n + 1 (rows of
    the chunk: :func:`_chunk_rows`)."""
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    kb = tl.program_id(2)
    b = bh // HK
    hk = bh % HK
    sk = HK * D
    sv = HK * DV
    r0, r1 = _chunk_rows(ct_ptr, NFT, c0, n, t0, T, F, VARLEN)
    rows = r0 + tl.arange(0, F)
    rmask = rows < r1
    m = kb * BK + tl.arange(0, BK)
    ia = tl.load(ia_ptr + m)
    ib = tl.load(ib_ptr + m)
    cols = tl.arange(0, DVP)
    slot = (bh * NS1 + n + 1) * 2
    soff = m[:, None] * DVP + cols[None, :]
    kb_off = b * T * sk + hk * D
    vb_off = b * T * sv + hk * DV
    _state_one(k1_ptr + kb_off, v1_ptr + vb_off, st_ptr + slot * KP * DVP + soff, sd_ptr + slot * KP + m, rows, rmask,
               sk, sv, ia, ib, ia_ptr, m, KP, cols, D, DV, DT, PREC, DEG)
    _state_one(k2_ptr + kb_off, v2_ptr + vb_off, st_ptr + (slot + 1) * KP * DVP + soff, sd_ptr + (slot + 1) * KP + m,
               rows, rmask, sk, sv, ia, ib, ia_ptr, m, KP, cols, D, DV, DT, PREC, DEG)


@triton.jit
def _state_one(kp, vp, st_out, sd_out, rows, rmask, sk, sv, ia, ib, ix_ptr, m, KP, cols, D: tl.constexpr,
               DV: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, DEG: tl.constexpr):
    u = _feature(_tile(kp, rows, rmask, sk, D), rmask, ia, ib, ix_ptr, m, KP, D, 1.0, DEG)
    v = _rows(vp, rows, rmask, sv, cols, DV)
    tl.store(st_out, _mm(tl.trans(u), v, DT, PREC))
    tl.store(sd_out, tl.sum(u, axis=0))


# --------------------------------------------------------------------------------------------------
# The walks (forward and backward): one position at a time inside a chunk, the states of one feature block in
# registers, the features from a segment's buffers (_feat_kernel); the backward's chain rule (_proj_kernel)
# --------------------------------------------------------------------------------------------------
@triton.jit
def _feat_kernel(q_ptr, k1_ptr, k2_ptr, u1_ptr, u2_ptr, u3_ptr, ia_ptr, ib_ptr, wq_ptr, T, t0, TE, TS, B, HQ, HK, KP,
                 scale, D: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, DEG: tl.constexpr):
    """The features of a segment's rows ``t0 + [0, TS)``, zero from row TE (the segment's end) on, of the three
    inputs in one launch (:func:`_feat_rows`): grid ``(B (Hq + 2 Hkv) x row blocks, feature blocks)``, the heads
    fastest; head ``p < B Hq`` writes ``U1`` (query weights and ``scale`` in) of q into ``u1 [B, TS, Hq, KP]``, the
    next ``B Hkv`` ``U2`` of k1 into ``u2``, the last ``B Hkv`` ``U3`` of k2 into ``u3`` (float32)."""
    NH = B * (HQ + 2 * HK)
    p = tl.program_id(0) % NH
    rb = tl.program_id(0) // NH
    if p < B * HQ:
        _feat_rows(q_ptr, u1_ptr, ia_ptr, ib_ptr, wq_ptr, p, rb, T, t0, TE, TS, HQ, KP, scale, D, R, BK, True, DEG)
    elif p < B * (HQ + HK):
        _feat_rows(k1_ptr, u2_ptr, ia_ptr, ib_ptr, wq_ptr, p - B * HQ, rb, T, t0, TE, TS, HK, KP, 1.0, D, R, BK,
                   False, DEG)
    else:
        _feat_rows(k2_ptr, u3_ptr, ia_ptr, ib_ptr, wq_ptr, p - B * (HQ + HK), rb, T, t0, TE, TS, HK, KP, 1.0, D, R,
                   BK, False, DEG)


@triton.jit
def _feat_rows(x_ptr, u_ptr, ia_ptr, ib_ptr, wq_ptr, bh, rb, T, t0, TE, TS, H, KP, scale, D: tl.constexpr,
               R: tl.constexpr, BK: tl.constexpr, QW: tl.constexpr, DEG: tl.constexpr):
    """Features ``ya yb`` (times the query weights when ``QW``) of the segment's rows of head ``bh`` (batch x head)
    of ``x [B, T, H, D]`` -> ``u [B, TS, H, KP]``: one ``[R, BK]`` block (row block ``rb``, feature block: the
    grid's axis 1)."""
    bh = bh.to(tl.int64)
    kb = tl.program_id(1)
    b = bh // H
    h = bh % H
    rl = rb * R + tl.arange(0, R)
    rows = rl.to(tl.int64) + t0  # int64: T * H * D may pass 2^31
    rmask = (rows < TE) & (rl < TS)
    m = kb * BK + tl.arange(0, BK)
    u = _feature(_tile(x_ptr + b * T * H * D + h * D, rows, rmask, H * D, D), rmask, tl.load(ia_ptr + m),
                 tl.load(ib_ptr + m), ia_ptr, m, KP, D, scale, DEG)
    if QW:
        u = u * tl.load(wq_ptr + m)[None, :]
    tl.store(u_ptr + ((b * TS + rl)[:, None] * H + h) * KP + m[None, :], u, mask=(rl < TS)[:, None])


@triton.jit
def _proj_kernel(q_ptr, k1_ptr, k2_ptr, du1_ptr, du2_ptr, du3_ptr, dq_ptr, dk1_ptr, dk2_ptr, gv_ptr, dv1_ptr, dv2_ptr,
                 GV2, ia_ptr, ib_ptr, wq_ptr, T, t0, TE, TS, B, HQ, HK, GROUPS, KP, NKB, scale, D: tl.constexpr,
                 DV: tl.constexpr, DVP: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, DEG: tl.constexpr,
                 X3: tl.constexpr):
    """The backward's end for a segment, the three inputs in one launch (:func:`_proj_rows`): grid ``(B (Hq + 2
    Hkv) x row blocks,)``, the heads fastest; head ``p < B Hq`` takes ``du1`` to dq, the next ``B Hkv`` ``du2`` to
    dk1 and the value gradients ``gv[0]`` to dv1, the last ``B Hkv`` ``du3`` to dk2 and ``gv[1]`` (``GV2``
    elements on) to dv2."""
    NH = B * (HQ + 2 * HK)
    p = tl.program_id(0) % NH
    rb = tl.program_id(0) // NH
    if p < B * HQ:
        _proj_rows(q_ptr, du1_ptr, dq_ptr, gv_ptr, dv1_ptr, ia_ptr, ib_ptr, wq_ptr, p, rb, T, t0, TE, TS, HQ, HQ, 1,
                   KP, NKB, scale, D, DV, DVP, R, BK, True, False, DEG, X3)
    elif p < B * (HQ + HK):
        _proj_rows(k1_ptr, du2_ptr, dk1_ptr, gv_ptr, dv1_ptr, ia_ptr, ib_ptr, wq_ptr, p - B * HQ, rb, T, t0, TE, TS,
                   HK, HQ, GROUPS, KP, NKB, 1.0, D, DV, DVP, R, BK, False, True, DEG, X3)
    else:
        _proj_rows(k2_ptr, du3_ptr, dk2_ptr, gv_ptr + GV2, dv2_ptr, ia_ptr, ib_ptr, wq_ptr, p - B * (HQ + HK), rb, T,
                   t0, TE, TS, HK, HQ, GROUPS, KP, NKB, 1.0, D, DV, DVP, R, BK, False, True, DEG, X3)


@triton.jit
def _proj_rows(x_ptr, du_ptr, dx_ptr, gv_ptr, dv_ptr, ia_ptr, ib_ptr, wq_ptr, bh, rb, T, t0, TE, TS, HX, HQ, GROUPS,
               KP, NKB, scale, D: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, R: tl.constexpr, BK: tl.constexpr,
               QW: tl.constexpr, VW: tl.constexpr, DEG: tl.constexpr, X3: tl.constexpr):
    """Chain rule through the features (:func:`_chain`; times the query weights and the scale when ``QW``) for
    ``R`` of the segment's rows ``t0 + [0, TS)`` before ``TE`` (the segment's end; row block ``rb``) of one head
    ``bh`` (batch x head ``hx``) of ``x [B, T, HX, D]``, the feature gradients ``du [B, TS, HQ,
    KP]`` summed over the ``GROUPS`` query heads of ``hx`` first; written into ``dx`` (x's layout and dtype). With
    ``VW`` also the same rows' value gradients ``gv [B, TS, HQ, DV]`` (float32) summed over the group into ``dv
    [B, T, HX, DV]`` (its dtype)."""
    bh = bh.to(tl.int64)
    b = bh // HX
    hx = bh % HX
    rl = rb * R + tl.arange(0, R)
    rows = rl.to(tl.int64) + t0  # int64: T * H * D may pass 2^31
    rmask = (rows < TE) & (rl < TS)
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
        acc = _chain(acc, du, xt, ya, yb, ia, ib, ia_ptr, m, KP, D, scale, DEG, X3)
    tl.store(dx_ptr + (b * T + rows)[:, None] * HX * D + hx * D + dk[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=rmask[:, None])
    if VW:
        cols = tl.arange(0, DVP)
        vm = rmask[:, None] & (cols < DV)[None, :]
        gv = tl.zeros((R, DVP), tl.float32)
        for g in range(GROUPS):
            gv += tl.load(gv_ptr + ((b * TS + rl)[:, None] * HQ + hx * GROUPS + g) * DV + cols[None, :], mask=vm,
                          other=0.0)
        tl.store(dv_ptr + ((b * T + rows)[:, None] * HX + hx) * DV + cols[None, :], gv.to(dv_ptr.dtype.element_ty),
                 mask=vm)


@triton.jit
def _totals_bwd_kernel(k_ptr, v_ptr, gs_ptr, gd_ptr, dk_ptr, dv_ptr, ia_ptr, ib_ptr, T, HK, KP, NKB,
                       D: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, R: tl.constexpr, BK: tl.constexpr,
                       X3: tl.constexpr):
    """Gradient of one stream's totals ``S = Σ_j U[j] ⊗ v[j]``, ``z = Σ_j U[j]`` over all rows of
    ``k, v [B, T, HK, *]`` (``U``: the degree-2 features of k), given ``gS [B * HK, KP, DVP]`` and ``gz [B * HK,
    KP]``, for ``R`` rows of one kv head: ``dv[j] = Σ_m U[j, m] gS[m]`` and ``dU[j, m] = <v[j], gS[m]> + gz[m]``
    taken through the monomials to dk (:func:`_chain`); written in k's and v's dtypes.
    Nothing per (row, feature) is stored. Products in float32 (``ieee``), as the rest of the backward."""
    rb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // HK
    hk = bh % HK
    rows = rb * R + tl.arange(0, R).to(tl.int64)  # int64: T * H * D may pass 2^31
    rmask = rows < T
    dk = tl.arange(0, D)
    cols = tl.arange(0, DVP)
    xt = _tile(k_ptr + b * T * HK * D + hk * D, rows, rmask, HK * D, D)
    v = _rows(v_ptr + b * T * HK * DV + hk * DV, rows, rmask, HK * DV, cols, DV)  # [R, DVP] float32
    accx = tl.zeros((R, D), tl.float32)
    accv = tl.zeros((R, DVP), tl.float32)
    for kb in range(NKB):
        m = kb * BK + tl.arange(0, BK)
        ia = tl.load(ia_ptr + m)
        ib = tl.load(ib_ptr + m)
        ya, yb = _gather(xt, ia, ib, D, 1.0)
        gs = tl.load(gs_ptr + (bh * KP + m)[:, None] * DVP + cols[None, :])  # [BK, DVP]
        du = tl.dot(v, tl.trans(gs), input_precision="ieee") + tl.load(gd_ptr + bh * KP + m)[None, :]  # [R, BK]
        accv = tl.dot(ya * yb, gs, accv, input_precision="ieee")
        accx = _chain(accx, du, xt, ya, yb, ia, ib, ia_ptr, m, KP, D, 1.0, 2, X3)
    tl.store(dk_ptr + (b * T + rows)[:, None] * HK * D + hk * D + dk[None, :], accx.to(dk_ptr.dtype.element_ty),
             mask=rmask[:, None])
    tl.store(dv_ptr + (b * T + rows)[:, None] * HK * DV + hk * DV + cols[None, :], accv.to(dv_ptr.dtype.element_ty),
             mask=rmask[:, None] & (cols[None, :] < DV))


@triton.jit
def _walk_ids(NB):
    """``(chunk, batch x query head (int64), feature block)`` of a walk program on the grid ``(chunks x NB, B Hq)``:
    the ``NB`` feature blocks of one chunk are adjacent, so they run side by side and their atomic adds into the
    same rows, and their reads of the same rows' values, meet in the L2. With the blocks as the grid's slowest axis
    (the layout before, ``(chunks, B Hq, NB)``) the walks took 11 % longer at 64K tokens on an H200
    (``benchmarks/results/poly_tune_sweep18.md``)."""
    p = tl.program_id(0)
    return p // NB, tl.program_id(1).to(tl.int64), p % NB


@triton.jit
def _walk_rows(u1_ptr, u2_ptr, u3_ptr, ct_ptr, NFT, c0, n, t0, T, b, h, hk, HQ, HK, TS, KP, m, F: tl.constexpr,
               VARLEN: tl.constexpr):
    """A walk's chunk: its first row ``r0``, its first row in the segment's buffers ``tq``, its row count ``nt`` (rows
    before T, or the chunk table's), and the pointers to feature block ``m`` of its first row in the feature
    buffers ``u1 [B, TS, Hq, KP]``, ``u2``, ``u3 [B, TS, Hkv, KP]``."""
    r0, r1 = _chunk_rows(ct_ptr, NFT, c0, n, t0, T, F, VARLEN)
    if VARLEN:
        tq = (r0 - t0).to(tl.int32)
        nt = (r1 - r0).to(tl.int32)
    else:
        tq = n * F
        nt = tl.minimum(T - t0 - n * F, F)
    return (r0, tq, nt, u1_ptr + ((b * TS + tq) * HQ + h) * KP + m, u2_ptr + ((b * TS + tq) * HK + hk) * KP + m,
            u3_ptr + ((b * TS + tq) * HK + hk) * KP + m)


@triton.jit(do_not_specialize=["c0", "NFT"])  # read only with packed documents
def _fwd_walk_kernel(u1_ptr, u2_ptr, u3_ptr, v1_ptr, v2_ptr, st_ptr, sd_ptr, num_ptr, den_ptr, ct_ptr, T, t0, c0, NFT,
                     NS1, TS, HQ, GROUPS, KP, DV: tl.constexpr, DVP: tl.constexpr, F: tl.constexpr, BK: tl.constexpr,
                     VARLEN: tl.constexpr):
    """The forward: one chunk n, one query head, one block of ``BK`` features,
    the two states ``[BK, DVP]`` in float32 registers from the state before the chunk (``st``, ``sd``: ``NS1``
    slots per kv head), one position per step: ``L2 += U2[i] ⊗ v1[i]``, ``L3 += U3[i] ⊗ v2[i]`` (and the
    normaliser's vectors), then this block's part of the numerator ``Σ_m U1[i, m] L2[m] ∘ L3[m]`` and of the
    normaliser ``Σ_m U1[i, m] l2[m] l3[m]``, added by atomics into ``num [B, TS, Hq, Dv]`` and ``den [B, TS, Hq]``
    (float32, from the segment's first row ``t0``; the feature blocks add up). The features come from the
    segment's buffers, as in :func:`_bwd_kernel`. Every product and sum in float32 on the CUDA cores: no
    tensor-core operand rounding, whatever the input dtype. Grid: :func:`_walk_ids`."""
    n, bh, kb = _walk_ids(tl.cdiv(KP, BK))
    b, h, hk, HK, stb, sdb = _head_states(st_ptr, sd_ptr, n, bh, HQ, GROUPS, NS1, KP, DVP)
    sv = HK * DV
    m = kb * BK + tl.arange(0, BK)
    cols = tl.arange(0, DVP)
    soff = m[:, None] * DVP + cols[None, :]
    L2 = tl.load(stb + soff)
    L3 = tl.load(stb + KP * DVP + soff)
    l2 = tl.load(sdb + m)
    l3 = tl.load(sdb + KP + m)
    v1b = v1_ptr + b * T * sv + hk * DV
    v2b = v2_ptr + b * T * sv + hk * DV
    r0, tq, nt, u1b, u2b, u3b = _walk_rows(u1_ptr, u2_ptr, u3_ptr, ct_ptr, NFT, c0, n, t0, T, b, h, hk, HQ, HK, TS, KP,
                                           m, F, VARLEN)
    ob = num_ptr + ((b * TS + tq) * HQ + h) * DV + cols
    db = den_ptr + (b * TS + tq) * HQ + h
    for t in range(nt):
        i = r0 + t
        u1 = tl.load(u1b + t * HQ * KP)
        u2 = tl.load(u2b + t * HK * KP)
        u3 = tl.load(u3b + t * HK * KP)
        L2 += u2[:, None] * _row(v1b + i * sv, cols, DV, DVP)[None, :]
        L3 += u3[:, None] * _row(v2b + i * sv, cols, DV, DVP)[None, :]
        l2 += u2
        l3 += u3
        tl.atomic_add(ob + t * HQ * DV, tl.sum(u1[:, None] * (L2 * L3), axis=0), mask=cols < DV, sem="relaxed")
        tl.atomic_add(db + t * HQ, tl.sum(u1 * l2 * l3, axis=0), sem="relaxed")


@triton.jit(do_not_specialize=["c0", "NFT"])  # read only with packed documents
def _bwd_kernel(u1_ptr, u2_ptr, u3_ptr, v1_ptr, v2_ptr, do_ptr, den_ptr, delta_ptr, st_ptr, sd_ptr, rs_ptr, rd_ptr,
                du1_ptr, du2_ptr, du3_ptr, gv_ptr, GV2, ct_ptr, T, t0, c0, NFT, NS1, HQ, GROUPS, KP,
                DV: tl.constexpr, DVP: tl.constexpr, F: tl.constexpr, BK: tl.constexpr, MODE: tl.constexpr,
                VARLEN: tl.constexpr):
    """One chunk n, one query head, one feature block of ``BK`` features (grid as :func:`_fwd_walk_kernel`'s): the
    states ``[BK, DVP]`` in registers
    (float32, CUDA cores), one position per step (forward states ``L += u ⊗ v`` by addition from the chunk's
    start); the features come from the segment's buffers ``u1 [B, TS, Hq, KP]``, ``u2``, ``u3 [B, TS, Hkv, KP]``.

    * ``MODE == 1`` (state gradients): the chunk's contribution ``Σ_{i in n} dL2_i`` with
      ``dL2_i = (U1[i] ⊗ G_i) ∘ L3_i`` (likewise dL3, and the normaliser's vectors), per query head -> slot
      ``NS1 - 1 - n`` of ``rs``, ``rd`` (reversed, so a forward cumsum gives suffixes).
    * ``MODE == 2`` (input gradients): suffix states (inclusive, from the reversed cumsum) less each row's own
      part; the feature gradients ``du1..3`` of every row stored into ``[B, TS, Hq, KP]`` (each row's block
      belongs to this program alone), the value gradients added into ``gv [2, B, TS, Hq, Dv]`` (``GV2`` apart)
      by atomics (feature blocks add up; :func:`_proj_kernel` sums GQA groups). With one warp per program (the default
      of this pass) every reduction stays inside the warp: no exchange through shared memory per row.

    Only the chunk's rows (:func:`_chunk_rows`) are walked: past its end nothing is read or written (their
    features are zero and their gradients are never read), so the loop body has no row masks. The segment's
    buffers hold its rows from ``t0`` (its first row) on, so chunk n starts at buffer row ``r0 - t0`` (``n F``
    without packed documents)."""
    n, bh, kb = _walk_ids(tl.cdiv(KP, BK))
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
    r0, tq, nt, u1b, u2b, u3b = _walk_rows(u1_ptr, u2_ptr, u3_ptr, ct_ptr, NFT, c0, n, t0, T, b, h, hk, HQ, HK, TS, KP,
                                           m, F, VARLEN)
    gub = ((b * TS + tq) * HQ + h) * KP + m
    gvb = ((b * TS + tq) * HQ + h) * DV + cols
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
        if MODE == 1:  # one product u1 ⊗ g shared by both states: 5 operations per element instead of 6
            ug = u1[:, None] * g[None, :]
            R2 += ug * L3
            R3 += ug * L2
            r2d += gd * u1 * l3
            r3d += gd * u1 * l2
        else:
            gl3 = g[None, :] * L3
            gl2 = g[None, :] * L2
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
def _normalize_kernel(num_ptr, dsum_ptr, o_ptr, den_ptr, NR, TS, T, t0, HQ, eps, DV: tl.constexpr,
                      DVP: tl.constexpr, R: tl.constexpr):
    """The forward walk's end for ``R`` of a segment's ``NR = rows x Hq`` (row, head) pairs of batch ``b``:
    ``den = Σ + eps`` into ``den [B, T, Hq]`` and ``o = num / den`` into ``o [B, T, Hq, Dv]`` (o's dtype) at the
    segment's rows from ``t0``, from the float32 sums ``num [B, TS, Hq, Dv]``, ``Σ = dsum [B, TS, Hq]``."""
    r = tl.program_id(0) * R + tl.arange(0, R)
    b = tl.program_id(1).to(tl.int64)
    rm = r < NR
    cols = tl.arange(0, DVP)
    d = tl.load(dsum_ptr + b * TS * HQ + r, mask=rm, other=1.0) + eps
    x = tl.load(num_ptr + (b * TS * HQ + r)[:, None] * DV + cols[None, :], mask=rm[:, None] & (cols < DV)[None, :],
                other=0.0)
    out = (b * T + t0) * HQ + r  # int64: T * H * Dv may pass 2^31
    tl.store(den_ptr + out, d, mask=rm)
    tl.store(o_ptr + out[:, None] * DV + cols[None, :], (x / d[:, None]).to(o_ptr.dtype.element_ty),
             mask=rm[:, None] & (cols < DV)[None, :])


@triton.jit
def _rowdot_kernel(a_ptr, b_ptr, out_ptr, N, DV: tl.constexpr, DVP: tl.constexpr, R: tl.constexpr):
    """``out[r] = Σ_d a[r, d] b[r, d]`` in float32 for ``R`` of the ``N`` rows of ``a, b [N, DV]`` (any float
    dtype): the backward's ``<dO, o>`` per (row, head), without float32 copies of the two."""
    r = tl.program_id(0) * R + tl.arange(0, R).to(tl.int64)
    rm = r < N
    cols = tl.arange(0, DVP)
    msk = rm[:, None] & (cols < DV)[None, :]
    off = r[:, None] * DV + cols[None, :]
    x = tl.load(a_ptr + off, mask=msk, other=0.0).to(tl.float32)
    y = tl.load(b_ptr + off, mask=msk, other=0.0).to(tl.float32)
    tl.store(out_ptr + r, tl.sum(x * y, axis=1), mask=rm)


@triton.jit
def _seg_add(a, fa, b, fb):
    """Combine of a segmented sum: ``b`` alone where it starts a segment (flag ``fb``), else ``a + b``."""
    return tl.where(fb != 0, b, a + b), fa | fb


@triton.jit
def _scan_kernel(x_ptr, xi_ptr, xo_ptr, y_ptr, yi_ptr, yo_ptr, f_ptr, N, WX, WY, NBX, U: tl.constexpr,
                 BW: tl.constexpr, SEG: tl.constexpr, FIN: tl.constexpr):
    """Two chunk scans in one launch: programs ``(bh, c)`` with ``c < NBX`` scan ``BW`` columns of ``x [BH, N, WX]``,
    the others of ``y [BH, N, WY]`` (:func:`_scan_cols`; the states and the normaliser's vectors of one segment)."""
    bh = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    if c < NBX:
        _scan_cols(x_ptr, xi_ptr, xo_ptr, f_ptr, bh, c, N, WX, U, BW, SEG, FIN)
    else:
        _scan_cols(y_ptr, yi_ptr, yo_ptr, f_ptr, bh, c - NBX, N, WY, U, BW, SEG, FIN)


@triton.jit
def _scan_cols(x_ptr, i_ptr, o_ptr, f_ptr, bh, c, N, W, U: tl.constexpr, BW: tl.constexpr, SEG: tl.constexpr,
               FIN: tl.constexpr):
    """In place, the inclusive prefix sum over the chunk axis of ``x [BH, N, W]`` (float32) for ``BW`` columns of
    one ``bh``, started from ``init [BH, W]`` (``i_ptr``): slot 0 becomes the initial value (what it held is not
    read) and slot n the initial value plus slots 1..n. ``U`` chunks per step as one ``[U, BW]`` tile (``U * BW``
    loads in flight, a scan inside the tile), the running sum carried in registers from one step to the next; with
    ``FIN`` the last slot is also written to ``o [BH, W]`` (the next segment's initial value).

    Segmented (packed documents): where ``f [N]`` (int32) is nonzero the sum restarts, at zero (``SEG == 1``:
    the slot becomes 0, the forward states before a document's first chunk) or at the slot's own value
    (``SEG == 2``: the backward's suffixes at a document's last chunk)."""
    cols = c * BW + tl.arange(0, BW)
    cm = cols < W
    r = tl.arange(0, U)
    base = x_ptr + bh * N * W + cols[None, :]
    acc = tl.load(i_ptr + bh * W + cols, mask=cm, other=0.0)
    for n0 in range(0, N, U):
        rows = n0 + r
        msk = (rows < N)[:, None] & cm[None, :]
        ptr = base + rows.to(tl.int64)[:, None] * W
        x = tl.load(ptr, mask=msk & (rows > 0)[:, None], other=0.0)  # slot 0: the initial value, in acc
        if SEG == 0:
            cs = tl.cumsum(x, axis=0) + acc[None, :]
        else:
            f = tl.broadcast_to(tl.load(f_ptr + rows, mask=rows < N, other=0)[:, None], (U, BW))
            if SEG == 1:
                x = tl.where(f != 0, 0.0, x)
            cs, fs = tl.associative_scan((x, f), 0, _seg_add)
            cs = tl.where(fs != 0, cs, cs + acc[None, :])  # the carry reaches the rows before the tile's first restart
        tl.store(ptr, cs, mask=msk)
        acc = tl.sum(tl.where(r[:, None] == U - 1, cs, 0.0), axis=0)  # the tile's last row (zero rows past N)
    if FIN:
        tl.store(o_ptr + bh * W + cols, acc, mask=cm)
