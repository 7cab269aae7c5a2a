"""Scale-out on ``torch.distributed``: context-parallel tensor attention and data-parallel training helpers.

Context parallelism (the sequence split across ranks)
----------------------------------------------------
Every rank of a process group holds one contiguous shard ``[B, T_r, H, D]`` of each of ``q, k1, k2, v1,
v2``; rank 0 holds the first positions, rank ``W - 1`` the last. Shards may have different lengths
(``T_r >= 1``); the result on each rank is the corresponding rows of the single-process result, and the
gradients with respect to the local shards are the corresponding rows of the single-process gradients.

* :func:`cp_poly_tensor_attn` (polynomial method, docs/math.md#non-causal and docs/math.md#causal). The polynomial softmax factorises
  through fixed-size states per key/value head::

      S2 = sum_j U2[j] ⊗ V1[j]   [k, Dv]      z2 = sum_j U2[j]   [k]
      S3 = sum_j U3[j] ⊗ V2[j]   [k, Dv]      z3 = sum_j U3[j]   [k]
      o[i] = U1[i] · (S2 ∘ S3) / U1[i] · (z2 ∘ z3)

  so ranks exchange ``2·k·(Dv + 1)`` numbers per head instead of keys and values. Non-causal: one
  all-reduce of the local states. Causal: an all-gather of the local totals, then the exclusive prefix
  ``P`` (sum over the ranks before this one), combined with the local running sums ``L_i``::

      (P2 + L2_i) ∘ (P3 + L3_i) = P2∘P3 + P2∘L3_i + L2_i∘P3 + L2_i∘L3_i

  i.e. the pairs with both keys on earlier ranks, the two cross terms, and the purely local causal term.
  Uneven shard lengths need nothing special (sums do not care how long a shard is).

* :func:`cp_tensor_attn` (exact windowed attention). A window ``(w1, w2)`` makes query ``i`` read only the
  keys ``i - max(w1, w2) < j <= i``, so each rank needs the last ``h = max(w1, w2) - 1`` keys and values
  before its shard (the *halo*). The halo is exchanged with one all-gather of every rank's last ``h``
  positions (so a halo may span several earlier ranks when shards are shorter than ``h``), then the
  local op runs on ``[halo; shard]`` and only the local queries are kept.

Both are differentiable: the collectives are :class:`torch.autograd.Function` s whose backward is the
adjoint collective (the backward of an all-reduce-sum is an all-reduce-sum of the gradients; the backward
of an all-gather sums, over ranks, the gradients that reach each rank's slot). The gradient convention is
the usual one: the global loss is the *sum* of the per-rank losses.

Data parallelism
----------------
:func:`init_distributed` reads torchrun's environment (gloo on the CPU, nccl on CUDA; NVLink multicast
left off), :func:`wrap_model` wraps a model in DDP or FSDP2 (``torch.distributed.fsdp.fully_shard``),
:func:`is_main_process` / :func:`print0` / :func:`save_checkpoint` guard rank-0-only work, and
:func:`shard_range` / :func:`shard_batch` / :func:`shard_sequence` split data.
Under a plain ``python`` launch (no torchrun) everything degrades to a single process with world size 1.

Example (``torchrun --nproc_per_node=N script.py``)::

    info = init_distributed()                       # rank, world_size, device
    model = wrap_model(Transformer(...).to(info.device), "ddp")
    x = shard_batch(global_batch, info.rank, info.world_size).to(info.device)
    ...
    save_checkpoint(path, model=model, optimizer=opt, step=step)   # collective; rank 0 writes
    cleanup()
"""
from __future__ import annotations

from .process_group import (
    DistInfo, init_distributed, cleanup, get_rank, get_world_size, is_main_process, print0, rank0_only, barrier,
    all_reduce_mean,
)
from .checkpoint import (
    wrap_model, unwrap_model, model_state_dict, save_checkpoint, load_checkpoint, read_checkpoint,
    CheckpointError,
)
from .sharding import shard_range, shard_batch, shard_sequence, gather_sequence
from .collectives import all_reduce_sum, all_gather_stack
from .context_parallel import cp_poly_tensor_attn, cp_tensor_attn

__all__ = [
    "DistInfo",
    "init_distributed",
    "cleanup",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "print0",
    "rank0_only",
    "barrier",
    "all_reduce_mean",
    "wrap_model",
    "unwrap_model",
    "model_state_dict",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "CheckpointError",
    "shard_range",
    "shard_batch",
    "shard_sequence",
    "gather_sequence",
    "all_reduce_sum",
    "all_gather_stack",
    "cp_poly_tensor_attn",
    "cp_tensor_attn",
]
