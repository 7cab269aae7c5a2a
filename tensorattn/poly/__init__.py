"""Fast (polynomial) tensor attention: a differentiable, causal or non-causal, linear-time op.

Semantics
---------
Exact tensor attention (:func:`tensorattn.naive.naive_tensor_attn`) weighs every visible key pair
``(j1, j2)`` of query ``i`` by ``exp(z)`` with ``z = scale * <q_i, k1_j1 ∘ k2_j2>``. This op replaces
``exp`` by its degree-``g`` Taylor polynomial ``P(z) = sum_{t<=g} z^t / t!`` (docs/math.md#polynomial) and keeps
everything else (same visibility, same ``[B, T, H, D]`` layout, same GQA rule)::

    o[i, e] = sum_{visible (j1, j2)} P(z[i, j1, j2]) * v1[j1, e] * v2[j2, e]
              / (eps + sum_{visible (j1, j2)} P(z[i, j1, j2]))

Only even degrees are allowed: an even Taylor polynomial of exp is > 0 on all of R (``T2 >= 1/2``,
``T4 >= 0.27``, docs/math.md#positivity), so the normaliser is at least ``min P > 0`` times the number of visible
pairs, whatever the logits. ``eps = 1e-6`` (:data:`EPS`) only guards against a normaliser lost to
underflow; it is included in the reference :func:`naive_poly_tensor_attn` too, so the two compute the
same function.

How it is computed (never the ``T x S1 x S2`` scores)
---------------------------------------------------
Feature map: exact monomials (:mod:`tensorattn.features`), rank ``k = C(Dk + g, g)`` (153 for Dk=16,
g=2; 2145 for Dk=64, g=2; 4845 for Dk=16, g=4). With ``U1 = φ_q(scale q)`` (weights ``1/β!``),
``U2 = φ(k1)``, ``U3 = φ(k2)``: ``P(z[i,j1,j2]) = sum_m U1[i,m] U2[j1,m] U3[j2,m]`` exactly. Append a
column of ones to v1 and v2 (``Dv' = Dv + 1``): the last output column is then the normaliser.

* non-causal: ``A2 = U2^T [v1, 1]``, ``A3 = U3^T [v2, 1]`` (``[k, Dv']`` each) and
  ``num = U1 (A2 ∘ A3)`` (docs/math.md#non-causal), chunk by chunk over the rows.
* causal (docs/math.md#chunks): for query ``i`` in chunk ``c`` (positions ``c0 .. c0+C-1``) the visible
  pairs ``{j1 <= i} x {j2 <= i}`` split into four blocks by whether each key lies before the chunk (B)
  or inside it at or before ``i`` (W)::

      (B,B): U1[i] · (A2 ∘ A3)                                  A2, A3: running states before c
      (B,W): sum_{j2 in W(i)} v2[j2] ∘ ((U1[i] ∘ U3[j2]) A2)    C x C pairs, one matrix product
      (W,B): sum_{j1 in W(i)} v1[j1] ∘ ((U1[i] ∘ U2[j1]) A3)
      (W,W): sum_{j1, j2 in W(i)} P(z[i,j1,j2]) v1[j1] ∘ v2[j2] the exact polynomial, C^3 per chunk

  then ``A2 += U2_c^T [v1_c, 1]``, ``A3 += U3_c^T [v2_c, 1]``. Nothing larger than a chunk is stored:
  the states are ``2 k Dv'`` floats per (batch, kv head). Time ``O(T (C k Dv + C^2 (Dk + Dv)))``.
* backward (by hand, docs/math.md#chunk-parallel): the gradient of ``o = num / den`` w.r.t. ``num'`` is
  ``G = [dO / den, -<dO, o> / den]``; a reverse pass over chunks carries ``dA2, dA3`` (the gradient
  of the later chunks w.r.t. the states) and recovers ``A2(c), A3(c)`` by subtracting each chunk's
  update from checkpoints saved every ``ckpt`` chunks by the forward pass (so the subtraction never
  runs for more than ``ckpt`` chunks: no drift). Feature Jacobians are applied chunk by chunk.
* causal on CUDA with small states (``B Hkv k (Dv + 1) <= 2^17``, e.g. Dk < 16 where the fused kernel
  does not apply): the scan (:mod:`.scan`) instead: running sums ``P + cumsum(U2 ⊗ [v1, 1])`` of
  a chunk of ~``2^26 / (B Hkv k Dv')`` positions at once (a few large kernels instead of a Python loop over
  32-position chunks; measured in ``benchmarks/NOTES_dist.md``), the backward recomputing each chunk.
  The same scan, started from the ranks' prefix state, is the local part of
  :func:`tensorattn.distributed.cp_poly_tensor_attn`.

Accumulation dtype: float32 (float64 for float64 inputs) everywhere: features, states, products.

Decoding (:class:`PolyTensorAttnState`, :func:`poly_tensor_attn_step`): the causal form as a
recurrence; the state is ``A2, A3`` of shape ``[B, Hkv, k, Dv + 1]`` float32, i.e.
``2 * k * (Dv + 1)`` floats per (batch, kv head), independent of the sequence length
(Dk=16, Dv=64, g=2: 2 * 153 * 65 * 4 B = 78 KiB).

Files: :mod:`.op` (the op, its backends and its custom ops), :mod:`.reference` (the plain reference),
:mod:`.chunked` (the torch backend's chunked path), :mod:`.scan` (the scan), :mod:`.decode` (the decoding state),
:mod:`.common` (constants, checks, feature maps), :mod:`.fused` (the fused kernels started from a prefix state, for
context parallelism); the fused Triton kernels themselves are :mod:`tensorattn.triton.poly`.
"""
from .common import EPS, MAX_DEGREE, MAX_RANK, poly_rank
from .decode import PolyTensorAttnState, poly_tensor_attn_step
from .op import BACKENDS, poly_tensor_attn
from .reference import naive_poly_tensor_attn

__all__ = [
    "poly_tensor_attn",
    "naive_poly_tensor_attn",
    "PolyTensorAttnState",
    "poly_tensor_attn_step",
    "poly_rank",
    "BACKENDS",
    "EPS",
    "MAX_RANK",
    "MAX_DEGREE",
]
