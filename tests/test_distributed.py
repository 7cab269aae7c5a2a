"""tensorattn.distributed: context-parallel attention and data-parallel training on gloo (CPU).

One spawned group of 3 ranks checks every case (process start-up dominates the cost), in two parts:

* context parallelism: poly attention (causal and not, uneven shards, GQA, chunked causal path,
  degree 4) and exact windowed attention with a halo that spans several ranks; outputs and the gradients
  of all five inputs equal the single-process ones in float64;
* data parallelism: one DDP step and one FSDP2 step of the training code's model on a third of the
  batch each equal the single-process step on the whole batch; checkpoints round-trip.

Workers collect mismatches and report them only after the last collective (so a wrong result fails
its test instead of leaving the other ranks waiting); each part is one test.
"""
import copy
import json
import os
import sys
import tempfile

import pytest
import torch
from utils import attn_inputs
import torch.distributed as dist
import torch.multiprocessing as mp

from tensorattn import distributed as td
from tensorattn import poly as poly_mod
from tensorattn.naive import naive_tensor_attn
from tensorattn.poly import naive_poly_tensor_attn, poly_tensor_attn

F64 = torch.float64


def _spawn(world, fn, *args):
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the workers; two CPU cores are shared
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_entry, args=(world, os.path.join(d, "store"), d, fn, args), nprocs=world, join=True)


def _entry(rank, world, store, tmpdir, fn, args):
    torch.set_num_threads(1)
    info = td.init_distributed("gloo", device="cpu", init_method=f"file://{store}", rank=rank, world_size=world,
                               timeout_s=120)
    try:
        assert (info.rank, info.world_size, info.device.type, info.backend) == (rank, world, "cpu", "gloo")
        fn(rank, world, tmpdir, *args)
    finally:
        td.cleanup()
    # the rank's report is written and the group destroyed: leave without the interpreter's teardown, where a
    # gloo transport thread still being destroyed has aborted a rank now and then under load ("terminate called
    # without an active exception", about one full CI run in six) although every rank had finished its work
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _inputs(seed, B, T, Hq, Hkv, D, Dv, amp=1.0):
    g = torch.Generator().manual_seed(seed)
    xs = attn_inputs(B, T, Hq, Hkv, D, Dv, dtype=F64, generator=g, q_scale=amp, k_scale=amp)
    return tuple(xs), torch.randn(B, T, Hq, Dv, dtype=F64, generator=g)


def _full(op, xs, do):
    xs = [x.clone().requires_grad_(True) for x in xs]
    o = op(*xs)
    (o * do).sum().backward()
    return o.detach(), [x.grad for x in xs]


def _sharded(op, xs, do, lengths, rank):
    s = sum(lengths[:rank])
    e = s + lengths[rank]
    loc = [x[:, s:e].clone().requires_grad_(True) for x in xs]
    o = op(*loc)
    (o * do[:, s:e]).sum().backward()  # the global loss is the sum of the per-rank losses
    return o.detach(), [x.grad for x in loc], slice(s, e)


def _compare(errs, name, o, grads, ref_o, ref_grads, sl, tol=1e-10):
    pairs = [("out", o, ref_o[:, sl])] + [(f"d{n}", g, rg[:, sl]) for n, g, rg in
                                          zip(("q", "k1", "k2", "v1", "v2"), grads, ref_grads)]
    for what, a, b in pairs:
        if a is None or a.shape != b.shape or not torch.allclose(a, b, atol=tol, rtol=tol):
            diff = "missing/shape" if a is None or a.shape != b.shape else f"{(a - b).abs().max().item():.3g}"
            errs.append(f"{name}: {what} differs ({diff})")


WORLD = 3


def _placement_part():
    """Joining the existing gloo group with the device left to choose stays on the CPU, even where CUDA
    exists (simulated here: a GPU machine put the training ranks of a CPU group on the GPU)."""
    real = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    try:
        dev = td.init_distributed().device
    finally:
        torch.cuda.is_available = real
    return [] if dev.type == "cpu" else [f"init_distributed() in a gloo group chose {dev}"]


def _all_worker(rank, world, tmpdir, outdir):
    report = {"cp": _cp_part(rank, world), "dp": _dp_part(rank, world, tmpdir) + _placement_part()}
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


