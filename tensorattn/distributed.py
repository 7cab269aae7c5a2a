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

import dataclasses
import functools
import io
import os
import pickle
import re
import warnings
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ._io import atomic_write
from ._validate import check_attn_inputs, check_bool, check_optional_bool, check_scale
from ._validate import check_finite as _check_finite_values
from .dispatch import no_autocast, refuse_double_backward

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

STRATEGIES = ("ddp", "fsdp", "none")


# ==================================================================================================
# Process group
# ==================================================================================================
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


# ==================================================================================================
# Data parallel wrapping and checkpoints
# ==================================================================================================
def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6 (FSDP2)
    except ImportError:  # pragma: no cover - older torch
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def wrap_model(model: nn.Module, strategy: str = "ddp", *, device: Optional[torch.device] = None,
               shard_modules: Optional[Sequence[nn.Module]] = None, **ddp_kwargs) -> nn.Module:
    """Wrap ``model`` (already on its device) for data-parallel training.

    * ``"ddp"``: :class:`torch.nn.parallel.DistributedDataParallel`: a full replica per rank, gradients
      averaged over ranks during ``backward``. ``device_ids`` is set on CUDA.
    * ``"fsdp"``: FSDP2, ``torch.distributed.fsdp.fully_shard``: parameters, gradients and optimizer
      state sharded over ranks (DTensor parameters), gathered per module around its forward/backward.
      Each module of ``shard_modules`` (default: every element of ``model.blocks`` when the model has
      such a list, as :class:`tensorattn.model.Transformer` does) becomes its own unit, then the root.
      Gradients are averaged over ranks, like DDP. Build the optimizer *after* wrapping.
    * ``"none"``: the model unchanged.

    Without a process group (a plain ``python`` run) every strategy returns the model unchanged, so one
    training script serves both launches.

    Args:
        model: the module, its parameters on ``device``.
        strategy: ``"ddp"``, ``"fsdp"`` or ``"none"``.
        device: the rank's device (default: the device of the first parameter).
        shard_modules: FSDP units (see above).
        **ddp_kwargs: passed to DDP (e.g. ``find_unused_parameters=True``).

    Returns:
        The wrapped module (DDP: a wrapper whose ``.module`` is the model; FSDP2: the same object, its
        class changed in place). :func:`unwrap_model` gives back the plain module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "none" or not _active():
        return model
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        if device.type == "cuda":
            ddp_kwargs.setdefault("device_ids", [device.index])
        return DDP(model, **ddp_kwargs)
    if ddp_kwargs:
        raise ValueError(f"keyword arguments {sorted(ddp_kwargs)} are for strategy='ddp' only")
    fully_shard = _fully_shard()
    from torch.distributed.device_mesh import init_device_mesh

    # FSDP2's default mesh is a CUDA one whenever CUDA exists, which would move the model of a CPU (gloo)
    # group to the GPU behind the caller's back; the mesh follows the group's backend instead (a model built
    # on the CPU or on meta inside an nccl group is still moved to the GPU by fully_shard)
    be = str(dist.get_backend())
    mesh = init_device_mesh("cpu" if be == "gloo" else "cuda" if be == "nccl" else device.type,
                            (dist.get_world_size(),))
    if shard_modules is None:
        shard_modules = list(getattr(model, "blocks", []))
    for m in shard_modules:
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (FSDP2 and unwrapped models are returned as they are)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def model_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict of a plain, DDP or FSDP2 model, with the plain model's key names.

    Collective under FSDP2 (every rank must call it); the result is the same on every rank.
    """
    if _active():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # cpu_offload=True would leave the other ranks with an empty dict; gather on every rank, then copy
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in sd.items()}
    return {k: v.detach().cpu() for k, v in unwrap_model(model).state_dict().items()}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with a message naming it: unreadable, truncated, not a checkpoint,
    holding Python objects other than plain data (refused unread: unpickling them could run code), holding
    non-finite tensors, or not fitting the model."""


# what a ``torch.load(..., weights_only=True)`` reads back besides tensors and containers
_PLAIN = (int, float, str, bool, type(None), torch.dtype, torch.device, torch.Size)


def _plain(obj: Any, where: str) -> Any:
    """``obj`` as data that ``torch.load(..., weights_only=True)`` reads back: numpy scalars become Python
    numbers, numpy arrays tensors, dataclasses dicts, a ``torch.Generator`` its state tensor; containers are
    converted recursively. Anything else is refused with a TypeError naming the entry."""
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN:
        return obj
    if type(obj).__module__ == "numpy":  # before the subclasses below: np.float64 is a float
        import numpy as np

        if isinstance(obj, np.generic) and not isinstance(obj, (np.object_, np.void)):
            return _plain(obj.item(), where)
        if isinstance(obj, np.ndarray) and obj.dtype.kind in "biufc":
            return torch.from_numpy(obj)
    for base in (bool, int, float, str):  # subclasses (an IntEnum, ...) as their plain value
        if isinstance(obj, base):
            return base.__str__(obj) if base is str else base(obj)
    if isinstance(obj, torch.Generator):
        return obj.get_state()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain(dataclasses.asdict(obj), where)
    if isinstance(obj, dict):
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return tuple(items) if type(obj) is tuple else items  # a namedtuple or list subclass: a plain list
    raise TypeError(f"save_checkpoint: entry {where} is a {type(obj).__module__}.{type(obj).__qualname__}, which "
                    "torch.load(weights_only=True) cannot read back; pass plain data (dicts, lists, tensors, numbers, "
                    "strings; RNG states as tensors)")


def save_checkpoint(path, *, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    **extra: Any) -> Optional[str]:
    """Save ``{"model": full state dict, "optimizer": full optimizer state, **extra}`` from rank 0, atomically.

    A collective (every rank must call it: FSDP2 gathers shards), then rank 0 writes ``path`` (via a
    temporary file and a rename, so a checkpoint is complete or absent) and all ranks wait for it.
    Works unchanged in a single process. ``extra`` holds e.g. ``step``, the config and RNG states; it is
    stored as plain data that :func:`load_checkpoint` reads with ``weights_only=True`` (numpy scalars become
    numbers, dataclasses dicts, a ``torch.Generator`` its state tensor); other objects raise a TypeError.

    Returns:
        ``str(path)`` on rank 0, ``None`` on the others.
    """
    state: Dict[str, Any] = {k: _plain(v, repr(k)) for k, v in extra.items()}
    state["model"] = model_state_dict(model)
    if optimizer is not None:
        if _active():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            state["optimizer"] = get_optimizer_state_dict(
                model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # rank 0 only
        else:
            state["optimizer"] = optimizer.state_dict()
    out = None
    if is_main_process():
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write(path, lambda f: f.write(buf.getvalue()), binary=True)
        out = str(path)
    barrier()
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(e).__name__}: {line[:160]}" if line else type(e).__name__


def _non_finite(state: Dict[str, Any]):
    """``(where, count)`` of the first floating-point tensor of the model or optimizer state holding NaN/Inf."""
    def walk(obj, where):
        if isinstance(obj, torch.Tensor):
            if (obj.is_floating_point() or obj.is_complex()) and obj.numel():
                fin = torch.isfinite(obj)
                if not bool(fin.all()):
                    yield where, int((~fin).sum())
        elif isinstance(obj, dict):
            for k, v in obj.items():
                yield from walk(v, f"{where}[{k!r}]")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                yield from walk(v, f"{where}[{i}]")

    for key in ("model", "optimizer", "opt"):
        if key in state:
            for hit in walk(state[key], key):
                return hit
    return None


def read_checkpoint(path, *, check_finite: bool = True, hint: str = "") -> Dict[str, Any]:
    """The dict stored in a :func:`save_checkpoint` file, read with ``torch.load(..., weights_only=True)``.

    Only tensors and plain data are unpickled: a file holding other Python objects (a crafted pickle whose
    objects would run code when loaded, or a checkpoint of another program) is refused unread. Every
    failure is a :class:`CheckpointError` naming ``path`` (``hint``, e.g. how to start afresh, is appended):
    an unreadable, truncated or garbage file, a file that is not a dict with a ``"model"`` state dict, and,
    with ``check_finite``, model or optimizer tensors holding NaN/Inf (a corrupt checkpoint).
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol ..." from foreign files: the error says more
            warnings.simplefilter("ignore")
            state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():
            # the line naming what was refused, e.g. "unsupported GLOBAL posix.system whose module posix is blocked"
            m = re.search(r"(unsupported (GLOBAL|global|operand)[^\n]*?)\.?(\n|$)", str(e), re.IGNORECASE)
            what = f" ({m.group(1).split(' was not an allowed')[0].strip()[:120]})" if m else ""
            raise CheckpointError(
                f"checkpoint {p} holds Python objects other than tensors and plain data{what}; refusing to load it, "
                "since unpickling them could run arbitrary code (tensorattn never writes such objects: the file "
                f"was written by another program or tampered with){hint}") from None
        raise CheckpointError(f"checkpoint {p} is truncated, corrupt or not a PyTorch checkpoint ({_first_line(e)})"
                              f"{hint}") from None
    except (IsADirectoryError, PermissionError) as e:
        raise CheckpointError(f"checkpoint {p} cannot be read ({_first_line(e)}){hint}") from None
    except Exception as e:  # EOFError, RuntimeError (zip), KeyError (legacy format), OSError, ...
        raise CheckpointError(f"checkpoint {p} is truncated, corrupt or not a PyTorch checkpoint ({_first_line(e)})"
                              f"{hint}") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        got = (f"a dict with keys {sorted(map(str, state))[:8]}" if isinstance(state, dict)
               else f"a {type(state).__name__}")
        raise CheckpointError(f"checkpoint {p} is not a tensorattn checkpoint: expected a dict with a 'model' state "
                              f"dict, got {got}{hint}")
    if check_finite:
        bad = _non_finite(state)
        if bad is not None:
            raise CheckpointError(f"checkpoint {p} is corrupt: {bad[0]} holds {bad[1]} non-finite value(s) (NaN or "
                                  f"Inf); expected finite weights and optimizer state{hint}")
    return state


