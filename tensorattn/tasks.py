"""Tasks for ``tensorattn train``: the protocol a task follows, the four built-in tasks, and user tasks.

A **task** is what differs between experiments: the data, the model built for it, the loss and the evaluation.
:func:`tensorattn.train.train` takes one (``train(config, task=my_task)``), and the CLI and TOML name one by
``task = "match3" | "lmatch3" | "kjv" | "mfeat"`` or by a factory, ``task = "package.module:make_task"`` or
``task = "path/to/file.py:make_task"``: a callable that takes the :class:`~tensorattn.config.TrainConfig` and returns
a task. ``examples/digits_three_bands.py`` is a complete one.

The protocol (:class:`Task`): what the training loop calls.

* ``tokens_per_batch: int``, for the throughput figure (tokens, or examples, per training batch).
* ``build_model() -> torch.nn.Module``: a fresh model (the loop moves it to the device, wraps it for DDP/FSDP and
  compiles it when asked).
* ``train_batch(gen: torch.Generator)``: one training batch, drawn only from ``gen`` (so a resumed run draws the
  same batches as an uninterrupted one); any structure that ``loss`` understands.
* ``loss(model, batch) -> torch.Tensor``: the scalar training loss (the task moves the batch to its device).
* ``evaluate(model, autocast) -> Dict[str, float]``: named metrics, called under ``torch.no_grad`` in eval mode;
  ``autocast()`` is a context manager for the run's mixed precision. Name metrics for what they measure
  (``val_*`` on a validation split, ``test_*`` on a test split): the summary keeps the ``val_``/``test_`` ones.

Optional:

* ``info: Dict[str, Any]``: facts about the data recorded in ``summary.json`` under ``task_info`` (the values a
  ``0 = ...`` config key resolved to, baselines such as the majority-class accuracy, the data source).
* ``encode(text) -> List[int]`` and ``decode(ids) -> str``: a character task's text codec (``tensorattn sample``).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # pragma: no cover
    from .config import TrainConfig

__all__ = ["Task", "BUILTIN_TASKS", "build_task", "load_task_factory", "Match3Task", "KJVTask", "MfeatTask"]


class Task:
    """The protocol of a task (see the module docstring): subclass it, or provide the same attributes."""

    tokens_per_batch: int
    info: Dict[str, Any] = {}

    def build_model(self) -> torch.nn.Module: ...

    def train_batch(self, gen: torch.Generator): ...

    def loss(self, model, batch) -> torch.Tensor: ...

    @torch.no_grad()
    def evaluate(self, model, autocast) -> Dict[str, float]: ...


def _seq_model(cfg: "TrainConfig", vocab: int, n_out: int, causal: bool, pos: str, block: int):
    from .model import Transformer

    nz = lambda v: v or None  # noqa: E731  (0 means "use the default")
    return Transformer(vocab, n_out=n_out, block_size=block, dim=cfg.dim, n_layer=cfg.n_layer, pattern=cfg.pattern,
                       n_heads=cfg.n_heads, head_dim=nz(cfg.head_dim), n_kv_heads=nz(cfg.n_kv_heads),
                       t_heads=nz(cfg.t_heads), t_head_dim=nz(cfg.t_head_dim), t_kv_heads=nz(cfg.t_kv_heads),
                       window=nz(cfg.window), p_key_dim=nz(cfg.p_key_dim), p_degree=cfg.p_degree, causal=causal,
                       pos=pos, mlp_ratio=cfg.mlp_ratio, backend=cfg.backend, p_backend=cfg.p_backend)


@torch.no_grad()
def _classification_eval(model, batches, autocast, device, *, last_only: bool) -> Dict[str, float]:
    """Mean cross-entropy and accuracy over labelled batches ``(x, y)``: one label per token, or (``last_only``) one
    per sequence, read at its last position."""
    tot_loss = tot_acc = 0.0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast():
            logits = model(x).float()
        logits = logits[:, -1] if last_only else logits.flatten(0, 1)
        tot_loss += F.cross_entropy(logits, y.flatten()).item()
        tot_acc += (logits.argmax(-1) == y.flatten()).float().mean().item()
    return {"val_loss": tot_loss / len(batches), "val_acc": tot_acc / len(batches)}


@functools.lru_cache(maxsize=None)
def _balanced_modulus(n: int, distinct: bool):
    from .data import match3_modulus

    return match3_modulus(n, distinct=distinct, samples=2048)


class Match3Task(Task):
    """Per-token binary labels; a fresh batch every step; a fixed validation set (same for every seed).

    ``info`` (recorded in ``summary.json``) holds the modulus used, its measured positive rate, and the accuracy of
    the majority class and of the pairwise shortcut rule on the validation set (the baselines of every table)."""

    def __init__(self, cfg: "TrainConfig", device):
        from .data import match3_baselines, match3_batch

        self.cfg, self.device = cfg, device
        self.n, self.distinct = cfg.match3_n, cfg.match3_distinct
        self.m = cfg.match3_m or _balanced_modulus(self.n, self.distinct)[0]
        self.tokens_per_batch = cfg.batch_size * self.n
        g = torch.Generator().manual_seed(1234)
        self.val = [match3_batch(self.n, self.m, cfg.batch_size, g, distinct=self.distinct)
                    for _ in range(cfg.eval_batches)]
        xs, ys = torch.cat([x for x, _ in self.val]), torch.cat([y for _, y in self.val])
        self.info = dict(match3_m=self.m, match3_distinct=self.distinct, **match3_baselines(xs, ys, self.m))

    def build_model(self):
        return _seq_model(self.cfg, self.m, 2, causal=False, pos="none", block=self.n)

    def train_batch(self, gen):
        from .data import match3_batch

        return match3_batch(self.n, self.m, self.cfg.batch_size, gen, distinct=self.distinct)

    def loss(self, model, batch):
        x, y = (t.to(self.device) for t in batch)
        return F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())

    def evaluate(self, model, autocast):
        return _classification_eval(model, self.val, autocast, self.device, last_only=False)


class LongMatch3Task(Task):
    """Long-range three-way matching (:func:`tensorattn.data.long_match3_batch`): one binary label per sequence, read
    at the last position (the query) of a causal model; a fresh batch every step, a fixed validation set.

    ``info`` holds the modulus, its measured positive rate and the majority-class accuracy of the validation set."""

    def __init__(self, cfg: "TrainConfig", device):
        from .data import long_match3_batch, long_match3_modulus

        self.cfg, self.device = cfg, device
        self.n, self.k, self.gap = cfg.lmatch3_n, cfg.lmatch3_k, cfg.lmatch3_gap
        self.m = cfg.lmatch3_m or long_match3_modulus(self.k)[0]
        self.tokens_per_batch = cfg.batch_size * self.n
        g = torch.Generator().manual_seed(1234)
        self.val = [long_match3_batch(self.n, self.k, self.m, cfg.batch_size, g, gap=self.gap)
                    for _ in range(cfg.eval_batches)]
        rate = float(torch.cat([y for _, y in self.val]).float().mean())
        self.info = dict(lmatch3_m=self.m, positive_rate=rate, majority=max(rate, 1.0 - rate))

    def build_model(self):
        return _seq_model(self.cfg, 1 + 2 * self.m, 2, causal=True, pos=self.cfg.pos, block=self.n)

    def train_batch(self, gen):
        from .data import long_match3_batch

        return long_match3_batch(self.n, self.k, self.m, self.cfg.batch_size, gen, gap=self.gap)

    def loss(self, model, batch):
        x, y = (t.to(self.device) for t in batch)
        return F.cross_entropy(model(x)[:, -1].float(), y)

    def evaluate(self, model, autocast):
        return _classification_eval(model, self.val, autocast, self.device, last_only=True)


_KJV_CACHE: Dict[tuple, Any] = {}


class KJVTask(Task):
    """Next-character prediction; validation on held-out books, in bits per character."""

    def __init__(self, cfg: "TrainConfig", device):
        from .data import CharData, load_kjv

        self.cfg, self.device = cfg, device
        key = tuple(cfg.kjv_val_books)
        if key not in _KJV_CACHE:  # parsing 4 MB of text once per process is enough
            _KJV_CACHE[key] = CharData(*load_kjv(cfg.kjv_val_books))
        self.data = _KJV_CACHE[key]
        self.tokens_per_batch = cfg.batch_size * cfg.block_size
        g = torch.Generator().manual_seed(1234)
        self.val = [self.data.batch("val", cfg.batch_size, cfg.block_size, g) for _ in range(cfg.eval_batches)]

    def build_model(self):
        return _seq_model(self.cfg, self.data.vocab_size, self.data.vocab_size, causal=True, pos=self.cfg.pos,
                          block=self.cfg.block_size)

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` (characters of the training vocabulary only)."""
        bad = sorted(set(text) - set(self.data.stoi))
        if bad:
            raise ValueError(f"the prompt has characters outside the KJV vocabulary: {bad!r}")
        return [self.data.stoi[c] for c in text]

    def decode(self, ids) -> str:
        return self.data.decode(ids)

    def train_batch(self, gen):
        if self.cfg.kjv_pack:  # one row of packed verses (x, y, cu_seqlens); the same characters per step
            return self.data.packed_batch("train", self.tokens_per_batch, self.cfg.block_size, gen)
        return self.data.batch("train", self.cfg.batch_size, self.cfg.block_size, gen)

    def loss(self, model, batch):
        if len(batch) == 3:  # packed: attention stops at each verse's end, its last position has no target
            x, y, cu = (t.to(self.device) for t in batch)
            return F.cross_entropy(model(x, cu_seqlens=cu).flatten(0, 1).float(), y.flatten(), ignore_index=-100)
        x, y = (t.to(self.device) for t in batch)
        return F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())

    @torch.no_grad()
    def evaluate(self, model, autocast):
        tot = 0.0
        for x, y in self.val:
            x, y = x.to(self.device), y.to(self.device)
            with autocast():
                logits = model(x).float()
            tot += F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
        loss = tot / len(self.val)
        return {"val_loss": loss, "val_bpc": loss / math.log(2)}


