"""Match3 labels, the distinct-position variant, the pairwise shortcut and the measured modulus."""
import itertools

import pytest
import torch

from tensorattn.data import (match3_baselines, match3_batch, match3_labels, match3_modulus, match3_pairwise_rule,
                             match3_positive_rate)


def _brute(x, m, distinct):
    B, N = x.shape
    y = torch.zeros(B, N, dtype=torch.long)
    for b, i in itertools.product(range(B), range(N)):
        for j1, j2 in itertools.product(range(N), repeat=2):
            if distinct and len({i, j1, j2}) < 3:
                continue
            if (x[b, i] + x[b, j1] + x[b, j2]) % m == 0:
                y[b, i] = 1
    return y


@pytest.mark.parametrize("distinct", [False, True])
def test_labels_match_brute_force(distinct):
    g = torch.Generator().manual_seed(0)
    for n, m in ((5, 7), (7, 11), (6, 13)):
        x = torch.randint(0, m, (6, n), generator=g)
        assert torch.equal(match3_labels(x, m, distinct=distinct), _brute(x, m, distinct))


def test_pairwise_rule_is_the_degenerate_triples():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 11, (8, 7), generator=g)
    m = 11
    want = torch.zeros_like(x)
    for b, i, j in itertools.product(range(8), range(7), range(7)):
        if (x[b, i] + 2 * x[b, j]) % m == 0 or (2 * x[b, i] + x[b, j]) % m == 0:
            want[b, i] = 1
    assert torch.equal(match3_pairwise_rule(x, m), want)
    # every degenerate triple is a Match3 triple: the rule never fires on a negative label of the original task
    y = match3_labels(x, m)
    assert bool((match3_pairwise_rule(x, m) <= y).all())


@pytest.mark.parametrize("distinct", [False, True])
def test_measured_modulus_balances_the_labels(distinct):
    m, rate = match3_modulus(8, distinct=distinct, samples=1024)
    assert abs(rate - 0.5) < 0.05
    assert abs(match3_positive_rate(8, m, distinct=distinct, samples=1024, seed=5) - 0.5) < 0.06


def test_pairwise_shortcut_works_on_the_original_labels_only():
    g = torch.Generator().manual_seed(2)
    m, _ = match3_modulus(10, samples=1024)
    x, y = match3_batch(10, m, 1024, g)
    base = match3_baselines(x, y, m)
    assert base["pairwise_rule"] > base["majority"] + 0.1  # the shortcut the original task leaks
    md, _ = match3_modulus(10, distinct=True, samples=1024)
    x, y = match3_batch(10, md, 1024, g, distinct=True)
    base = match3_baselines(x, y, md)
    assert abs(base["pairwise_rule"] - 0.5) < 0.04 and base["majority"] < 0.55  # chance: no shortcut


def test_bad_arguments_are_named():
    x = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="m "):
        match3_labels(x, 0)
    with pytest.raises(TypeError, match="distinct"):
        match3_labels(x, 5, distinct="yes")
    with pytest.raises(ValueError, match="x must be an integer"):
        match3_labels(x.float(), 5)
    with pytest.raises(ValueError, match="n must be"):
        match3_modulus(2)
    with pytest.raises(ValueError, match="target"):
        match3_modulus(8, target=1.5)


@pytest.mark.parametrize("distinct", [False, True])
def test_training_records_the_modulus_and_the_baselines(tmp_path, distinct):
    import json

    from tensorattn.config import TrainConfig

    from tensorattn.train import train

    out = tmp_path / "run"
    train(TrainConfig(task="match3", match3_n=6, match3_distinct=distinct, dim=16, n_heads=2, batch_size=8,
                      steps=1, eval_every=1, eval_batches=2, progress=False, out_dir=str(out)))
    info = json.loads((out / "summary.json").read_text())["task_info"]
    m, _ = match3_modulus(6, distinct=distinct, samples=2048)
    assert info["match3_m"] == m and info["match3_distinct"] is distinct
    assert 0.35 < info["positive_rate"] < 0.65 and info["majority"] >= 0.5
    assert (info["pairwise_rule"] > 0.65) is (not distinct)
