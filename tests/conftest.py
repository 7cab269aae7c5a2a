import functools
import os
import subprocess
import sys

import pytest
import torch

# Two cores on CI: keep intra-op threads at one per worker so tests do not fight each other.
torch.set_num_threads(int(os.environ.get("TENSORATTN_TEST_THREADS", "1")))
# inductor (the compile tests) compiles in this process instead of keeping a pool of compile workers alive beside
# the spawned gloo ranks of the distributed tests
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


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
