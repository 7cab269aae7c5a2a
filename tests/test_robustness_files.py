"""Robustness of the files and the command line (issue 17), in sections by the issue's class numbers.

1. no code execution from a file: checkpoints are read with ``weights_only=True`` everywhere and hold
   only plain data; a crafted pickle is refused unread (its payload would create a marker file);
3. sizes in a config are checked before anything is allocated;
5. the context-parallel ops apply the non-finite rule of the single-process ops;
7. clear one-line errors instead of tracebacks: bad checkpoints, runtime config problems, ``check
   --device cuda`` without CUDA, ``plot --out DIR``, hand-edited metrics lines;
8. commands that did nothing fail instead of reporting success;
10. temporary files left by a kill during an atomic write are removed at the next start.

Every test asserts the error type and that the message names the argument or the file.
"""
import dataclasses
import importlib.util
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from tensorattn import distributed as td
from tensorattn._io import MetricsLineWarning, read_metrics_lines, remove_stale_temps
from tensorattn.config import ConfigError, TrainConfig, load_config
from tensorattn.train import train
from tensorattn.train import main as train_main

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(task="match3", match3_n=6, dim=16, n_heads=2, batch_size=8, eval_batches=1, progress=False,
            warmup_steps=1, steps=2, eval_every=2, log_every=1, device="cpu")
TINY_ARGS = [f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower()}" for k, v in TINY.items()]


def _cfg(out_dir, **kw):
    return TrainConfig(**{**TINY, "out_dir": str(out_dir), **kw})


def _one_line_error(capsys, prog="tensorattn train"):
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{prog}: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory):
    """The bytes of a real two-step checkpoint (and its run directory)."""
    d = tmp_path_factory.mktemp("good") / "run"
    train(_cfg(d))
    return (d / "ckpt.pt").read_bytes(), d


def _run_with(tmp_path, ckpt_bytes, name="run"):
    """A run directory whose ckpt.pt holds ``ckpt_bytes`` (resume is on by default)."""
    d = tmp_path / name
    d.mkdir()
    (d / "ckpt.pt").write_bytes(ckpt_bytes)
    return d


