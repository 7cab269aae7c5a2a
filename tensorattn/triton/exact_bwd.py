"""Fused backward of exact tensor attention (Triton): two kernels, no T^2 or T^3 buffers.

With ``P`` recomputed from the saved natural-log LSE (times ``log2 e``: the kernels work in base 2, like
the forward), ``dP = (dO * v1[j1]) @ v2^T``, ``Delta = rowsum(dO * O)`` and ``dS = P * (dP - Delta)``:

* ``_bwd_q_kernel`` (query-major, the forward's tiling: rows = query tokens x GQA heads, outer loop over
  ``j1``, inner blocks of ``j2``) accumulates, for the current ``j1`` of each row,
  ``t = sum_j2 dS k2`` and ``u = sum_j2 P v2`` over the inner loop; then ``dq += scale * t * k1[j1]``
  (owned rows, kept in registers), and ``dk1[j1] += scale * t * q``, ``dv1[j1] += u * dO`` are added to
  float32 buffers with ONE atomic add per outer step (after summing the G heads of a kv head), not per
  inner block, so the atomics are amortised over ``w2 / BN`` blocks of four matrix products. The adds are
  relaxed (``sem="relaxed"``: the buffers are read only after the kernel ends); Triton's default, acquire-release,
  took 1.6x the time of this kernel at head dim 64 without GQA (7.3 against 4.7 ms on an H200, measured in two
  device calls).
* Both kernels load the outer step's k1/v1 as one broadcast row where all rows of a block read the same position
  (``ROW1`` of :mod:`.exact_fwd`); with windows and several tokens of several heads per block, the key-major kernel
  loads one row per token and broadcasts it over the token's heads (``ROWG``).
* ``_bwd_k2_kernel`` (key-major for the second stream, like FlashAttention's dK/dV pass): a program owns
  ``BN`` positions of ``k2/v2`` and loops over the query blocks that see them and, inside, over ``j1``:
  ``dk2 += dS^T @ (q * k1[j1])`` and ``dv2 += P^T @ (dO * v1[j1])``; no atomics.

Four matrix products per tile in each kernel (8 in all, against the forward's 2). Accumulation is float32;
products take the input dtype (float32: "ieee"). The atomic adds make dk1/dv1 reproducible only up to
float32 summation order; ``deterministic=True`` replaces them by a second run of the key-major kernel with the
streams swapped (bitwise reproducible, 11 products per tile pair instead of 8).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .exact_fwd import (FAST, LN2, LOG2E, COMPILED, MODE_CAUSAL, MODE_WINDOW, _block_rows, _outer_keys, _outer_row,
                        _outer_tokens, _pair_mask, _partial_block, _query_loops, block_sizes, dot_dtype, plan,
                        row_broadcast)

# The query-major kernel's inner key block (its own: the key-major kernel's BN is the key block it owns). Default:
# 32 with windows at head dims <= 64, where the 64-key block spills (H200, bf16, window (512, 32), relaxed atomics:
# that kernel 4.66 -> 3.96 ms at Hq = Hkv = 16, 3.74 -> 3.50 ms at Hkv = 1), else the tile's BN (32 lost at D = 128,
# 148 -> 179 ms, and on full causal attention at D = 64, 684 -> 746 ms; benchmarks/NOTES_exact.md).
# TENSORATTN_EXACT_BWD_BNQ=16|32|64|128 fixes it (the benchmarks' A/B); a block override sets both.
_bnq = os.environ.get("TENSORATTN_EXACT_BWD_BNQ", "")
if _bnq not in ("", "16", "32", "64", "128"):
    raise ValueError(f"TENSORATTN_EXACT_BWD_BNQ must be 16, 32, 64 or 128, got {_bnq!r}")
BNQ = int(_bnq) if _bnq else None
# Software-pipelining stages of both backward kernels (TENSORATTN_EXACT_BWD_STAGES, a positive integer; default:
# Triton's), for the benchmarks' A/B.
_bst = os.environ.get("TENSORATTN_EXACT_BWD_STAGES", "")
if _bst and not (_bst.isdecimal() and int(_bst) >= 1):
    raise ValueError(f"TENSORATTN_EXACT_BWD_STAGES must be a positive integer, got {_bst!r}")
BWD_STAGES = dict(num_stages=int(_bst)) if _bst else {}
# The key-major kernel with windows and several tokens of several heads per block (GQA): each token's outer k1/v1 row
# loaded once and broadcast over its heads, instead of one gathered row per block row: 6.29 -> 5.80 ms at window
# (512, 32), D 64, Hq 16, Hkv 1 (4 tokens x 16 heads) on an H200. Head dims <= 64 only, as measured (its float32
# [token, head, lane] views of q and dO add registers, which D = 128 lacks). TENSORATTN_EXACT_ROWG=0 gathers (A/B).
ROWG = os.environ.get("TENSORATTN_EXACT_ROWG", "1") != "0"


@triton.jit
def _bwd_q_kernel(
    Q, K1, K2, V1, V2, DO, LSE, DELTA, DQ, DK1, DV1, DOC_LO, DOC_HI,
    sq_b, sq_t, sq_h, sq_d,
    sk1_b, sk1_t, sk1_h, sk1_d,
    sk2_b, sk2_t, sk2_h, sk2_d,
    sv1_b, sv1_t, sv1_h, sv1_d,
    sv2_b, sv2_t, sv2_h, sv2_d,
    sdo_b, sdo_t, sdo_h, sdo_d,
    sl_b, sl_h, sl_t,
    sdq_b, sdq_t, sdq_h, sdq_d,
    sa_b, sa_t, sa_h, sa_d,  # dk1 (float32 buffer)
    sb_b, sb_t, sb_h, sb_d,  # dv1 (float32 buffer)
    T, S1, S2, Hkv, G, D, Dv, W1, W2, scale,
    MODE: tl.constexpr, BT: tl.constexpr, GP: tl.constexpr, BN: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    VARLEN: tl.constexpr, KV1: tl.constexpr, ROW1: tl.constexpr,
):
    M: tl.constexpr = BT * GP
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    i0 = pid_t * BT
    tok, g, row_ok, hq, d, e, d_ok, e_ok = _block_rows(i0, hk, T, G, D, Dv, BT, GP, BD, BDV)
    b64 = b.to(tl.int64)
    K1 += b64 * sk1_b + hk * sk1_h
    K2 += b64 * sk2_b + hk * sk2_h
    V1 += b64 * sv1_b + hk * sv1_h
    V2 += b64 * sv2_b + hk * sv2_h
    DK1 += b64 * sa_b + hk * sa_h
    DV1 += b64 * sb_b + hk * sb_h

    qmask = row_ok[:, None] & d_ok[None, :]
    # q and dO stay in the input dtype (registers are the limit here); converted where used
    q = tl.load(Q + b64 * sq_b + tok[:, None] * sq_t + hq[:, None] * sq_h + d[None, :] * sq_d, mask=qmask,
                other=0.0)  # [M, BD]
    do = tl.load(DO + b64 * sdo_b + tok[:, None] * sdo_t + hq[:, None] * sdo_h + e[None, :] * sdo_d,
                 mask=row_ok[:, None] & e_ok[None, :], other=0.0)  # [M, BDV]
    lse2 = tl.load(LSE + b64 * sl_b + hq * sl_h + tok * sl_t, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + b64 * sl_b + hq * sl_h + tok * sl_t, mask=row_ok, other=0.0)
    dq = tl.zeros([M, BD], tl.float32)

    r0, n_outer, lo2, hi2, doc_lo, doc_hi = _query_loops(DOC_LO, DOC_HI, i0, tok, row_ok, T, S1, S2, W1, W2, BT,
                                                         MODE, VARLEN)
    for r in range(r0, n_outer):
        j1, ok1 = _outer_keys(r, tok, row_ok, doc_lo, doc_hi, M, MODE, VARLEN)
        if ROW1:  # every row has the same j1: one row of k1 and v1, broadcast over the M rows
            k1, v1 = _outer_row(K1, V1, r, i0, d, e, d_ok, e_ok, sk1_t, sk1_d, sv1_t, sv1_d, MODE)
        else:
            k1p = K1 + j1[:, None] * sk1_t + d[None, :] * sk1_d
            k1m = ok1[:, None] & d_ok[None, :]
            k1 = tl.load(k1p, mask=k1m, other=0.0)
            v1 = tl.load(V1 + j1[:, None] * sv1_t + e[None, :] * sv1_d, mask=ok1[:, None] & e_ok[None, :],
                         other=0.0)
        qk1 = (q.to(tl.float32) * k1.to(tl.float32) * (scale * LOG2E)).to(DOT_DTYPE)
        dov1 = (do.to(tl.float32) * v1.to(tl.float32)).to(DOT_DTYPE)
        t = tl.zeros([M, BD], tl.float32)
        u = tl.zeros([M, BDV], tl.float32)
        for c0 in range(lo2, hi2, BN):
            j2 = c0 + tl.arange(0, BN)
            ok2 = j2 < hi2
            k2 = tl.load(K2 + j2[:, None] * sk2_t + d[None, :] * sk2_d, mask=ok2[:, None] & d_ok[None, :],
                         other=0.0).to(DOT_DTYPE)  # [BN, BD]
            v2 = tl.load(V2 + j2[:, None] * sv2_t + e[None, :] * sv2_d, mask=ok2[:, None] & e_ok[None, :],
                         other=0.0).to(DOT_DTYPE)  # [BN, BDV]
            s = tl.dot(qk1, tl.trans(k2), input_precision=PRECISION)
            # every block masked: skipping the mask on whole blocks (as the forward does) was slower here, by 2-11 %
            vis = _pair_mask(ok1[:, None] & ok2[None, :], j2, tok, W2, doc_lo, doc_hi, MODE, VARLEN)
            p = tl.where(vis, tl.math.exp2(tl.minimum(s - lse2[:, None], 0.0)), 0.0)  # P <= 1: lse >= max s
            dp = tl.dot(dov1, tl.trans(v2), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            t = tl.dot(ds.to(DOT_DTYPE), k2, acc=t, input_precision=PRECISION)
            if KV1:
                u = tl.dot(p.to(DOT_DTYPE), v2, acc=u, input_precision=PRECISION)
        if ROW1:
            dq += t * k1.to(tl.float32)
        else:  # the gathered k1 is re-read (an L1/L2 hit) rather than kept live through the inner loop
            dq += t * tl.load(k1p, mask=k1m, other=0.0).to(tl.float32)
        if KV1:  # else (deterministic) dk1, dv1 come from the key-major kernel with the streams swapped
            gk1 = t * (q.to(tl.float32) * scale)  # [M, BD]: contribution of each row to dk1[j1]
            gv1 = u * do.to(tl.float32)  # [M, BDV]
            if MODE == 2:
                # sum the GP heads of each token; token k's j1 is i0 + k - r
                gk1 = tl.sum(tl.reshape(gk1, [BT, GP, BD]), 1)
                gv1 = tl.sum(tl.reshape(gv1, [BT, GP, BDV]), 1)
                tk = i0 + tl.arange(0, BT)
                jj = tk - r
                okk = (tk < T) & (jj >= 0)
                tl.atomic_add(DK1 + jj[:, None] * sa_t + d[None, :] * sa_d, gk1, mask=okk[:, None] & d_ok[None, :],
                              sem="relaxed")
                tl.atomic_add(DV1 + jj[:, None] * sb_t + e[None, :] * sb_d, gv1, mask=okk[:, None] & e_ok[None, :],
                              sem="relaxed")
            else:
                tl.atomic_add(DK1 + r * sa_t + d * sa_d, tl.sum(gk1, 0), mask=d_ok, sem="relaxed")
                tl.atomic_add(DV1 + r * sb_t + e * sb_d, tl.sum(gv1, 0), mask=e_ok, sem="relaxed")

    dq = dq * scale
    tl.store(DQ + b64 * sdq_b + tok[:, None] * sdq_t + hq[:, None] * sdq_h + d[None, :] * sdq_d,
             dq.to(DQ.dtype.element_ty), mask=qmask)


@triton.jit
def _bwd_k2_kernel(
    Q, K1, K2, V1, V2, DO, LSE, DELTA, DK2, DV2, DOC_LO, DOC_HI,
    sq_b, sq_t, sq_h, sq_d,
    sk1_b, sk1_t, sk1_h, sk1_d,
    sk2_b, sk2_t, sk2_h, sk2_d,
    sv1_b, sv1_t, sv1_h, sv1_d,
    sv2_b, sv2_t, sv2_h, sv2_d,
    sdo_b, sdo_t, sdo_h, sdo_d,
    sl_b, sl_h, sl_t,
    sdk_b, sdk_t, sdk_h, sdk_d,
    sdv_b, sdv_t, sdv_h, sdv_d,
    T, S1, S2, Hkv, G, D, Dv, W1, W2, scale,
    MODE: tl.constexpr, BT: tl.constexpr, GP: tl.constexpr, BN: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    VARLEN: tl.constexpr, ROW1: tl.constexpr, FAST: tl.constexpr, ROWG: tl.constexpr,
):
    M: tl.constexpr = BT * GP
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    c0 = pid_n * BN
    j2 = c0 + tl.arange(0, BN)
    ok2 = j2 < S2
    d = tl.arange(0, BD)
    e = tl.arange(0, BDV)
    d_ok = d < D
    e_ok = e < Dv
    b64 = b.to(tl.int64)
    Q += b64 * sq_b
    DO += b64 * sdo_b
    LSE += b64 * sl_b
    DELTA += b64 * sl_b
    K1 += b64 * sk1_b + hk * sk1_h
    V1 += b64 * sv1_b + hk * sv1_h
    k2 = tl.load(K2 + b64 * sk2_b + hk * sk2_h + j2[:, None] * sk2_t + d[None, :] * sk2_d,
                 mask=ok2[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)  # [BN, BD]
    v2 = tl.load(V2 + b64 * sv2_b + hk * sv2_h + j2[:, None] * sv2_t + e[None, :] * sv2_d,
                 mask=ok2[:, None] & e_ok[None, :], other=0.0).to(DOT_DTYPE)  # [BN, BDV]
    dk2 = tl.zeros([BN, BD], tl.float32)
    dv2 = tl.zeros([BN, BDV], tl.float32)

    if MODE == 2:
        q_lo = c0
        q_hi = tl.minimum(T, c0 + BN - 1 + W2)
    elif MODE == 1:
        q_lo = c0
        q_hi = T
    else:
        q_lo = 0
        q_hi = T
    if VARLEN:  # the queries that can see this key block: those of its documents
        c_last = tl.minimum(S2, c0 + BN) - 1
        q_lo = tl.maximum(q_lo, tl.load(DOC_LO + c0))
        q_hi = tl.minimum(q_hi, tl.load(DOC_HI + c_last))
    q_lo = (q_lo // BT) * BT  # align query blocks so tokens stay in [0, T)
    rows = tl.arange(0, M)
    g = rows % GP
    hq = hk * G + g
    for i0 in range(q_lo, q_hi, BT):
        tok = i0 + rows // GP
        row_ok = (tok < T) & (g < G)
        q = tl.load(Q + tok[:, None] * sq_t + hq[:, None] * sq_h + d[None, :] * sq_d,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(DO + tok[:, None] * sdo_t + hq[:, None] * sdo_h + e[None, :] * sdo_d,
                     mask=row_ok[:, None] & e_ok[None, :], other=0.0)
        lse2 = tl.load(LSE + hq * sl_h + tok * sl_t, mask=row_ok, other=0.0) * LOG2E
        delta = tl.load(DELTA + hq * sl_h + tok * sl_t, mask=row_ok, other=0.0)
        r0, n_outer, _lo2, hi2, doc_lo, doc_hi = _query_loops(DOC_LO, DOC_HI, i0, tok, row_ok, T, S1, S2, W1, W2,
                                                              BT, MODE, VARLEN)
        vis2 = _pair_mask(row_ok[:, None] & ok2[None, :], j2, tok, W2, doc_lo, doc_hi, MODE, VARLEN)
        if ROWG:  # the block's rows as [token, head, lane]
            q3 = tl.reshape(q, (BT, GP, BD)).to(tl.float32)
            do3 = tl.reshape(do, (BT, GP, BDV)).to(tl.float32)
        for r in range(r0, n_outer):
            j1, ok1 = _outer_keys(r, tok, row_ok, doc_lo, doc_hi, M, MODE, VARLEN)
            if ROWG:  # each token's outer row, broadcast over its GP heads
                k1t, v1t = _outer_tokens(K1, V1, r, i0, T, d, e, d_ok, e_ok, sk1_t, sk1_d, sv1_t, sv1_d, BT)
                qk1 = tl.reshape(q3 * (k1t.to(tl.float32) * (scale * LOG2E))[:, None, :], (M, BD)).to(DOT_DTYPE)
                dov1 = tl.reshape(do3 * v1t.to(tl.float32)[:, None, :], (M, BDV)).to(DOT_DTYPE)
            else:
                if ROW1:  # every row has the same j1: one row of k1 and v1, broadcast over the M rows
                    k1, v1 = _outer_row(K1, V1, r, i0, d, e, d_ok, e_ok, sk1_t, sk1_d, sv1_t, sv1_d, MODE)
                else:
                    k1 = tl.load(K1 + j1[:, None] * sk1_t + d[None, :] * sk1_d, mask=ok1[:, None] & d_ok[None, :],
                                 other=0.0)
                    v1 = tl.load(V1 + j1[:, None] * sv1_t + e[None, :] * sv1_d, mask=ok1[:, None] & e_ok[None, :],
                                 other=0.0)
                qk1 = (q.to(tl.float32) * k1.to(tl.float32) * (scale * LOG2E)).to(DOT_DTYPE)  # [M, BD]
                dov1 = (do.to(tl.float32) * v1.to(tl.float32)).to(DOT_DTYPE)  # [M, BDV]
            s = tl.dot(qk1, tl.trans(k2), input_precision=PRECISION)  # [M, BN]
            p = tl.math.exp2(tl.minimum(s - lse2[:, None], 0.0))  # P <= 1: lse >= max s
            if FAST and not VARLEN:  # masked only where some row does not see all of this key block
                if _partial_block(r, c0, i0, hi2, W2, BT, BN, MODE):
                    p = tl.where(vis2 & ok1[:, None], p, 0.0)
            else:
                p = tl.where(vis2 & ok1[:, None], p, 0.0)
            dp = tl.dot(dov1, tl.trans(v2), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk2 = tl.dot(tl.trans(ds.to(DOT_DTYPE)), qk1, acc=dk2, input_precision=PRECISION)
            dv2 = tl.dot(tl.trans(p.to(DOT_DTYPE)), dov1, acc=dv2, input_precision=PRECISION)

    dk2 = dk2 * LN2  # qk1 carried log2(e) on top of the scale
    tl.store(DK2 + b64 * sdk_b + hk * sdk_h + j2[:, None] * sdk_t + d[None, :] * sdk_d,
             dk2.to(DK2.dtype.element_ty), mask=ok2[:, None] & d_ok[None, :])
    tl.store(DV2 + b64 * sdv_b + hk * sdv_h + j2[:, None] * sdv_t + e[None, :] * sdv_d,
             dv2.to(DV2.dtype.element_ty), mask=ok2[:, None] & e_ok[None, :])


def exact_bwd(do, q, k1, k2, v1, v2, o, lse, *, scale: float, causal: bool, window, block=None, docs=None,
              deterministic: bool = False):
    """Launch the fused backward.

    Args:
        do: ``[B, T, Hq, Dv]`` gradient of the output; q, k1, k2, v1, v2 as in :func:`exact_fwd`;
        o: the forward's output; lse: its ``[B, Hq, T]`` float32 natural-log log-sum-exp.
        block: optional ``(BT, GP, BN, BD, BDV, num_warps)`` override.
        docs: packed documents, as in :func:`tensorattn.triton.exact_fwd.exact_fwd`.
        deterministic: no floating-point atomics, so the gradients are bitwise the same on every run: the
            query-major kernel computes dq only, and dk1, dv1 come from the key-major kernel run a second time
            with the two streams swapped (``(k1, v1) <-> (k2, v2)``, windows ``(w2, w1)``), each key block owned
            by one program: 11 matrix products per tile pair against 8, and the key-major kernel is the slower one
            (measured cost: the deterministic rows of ``benchmarks/results/bench_exact_v10.md`` and, for full
            causal attention with the final tiles, ``bench_exact_v10_causal.md``).

    Returns:
        ``(dq, dk1, dk2, dv1, dv2)`` in the input dtype.
    """
    B, T, Hq, D = q.shape
    Hkv, Dv = k1.shape[2], v1.shape[3]
    G = Hq // Hkv
    mode, (w1, w2), swap = plan(q, k1, k2, causal=causal, window=window)
    if swap:
        k1, k2, v1, v2 = k2, k1, v2, v1
    S1, S2 = k1.shape[1], k2.shape[1]
    interpret = q.device.type == "cpu"
    BT, GP, BN, BD, BDV, warps = block or block_sizes(G, D, Dv, interpret=interpret)
    stages = dict(BWD_STAGES)
    wide32 = q.dtype == torch.float32 and block is None and not interpret and max(BD, BDV) >= 64
    if wide32:
        # float32 tiles with the default pipelining asked for 288 KB of shared memory at D = 128 on an H100
        # (limit 227 KB): halve the key block and drop the pipelining; float32 is the accuracy path, not the fast one
        BN, stages = 32, dict(num_stages=1)
    delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()  # [B, Hq, T]
    lse = lse.contiguous()
    dq = torch.empty(B, T, Hq, D, dtype=q.dtype, device=q.device)
    if deterministic:
        dk1 = torch.empty(B, S1, Hkv, D, dtype=q.dtype, device=q.device)
        dv1 = torch.empty(B, S1, Hkv, Dv, dtype=q.dtype, device=q.device)
    else:  # float32 buffers for the query-major kernel's atomic adds
        dk1 = torch.zeros(B, S1, Hkv, D, dtype=torch.float32, device=q.device)
        dv1 = torch.zeros(B, S1, Hkv, Dv, dtype=torch.float32, device=q.device)
    dk2 = torch.empty(B, S2, Hkv, D, dtype=q.dtype, device=q.device)
    dv2 = torch.empty(B, S2, Hkv, Dv, dtype=q.dtype, device=q.device)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    common = dict(MODE=mode, BT=BT, GP=GP, BN=BN, BD=BD, BDV=BDV, DOT_DTYPE=dot_dtype(q.dtype), PRECISION=prec,
                  VARLEN=docs is not None, ROW1=row_broadcast(mode, BT), num_warps=warps, **stages)
    lo, hi = docs if docs is not None else (lse, lse)  # unused without documents
    head = (*q.stride(), *k1.stride(), *k2.stride(), *v1.stride(), *v2.stride(), *do.stride(), *lse.stride())
    narrow = mode == MODE_WINDOW and max(BD, BDV) <= 64
    bnq = BN if block is not None or wide32 else BNQ or (min(BN, 32) if narrow else BN)
    COMPILED['_bwd_q_kernel'] = _bwd_q_kernel[(triton.cdiv(T, BT), B * Hkv)](
        q, k1, k2, v1, v2, do, lse, delta, dq, dk1, dv1, lo, hi, *head, *dq.stride(), *dk1.stride(), *dv1.stride(),
        T, S1, S2, Hkv, G, D, Dv, w1, w2, scale, KV1=not deterministic, **dict(common, BN=bnq))
    # the key-major kernel skips the mask on whole blocks under full causal attention only: 4-5 % faster there,
    # 1.5-4.5 % slower with windows (H200, benchmarks/NOTES_exact.md)
    common["FAST"] = FAST and mode == MODE_CAUSAL
    common["ROWG"] = ROWG and mode == MODE_WINDOW and BT > 1 and GP > 1 and max(BD, BDV) <= 64
    COMPILED['_bwd_k2_kernel'] = _bwd_k2_kernel[(triton.cdiv(S2, BN), B * Hkv)](
        q, k1, k2, v1, v2, do, lse, delta, dk2, dv2, lo, hi, *head, *dk2.stride(), *dv2.stride(),
        T, S1, S2, Hkv, G, D, Dv, w1, w2, scale, **common)
    if deterministic:  # the same kernel with the streams swapped: stream 1's gradients, one owner per key block
        swapped = (*q.stride(), *k2.stride(), *k1.stride(), *v2.stride(), *v1.stride(), *do.stride(), *lse.stride())
        _bwd_k2_kernel[(triton.cdiv(S1, BN), B * Hkv)](
            q, k2, k1, v2, v1, do, lse, delta, dk1, dv1, lo, hi, *swapped, *dk1.stride(), *dv1.stride(),
            T, S2, S1, Hkv, G, D, Dv, w2, w1, scale, **common)
    dk1, dv1 = dk1.to(q.dtype), dv1.to(q.dtype)
    if swap:
        dk1, dk2, dv1, dv2 = dk2, dk1, dv2, dv1
    return dq, dk1, dk2, dv1, dv2


__all__ = ["exact_bwd"]
