import atexit
import os
import shutil
import tempfile

import pytest
import torch

# Two cores on CI: keep intra-op threads at one per worker so tests do not fight each other.
torch.set_num_threads(int(os.environ.get("TENSORATTN_TEST_THREADS", "1")))
# inductor (the compile tests) compiles in this process instead of keeping a pool of compile workers alive beside
# the spawned gloo ranks of the distributed tests
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
# a fresh inductor cache for each pytest run, shared by its xdist workers and the interpreter subprocesses (they
# inherit the variable): a graph cached by another version of this library (another custom-op fake, another kernel)
# is never reused by the tests. A cache directory set by the caller is kept.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="tensorattn-tests-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], True)


def pytest_collection_modifyitems(items):
    """Under pytest-xdist (``--dist loadgroup``, the Makefile) the tests of a module that uses a module-scoped fixture
    run in one worker, so the fixture (gloo ranks, a training run, a report) is built once."""
    for item in items:
        defs = getattr(item, "_fixtureinfo", None)
        if defs and any(d.scope == "module" for fd in defs.name2fixturedefs.values() for d in fd):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
