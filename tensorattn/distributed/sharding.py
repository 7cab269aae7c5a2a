"""Splitting batches and sequences over ranks, and gathering sequence shards back."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .collectives import _all_lengths
from .process_group import _active, get_rank, get_world_size


def _check_rank(rank, world_size) -> Tuple[int, int]:
    """``(rank, world_size)`` validated, ``None`` meaning this process's own."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    for nm, v in (("rank", rank), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{nm} must be an int, got {type(v).__name__} {v!r}")
    if world_size < 1 or not (0 <= rank < world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def shard_range(n: int, rank: Optional[int] = None, world_size: Optional[int] = None) -> Tuple[int, int]:
    """``(start, end)`` of rank ``rank``'s contiguous piece when ``n`` items are split over ``world_size`` ranks.

    The first ``n % world_size`` ranks get one item more (as ``torch.tensor_split``), so lengths differ by
    at most one; a rank gets an empty piece when ``n < world_size``. Defaults: this process's rank/size.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    rank, world_size = _check_rank(rank, world_size)
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_batch(x, rank: Optional[int] = None, world_size: Optional[int] = None, *, dim: int = 0,
                even: bool = True):
    """This rank's contiguous slice of a global batch along ``dim`` (a tensor, or a tuple/list of them).

    With ``even=True`` (default, what DDP's gradient averaging assumes: the mean of per-rank mean losses is
    the global mean loss only for equal pieces) the size along ``dim`` must be divisible by the world size.
    """
    if isinstance(x, (tuple, list)):
        return type(x)(shard_batch(t, rank, world_size, dim=dim, even=even) for t in x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor (or a tuple/list of them), got {type(x).__name__}")
    rank, world_size = _check_rank(rank, world_size)
    n = x.shape[dim]
    if even and n % world_size:
        raise ValueError(f"x has {n} items along dim {dim}, not divisible by world_size={world_size}; use a global "
                         "batch that is a multiple of the number of ranks (or even=False)")
    s, e = shard_range(n, rank, world_size)
    return x.narrow(dim, s, e - s)


def shard_sequence(x: torch.Tensor, rank: Optional[int] = None, world_size: Optional[int] = None, *,
                   lengths: Optional[Sequence[int]] = None, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous shard of the sequence axis (``dim=1`` of ``[B, T, H, D]``) for context parallelism.

    Default lengths are :func:`shard_range`'s near-even split; ``lengths`` (one per rank, summing to
    ``T``, each ``>= 1``) gives an explicit uneven split.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    rank, world_size = _check_rank(rank, world_size)
    T = x.shape[dim]
    if lengths is None:
        s, e = shard_range(T, rank, world_size)
    else:
        lengths = [int(v) for v in lengths]
        if len(lengths) != world_size or sum(lengths) != T or min(lengths) < 1:
            raise ValueError(f"lengths must hold world_size={world_size} ints >= 1 summing to the sequence length "
                             f"{T}, got {lengths}")
        s = sum(lengths[:rank])
        e = s + lengths[rank]
    return x.narrow(dim, s, e - s)


def gather_sequence(x: torch.Tensor, *, dim: int = 1, group=None) -> torch.Tensor:
    """Concatenate every rank's shard along ``dim`` in rank order (shards may differ in length; no autograd)."""
    if not _active() or get_world_size(group) == 1:
        return x
    lens = _all_lengths(x.shape[dim], x.device, group)
    m = max(lens)
    pad = list(x.shape)
    pad[dim] = m - x.shape[dim]
    xp = torch.cat([x, x.new_zeros(pad)], dim).contiguous()
    outs = [torch.empty_like(xp) for _ in lens]
    dist.all_gather(outs, xp, group=group)
    return torch.cat([o.narrow(dim, 0, n) for o, n in zip(outs, lens)], dim)
