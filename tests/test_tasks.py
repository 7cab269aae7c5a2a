"""The task protocol: built-in tasks follow it, `train` takes a task object, and the CLI trains a user task named
by a factory (the three-band digits example)."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tensorattn.tasks import BUILTIN_TASKS, Task, load_task_factory
from tensorattn.config import TrainConfig
from tensorattn.train import main, train

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = f"{ROOT / 'examples' / 'digits_three_bands.py'}:make_task"


def test_builtin_tasks_follow_the_protocol():
    for cls in BUILTIN_TASKS.values():
        assert issubclass(cls, Task)
        for name in ("build_model", "train_batch", "loss", "evaluate"):
            assert callable(getattr(cls, name))


def test_cli_trains_the_example_factory(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "digits"
    rc = main([f"task={EXAMPLE}", "mixer=tensor", "steps=120", "batch_size=64", "mfeat_tokens=4", "dim=32",
               "eval_every=60", "lr=3e-3", "device=cpu", "progress=false", f"out_dir={out}"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["config"]["task"] == EXAMPLE and s["task_info"]["n_test"] == 449
    assert s["final"]["test_acc"] > s["task_info"]["majority"] + 0.5  # 10 classes: far above the majority class


class _Tiny(Task):
    """A task written inline: regress the sum of 4 numbers."""

    tokens_per_batch = 16

    def build_model(self):
        return torch.nn.Linear(4, 1)

    def train_batch(self, gen):
        x = torch.randn(16, 4, generator=gen)
        return x, x.sum(-1, keepdim=True)

    def loss(self, model, batch):
        x, y = batch
        return F.mse_loss(model(x), y)

    @torch.no_grad()
    def evaluate(self, model, autocast):
        x = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
        return {"val_mse": F.mse_loss(model(x), x.sum(-1, keepdim=True)).item()}


def test_train_takes_a_task_object(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path / "t"), steps=200, lr=3e-2, warmup_steps=5, eval_every=100,
                      progress=False, device="cpu", weight_decay=0.0)
    s = train(cfg, task=_Tiny())
    assert s["final"]["val_mse"] < 1e-2
    with pytest.raises(TypeError, match="not a task"):
        train(cfg, task=object())


@pytest.mark.parametrize("spec,match", [
    ("no_colon_here", "must be one of"),
    ("nosuchmodule_xyz:make", "cannot import 'nosuchmodule_xyz'"),
    ("tensorattn.tasks:nosuchname", "has no callable 'nosuchname'"),
    ("missing/file.py:make", "no such file"),
])
def test_bad_factories_are_one_line_errors(spec, match, capsys, tmp_path):
    assert main([f"task={spec}", f"out_dir={tmp_path / 'x'}", "progress=false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tensorattn train:") and match in err and "task" in err
    with pytest.raises(ValueError, match="task"):
        load_task_factory(spec)


def test_a_factory_that_fails_or_returns_no_task(tmp_path, capsys):
    mod = tmp_path / "user_tasks.py"
    mod.write_text("def broken(cfg):\n    raise RuntimeError('no data here')\n\n"
                   "def not_a_task(cfg):\n    return 42\n")
    assert main([f"task={mod}:broken", f"out_dir={tmp_path / 'a'}", "progress=false"]) == 2
    assert "the factory raised RuntimeError: no data here" in capsys.readouterr().err
    assert main([f"task={mod}:not_a_task", f"out_dir={tmp_path / 'b'}", "progress=false"]) == 2
    assert "is not a task" in capsys.readouterr().err


# ------------------------------------------------------------------------ checkpoints, schedule, progress lines
def _m3(tmp_path, **kw):
    return TrainConfig(**{**dict(task="match3", match3_n=6, dim=16, n_heads=2, batch_size=8, eval_batches=1,
                                 eval_every=10, log_every=1, progress=False, device="cpu",
                                 out_dir=str(tmp_path / "run")), **kw})


def test_ckpt_every_is_independent_of_eval_every(tmp_path):
    train(_m3(tmp_path, steps=20, stop_at=7, ckpt_every=3))
    ck = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ck["step"] == 7  # written at 3 and 6 as well, and at stop_at
    train(_m3(tmp_path, steps=20, stop_at=8, ckpt_every=3))
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 8


def test_finished_and_stopped_runs_say_so_and_a_finished_run_continues(tmp_path, capsys):
    train(_m3(tmp_path, steps=20, stop_at=10))
    err = capsys.readouterr().err
    assert "stopped at step 10 of 20" in err and "step 10/20 " in err and "val_loss=" in err  # plain lines
    train(_m3(tmp_path, steps=20))
    train(_m3(tmp_path, steps=20))
    assert "already finished (step 20 of 20)" in capsys.readouterr().err
    s = train(_m3(tmp_path, steps=30))
    assert s["step"] == 30 and s["finished"]
    assert "continuing the finished run" in capsys.readouterr().err
    with pytest.raises(ValueError, match="steps"):  # an unfinished run keeps its schedule
        train(_m3(tmp_path, out_dir=str(tmp_path / "other"), steps=20, stop_at=5))
        train(_m3(tmp_path, out_dir=str(tmp_path / "other"), steps=40))


def test_config_table_covers_every_key_and_docs_match_it(capsys):
    from tensorattn.config import _FIELDS, config_table

    table = config_table()
    rows = [r for r in table.splitlines()[2:]]
    assert [r.split("|")[2].strip().strip("`") for r in rows] == list(_FIELDS)
    assert all(r.split("|")[5].strip() for r in rows), "every key has a meaning"
    assert table in (ROOT / "docs" / "config.md").read_text(), "regenerate docs/config.md from config_table()"
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "ckpt_every" in capsys.readouterr().out


def test_plot_colours_reference_time_axis_and_logy(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from tensorattn import plot as P

    runs = []
    for name in ("m3_S_seed0", "m3_S_seed1", "m3_T_seed0"):
        out = tmp_path / name
        train(_m3(tmp_path, out_dir=str(out), steps=20, pattern=name.split("_")[1]))
        runs.append(out)
    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    path = P.plot(runs, ["train_loss", "val_acc"], tmp_path / "c.png", logy=True, x="time", reference=True)
    assert path.is_file()
    (loss_ax, acc_ax) = figs[-1].axes
    assert loss_ax.get_yscale() == "log" and acc_ax.get_yscale() == "linear"  # --logy on loss panels only
    assert loss_ax.get_xlabel() == "training time (s)"
    assert loss_ax.get_legend() is not None and acc_ax.get_legend() is not None
    colours = {ln.get_label(): ln.get_color() for ln in acc_ax.get_lines()}
    assert colours["m3_S (n=2)"] == P.group_colour("m3_S") and colours["m3_T"] == P.group_colour("m3_T")
    assert any("majority class" in lab for lab in colours)  # the reference line from summary.json
    P.plot(runs[2:], ["val_acc"], tmp_path / "d.png")
    assert {ln.get_label(): ln.get_color() for ln in figs[-1].axes[0].get_lines()}["m3_T"] == colours["m3_T"]


def test_compiled_training_matches_eager_and_checkpoints_load_either_way(tmp_path):
    import json as _json

    eager = train(_m3(tmp_path, out_dir=str(tmp_path / "e"), steps=6, eval_every=3, pattern="T"))
    comp = train(_m3(tmp_path, out_dir=str(tmp_path / "c"), steps=6, eval_every=3, pattern="T", compile=True))
    assert comp["final"]["val_loss"] == pytest.approx(eager["final"]["val_loss"], rel=1e-4, abs=1e-5)
    a = torch.load(tmp_path / "e" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "c" / "ckpt.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()  # eager names, no "_orig_mod." prefix
    # a compiled run resumes an eager one's checkpoint (compile is not part of the schedule)
    s = train(_m3(tmp_path, out_dir=str(tmp_path / "e"), steps=9, eval_every=3, pattern="T", compile=True))
    assert s["step"] == 9
    assert _json.loads((tmp_path / "e" / "summary.json").read_text())["config"]["compile"] is True


def test_multiview_classifier_takes_one_token_count_per_view():
    from tensorattn import MultiViewClassifier

    torch.manual_seed(0)
    views = [torch.randn(5, d) for d in (24, 24, 16)]
    for mixer in ("tensor", "softmax"):
        m = MultiViewClassifier([24, 24, 16], 10, mixer=mixer, n_tokens=[6, 4, 2], dim=16, n_heads=2)
        assert [t.shape[1] for t in m.tokens(views)] == [6, 4, 2]
        out = m(views)
        assert out.shape == (5, 10) and torch.isfinite(out).all()
        out.sum().backward()
    same = MultiViewClassifier([24, 24, 16], 10, n_tokens=4, dim=16, n_heads=2)
    assert same.n_tokens == [4, 4, 4] and tuple(same.tok_pos.shape) == (3, 4, 16)  # old checkpoints still load
    with pytest.raises(ValueError, match="n_tokens"):
        MultiViewClassifier([24, 24, 16], 10, n_tokens=[4, 4])
    with pytest.raises(ValueError, match=r"n_tokens\[1\]"):
        MultiViewClassifier([24, 24, 16], 10, n_tokens=[4, 0, 2])