def load_checkpoint(path, *, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    check_finite: bool = True) -> Dict[str, Any]:
    """Load a :func:`save_checkpoint` file into a plain, DDP or FSDP2 model (and optimizer) on every rank.

    Every rank reads ``path`` (it must be visible to all ranks, as on one host) with
    :func:`read_checkpoint` (``weights_only=True``: a file holding other Python objects is refused unread;
    ``check_finite`` refuses NaN/Inf weights, pass False for a model with non-finite buffers); ``path``
    may also be the dict already read from such a file. Returns the other entries (``step`` etc.).
    Raises :class:`CheckpointError` naming the file when it cannot be read or does not fit the model.
    """
    state = path if isinstance(path, dict) else read_checkpoint(path, check_finite=check_finite)
    name = "the checkpoint" if isinstance(path, dict) else f"checkpoint {os.fspath(path)}"
    if not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{name} has no 'model' state dict (keys: {sorted(map(str, state))[:8]})")
    try:
        if _active():
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(model, state["model"], options=opts)
            if optimizer is not None and "optimizer" in state:
                set_optimizer_state_dict(model, optimizer, state["optimizer"], options=opts)
        else:
            unwrap_model(model).load_state_dict(state["model"])
            if optimizer is not None and "optimizer" in state:
                optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        raise CheckpointError(f"{name} does not fit the model or optimizer ({_first_line(e)})") from None
    return {k: v for k, v in state.items() if k not in ("model", "optimizer")}