class MfeatTask(Task):
    """Multi-view digit classification; minibatches drawn from the training split, test accuracy."""

    def __init__(self, cfg: "TrainConfig", device):
        from .data import load_mfeat

        self.cfg, self.device = cfg, device
        self.d = load_mfeat(cfg.mfeat_views)
        self.tokens_per_batch = cfg.batch_size
        self.n_train = len(self.d["y_train"])
        counts = torch.bincount(self.d["y_test"], minlength=10)
        self.info = {"data_source": self.d["source"], "n_train": self.n_train, "n_test": len(self.d["y_test"]),
                     "majority": float(counts.max()) / max(1, len(self.d["y_test"]))}
        print(f"mfeat: {self.d['source']}", file=sys.stderr)

    def build_model(self):
        from .model import MultiViewClassifier

        c = self.cfg
        return MultiViewClassifier(self.d["dims"], 10, mixer=c.mixer, n_tokens=c.mfeat_tokens, dim=c.dim,
                                   n_heads=c.n_heads, head_dim=c.head_dim or None, t_head_dim=c.t_head_dim or None,
                                   hidden=c.hidden)

    def train_batch(self, gen):
        idx = torch.randint(0, self.n_train, (self.cfg.batch_size,), generator=gen)
        return [v[idx] for v in self.d["train"]], self.d["y_train"][idx]

    def loss(self, model, batch):
        views, y = batch
        return F.cross_entropy(model([v.to(self.device) for v in views]).float(), y.to(self.device))

    @torch.no_grad()
    def evaluate(self, model, autocast):
        with autocast():
            logits = model([v.to(self.device) for v in self.d["test"]]).float()
        y = self.d["y_test"].to(self.device)
        return {"test_loss": F.cross_entropy(logits, y).item(), "test_acc": (logits.argmax(-1) == y).float().mean().item()}


