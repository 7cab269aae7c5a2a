"""Backend choice, shared by every op (after xformers' ``fmha/dispatch.py``).

A backend declares what it supports through ``not_supported_reasons(**problem)``, which returns a list of
human-readable strings (empty = supported). ``choose`` returns the first backend, in priority order,
that supports a problem; a forced choice that does not fit, or a problem no backend fits, raises a
``ValueError`` that lists every backend's reasons.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Any, Dict, List, Sequence

import torch


class Backend:
    """The protocol of every op's backends (the exact op's in :mod:`tensorattn.exact`, the polynomial op's in
    :mod:`tensorattn.poly.op`), each registered by ``name`` in the op's ``BACKENDS`` dict:

    * ``not_supported_reasons(**problem) -> list of str``: why this backend cannot run a call (empty: it can);
      :func:`choose` picks with it.
    * ``fwd(q, k1, k2, v1, v2, **cfg) -> (o, *saved)``: the forward, not differentiable itself, returning the
      output and what the backward needs (exact: the log-sum-exp; poly: a list of tensors).
    * ``bwd(do, q, k1, k2, v1, v2, o, *saved, **cfg) -> (dq, dk1, dk2, dv1, dv2)``: the backward.

    The op's one custom-op pair (``tensorattn::exact_fwd/bwd``, ``tensorattn::poly_fwd/bwd``) calls ``fwd`` and
    ``bwd`` of the backend it names and carries the autograd; the polynomial backends add ``plan`` (block sizes
    fixed at the forward) and ``fake_fwd`` (output shapes for ``torch.compile``)."""

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
        with autocast_off(device):
            return fn(ctx, *args)

    return wrapper


def autocast_off(device_type: str):
    """``torch.autocast(device_type, enabled=False)`` where autocast exists for that device type, else a no-op
    context (the meta device has no autocast: ``torch.autocast("meta", ...)`` raises ``unsupported scalarType``,
    and there is nothing to turn off there)."""
    available = getattr(torch.amp, "is_autocast_available", None)
    if available is not None and not available(device_type):
        return contextlib.nullcontext()
    if available is None and device_type not in ("cpu", "cuda", "xpu", "mps", "hpu"):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


class _DoubleBackwardError(torch.autograd.Function):
    """Passes the first ``n`` tensors (the gradients of a hand-written backward) through and takes the tensors
    they depend on (incoming gradients, saved inputs) as extra inputs, so that a second differentiation reaches
    this node, whose backward raises, instead of treating the gradients as constants."""

    @staticmethod
    def forward(ctx, op: str, n: int, *tensors):
        ctx.op = op
        return tuple(t.clone() for t in tensors[:n])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(double_backward_message(ctx.op))


def double_backward_message(op: str) -> str:
    """The error of a double backward through ``op`` (shared by the autograd Functions and the custom ops)."""
    return (f"{op} does not support double backward: its backward is hand-written and not differentiable, so the "
            "gradient of its gradient (create_graph=True, then a second backward; gradgradcheck; Hessian-vector "
            "products) would be wrong")


def refuse_double_backward_op(backward_op, op: str) -> None:
    """For a ``torch.library.custom_op`` that computes a hand-written backward: register its autograd so that
    differentiating its outputs (a double backward of ``op``) raises a ``RuntimeError`` naming ``op``.

    The custom-op counterpart of :func:`refuse_double_backward`: under ``create_graph=True`` the backward op is
    called with the saved inputs and the incoming gradients, so its outputs are connected to both and a second
    differentiation (with respect to either) reaches this formula, which raises instead of treating the
    gradients as constants."""

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(double_backward_message(op))

    backward_op.register_autograd(backward, setup_context=setup_context)


def refuse_double_backward(op: str):
    """For ``autograd.Function.backward``: run the backward without recording a graph and, when a graph is being
    built (``create_graph=True``), return gradients whose own backward raises a ``RuntimeError`` saying that
    ``op`` does not support double backward. This is ``torch.autograd.function.once_differentiable`` with a
    message that names the op, and connected to the saved inputs too, so that differentiating the gradients
    with respect to the inputs raises rather than reporting them unused (or, with ``allow_unused``, zero)."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(ctx, *grad_outputs):
            with torch.no_grad():
                grads = fn(ctx, *grad_outputs)
            if not torch.is_grad_enabled():  # create_graph=False: nobody will differentiate these
                return grads
            single = not isinstance(grads, tuple)
            grads = (grads,) if single else grads
            idx = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
            deps = [t for t in (*grad_outputs, *getattr(ctx, "saved_tensors", ()))
                    if isinstance(t, torch.Tensor) and t.requires_grad]
            if not idx or not deps:
                return grads[0] if single else grads
            wrapped = _DoubleBackwardError.apply(op, len(idx), *(grads[i] for i in idx), *deps)
            out = list(grads)
            for i, w in zip(idx, wrapped):
                out[i] = w
            return out[0] if single else tuple(out)

        return wrapper

    return deco


# looked up once at import: torch.compile cannot trace importlib's find_spec (it graph-breaks, and fullgraph fails)
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Triton is importable and can run: on a CUDA device, or on the CPU under TRITON_INTERPRET=1."""
    return _TRITON_INSTALLED


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# dtypes whose tl.dot the Triton interpreter computes wrongly (bf16 products off by ~1e9 with Triton 3.x)
_INTERPRETER_BAD_DTYPES = (torch.bfloat16, torch.float16)


def triton_interpreter_dtype_reasons(dtype) -> List[str]:
    """Why a Triton backend must not run ``dtype`` here (empty if it may): under ``TRITON_INTERPRET=1`` every
    kernel runs in the interpreter, whose bfloat16/float16 ``tl.dot`` gives wrong results, so only float32
    (and wider) is declared. Shared by every Triton backend (exact and poly ops)."""
    if triton_interpret() and dtype in _INTERPRETER_BAD_DTYPES:
        return [f"dtype {dtype} under TRITON_INTERPRET=1: the Triton interpreter's bfloat16/float16 tl.dot "
                "products are wrong, so the interpreter runs float32 only"]
    return []


def triton_device_reasons(device, dtype=None) -> List[str]:
    """Why a Triton backend cannot run on ``device`` (empty if it can): Triton installed, and CUDA, or the CPU
    under ``TRITON_INTERPRET=1``. With ``dtype``, also :func:`triton_interpreter_dtype_reasons`."""
    reasons = [] if triton_available() else ["triton is not installed"]
    if device.type == "cpu":
        if not triton_interpret():
            reasons.append("inputs are on the CPU and TRITON_INTERPRET=1 is not set (the kernels need CUDA)")
    elif device.type != "cuda":
        reasons.append(f"device type {device.type!r} is not supported (needs cuda)")
    if dtype is not None:
        reasons += triton_interpreter_dtype_reasons(dtype)
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
