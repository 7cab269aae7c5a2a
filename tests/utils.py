"""Helpers shared by the tests: running code under Triton's interpreter in a subprocess.

``TRITON_INTERPRET=1`` must be set before triton is imported, so interpreter runs happen in a fresh process;
the variable then does not leak into the other test modules.
"""
import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRITON_INTERPRETER = importlib.util.find_spec("triton") is not None  # a core dependency; the probe is cheap


def interpreter_env() -> dict:
    """The environment of an interpreter subprocess: TRITON_INTERPRET=1, one thread, this checkout first."""
    return dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
                PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run_cuda(script: str, *args: str, timeout: int = 600) -> str:
    """Run ``python -c script args...`` compiled for the GPU (``TA_TEST_DEVICE=cuda``, no interpreter), skipping
    without CUDA: the interpreter scripts' twin on the real kernels. Asserts a zero exit status, returns stdout."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    env = dict(os.environ, TA_TEST_DEVICE="cuda", TRITON_INTERPRET="0",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def run_script(where: str, script: str, *args: str, timeout: int = 600) -> str:
    """``run_interpreter`` (where="interpreter") or ``run_cuda`` (where="cuda")."""
    return {"interpreter": run_interpreter, "cuda": run_cuda}[where](script, *args, timeout=timeout)


WHERE = ("interpreter", "cuda")


def run_interpreter(script: str, *args: str, timeout: int = 600) -> str:
    """Run ``python -c script args...`` under the interpreter (skipping if this Triton's interpreter is broken);
    asserts a zero exit status (with the end of stderr in the message) and returns stdout."""
    skip_if_interpreter_broken()
    r = subprocess.run([sys.executable, "-c", script, *args], env=interpreter_env(), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


# A kernel loop whose bound is a runtime argument: Triton 3.6's interpreter turns scalar arguments into
# 1-element arrays and calls int() on them, which numpy >= 2.3 refuses. Newer Triton squeezes them first.
_INTERPRETER_PROBE = """
import torch, triton, triton.language as tl

@triton.jit
def _k(o, n):
    s = 0
    for i in range(0, n):
        s += i
    tl.store(o, s)

o = torch.zeros(1, dtype=torch.int32)
_k[(1,)](o, 4)
assert int(o) == 6, int(o)
"""


@functools.lru_cache(maxsize=None)
def triton_interpreter_problem():
    """``None`` when this Triton's interpreter (``TRITON_INTERPRET=1``) runs a loop with a runtime bound,
    else the error it gives (a limitation of that Triton and numpy, not of tensorattn's kernels)."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _INTERPRETER_PROBE], env=env, capture_output=True, text=True,
                       timeout=300)
    if r.returncode == 0:
        return None
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit status {r.returncode}"


def skip_if_interpreter_broken():
    problem = triton_interpreter_problem()
    if problem is not None:
        import triton

        pytest.skip(f"the interpreter of triton {triton.__version__} cannot run a loop with a runtime bound "
                    f"here ({problem}); the kernels' interpreter tests need a newer triton")


def attn_inputs(B: int = 1, T: int = 8, Hq: int = 2, Hkv: int = None, D: int = 4, Dv: int = None, *, S1: int = None,
                S2: int = None, dtype=None, seed: int = 0, generator=None, q_scale: float = 1.0, k_scale: float = 1.0,
                v_scale: float = 1.0, requires_grad: bool = False):
    """The five inputs ``q [B, T, Hq, D], k1 [B, S1, Hkv, D], k2 [B, S2, Hkv, D], v1 [B, S1, Hkv, Dv],
    v2 [B, S2, Hkv, Dv]`` of the tensor-attention ops: standard normal draws in float64 in that order (from
    ``generator``, else one seeded with ``seed``), times the scales, cast to ``dtype`` (default float64), leaves
    with ``requires_grad``. Defaults: ``Hkv = Hq``, ``Dv = D``, ``S1 = S2 = T``."""
    import torch

    Hkv, Dv, S1, S2 = Hkv or Hq, Dv or D, S1 or T, S2 or T
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    shapes = [((B, T, Hq, D), q_scale), ((B, S1, Hkv, D), k_scale), ((B, S2, Hkv, D), k_scale),
              ((B, S1, Hkv, Dv), v_scale), ((B, S2, Hkv, Dv), v_scale)]
    out = [(c * torch.randn(*s, generator=g, dtype=torch.float64)).to(dtype or torch.float64) for s, c in shapes]
    return [x.requires_grad_(requires_grad) for x in out]