@pytest.fixture(scope="module")
def gloo_report(tmp_path_factory):
    """Mismatches found by each rank in each part: ``{part: [messages]}`` over all ranks."""
    outdir = str(tmp_path_factory.mktemp("dist"))
    _spawn(WORLD, _all_worker, outdir)
    out = {"cp": [], "dp": []}
    for r in range(WORLD):
        with open(os.path.join(outdir, f"rank{r}.json")) as f:
            for part, errs in json.load(f).items():
                out[part] += [f"rank {r}: {e}" for e in errs]
    return out


# ------------------------------------------------------------------------------------------ context parallel
def _cp_part(rank, world):
    errs = []
    # poly: (lengths, causal, degree, chunk_size, Hq, Hkv)
    cases = [([3, 5, 2], False, 2, None, 4, 2), ([3, 5, 2], True, 2, None, 4, 2), ([4, 3, 3], True, 2, 2, 2, 2),
             ([1, 6, 2], True, 4, 4, 2, 1), ([2, 2, 5], False, 4, None, 3, 3)]
    for n, (lengths, causal, degree, chunk, Hq, Hkv) in enumerate(cases):
        xs, do = _inputs(100 + n, 2, sum(lengths), Hq, Hkv, 3, 4, amp=0.8)
        ref_o, ref_g = _full(lambda *a: naive_poly_tensor_attn(*a, degree=degree, causal=causal), xs, do)
        o, g, sl = _sharded(lambda *a: td.cp_poly_tensor_attn(*a, degree=degree, causal=causal, chunk_size=chunk),
                            xs, do, lengths, rank)
        _compare(errs, f"poly case {n} (lengths {lengths}, causal={causal}, degree={degree}, chunk={chunk})",
                 o, g, ref_o, ref_g, sl)
        if n == 1:  # the public single-process op as well, and a visible non-trivial effect of the prefix
            p_o, p_g = _full(lambda *a: poly_tensor_attn(*a, degree=degree, causal=causal), xs, do)
            _compare(errs, "poly vs poly_tensor_attn", o, g, p_o, p_g, sl)
            if rank > 0:
                local = naive_poly_tensor_attn(*(x[:, sl] for x in xs), degree=degree, causal=True)
                if torch.allclose(local, o):
                    errs.append("causal shard result ignores the earlier ranks")
    # exact windowed: (lengths, window); halos that span two earlier ranks, and shards longer than the halo
    for n, (lengths, window) in enumerate([([2, 1, 7], (4, 2)), ([4, 3, 3], (2, 3)), ([3, 4, 3], 1)]):
        xs, do = _inputs(200 + n, 1, sum(lengths), 2, 1, 3, 2)
        ref_o, ref_g = _full(lambda *a: naive_tensor_attn(*a, window=window), xs, do)
        o, g, sl = _sharded(lambda *a: td.cp_tensor_attn(*a, window=window), xs, do, lengths, rank)
        _compare(errs, f"exact case {n} (lengths {lengths}, window={window})", o, g, ref_o, ref_g, sl)
    # the default shard_sequence split and gather_sequence put the pieces back in order
    x = torch.arange(2 * 10, dtype=F64).view(2, 10, 1, 1)
    if not torch.equal(td.gather_sequence(td.shard_sequence(x, rank, world)), x):
        errs.append("gather_sequence(shard_sequence(x)) != x")
    if td.all_reduce_mean(float(rank)) != (world - 1) / 2:
        errs.append("all_reduce_mean")
    return errs


def test_context_parallel_matches_single_process(gloo_report):
    assert not gloo_report["cp"], "\n".join(gloo_report["cp"])


# ------------------------------------------------------------------------------------------ data parallel
def _task():
    from tensorattn.tasks import build_task
    from tensorattn.config import TrainConfig

    cfg = TrainConfig(task="match3", pattern="TP", n_layer=2, dim=16, n_heads=2, match3_n=6, batch_size=2 * WORLD,
                      eval_batches=1, progress=False)
    return build_task(cfg, "cpu")


def _grads(model):
    out = {}
    for n, p in td.unwrap_model(model).named_parameters():
        g = p.grad
        out[n] = g.full_tensor() if hasattr(g, "full_tensor") else g
    return out


