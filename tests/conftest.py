import os

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
