"""``tensorattn.train`` under torch.distributed: 2 spawned gloo ranks (CPU) run ``train(cfg)``.

One spawned group does every multi-rank run (process start-up dominates the cost); the parent process
runs the single-process references and compares:

* DDP on 2 ranks, each on half of the global batch, equals the single-process run on the whole batch
  (metrics and final weights, float32 rounding);
* a DDP run stopped and resumed equals the uninterrupted DDP run (exactly);
* FSDP2 runs, checkpoints (full state), resumes from its checkpoint and equals the single-process run;
* checkpoints cross launch modes: a single-process checkpoint resumes under DDP, and a DDP checkpoint resumes
  in a single process;
* only rank 0 writes files (an audit hook records every file write, rename, mkdir and removal);
* a global batch not divisible by the world size, and strategy "none" on 2 ranks, are refused clearly.

Workers record what they saw in a JSON file; failures are asserted in the parent.
"""
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tensorattn import distributed as td
from tensorattn.config import TrainConfig, load_config
from tensorattn.train import train

WORLD = 2
BASE = dict(task="match3", pattern="T", match3_n=6, dim=16, n_heads=2, batch_size=8, eval_batches=2, progress=False,
            warmup_steps=2, lr=3e-3, min_lr=3e-4, steps=6, eval_every=3, log_every=2,
            device="cpu")  # the gloo ranks and the single-process references alike, also where CUDA exists
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
REL = 1e-5  # float32: sharded batches change the order of the reductions


def _cfg(root, name, **kw):
    return TrainConfig(**{**BASE, "out_dir": os.path.join(str(root), name), **kw})


def _writes_under(root, log):
    """An audit hook that appends to ``log`` every file write, rename, mkdir or removal under ``root``."""
    root = os.path.realpath(root)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def under(p):
        return isinstance(p, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(p)).startswith(root)

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & write_flags)
            if writing and under(path):
                log.append(f"open {path} {mode or flags}")
        elif event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "os.chmod", "os.truncate"):
            if under(args[0]) or (event == "os.rename" and under(args[1])):
                log.append(f"{event} {args[0]}")

    sys.addaudithook(hook)


def _worker(rank, world, store, root):
    torch.set_num_threads(1)
    td.init_distributed("gloo", device="cpu", init_method=f"file://{store}", rank=rank, world_size=world,
                        timeout_s=120)
    writes, report = [], {}
    _writes_under(root, writes)
    from tensorattn.tasks import Match3Task

    seen, loss = [], Match3Task.loss
    Match3Task.loss = lambda self, model, batch: seen.append(batch[0].tolist()) or loss(self, model, batch)
    try:
        report["ddp_full"] = train(_cfg(root, "ddp_full", strategy="ddp"))["final"]
        report["first_batch"] = seen[0]  # this rank's inputs at step 1
        train(_cfg(root, "ddp_split", strategy="ddp", stop_at=4))
        report["ddp_split"] = train(_cfg(root, "ddp_split", strategy="ddp"))["final"]
        train(_cfg(root, "fsdp", strategy="fsdp", stop_at=3))
        report["fsdp"] = train(_cfg(root, "fsdp", strategy="fsdp"))["step"]
        train(_cfg(root, "legacy", strategy="ddp"))  # resumes the parent's single-process checkpoint
        train(_cfg(root, "cross", strategy="ddp", stop_at=4))  # the parent resumes it in one process
        for name, kw in (("odd_batch", dict(batch_size=7, strategy="ddp")), ("no_strategy", {})):
            try:
                train(_cfg(root, name, **kw))
                report[name] = "no error"
            except ValueError as e:
                report[name] = str(e)
        report["budget_step"] = train(_cfg(root, "budget", strategy="ddp", steps=100_000, eval_every=100_000,
                                           log_every=100_000, time_budget_s=0.3))["step"]
        report["group_kept"] = dist.is_initialized()  # train() leaves a group it did not create
    finally:
        report["writes"] = writes
        with open(os.path.join(os.path.dirname(store), f"rank{rank}.json"), "w") as f:
            json.dump(report, f)
        td.cleanup()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``(root, reports)``: the run directories and each rank's report."""
    root = tmp_path_factory.mktemp("runs")
    # a single-process checkpoint at step 4; the workers resume it under DDP
    train(_cfg(root, "legacy", stop_at=4))
    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(WORLD, os.path.join(d, "store"), str(root)), nprocs=WORLD, join=True)
        reports = [json.load(open(os.path.join(d, f"rank{r}.json"))) for r in range(WORLD)]
    train(_cfg(root, "cross"))  # a DDP checkpoint resumed in a single process (strategy "none")
    train(_cfg(root, "single"))
    return root, reports