def _rel(a, b):
    """Relative error in the Frobenius norm (robust to tiny entries)."""
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _dp_part(rank, world, tmpdir):
    torch.set_default_dtype(F64)
    errs = []
    task = _task()
    torch.manual_seed(0)
    base = task.build_model()
    batch = task.train_batch(torch.Generator().manual_seed(1))
    # single process, whole batch
    ref = copy.deepcopy(base)
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    task.loss(ref, batch).backward()
    ref_grads = _grads(ref)
    opt.step()
    ref_state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    local = td.shard_batch(batch, rank, world)
    # task.loss casts the float64 logits to float32 for the cross-entropy (as in training), so the
    # gradients agree to float32 rounding (~1e-8 relative, in norm), not float64; a wrong reduction or shard is O(1)
    for strategy in ("ddp", "fsdp"):
        model = td.wrap_model(copy.deepcopy(base), strategy)
        # the model stays where it was (FSDP2's default mesh would move it to a GPU when one exists)
        devices = sorted({str(p.device) for p in model.parameters()})
        if devices != ["cpu"]:
            errs.append(f"{strategy}: wrapping moved the parameters of a CPU model to {devices}")
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)  # momentum: state to checkpoint
        task.loss(model, local).backward()
        grads = _grads(model)
        for n, g in ref_grads.items():
            if _rel(grads[n], g) > 1e-6:
                errs.append(f"{strategy}: grad of {n} differs (relative {_rel(grads[n], g):.3g})")
        opt.step()
        state = td.model_state_dict(model)
        for k, v in ref_state.items():
            if _rel(state[k], v) > 1e-6:
                errs.append(f"{strategy}: {k} after the step differs (relative {_rel(state[k], v):.3g})")
        # checkpoint written by rank 0, loaded into a fresh wrapped model on every rank
        path = os.path.join(tmpdir, f"{strategy}.pt")
        written = td.save_checkpoint(path, model=model, optimizer=opt, step=7)
        if (written is not None) != (rank == 0):
            errs.append(f"{strategy}: save_checkpoint returned {written!r} on rank {rank}")
        fresh = td.wrap_model(copy.deepcopy(base), strategy)
        fopt = torch.optim.SGD(fresh.parameters(), lr=0.5, momentum=0.9)
        extra = td.load_checkpoint(path, model=fresh, optimizer=fopt)
        if extra.get("step") != 7:
            errs.append(f"{strategy}: checkpoint extras {extra}")
        loaded = td.model_state_dict(fresh)
        if any(not torch.equal(loaded[k], v) for k, v in state.items()):
            errs.append(f"{strategy}: checkpoint did not round-trip")
    return errs


def test_data_parallel_step_matches_single_process(gloo_report):
    assert not gloo_report["dp"], "\n".join(gloo_report["dp"])


# ------------------------------------------------------------------------------------- one process
def test_without_process_group_everything_is_local(monkeypatch):
    for v in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(v, raising=False)
    info = td.init_distributed(device="cpu")
    assert (info.rank, info.world_size, info.backend, info.is_main) == (0, 1, None, True)
    assert not dist.is_initialized()
    m = torch.nn.Linear(2, 2)
    assert td.wrap_model(m, "ddp") is m and td.unwrap_model(m) is m
    assert td.is_main_process() and td.get_world_size() == 1
    xs, _ = _inputs(0, 1, 7, 2, 2, 3, 2, amp=0.8)
    for causal in (False, True):
        want = naive_poly_tensor_attn(*xs, causal=causal)
        assert torch.allclose(td.cp_poly_tensor_attn(*xs, causal=causal, chunk_size=3), want, atol=1e-12)
    assert torch.allclose(td.cp_tensor_attn(*xs, window=(3, 2)), naive_tensor_attn(*xs, window=(3, 2)), atol=1e-12)


@pytest.mark.parametrize("chunk", [None, 1, 2, 5, 64])
def test_causal_chunking_keeps_results_and_gradients(monkeypatch, chunk):
    """The chunked causal pass (features recomputed per chunk, state gradient carried backwards) equals the
    reference for any chunk, including the automatic one forced down to one position per chunk."""
    for v in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(poly_mod.scan, "_SCAN_CHUNK_ELEMS", 1)  # chunk=None: one position per chunk
    xs, do = _inputs(5, 2, 11, 4, 2, 3, 4, amp=0.8)
    ref_o, ref_g = _full(lambda *a: naive_poly_tensor_attn(*a, causal=True), xs, do)
    o, g = _full(lambda *a: td.cp_poly_tensor_attn(*a, causal=True, chunk_size=chunk), xs, do)
    assert _rel(o, ref_o) < 1e-12
    for name, a, b in zip(("q", "k1", "k2", "v1", "v2"), g, ref_g):
        assert _rel(a, b) < 1e-10, name