# ==================================================================================================
# Sharding data
# ==================================================================================================
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


# ==================================================================================================
# Autograd-aware collectives
# ==================================================================================================
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


# ==================================================================================================
# Context-parallel polynomial tensor attention
# ==================================================================================================
def _poly_features(q, k1, k2, degree: int, scale: float):
    """``(U1, U2, U3)``: the feature maps of :mod:`tensorattn.poly` (its ``_Feat``), in its accumulation dtype.

    ``U1[i] · (U2[j1] ∘ U3[j2]) = P(scale · <q_i, k1_j1 ∘ k2_j2>)`` with ``P`` the degree-``g`` Taylor
    polynomial of exp (docs/math.md#polynomial): ``U1[i, β] = (scale q_i)^β / β!``, ``U2[j, β] = k1_j^β``, ``U3[j, β] = k2_j^β``.
    """
    from .poly import _acc, _Feat

    acc = _acc(q.dtype)
    feat = _Feat(q.shape[-1], degree, scale, acc, q.device)
    return feat.q(q.to(acc)), feat.k(k1.to(acc)), feat.k(k2.to(acc))


def _pack_states(U2, U3, v1, v2):
    """Per-head totals of one shard packed as ``[B, Hkv, k, 2 Dv + 2]`` = ``[S2 | S3 | z2 | z3]``."""
    S2 = torch.einsum("bjhl,bjhe->bhle", U2, v1)  # [B, Hkv, k, Dv]
    S3 = torch.einsum("bjhl,bjhe->bhle", U3, v2)
    z2 = U2.sum(1)[..., None]  # [B, Hkv, k, 1]
    z3 = U3.sum(1)[..., None]
    return torch.cat([S2, S3, z2, z3], -1)