def _lines(path):
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def _weights(run_dir):
    return torch.load(run_dir / "ckpt.pt", weights_only=False)["model"]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _assert_close_runs(a_dir, b_dir, rel):
    a, b = _lines(a_dir / "metrics.jsonl"), _lines(b_dir / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [2, 3, 4, 6]
    for ra, rb in zip(a, b):
        for k in ("train_loss", "grad_norm", "val_loss", "lr", "tokens"):
            if k in rb:
                assert ra[k] == pytest.approx(rb[k], rel=rel, abs=0 if rel == 0 else 1e-12), (k, ra, rb)
    wa, wb = _weights(a_dir), _weights(b_dir)
    assert wa.keys() == wb.keys()
    for k in wb:
        assert wa[k].shape == wb[k].shape, k  # full (unsharded) tensors, also under FSDP2
        assert _rel(wa[k], wb[k]) <= rel, (k, _rel(wa[k], wb[k]))


def test_ddp_equals_single_process_on_the_global_batch(runs):
    root, reports = runs
    _assert_close_runs(root / "ddp_full", root / "single", REL)
    assert reports[0]["ddp_full"]["val_loss"] == reports[1]["ddp_full"]["val_loss"]  # every rank evaluates


def test_each_rank_trains_on_its_share_of_the_global_batch(runs):
    _, reports = runs
    from tensorattn.tasks import build_task

    task = build_task(_cfg("unused", "x"))
    x, _ = task.train_batch(torch.Generator().manual_seed(BASE.get("seed", 0) + 1))  # train()'s first batch
    shares = [r["first_batch"] for r in reports]
    assert [len(s) for s in shares] == [BASE["batch_size"] // WORLD] * WORLD
    assert shares[0] + shares[1] == x.tolist()


def test_ddp_resume_equals_uninterrupted(runs):
    root, reports = runs
    _assert_close_runs(root / "ddp_split", root / "ddp_full", 0)
    assert reports[0]["ddp_split"] == reports[0]["ddp_full"]


def test_fsdp_runs_checkpoints_and_resumes(runs):
    root, reports = runs
    assert [r["fsdp"] for r in reports] == [6, 6]
    assert set(torch.load(root / "fsdp" / "ckpt.pt", weights_only=False)["optimizer"]["state"]) == \
        set(_weights(root / "single"))  # full optimizer state, keyed by parameter name
    _assert_close_runs(root / "fsdp", root / "single", REL)


def test_checkpoints_cross_launch_modes(runs):
    root, _ = runs
    _assert_close_runs(root / "legacy", root / "single", REL)  # old single-process checkpoint -> DDP
    _assert_close_runs(root / "cross", root / "single", REL)  # DDP checkpoint -> single process


def test_only_rank0_writes_files(runs):
    root, reports = runs
    assert reports[1]["writes"] == []
    w0 = " ".join(reports[0]["writes"])
    for f in ("config.json", "metrics.jsonl", "ckpt.pt", "summary.json"):
        assert f in w0  # the hook sees rank 0's writes
    for d in ("ddp_full", "fsdp"):
        assert sorted(p.name for p in (root / d).iterdir()) == ["ckpt.pt", "config.json", "metrics.jsonl",
                                                                 "summary.json"]


def test_time_budget_stops_every_rank_at_the_same_step(runs):
    _, reports = runs
    steps = [r["budget_step"] for r in reports]
    assert len(set(steps)) == 1 and 0 < steps[0] < 100_000, steps  # the ranks' mean step time decides for all


def test_distributed_config_errors(runs):
    _, reports = runs
    for r in reports:
        assert "config key 'batch_size' (the global batch, 7) must be divisible by the world size 2" in r["odd_batch"]
        assert "config key 'strategy' is 'none'" in r["no_strategy"]
        assert r["group_kept"]


def test_strategy_is_validated_and_single_process_ignores_it(tmp_path):
    with pytest.raises(ValueError, match=r"config key 'strategy' must be one of \['none', 'ddp', 'fsdp'\], "
                                         r"got 'zero3'"):
        load_config(None, ["strategy=zero3"])
    cfg = load_config(str(CONFIGS / "match3_ddp.toml"), [f"out_dir={tmp_path / 'r'}", "steps=1", "progress=false",
                                                  "batch_size=4", "eval_batches=1", "device=cpu"])
    assert cfg.strategy == "ddp"
    s = train(cfg)  # a plain launch is one process whatever the strategy
    assert s["world_size"] == 1 and s["finished"] and not dist.is_initialized()
