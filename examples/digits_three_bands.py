"""Train on your own data: three-view digits from scikit-learn's ``load_digits`` (8 x 8 images).

Each image is cut into three views: the top band (rows 0-2, 24 pixels), the middle band (rows 3-5, 24) and the
bottom band (rows 6-7, 16). :class:`tensorattn.MultiViewClassifier` mixes the views by tensor attention (each
view's tokens query pairs of tokens from the two other views), by softmax cross-attention or not at all
(``mixer = "concat"``, an MLP on the concatenated pixels).

    tensorattn train task=examples/digits_three_bands.py:make_task mixer=tensor steps=300 out_dir=runs/digits

``make_task(config)`` is the factory the ``task`` key names; the config keys it reads are ``seed`` (the split),
``batch_size``, ``mixer``, ``mfeat_tokens``, ``dim``, ``n_heads``, ``head_dim``, ``t_head_dim`` and ``hidden``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tensorattn.model import MultiViewClassifier
from tensorattn.tasks import Task

BANDS = ((0, 3), (3, 6), (6, 8))  # image rows of the three views
TEST_FRACTION = 0.25


class DigitsThreeBands(Task):
    """The task protocol of :mod:`tensorattn.tasks` for the three-band digits."""

    def __init__(self, cfg, device="cpu"):
        from sklearn.datasets import load_digits

        self.cfg, self.device = cfg, torch.device(cfg.device)  # the device the run resolved
        d = load_digits()
        images = torch.tensor(d.images, dtype=torch.float32) / 16.0  # [N, 8, 8] in [0, 1]
        y = torch.tensor(d.target, dtype=torch.long)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.seed))
        n_test = int(len(y) * TEST_FRACTION)
        test, train = perm[:n_test], perm[n_test:]
        views = [images[:, a:b].flatten(1) for a, b in BANDS]  # [N, 24], [N, 24], [N, 16]
        self.train = ([v[train] for v in views], y[train])
        self.test = ([v[test] for v in views], y[test])
        self.tokens_per_batch = cfg.batch_size
        counts = torch.bincount(y[test], minlength=10)
        self.info = {"data": "sklearn.datasets.load_digits (1797 images), views = rows 0-2 / 3-5 / 6-7",
                     "n_train": len(train), "n_test": n_test, "majority": float(counts.max()) / n_test}

    def build_model(self):
        c = self.cfg
        return MultiViewClassifier([v.shape[1] for v in self.train[0]], 10, mixer=c.mixer, n_tokens=c.mfeat_tokens,
                                   dim=c.dim, n_heads=c.n_heads, head_dim=c.head_dim or None,
                                   t_head_dim=c.t_head_dim or None, hidden=c.hidden)

    def train_batch(self, gen):
        idx = torch.randint(0, len(self.train[1]), (self.cfg.batch_size,), generator=gen)
        return [v[idx] for v in self.train[0]], self.train[1][idx]

    def loss(self, model, batch):
        views, y = batch
        return F.cross_entropy(model([v.to(self.device) for v in views]).float(), y.to(self.device))

    @torch.no_grad()
    def evaluate(self, model, autocast):
        views, y = self.test
        with autocast():
            logits = model([v.to(self.device) for v in views]).float()
        y = y.to(self.device)
        return {"test_loss": F.cross_entropy(logits, y).item(), "test_acc": (logits.argmax(-1) == y).float().mean().item()}


def make_task(cfg):
    """The factory: ``task = "examples/digits_three_bands.py:make_task"``."""
    return DigitsThreeBands(cfg)
