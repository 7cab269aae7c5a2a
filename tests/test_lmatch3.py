"""The long-range Match3 task (issue: a task where a window cannot see the evidence): data, labels, the window's
blindness, a training run."""
import itertools

import pytest
import torch

from tensorattn.data import long_match3_batch, long_match3_labels, long_match3_modulus
from tensorattn.model import Transformer
from tensorattn.config import TrainConfig, load_config
from tensorattn.train import train


def test_batch_layout_and_labels_match_brute_force():
    n, k, m, gap = 80, 5, 11, 30
    x, y = long_match3_batch(n, k, m, 64, torch.Generator().manual_seed(0), gap=gap)
    assert x.shape == (64, n) and y.shape == (64,)
    for row, lab in zip(x, y):
        marks = [(i, int(t) - 1) for i, t in enumerate(row[:-1].tolist()) if t]
        assert len(marks) == k and all(i < n - 1 - gap and 0 <= v < m for i, v in marks)
        q = int(row[-1]) - 1 - m
        assert 0 <= q < m
        want = any((q + a + b) % m == 0 for (_, a), (_, b) in itertools.combinations(marks, 2))
        assert int(lab) == int(want)
    # two equal marks still count as two positions; one mark alone never pairs with itself
    assert long_match3_labels(torch.tensor([[3, 3]]), torch.tensor([5]), 11).item() == 1
    assert long_match3_labels(torch.tensor([[3, 4]]), torch.tensor([5]), 11).item() == 0  # 5 + 3 + 3 only


def test_modulus_balances_the_labels():
    m, rate = long_match3_modulus(6)
    assert 0.45 < rate < 0.55
    y = long_match3_batch(300, 6, m, 4096, torch.Generator().manual_seed(1), gap=100)[1]
    assert abs(float(y.float().mean()) - rate) < 0.04


def test_a_short_window_cannot_see_the_marks_but_the_fast_layer_can():
    torch.manual_seed(0)
    n, k, m, gap = 96, 4, 9, 40
    x, _ = long_match3_batch(n, k, m, 8, torch.Generator().manual_seed(2), gap=gap)
    x2 = x.clone()
    x2[:, :-1] = torch.where(x[:, :-1] > 0, 1 + (x[:, :-1] - 1 + 1) % m, 0)  # every mark's value changed
    common = dict(vocab_size=1 + 2 * m, n_out=2, block_size=n, dim=16, n_layer=2, n_heads=2, causal=True, pos="rope")
    window = Transformer(**common, pattern="T", window=gap // 2 - 1).double()  # two layers reach back < gap
    fast = Transformer(**common, pattern="P", p_key_dim=4).double()
    torch.testing.assert_close(window(x)[:, -1], window(x2)[:, -1], rtol=0, atol=0)
    assert (fast(x)[:, -1] - fast(x2)[:, -1]).abs().max() > 1e-6


def test_train_lmatch3_runs_and_records_the_baseline(tmp_path):
    cfg = TrainConfig(task="lmatch3", pattern="P", n_layer=1, dim=16, n_heads=2, p_key_dim=4, lmatch3_n=48,
                      lmatch3_k=4, lmatch3_gap=16, pos="rope", batch_size=8, steps=2, eval_every=2, eval_batches=1,
                      log_every=1, progress=False, out_dir=str(tmp_path / "run"))
    res = train(cfg)
    assert 0.0 <= res["final"]["val_acc"] <= 1.0
    assert 0.5 <= res["task_info"]["majority"] <= 1.0 and res["task_info"]["lmatch3_m"] >= 2


def test_lmatch3_config_errors(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('task = "lmatch3"\nlmatch3_n = 20\nlmatch3_k = 6\nlmatch3_gap = 14\n')
    with pytest.raises(ValueError, match="lmatch3_gap"):
        load_config(str(p), [])


def test_run_lmatch3_script_equal_params_and_budget(tmp_path):
    """scripts/run_lmatch3.py on the CPU at a tiny size: the three layer kinds get the same parameter count, each
    run stops at its time budget, and the report (JSON + markdown) carries the baseline and the command."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "lm"
    r = subprocess.run([sys.executable, str(root / "scripts" / "run_lmatch3.py"), "--device", "cpu", "--n", "48",
                        "--gap", "12", "--window", "6", "--budget-s", "0.5", "--eval-every", "5", "--seeds", "1",
                        "--runs", str(tmp_path / "runs"), "--out", str(out)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [row["model"] for row in rows] == ["fast tensor (P)", "windowed tensor (T)", "softmax (S)"]
    assert len({row["params"] for row in rows}) == 1  # equal parameter count
    assert all(row["train_time_s"][0] >= 0.5 and 0 <= row["val_acc"][0] <= 1 for row in rows)
    md = out.with_suffix(".md").read_text()
    assert "majority" in md and "run_lmatch3.py" in md
    bad = subprocess.run([sys.executable, str(root / "scripts" / "run_lmatch3.py"), "--window", "64", "--gap", "32"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--window (64) must be below --gap (32)" in bad.stderr