# ================================================================================================ class 1
class Payload:
    """Unpickling this creates the marker file: code execution from a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _crafted(path, marker, how):
    if how == "torch.save":  # a zip checkpoint whose model entry is the payload
        torch.save({"model": {"w": torch.zeros(2)}, "step": Payload(marker)}, path)
    else:  # a bare pickle
        with open(path, "wb") as f:
            pickle.dump({"model": Payload(marker)}, f)


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_1_train_resume_refuses_a_crafted_pickle(tmp_path, how):
    d = tmp_path / "run"
    d.mkdir()
    marker = tmp_path / "MARKER"
    _crafted(d / "ckpt.pt", marker, how)
    with pytest.raises(td.CheckpointError, match=r"refusing to load it.*resume=false") as e:
        train(_cfg(d))
    assert str(d / "ckpt.pt") in str(e.value)
    assert not marker.exists()


def test_1_train_cli_refuses_a_crafted_pickle_in_one_line(tmp_path, capsys):
    d = tmp_path / "run"
    d.mkdir()
    marker = tmp_path / "MARKER"
    _crafted(d / "ckpt.pt", marker, "torch.save")
    assert train_main(TINY_ARGS + [f"out_dir={d}"]) == 2
    err = _one_line_error(capsys)
    assert str(d / "ckpt.pt") in err and "resume=false" in err
    assert not marker.exists()


def test_1_load_checkpoint_refuses_a_crafted_pickle(tmp_path):
    marker = tmp_path / "MARKER"
    _crafted(tmp_path / "x.pt", marker, "torch.save")
    model = torch.nn.Linear(2, 2)
    with pytest.raises(td.CheckpointError, match="could run arbitrary code") as e:
        td.load_checkpoint(tmp_path / "x.pt", model=model)
    assert str(tmp_path / "x.pt") in str(e.value)
    with pytest.raises(td.CheckpointError, match="x.pt"):
        td.read_checkpoint(tmp_path / "x.pt")
    assert not marker.exists()


def test_1_summarize_refuses_a_crafted_pickle(tmp_path):
    spec = importlib.util.spec_from_file_location("summarize_under_test", ROOT / "scripts" / "summarize.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    run = tmp_path / "match3_N6_T_seed0"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(_cfg(run, pattern="T"))))
    marker = tmp_path / "MARKER"
    _crafted(run / "ckpt.pt", marker, "torch.save")
    with pytest.raises(td.CheckpointError, match="ckpt.pt"):
        summarize.grad_agreement(run, degrees=(2,), n_batches=1)
    assert not marker.exists()


def test_1_own_checkpoints_are_plain_data_and_resume_reads_them_weights_only(tmp_path, good_ckpt, monkeypatch):
    ck = torch.load(good_ckpt[1] / "ckpt.pt", map_location="cpu", weights_only=True)  # raises on anything else
    for k in ("gen", "torch_rng"):
        assert ck[k].dtype == torch.uint8 and ck[k].dim() == 1, k
    assert isinstance(ck["step"], int) and isinstance(ck["config"], dict) and ck["step"] == 2
    calls, real = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw.get("weights_only")) or real(*a, **kw))
    d = _run_with(tmp_path, good_ckpt[0])
    assert train(_cfg(d))["step"] == 2  # resumed at its last step
    assert calls == [True]


@dataclasses.dataclass
class _Extra:
    a: int
    b: list


def test_1_save_checkpoint_converts_extras_to_plain_data(tmp_path):
    model = torch.nn.Linear(2, 2)
    g = torch.Generator().manual_seed(5)
    td.save_checkpoint(tmp_path / "c.pt", model=model, step=np.int64(3), loss=np.float32(0.5), flag=np.bool_(True),
                       arr=np.arange(3), cfg=_Extra(1, [np.float64(2.0)]), gen=g, pair=(1, "x"))
    ck = torch.load(tmp_path / "c.pt", weights_only=True)
    assert ck["step"] == 3 and type(ck["step"]) is int
    assert ck["loss"] == 0.5 and type(ck["loss"]) is float and ck["flag"] is True
    assert torch.equal(ck["arr"], torch.arange(3)) and ck["cfg"] == {"a": 1, "b": [2.0]} and ck["pair"] == (1, "x")
    assert torch.equal(ck["gen"], g.get_state())
    rest = td.load_checkpoint(tmp_path / "c.pt", model=torch.nn.Linear(2, 2))
    assert rest["step"] == 3
    with pytest.raises(TypeError, match=r"entry 'bad' is a .*object.*weights_only=True"):
        td.save_checkpoint(tmp_path / "d.pt", model=model, bad=object())
    assert not (tmp_path / "d.pt").exists()


# ================================================================================================ class 3
@pytest.mark.parametrize("override,limit_name", [
    ("batch_size=1000000000000", "MAX_ACTIVATION"),
    ("dim=10000000", "MAX_ACTIVATION"),
    ("n_layer=1000000", "MAX_PARAMS"),
    ("match3_n=10000000", "MAX_ACTIVATION"),
    ("eval_batches=1000000000", "MAX_EVAL_TOKENS"),
])
def test_3_huge_sizes_in_a_config_are_refused_before_allocating(override, limit_name):
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=rf"config sizes too large: .* above the limit [\d,]+ \({limit_name}") as e:
        load_config(None, [override])
    assert f"lower {key}" in str(e.value) or key in str(e.value).split("lower ", 1)[1]


def test_3_huge_batch_size_says_what_fits():
    with pytest.raises(ValueError, match=r"\[1000000000000, 16, 256\] has 4,096,000,000,000,000 elements.*"
                                         r"batch_size at most \d+"):
        load_config(None, ["batch_size=1000000000000", "match3_n=16", "dim=64"])


def test_3_cli_reports_a_huge_batch_size_in_one_line(capsys):
    assert train_main(TINY_ARGS + ["batch_size=1000000000000"]) == 2
    assert "batch_size" in _one_line_error(capsys)


# ================================================================================================ class 5
def _cp_inputs(T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, T, 2, 4, generator=g, dtype=torch.float64) for _ in range(3)] + \
        [torch.randn(1, T, 2, 3, generator=g, dtype=torch.float64) for _ in range(2)]


CP_OPS = {
    "cp_poly": lambda *x, **kw: td.cp_poly_tensor_attn(*x, **kw),
    "cp_poly_causal": lambda *x, **kw: td.cp_poly_tensor_attn(*x, causal=True, **kw),
    "cp_exact": lambda *x, **kw: td.cp_tensor_attn(*x, window=3, **kw),
}


@pytest.mark.parametrize("op", sorted(CP_OPS))
@pytest.mark.parametrize("which", [0, 1, 4])
def test_5_cp_ops_refuse_non_finite_cpu_inputs(op, which):
    names = ("q", "k1", "k2", "v1", "v2")
    x = _cp_inputs()
    x[which][0, 2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"^{names[which]} contains 1 non-finite value"):
        CP_OPS[op](*x)
    with pytest.raises(ValueError, match=rf"^{names[which]} contains"):
        CP_OPS[op](*x, check_finite=True)
    assert torch.isnan(CP_OPS[op](*x, check_finite=False)).any()  # the opt-out passes them through
    with pytest.raises(TypeError, match="check_finite must be None or a bool, got str 'yes'"):
        CP_OPS[op](*_cp_inputs(), check_finite="yes")
    o = CP_OPS[op](*_cp_inputs(), check_finite=np.bool_(True))  # numpy bools are bools
    assert torch.isfinite(o).all()


def _cp_nan_worker(rank, world, store, outdir):
    torch.set_num_threads(1)
    td.init_distributed("gloo", device="cpu", init_method=f"file://{store}", rank=rank, world_size=world,
                        timeout_s=60)
    res = {}
    try:
        for name in ("cp_poly", "cp_exact"):
            x = _cp_inputs(T=4, seed=rank)
            if rank == 1:
                x[2][0, 0, 0, 0] = float("inf")
            try:
                CP_OPS[name](*x)
                res[name] = "no error"
            except ValueError as e:
                res[name] = str(e)
    finally:
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
        td.cleanup()


def test_5_cp_ops_non_finite_on_one_rank_stops_every_rank():
    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_cp_nan_worker, args=(2, os.path.join(d, "store"), d), nprocs=2, join=True)
        res = [json.load(open(os.path.join(d, f"rank{r}.json"))) for r in range(2)]
    for name in ("cp_poly", "cp_exact"):
        assert res[1][name].startswith("k2 contains 1 non-finite value"), res
        assert "rank 1" in res[0][name] and "non-finite" in res[0][name], res


# ================================================================================================ class 7
def _bad_checkpoints(good: bytes):
    buf_list, buf_foreign, buf_partial, buf_wrong = (tempfile.SpooledTemporaryFile() for _ in range(4))
    torch.save([1, 2, 3], buf_list)
    torch.save({"state_dict": {"w": torch.zeros(2)}}, buf_foreign)
    torch.save({"model": {"w": torch.zeros(2)}}, buf_partial)
    ck = torch.load(__import__("io").BytesIO(good), weights_only=True)
    ck["step"] = "2"
    torch.save(ck, buf_wrong)
    out = {}
    for name, b in (("list", buf_list), ("foreign", buf_foreign), ("partial", buf_partial), ("wrong_type", buf_wrong)):
        b.seek(0)
        out[name] = b.read()
    out.update(truncated=good[: len(good) // 2], head=good[:100], empty=b"", garbage=b"not a checkpoint\n" * 20)
    return out


BAD = ["truncated", "head", "empty", "garbage", "list", "foreign", "partial", "wrong_type"]


@pytest.mark.parametrize("kind", BAD)
def test_7_bad_checkpoint_gives_a_clear_error(tmp_path, good_ckpt, kind):
    d = _run_with(tmp_path, _bad_checkpoints(good_ckpt[0])[kind])
    with pytest.raises(td.CheckpointError, match=r"resume=false starts afresh") as e:
        train(_cfg(d))
    assert str(d / "ckpt.pt") in str(e.value)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "foreign"])
def test_7_bad_checkpoint_cli_one_line_rc2_and_resume_false_starts_afresh(tmp_path, good_ckpt, kind, capsys):
    d = _run_with(tmp_path, _bad_checkpoints(good_ckpt[0])[kind])
    assert train_main(TINY_ARGS + [f"out_dir={d}"]) == 2
    err = _one_line_error(capsys)
    assert str(d / "ckpt.pt") in err and "resume=false" in err
    assert train_main(TINY_ARGS + [f"out_dir={d}", "resume=false"]) == 0  # what the message says works
    assert torch.load(d / "ckpt.pt", weights_only=True)["step"] == 2


def test_7_nan_checkpoint_is_reported_as_corrupt(tmp_path, good_ckpt):
    ck = torch.load(__import__("io").BytesIO(good_ckpt[0]), weights_only=True)
    name = next(iter(ck["model"]))
    ck["model"][name].view(-1)[0] = float("nan")
    d = tmp_path / "run"
    d.mkdir()
    torch.save(ck, d / "ckpt.pt")
    with pytest.raises(td.CheckpointError, match=rf"is corrupt: model\['{name}'\] holds 1 non-finite") as e:
        train(_cfg(d))
    assert str(d / "ckpt.pt") in str(e.value) and "q contains" not in str(e.value)
    with pytest.raises(td.CheckpointError, match="non-finite"):
        td.load_checkpoint(d / "ckpt.pt", model=torch.nn.Linear(1, 1))


def _runtime_problems(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    dev = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    return [
        ([f"device={dev}"], "'device'"),
        ([f"out_dir={afile}"], "'out_dir'"),
        ([f"out_dir={afile / 'sub'}"], "'out_dir'"),
        (["task=mfeat", "mfeat_views=pix,nosuchview"], "'mfeat_views'"),
        ([f"seed={2 ** 64}"], "'seed'"),
        (["pattern=P", "p_degree=24", "dim=64"], "'p_degree'"),
    ]


@pytest.mark.parametrize("case", range(6))
def test_7_runtime_config_problems_end_in_one_line_rc2(tmp_path, capsys, case):
    extra, key = _runtime_problems(tmp_path)[case]
    args = TINY_ARGS + [f"out_dir={tmp_path / 'run'}"] + extra
    assert train_main(args) == 2
    assert key in _one_line_error(capsys)


def test_7_runtime_config_problems_are_config_errors(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"config key 'out_dir' \('.*afile'\) is a file"):
        train(_cfg(tmp_path / "afile"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="config key 'device' is 'cuda' but CUDA is not available"):
        train(_cfg(tmp_path / "run", device="cuda"))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_7_check_device_cuda_without_cuda(monkeypatch, capsys):
    from tensorattn import check
    from tensorattn.cli import main as cli_main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli_main(["check", "--device", "cuda"]) == 2
    err = _one_line_error(capsys, "tensorattn check")
    assert "'cuda'" in err and "CUDA is not available" in err
    assert cli_main(["check", "--device", "nosuchdevice"]) == 2
    assert "'nosuchdevice'" in _one_line_error(capsys, "tensorattn check")
    with pytest.raises(ValueError, match="device 'cuda:0' was asked for"):
        check.run_checks(0, "cuda:0")


def _metrics_dir(root, name="m3_S_seed0", extra_lines=()):
    d = root / name
    d.mkdir(parents=True)
    rows = [json.dumps({"step": s, "train_loss": 1.0 / s, "val_loss": 2.0 / s}) for s in (1, 2, 3)]
    (d / "metrics.jsonl").write_text("\n".join(rows[:2] + list(extra_lines) + rows[2:]) + "\n")
    return d


def test_7_plot_out_directory(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from tensorattn.plot import main as plot_main

    run = _metrics_dir(tmp_path)
    (tmp_path / "figs").mkdir()
    assert plot_main([str(run), "--out", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert plot_main([str(run), "--out", str(tmp_path / "new") + "/"]) == 0
    assert (tmp_path / "new" / "curves.png").is_file()
    (tmp_path / "afile").write_text("x")
    capsys.readouterr()
    assert plot_main([str(run), "--out", str(tmp_path / "afile" / "c.png")]) == 2
    assert "afile" in _one_line_error(capsys, "tensorattn plot")
    assert plot_main([str(run), "--out", str(tmp_path / "c.nosuchformat")]) == 2
    assert "'.nosuchformat'" in _one_line_error(capsys, "tensorattn plot")


HAND_EDITS = ['[1, 2]', '{"step": "x", "train_loss": 1}', 'not json at all', '{"step": 2, "val_loss": "low"}',
              '{"train_loss": 0.5}', '7']


def test_7_hand_edited_metrics_lines_are_skipped_with_a_warning(tmp_path):
    run = _metrics_dir(tmp_path, extra_lines=HAND_EDITS)
    with pytest.warns(MetricsLineWarning) as w:
        recs = [r for _, r in read_metrics_lines(run / "metrics.jsonl")]
    assert [r["step"] for r in recs] == [1, 2, 3]
    msgs = [str(x.message) for x in w]
    assert len(msgs) == len(HAND_EDITS)
    for i, m in enumerate(msgs):
        assert m.startswith(f"{run / 'metrics.jsonl'}:{3 + i}: skipping a metrics line"), m


def test_7_plot_skips_hand_edited_metrics_lines(tmp_path):
    pytest.importorskip("matplotlib")
    from tensorattn.plot import main as plot_main

    run = _metrics_dir(tmp_path, extra_lines=HAND_EDITS)
    with pytest.warns(MetricsLineWarning) as w:
        assert plot_main([str(run), "--out", str(tmp_path / "c.png"), "--metric", "val_loss"]) == 0
    assert (tmp_path / "c.png").is_file()
    assert [str(x.message).split(": skipping")[0] for x in w] == \
        [f"{run / 'metrics.jsonl'}:{3 + i}" for i in range(len(HAND_EDITS))]


def test_7_resume_skips_hand_edited_metrics_lines(tmp_path):
    d = tmp_path / "run"
    train(_cfg(d, steps=3, eval_every=1, stop_at=1))
    with open(d / "metrics.jsonl", "a") as f:
        f.write("\n".join(HAND_EDITS) + "\n")
    with pytest.warns(MetricsLineWarning) as w:
        s = train(_cfg(d, steps=3, eval_every=1))
    assert len(w) == len(HAND_EDITS) and str(w[0].message).startswith(f"{d / 'metrics.jsonl'}:2: skipping")
    assert s["finished"]
    rows = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


# ================================================================================================ class 8
def test_8_reproduce_with_an_empty_selection_fails(tmp_path, capsys):
    from tensorattn.reproduce import main as rep_main
    from tensorattn.reproduce import run

    for sel in (",", " , ,", ""):
        assert rep_main(["--preset", "tiny", "--out", str(tmp_path / "r"), "--sections", sel]) == 2
        out, err = capsys.readouterr()
        assert "report written" not in out
        assert err.startswith("tensorattn reproduce: --sections") and "selects nothing" in err, err
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="sections selects nothing"):
        run("tiny", str(tmp_path / "r"), sections=[])
    with pytest.raises(ValueError, match=r"sections must name each section once, got \['cost'\]"):
        run("tiny", str(tmp_path / "r"), sections=["cost", "cost"])
    assert rep_main(["--preset", "tiny", "--out", str(tmp_path / "r"), "--sections", "nosuch"]) == 2
    assert "'nosuch'" in _one_line_error(capsys, "tensorattn reproduce")


def test_8_plot_unknown_metric_fails(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from tensorattn.plot import main as plot_main

    run = _metrics_dir(tmp_path)
    assert plot_main([str(run), "--metric", "nosuchmetric", "--out", str(tmp_path / "c.png")]) == 2
    err = _one_line_error(capsys, "tensorattn plot")
    assert "'nosuchmetric'" in err and "available: train_loss, val_loss" in err
    assert not (tmp_path / "c.png").exists()


# =============================================================================================== class 10
def test_10_remove_stale_temps_removes_only_ours(tmp_path):
    ours = [tmp_path / ".ckpt.pt.abcd_123.tmp", tmp_path / ".metrics.jsonl.zz99zz99.tmp"]
    theirs = [tmp_path / ".ckpt.pt.abc.tmp", tmp_path / ".other.abcdefgh.tmp", tmp_path / "ckpt.pt.abcdefgh.tmp",
              tmp_path / "notes.tmp", tmp_path / ".ckpt.pt.ABCDEFGH.tmp"]
    for p in ours + theirs:
        p.write_text("x")
    (tmp_path / ".ckpt.pt.dirdirdi.tmp").mkdir()  # the pattern, but a directory: not ours
    removed = remove_stale_temps(tmp_path, ["ckpt.pt", "metrics.jsonl"])
    assert sorted(removed) == sorted(ours)
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)
    assert (tmp_path / ".ckpt.pt.dirdirdi.tmp").is_dir()


_KILL_MID_WRITE = """
import os, signal, sys
import tensorattn.distributed.checkpoint as ckpt
from tensorattn.config import TrainConfig
from tensorattn.train import train
real = ckpt.atomic_write
def dying(path, write, binary=False):
    def half(f):
        f.write(b"partial checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, half, binary=binary)
ckpt.atomic_write = dying
train(TrainConfig(**{**eval(sys.argv[1]), "out_dir": sys.argv[2]}))
"""


def test_10_sigkill_during_a_checkpoint_write_is_cleaned_at_the_next_start(tmp_path):
    d = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", _KILL_MID_WRITE, repr(TINY), str(d)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    left = list(d.glob(".ckpt.pt.*.tmp"))
    assert len(left) == 1 and not (d / "ckpt.pt").exists()
    s = train(_cfg(d))  # no checkpoint: starts afresh, and removes the leftover
    assert s["finished"] and not list(d.glob(".*.tmp"))
    (d / ".ckpt.pt.abcdefgh.tmp").write_bytes(b"x")
    train(_cfg(d))  # a resume (nothing left to do) cleans too
    assert not list(d.glob(".*.tmp"))
