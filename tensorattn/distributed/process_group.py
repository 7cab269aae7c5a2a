"""Process groups: start-up from torchrun's environment, ranks, rank-0 helpers and a mean all-reduce."""
from __future__ import annotations

import dataclasses
import functools
import os
from datetime import timedelta
from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its host, its ``device``,
    the process-group ``backend`` (``None`` without a process group) and whether :func:`init_distributed`
    created the group (then :func:`cleanup` destroys it)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Optional[str]
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {v!r}") from None


def init_distributed(backend: Optional[str] = None, *, device: Optional[str] = None, init_method: Optional[str] = None,
                     rank: Optional[int] = None, world_size: Optional[int] = None,
                     timeout_s: float = 600.0) -> DistInfo:
    """Join the process group that torchrun describes (or run as a single process without one).

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (set by ``torchrun``; ``MASTER_ADDR``/``MASTER_PORT``
    are read by ``torch.distributed`` itself). Without ``WORLD_SIZE`` in the environment and without an
    explicit ``world_size``/``init_method``, no process group is created: the result is rank 0 of 1 and
    every helper in this module works locally. Under ``torchrun --nproc_per_node=1`` a real group of size 1
    is created, so the collectives are exercised.

    The device is ``cuda:LOCAL_RANK`` when CUDA is available (and made current), else the CPU; the backend
    defaults to ``nccl`` on CUDA and ``gloo`` on the CPU. Joining an existing ``gloo`` group with
    ``device=None`` gives the CPU, also on a machine with a GPU. Before a nccl group is made,
    ``NCCL_NVLS_ENABLE=0`` and ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` are set unless already set
    (NVLink multicast stays off). Calling it again when a group exists returns the current placement.

    Args:
        backend: ``"gloo"``, ``"nccl"`` or ``None`` (choose by device).
        device: ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when available).
        init_method: e.g. ``"file:///tmp/x"`` (tests); default ``"env://"`` (torchrun).
        rank, world_size: override the environment (tests spawn processes without torchrun).
        timeout_s: collective timeout.

    Returns:
        :class:`DistInfo`.
    """
    if backend is not None and backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo', 'nccl' or None, got {backend!r}")
    if device is not None and device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or None, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but CUDA is not available")
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    local_rank = _env_int("LOCAL_RANK", 0 if rank is None else rank)
    dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count())) if use_cuda else torch.device("cpu")
    if dist.is_available() and dist.is_initialized():
        be = str(dist.get_backend())
        if device is None and be == "gloo":
            dev = torch.device("cpu")  # a gloo group serves CPU ranks: "choose" must not put them on a GPU
        elif dev.type == "cuda":
            dev = torch.device("cuda", torch.cuda.current_device())  # the caller placed this rank already
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, be, False)
    ws = world_size if world_size is not None else _env_int("WORLD_SIZE", -1)
    if ws == -1 and init_method is None:
        if use_cuda:
            torch.cuda.set_device(dev)
        return DistInfo(0, 1, 0, dev, None, False)
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of PyTorch")
    rk = rank if rank is not None else _env_int("RANK", 0)
    if ws < 1 or not (0 <= rk < ws):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rk}, world_size={ws}")
    backend = backend or ("nccl" if use_cuda else "gloo")
    if backend == "nccl":
        if not use_cuda:
            raise ValueError("backend='nccl' needs CUDA tensors; use backend='gloo' on the CPU")
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    if use_cuda:
        torch.cuda.set_device(dev)
    kw: Dict[str, Any] = dict(backend=backend, init_method=init_method or "env://", rank=rk, world_size=ws,
                              timeout=timedelta(seconds=timeout_s))
    if backend == "nccl":
        kw["device_id"] = dev  # binds the communicator to this GPU (avoids a guess at the first collective)
    dist.init_process_group(**kw)
    return DistInfo(rk, ws, local_rank, dev, backend, True)


def cleanup() -> None:
    """Destroy the default process group if one exists (call once at the end of a torchrun script, on every rank).
    A barrier first: a rank that tears its group down while another still sends can abort the other's gloo
    transport threads (seen as ``terminate called without an active exception`` in a spawned rank)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _active() -> bool:
    """A default process group exists (the world; every group lives inside it)."""
    return dist.is_available() and dist.is_initialized()


def get_rank(group=None) -> int:
    """Rank in ``group`` (default: the world), 0 without a process group."""
    return dist.get_rank(group) if _active() else 0


def get_world_size(group=None) -> int:
    """Size of ``group`` (default: the world), 1 without a process group."""
    return dist.get_world_size(group) if _active() else 1


def is_main_process() -> bool:
    """True on global rank 0 (and in a single process): the rank that logs and writes files."""
    return get_rank() == 0


def rank0_only(fn: Callable) -> Callable:
    """Decorator: run ``fn`` on rank 0 only; other ranks get ``None``. Never put a collective inside ``fn``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if is_main_process() else None

    return wrapper


@rank0_only
def print0(*args, **kwargs) -> None:
    """``print`` on rank 0 only (flushes, so torchrun's interleaved logs stay readable)."""
    kwargs.setdefault("flush", True)
    print(*args, **kwargs)


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if _active():
        dist.barrier()


def all_reduce_mean(x, group=None):
    """Mean of a float (or tensor) over the ranks of ``group``, for logging (no autograd).

    Returns the same type as given: a Python float for a number, a new tensor for a tensor.
    """
    if not _active() or get_world_size(group) == 1:
        return float(x) if not isinstance(x, torch.Tensor) else x.detach().clone()
    is_num = not isinstance(x, torch.Tensor)
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    t = torch.tensor(float(x), dtype=torch.float64, device=dev) if is_num else x.detach().clone()
    dist.all_reduce(t, group=group)
    t = t / dist.get_world_size(group)
    return float(t) if is_num else t
