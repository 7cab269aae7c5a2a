"""Data parallelism (DDP and FSDP2 wrapping) and checkpoints (atomic, safely loaded, validated)."""
from __future__ import annotations

import dataclasses
import io
import os
import pickle
import re
import warnings
from typing import Any, Dict, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .._io import atomic_write
from .process_group import _active, barrier, is_main_process


STRATEGIES = ("ddp", "fsdp", "none")


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
