"""Backend choice, shared by every op (after xformers' ``fmha/dispatch.py``).

A backend declares what it supports through ``not_supported_reasons(**problem)``, which returns a list of
human-readable strings (empty = supported). ``choose`` returns the first backend, in priority order,
that supports a problem; a forced choice that does not fit, or a problem no backend fits, raises a
``ValueError`` that lists every backend's reasons.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any, Dict, List, Sequence

import torch


class Backend:
    """Base class: subclasses set ``name`` and override ``not_supported_reasons``."""

    name: str = "?"

    def not_supported_reasons(self, **problem: Any) -> List[str]:  # pragma: no cover - interface
        return []

    def __repr__(self) -> str:
        return f"<backend {self.name}>"


def no_autocast(fn):
    """For ``autograd.Function.forward``/``backward``: run with autocast off on the inputs' device.

    The ops accumulate in float32 on their own; under a caller's autocast the torch paths' matmuls would
    silently drop to bf16 in the forward, while the backward (which autocast does not reach) recomputes in
    float32, so the two would no longer describe the same function.
    """
    @functools.wraps(fn)
    def wrapper(ctx, *args):
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        with torch.autocast(device, enabled=False):
            return fn(ctx, *args)

    return wrapper


def triton_available() -> bool:
    """Triton is importable and can run: on a CUDA device, or on the CPU under TRITON_INTERPRET=1."""
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_device_reasons(device) -> List[str]:
    """Why a Triton backend cannot run on ``device`` (empty if it can): Triton installed, and CUDA, or the CPU
    under ``TRITON_INTERPRET=1``."""
    reasons = [] if triton_available() else ["triton is not installed"]
    if device.type == "cpu":
        if not triton_interpret():
            reasons.append("inputs are on the CPU and TRITON_INTERPRET=1 is not set (the kernels need CUDA)")
    elif device.type != "cuda":
        reasons.append(f"device type {device.type!r} is not supported (needs cuda)")
    return reasons


def choose(backends: Sequence[Backend], requested: str, problem: Dict[str, Any], *, op: str) -> Backend:
    """Pick a backend. ``requested`` is ``"auto"`` or a backend's name."""
    by_name = {b.name: b for b in backends}
    if requested != "auto":
        if requested not in by_name:
            raise ValueError(f"backend must be 'auto' or one of {sorted(by_name)} for {op}, got {requested!r}")
        reasons = by_name[requested].not_supported_reasons(**problem)
        if reasons:
            raise ValueError(f"backend {requested!r} cannot run this {op} call: " + "; ".join(reasons))
        return by_name[requested]
    all_reasons = {}
    for b in backends:
        reasons = b.not_supported_reasons(**problem)
        if not reasons:
            return b
        all_reasons[b.name] = reasons
    detail = "\n".join(f"  {n}: " + "; ".join(r) for n, r in all_reasons.items())
    raise ValueError(f"no backend can run this {op} call:\n{detail}")