def _combine_states(local, causal: bool, group):
    if not causal:
        return all_reduce_sum(local, group)
    allst = all_gather_stack(local, group)  # [W, B, Hkv, k, 2Dv+2]
    # rank 0 sums an empty slice (zeros) but stays connected to the gather, so that every rank takes
    # part in the gather's backward collective
    return allst[:get_rank(group)].sum(0)


class _ShardTotals(torch.autograd.Function):
    """Packed totals ``[S2 | S3 | z2 | z3]`` of a shard's keys, ``chunk`` positions at a time.

    Nothing of size ``T_r x k`` is kept: the backward recomputes each chunk's features.
    """

    @staticmethod
    @no_autocast
    def forward(ctx, k1, k2, v1, v2, feat, chunk):
        acc = feat.w.dtype
        tot = None
        for t0 in range(0, k1.shape[1], chunk):
            sl = slice(t0, t0 + chunk)
            part = _pack_states(feat.k(k1[:, sl].to(acc)), feat.k(k2[:, sl].to(acc)), v1[:, sl].to(acc),
                                v2[:, sl].to(acc))
            tot = part if tot is None else tot + part
        ctx.save_for_backward(k1, k2, v1, v2)
        ctx.cfg = (feat, chunk)
        return tot

    @staticmethod
    @refuse_double_backward("cp_poly_tensor_attn")
    @no_autocast
    def backward(ctx, g):
        from .poly import _chunk_grads

        k1, k2, v1, v2 = ctx.saved_tensors
        feat, chunk = ctx.cfg
        acc = feat.w.dtype
        grads = [torch.empty(x.shape, dtype=acc, device=x.device) for x in (k1, k2, v1, v2)]

        def part(a, b, c, d):
            return _pack_states(feat.k(a), feat.k(b), c, d)

        for t0 in range(0, k1.shape[1], chunk):
            sl = slice(t0, t0 + chunk)
            gs = _chunk_grads(part, [x[:, sl].to(acc) for x in (k1, k2, v1, v2)], g)
            for buf, gx in zip(grads, gs):
                buf[:, sl] = gx
        return tuple(gx.to(x.dtype) for gx, x in zip(grads, (k1, k2, v1, v2))) + (None, None)


