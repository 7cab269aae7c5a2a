"""Autograd-aware collectives: all-reduce-sum and all-gather whose backward is the adjoint collective."""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist

from .process_group import _active, get_world_size


class _AllReduceSum(torch.autograd.Function):
    """``y = sum over ranks of x`` on every rank. Backward: ``dx = sum over ranks of dy`` (the adjoint)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.contiguous().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, dy):
        dx = dy.contiguous().clone()
        dist.all_reduce(dx, op=dist.ReduceOp.SUM, group=ctx.group)
        return dx, None


class _AllGatherStack(torch.autograd.Function):
    """``y[r] = x on rank r`` (stacked on a new dim 0) on every rank; shapes must agree across ranks.

    Backward: rank ``r``'s input influenced slot ``r`` of every rank's output, so
    ``dx = sum over ranks of dy[r]``: an all-reduce of the stacked gradient, then this rank's slot
    (gloo has no reduce-scatter; the states gathered here are small).
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        x = x.contiguous()
        outs = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(outs, x, group=group)
        return torch.stack(outs)

    @staticmethod
    def backward(ctx, dy):
        dy = dy.contiguous().clone()
        dist.all_reduce(dy, op=dist.ReduceOp.SUM, group=ctx.group)
        return dy[ctx.rank], None


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable sum of ``x`` over the ranks of ``group`` (identity without a process group)."""
    if not _active() or get_world_size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group)


def all_gather_stack(x: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable all-gather: ``[W, *x.shape]`` with slot ``r`` holding rank ``r``'s ``x``.

    ``x`` must have one shape on every rank. Without a process group: ``x[None]``.
    """
    if not _active() or get_world_size(group) == 1:
        return x[None]
    return _AllGatherStack.apply(x, group)


def _all_lengths(n: int, device, group=None) -> List[int]:
    """Every rank's local length (one small all-gather, no autograd)."""
    if not _active() or get_world_size(group) == 1:
        return [int(n)]
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([int(n)], dtype=torch.int64, device=device)
    outs = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(outs, t, group=group)
    return [int(o) for o in outs]