@pytest.mark.parametrize("chunk", [None, 1, 2, 5, 64])
def test_noncausal_chunking_keeps_results_and_gradients(monkeypatch, chunk):
    """The non-causal pass forms features a chunk of positions at a time (totals, then the readout; the backward
    recomputes each chunk): the reference for any chunk, the automatic one forced down to one position too."""
    from tensorattn.distributed import context_parallel as cp

    for v in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(cp, "_READOUT_ELEMS", 1)  # chunk=None: one position per chunk
    xs, do = _inputs(6, 2, 11, 4, 2, 3, 4, amp=0.8)
    ref_o, ref_g = _full(lambda *a: naive_poly_tensor_attn(*a), xs, do)
    o, g = _full(lambda *a: td.cp_poly_tensor_attn(*a, chunk_size=chunk), xs, do)
    assert _rel(o, ref_o) < 1e-12
    for name, a, b in zip(("q", "k1", "k2", "v1", "v2"), g, ref_g):
        assert _rel(a, b) < 1e-10, name


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_context_parallel_ignores_a_callers_autocast(monkeypatch, causal):
    for v in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(v, raising=False)
    xs, _ = _inputs(9, 1, 21, 2, 2, 3, 4, amp=0.8)
    xs = [x.float() for x in xs]
    plain = td.cp_poly_tensor_attn(*xs, causal=causal, chunk_size=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = td.cp_poly_tensor_attn(*xs, causal=causal, chunk_size=5)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_context_parallel_empty_batch(monkeypatch, causal):
    for v in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(v, raising=False)
    xs = [torch.randn(0, 5, 2, d, dtype=F64, requires_grad=True) for d in (3, 3, 3, 4, 4)]
    o = td.cp_poly_tensor_attn(*xs, causal=causal)
    assert o.shape == (0, 5, 2, 4)
    o.sum().backward()
    assert [tuple(x.grad.shape) for x in xs] == [tuple(x.shape) for x in xs]


def test_shard_helpers():
    assert [td.shard_range(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [td.shard_range(2, r, 3) for r in range(3)] == [(0, 1), (1, 2), (2, 2)]
    x = torch.arange(12).view(6, 2)
    assert torch.equal(torch.cat([td.shard_batch(x, r, 3) for r in range(3)]), x)
    a, b = td.shard_batch((x, x + 1), 1, 2)
    assert torch.equal(a, x[3:]) and torch.equal(b, x[3:] + 1)
    with pytest.raises(ValueError, match="divisible by world_size"):
        td.shard_batch(x, 0, 4)
    with pytest.raises(ValueError, match="rank"):
        td.shard_range(5, 3, 3)
    y = torch.zeros(1, 9, 1, 1)
    assert td.shard_sequence(y, 1, 3, lengths=[2, 5, 2]).shape[1] == 5
    with pytest.raises(ValueError, match="lengths"):
        td.shard_sequence(y, 0, 3, lengths=[2, 5, 3])


def test_bad_arguments_are_named():
    xs, _ = _inputs(0, 1, 4, 2, 2, 3, 2)
    with pytest.raises(ValueError, match="degree"):
        td.cp_poly_tensor_attn(*xs, degree=3)
    with pytest.raises(TypeError, match="degree"):
        td.cp_poly_tensor_attn(*xs, degree=2.0)
    with pytest.raises(ValueError, match="chunk_size"):
        td.cp_poly_tensor_attn(*xs, causal=True, chunk_size=0)
    with pytest.raises(ValueError, match="one length"):
        td.cp_poly_tensor_attn(xs[0], xs[1][:, :3], *xs[2:])
    with pytest.raises(ValueError, match="non-causal"):
        td.cp_poly_tensor_attn(*xs, backend="triton")
    with pytest.raises(TypeError, match="backend"):
        td.cp_poly_tensor_attn(*xs, causal=True, backend=None)
    with pytest.raises(ValueError, match="backend 'triton' cannot run"):  # float64 on the CPU: no fused kernels
        td.cp_poly_tensor_attn(*xs, causal=True, backend="triton")
    with pytest.raises(ValueError, match="window"):
        td.cp_tensor_attn(*xs, window=None)
    with pytest.raises(ValueError, match="strategy"):
        td.wrap_model(torch.nn.Linear(2, 2), "zero3")
    with pytest.raises(TypeError, match="model"):
        td.wrap_model("not a model")
    with pytest.raises(ValueError, match="backend"):
        td.init_distributed("mpi")