def _cp_check_finite(flag, xs: Sequence[torch.Tensor], group) -> None:
    """The non-finite rule of the single-process ops (``check_finite``: ``True`` always, ``False`` never,
    ``None`` only for CPU tensors), decided together by the ranks of ``group``: a NaN/Inf on one rank makes
    every rank raise (so none is left waiting in a collective), the owner naming its input."""
    flag = check_optional_bool("check_finite", flag)
    if not (flag or (flag is None and xs[0].device.type == "cpu")):
        return
    names = ("q", "k1", "k2", "v1", "v2")
    try:
        _check_finite_values(names, xs)
        err = None
    except ValueError as e:
        err = e
    if _active() and get_world_size(group) > 1:
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else \
            torch.device("cpu")
        t = torch.tensor([get_rank(group) if err is not None else -1], dtype=torch.int64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        owner = int(t)
        if err is None and owner >= 0:
            raise ValueError(f"the inputs of rank {owner} (of this group) contain non-finite values (NaN or Inf); "
                             "expected finite q, k1, k2, v1 and v2 on every rank")
    if err is not None:
        raise err


def cp_poly_tensor_attn(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor, *,
                        degree: int = 2, causal: bool = False, scale: Optional[float] = None, group=None,
                        chunk_size: Optional[int] = None, check_finite: Optional[bool] = None) -> torch.Tensor:
    """Context-parallel polynomial tensor attention: this rank's rows of ``poly_tensor_attn`` on the whole sequence.

    The sequence axis is split across the ranks of ``group`` in rank order; this rank passes its
    contiguous shard and gets back the rows of the single-process result
    :func:`tensorattn.poly.poly_tensor_attn` (same feature map, scale and degree) for those positions.
    Semantics of that op: the joint softmax over key pairs ``(j1, j2)`` with ``exp`` replaced by the
    degree-``g`` Taylor polynomial ``P`` of ``exp``::

        o[i] = sum_{j1, j2 visible} P(s[i, j1, j2]) v1[j1] ∘ v2[j2] / (EPS + sum_{j1, j2 visible} P(s[i, j1, j2]))

    with ``s = scale · <q_i, k1_j1 ∘ k2_j2>``; visible pairs are all pairs of the *whole* sequence, or
    with ``causal`` the pairs with ``j1 <= i`` and ``j2 <= i`` in global positions. Communication per
    call: one all-reduce (non-causal) or one all-gather (causal) of ``B · Hkv · k · (2 Dv + 2)`` numbers,
    ``k = C(D + g, g)``, independent of the sequence length; the same again in the backward.
    Shards may have different lengths on different ranks (each ``>= 1``). Without a process group (or
    with one rank) it is the single-process op.

    Args:
        q: ``[B, T_r, Hq, D]`` this rank's queries.
        k1, k2: ``[B, T_r, Hkv, D]``; v1, v2: ``[B, T_r, Hkv, Dv]`` this rank's keys and values
            (the same positions as ``q``; ``Hq`` a multiple of ``Hkv``).
        degree: even Taylor degree ``g >= 2`` (odd degrees are refused: the normaliser could be <= 0).
        causal: causal mask in global positions.
        scale: score scale, default ``1 / sqrt(D)``.
        group: the process group the sequence is split over (default: the world).
        chunk_size: causal only: running sums are formed ``chunk_size`` positions at a time, and the
            backward recomputes each chunk (a memory knob; the result does not depend on it). ``None``:
            as many positions as keep one ``[B, chunk, Hkv, k, Dv]`` running sum under 2^26 entries.
        check_finite: refuse NaN/Inf inputs with a ``ValueError``, as :func:`tensorattn.poly.poly_tensor_attn`
            does: ``None`` (default) checks CPU inputs only (on a GPU the check costs a synchronisation),
            ``True`` always, ``False`` never. Under a process group the ranks decide together (one small
            all-reduce), so every rank raises when one rank's shard is not finite.

    Returns:
        ``[B, T_r, Hq, Dv]`` in the input dtype. Differentiable with respect to all five local inputs;
        gradients equal the corresponding rows of the single-process gradients of the summed per-rank loss.

    Memory beyond the inputs, per head: ``O(T_r · k)`` non-causal; causal ``O(chunk · k · Dv)`` for the
    running sums plus ``O(T_r / chunk · k · Dv)`` for the saved chunk-start states (nothing ``T_r x k``
    is kept). Accumulates in float32 (float64 for float64).
    """
    B, T, Hq, Hkv, D, Dv, S1, S2, _ = check_attn_inputs(q, k1, k2, v1, v2)
    _cp_check_finite(check_finite, (q, k1, k2, v1, v2), group)
    if not (S1 == S2 == T):
        raise ValueError(f"context parallelism needs q, k1 and k2 shards of one length (the same positions), got "
                         f"T={T}, len(k1)={S1}, len(k2)={S2}")
    causal = check_bool("causal", causal)
    from .poly import _check_degree

    degree = _check_degree(degree)
    scale = check_scale(scale, D)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    from .poly import EPS, _unpack

    groups = Hq // Hkv
    if causal:
        from .poly import _acc, _Feat, _scan_attn, _scan_chunk

        feat = _Feat(D, degree, scale, _acc(q.dtype), q.device)
        chunk = chunk_size or _scan_chunk(T, B, Hkv, feat.w.numel(), Dv)
        totals = _ShardTotals.apply(k1, k2, v1, v2, feat, chunk)  # [B, Hkv, k, 2Dv+2]
        return _scan_attn(q, k1, k2, v1, v2, _combine_states(totals, True, group), feat, chunk)
    with torch.autocast(q.device.type, enabled=False):  # float32 sums, also under a caller's autocast
        U1, U2, U3 = _poly_features(q, k1, k2, degree, scale)  # [B, T_r, H, k] in the accumulation dtype
        x1, x2 = v1.to(U1.dtype), v2.to(U1.dtype)
        states = _combine_states(_pack_states(U2, U3, x1, x2), False, group)  # [B, Hkv, k, 2Dv+2]
        S2_, S3_, z2, z3 = _unpack(states, Dv)
        U1g = U1.view(B, T, Hkv, groups, U1.shape[-1])
        num = torch.einsum("bihgl,bhle->bihge", U1g, S2_ * S3_)  # [B, T_r, Hkv, G, Dv]
        den = torch.einsum("bihgl,bhl->bihg", U1g, z2 * z3)  # [B, T_r, Hkv, G]
        return (num / (den[..., None] + EPS)).reshape(B, T, Hq, Dv).to(q.dtype)


# ==================================================================================================
# Context-parallel exact windowed tensor attention (halo exchange)
# ==================================================================================================
def _exact_op():
    try:
        from .exact import tensor_attn
    except ModuleNotFoundError as e:  # pragma: no cover - exact.py is part of the package
        if e.name != "tensorattn.exact":
            raise
        tensor_attn = None
    return tensor_attn


def cp_tensor_attn(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor, *,
                   window, scale: Optional[float] = None, backend: str = "auto", group=None,
                   check_finite: Optional[bool] = None) -> torch.Tensor:
    """Context-parallel exact windowed tensor attention: this rank's rows of ``tensor_attn(..., window=window)``.

    Semantics are those of :func:`tensorattn.naive_tensor_attn` with ``window=(w1, w2)`` on the whole
    sequence (split across the ranks of ``group`` in rank order): query ``i`` sees the pairs with
    ``i - w1 < j1 <= i`` and ``i - w2 < j2 <= i`` (global positions). A rank needs the
    ``h = max(w1, w2) - 1`` positions of keys and values just before its shard (fewer on the first
    positions of the sequence). They come from one differentiable all-gather of every rank's last ``h``
    key/value rows (so a halo spans several ranks when shards are shorter than ``h``); then the exact op
    :func:`tensorattn.exact.tensor_attn` runs on ``[halo; shard]`` with placeholder queries on the halo
    rows, and only this rank's rows are returned. The gradient of the halo rows is sent back to the ranks
    that own them by the all-gather's backward. Shards may have different lengths (each ``>= 1``).

    Extra work: ``h`` placeholder query rows per rank (``h · w1 · w2`` score triples) and an all-gather of
    ``W · B · h · Hkv · (2 D + 2 Dv)`` numbers.

    Args:
        q: ``[B, T_r, Hq, D]``; k1, k2: ``[B, T_r, Hkv, D]``; v1, v2: ``[B, T_r, Hkv, Dv]`` this rank's shard.
        window: ``w`` or ``(w1, w2)``, both ``>= 1`` (required: unbounded causal attention would need every
            earlier key on every rank).
        scale: default ``1 / sqrt(D)``.
        backend: backend of :func:`tensorattn.exact.tensor_attn` (``"auto"``, ``"triton"``, ``"torch"``, ``"naive"``).
        group: the process group the sequence is split over (default: the world).
        check_finite: as in :func:`cp_poly_tensor_attn` (``None``: CPU inputs are checked).

    Returns:
        ``[B, T_r, Hq, Dv]`` in the input dtype, differentiable with respect to all five local inputs.
    """
    if window is None:
        raise ValueError("window must be given (w or (w1, w2)); context-parallel exact attention needs a bounded "
                         "window so that each rank only needs a halo of max(w1, w2) - 1 earlier keys")
    B, T, Hq, Hkv, D, Dv, S1, S2, win = check_attn_inputs(q, k1, k2, v1, v2, window=window)
    _cp_check_finite(check_finite, (q, k1, k2, v1, v2), group)
    op = _exact_op()
    h = max(win) - 1
    W = get_world_size(group)
    if h == 0 or W == 1:
        return op(q, k1, k2, v1, v2, scale=scale, window=win, backend=backend, check_finite=False)
    lens = _all_lengths(T, q.device, group)
    r = get_rank(group)
    kv = torch.cat([k1, k2, v1, v2], -1)  # [B, T_r, Hkv, 2D + 2Dv]: one collective for all four
    n_tail = min(h, T)
    tail = kv[:, T - n_tail:]
    if n_tail < h:
        tail = torch.cat([kv.new_zeros(B, h - n_tail, Hkv, kv.shape[-1]), tail], 1)  # pad at the front
    tails = all_gather_stack(tail, group)  # [W, B, h, Hkv, C]
    # valid rows of the earlier ranks, in order; rank 0 takes an empty slice, which keeps it connected to
    # the gather so that every rank takes part in the gather's backward collective
    before = [tails[s, :, h - min(h, lens[s]):] for s in range(r)] or [tails[0, :, :0]]
    halo = torch.cat(before, 1)[:, -h:]  # [B, h_r, Hkv, C], h_r = min(h, start of this shard)
    hr = halo.shape[1]
    ext = torch.cat([halo, kv], 1)
    ek1, ek2, ev1, ev2 = torch.split(ext, [D, D, Dv, Dv], -1)
    eq = torch.cat([q.new_zeros(B, hr, Hq, D), q], 1)  # placeholder queries; their rows are dropped
    o = op(eq, ek1.contiguous(), ek2.contiguous(), ev1.contiguous(), ev2.contiguous(), scale=scale, window=win,
           backend=backend, check_finite=False)  # checked above; the halo rows are other ranks' checked inputs
    return o[:, hr:]