BUILTIN_TASKS = {"match3": Match3Task, "kjv": KJVTask, "mfeat": MfeatTask, "lmatch3": LongMatch3Task}
_PROTOCOL = ("tokens_per_batch", "build_model", "train_batch", "loss", "evaluate")


def load_task_factory(spec: str) -> Callable[["TrainConfig"], Task]:
    """The factory named by ``"package.module:name"`` or ``"path/to/file.py:name"`` (a path relative to the
    working directory). Errors say what failed: the form, the import, or the missing name."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"config key 'task' must be one of {sorted(BUILTIN_TASKS)} or a factory "
                         f"'package.module:name' / 'path/to/file.py:name', got {spec!r}")
    mod_name, attr = spec.split(":")
    try:
        if mod_name.endswith(".py") or "/" in mod_name or "\\" in mod_name:
            path = Path(mod_name)
            if not path.is_file():
                raise FileNotFoundError(f"no such file {str(path)!r}")
            name = "tensorattn_user_task_" + path.stem
            module = sys.modules.get(name)
            if module is None or Path(getattr(module, "__file__", "")).resolve() != path.resolve():
                # run the file once per process: the config's validation and the task's construction both load it
                mspec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(mspec)
                sys.modules[name] = module
                try:
                    mspec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]  # a module that failed to run is not kept for the next call
                    raise
        else:
            module = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001  (any failure inside the user's module is reported, not a traceback)
        raise ValueError(f"config key 'task' = {spec!r}: cannot import {mod_name!r}: {type(e).__name__}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"config key 'task' = {spec!r}: {mod_name!r} has no callable {attr!r}")
    return factory


def _check_task(task: Any, where: str) -> Task:
    missing = [a for a in _PROTOCOL if not hasattr(task, a)]
    if missing:
        raise TypeError(f"{where} is not a task: it lacks {missing} (see tensorattn.tasks.Task)")
    return task


def build_task(cfg: "TrainConfig", device="cpu") -> Task:
    """The task ``cfg.task`` names: a built-in one, or what the factory ``module:name`` returns for ``cfg``."""
    if cfg.task in BUILTIN_TASKS:
        return BUILTIN_TASKS[cfg.task](cfg, torch.device(device))
    factory = load_task_factory(cfg.task)
    try:  # the factory sees the device the run resolved ("auto" -> "cuda" or "cpu")
        task = factory(dataclasses.replace(cfg, device=str(torch.device(device))))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"config key 'task' = {cfg.task!r}: the factory raised {type(e).__name__}: {e}") from None
    return _check_task(task, f"what the factory {cfg.task!r} returned ({type(task).__name__})")


