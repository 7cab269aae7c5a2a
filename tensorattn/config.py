"""The training config: the :class:`TrainConfig` dataclass (every key, its type, default and meaning), its
validation, the TOML file plus ``key=value`` overrides that build it (:func:`load_config`) and the table of keys
(:func:`config_table`, ``docs/config.md``). :mod:`tensorattn.train` runs it."""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from .tasks import BUILTIN_TASKS, load_task_factory

__all__ = ["TrainConfig", "ConfigError", "load_config", "config_table"]


class ConfigError(ValueError):
    """A config that validates but cannot run here (no such device, an out_dir that is a file, a model the
    layers refuse): ``tensorattn train`` reports it in one line and exits with status 2, as for a bad key."""


#: Size limits that :meth:`TrainConfig.validate` checks before anything is allocated.
MAX_ACTIVATION = 1 << 31  # elements of one activation [batch_size, seq_len, width] (8 GiB in float32)
MAX_PARAMS = 1 << 32  # parameters (16 GiB in float32, three times that with AdamW's moments)
MAX_EVAL_TOKENS = 1 << 28  # tokens of the validation batches held in memory: eval_batches x batch_size x seq_len
MAX_SEED = (1 << 63) - 2  # seed + 1 seeds the batch generator; both must fit torch's seed range


@dataclass
class TrainConfig:
    """Everything a run needs. Integers documented with "0 = ..." take 0 to mean the stated default."""

    # --- run
    task: str = "match3"  # "match3" | "lmatch3" | "kjv" | "mfeat" | a factory "package.module:name" or "file.py:name"
    out_dir: str = "runs/default"  # run directory: config.json, metrics.jsonl, ckpt.pt, summary.json
    seed: int = 0  # model initialisation and training batches (evaluation data has its own fixed seed)
    device: str = "auto"  # "auto" (cuda if available) | "cpu" | "cuda" | "cuda:N"
    amp: str = "auto"  # "auto" (bf16 on cuda, none on cpu) | "bf16" | "none"
    threads: int = 0  # torch CPU threads; 0 = leave torch's default
    resume: bool = True  # continue from out_dir/ckpt.pt when it exists
    stop_at: int = 0  # stop (with a checkpoint) after this step; 0 = run to `steps`
    progress: bool = True  # a progress bar on a terminal; else (or with false) one line per evaluation (rank 0)
    ckpt_every: int = 0  # write ckpt.pt every this many steps as well; 0 = at evaluations only
    compile: bool = False  # torch.compile the model for training and evaluation (checkpoints stay eager-loadable)
    strategy: str = "none"  # data parallelism under torchrun: "none" | "ddp" | "fsdp" (FSDP2); batch_size is global
    # --- optimisation
    steps: int = 500  # optimiser steps (the cosine schedule ends here)
    time_budget_s: float = 0.0  # stop after this many seconds of training steps (evaluations not counted); the cosine schedule then runs over the budget, `steps` stays the cap; 0 = none
    batch_size: int = 32  # examples per step (the global batch under torchrun)
    lr: float = 1e-3  # peak learning rate (AdamW)
    min_lr: float = 1e-4  # the cosine schedule's floor
    warmup_steps: int = 50  # linear warm-up steps before the cosine decay
    weight_decay: float = 0.1  # AdamW weight decay
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # 0 = no clipping
    eval_every: int = 100  # evaluate (and checkpoint) every this many steps, and at the end
    eval_batches: int = 8  # validation batches per evaluation
    log_every: int = 10  # log the mean training loss every this many steps
    # --- sequence model (match3, kjv)
    pattern: str = "S"  # S softmax, T exact tensor, P fast tensor; repeated to n_layer
    n_layer: int = 1  # number of blocks
    dim: int = 64  # model width
    n_heads: int = 4  # softmax layers' query heads (and tensor layers' unless t_heads)
    head_dim: int = 0  # 0 = dim // n_heads
    n_kv_heads: int = 0  # 0 = n_heads
    t_heads: int = 0  # 0 = n_heads
    t_head_dim: int = 0  # 0 = head_dim
    t_kv_heads: int = 0  # 0 = t_heads
    window: int = 0  # exact tensor layers' window; 0 = all causal pairs
    p_key_dim: int = 0  # fast layers' key dim Dk; 0 = t_head_dim
    p_degree: int = 2  # fast (P) layers: even Taylor degree of the polynomial
    backend: str = "auto"  # exact tensor layers' backend: "auto" or one of tensorattn.exact.BACKENDS
    p_backend: str = "auto"  # fast tensor layers' backend: "auto", "triton" or "torch"
    mlp_ratio: int = 4  # MLP hidden width over dim
    pos: str = "learned"  # "learned" | "rope" | "none" (match3 always uses "none")
    block_size: int = 128  # kjv: context length (and the learned position table's size)
    # --- data
    match3_n: int = 16  # match3: sequence length N
    match3_m: int = 0  # 0 = the modulus whose measured positive rate is closest to 50 % (summary.json: task_info)
    match3_distinct: bool = False  # count only triples of three distinct positions (no pairwise shortcut)
    lmatch3_n: int = 256  # lmatch3 (long-range Match3): sequence length
    lmatch3_k: int = 6  # lmatch3: marked values per sequence
    lmatch3_m: int = 0  # lmatch3: modulus; 0 = the one whose measured positive rate is closest to 50 %
    lmatch3_gap: int = 64  # lmatch3: every mark sits at least this many positions before the query
    kjv_val_books: List[str] = field(default_factory=lambda: ["Ruth", "Jonah", "Mark", "James"])  # kjv: held-out books
    kjv_pack: bool = False  # kjv: train on packed verses (batch_size x block_size characters in one row, one verse a document)
    mfeat_views: List[str] = field(default_factory=lambda: ["pix", "fou", "zer"])  # mfeat: UCI views
    mfeat_tokens: int = 8  # mfeat (and the digits example): tokens per view
    mixer: str = "tensor"  # mfeat: "tensor" | "softmax" | "concat"
    hidden: int = 128  # mfeat classifier width

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the key for any value out of its range."""
        if self.task not in BUILTIN_TASKS:
            load_task_factory(self.task)  # the form and the import, before anything runs
        choices = {"amp": ("auto", "bf16", "none"),
                   "pos": ("learned", "rope", "none"), "mixer": ("tensor", "softmax", "concat"),
                   "strategy": ("none", "ddp", "fsdp")}
        for k, allowed in choices.items():
            if getattr(self, k) not in allowed:
                raise ValueError(f"config key {k!r} must be one of {list(allowed)}, got {getattr(self, k)!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"config key 'device' must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        positive = ("steps", "batch_size", "eval_every", "eval_batches", "log_every", "n_layer", "dim", "n_heads",
                    "p_degree", "mlp_ratio", "block_size", "match3_n", "mfeat_tokens", "hidden", "lmatch3_n")
        for k in positive:
            if getattr(self, k) < 1:
                raise ValueError(f"config key {k!r} must be >= 1, got {getattr(self, k)}")
        nonneg = ("seed", "threads", "stop_at", "ckpt_every", "warmup_steps", "head_dim", "n_kv_heads", "t_heads",
                  "t_head_dim", "t_kv_heads", "window", "p_key_dim", "match3_m", "lmatch3_m", "lmatch3_gap")
        for k in nonneg:
            if getattr(self, k) < 0:
                raise ValueError(f"config key {k!r} must be >= 0, got {getattr(self, k)}")
        for k in ("lr", "min_lr", "weight_decay", "grad_clip", "time_budget_s"):
            v = getattr(self, k)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"config key {k!r} must be a finite number >= 0, got {v}")
        if self.min_lr > self.lr:
            raise ValueError(f"config key 'min_lr' ({self.min_lr}) must not exceed 'lr' ({self.lr})")
        for k in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, k) < 1.0:
                raise ValueError(f"config key {k!r} must be in [0, 1), got {getattr(self, k)}")
        if self.p_degree % 2:
            raise ValueError(f"config key 'p_degree' must be even (odd Taylor degrees can make the normaliser <= 0), "
                             f"got {self.p_degree}")
        for heads, kv in (("n_heads", "n_kv_heads"), ("t_heads", "t_kv_heads")):
            h = getattr(self, heads) or self.n_heads
            g = getattr(self, kv) or h
            if h % g:
                raise ValueError(f"config key {heads!r} ({h}) must be a multiple of {kv!r} ({g}) for grouped-query "
                                 "attention")
        from .exact import BACKENDS as EXACT_BACKENDS
        from .poly import BACKENDS as POLY_BACKENDS

        for k, names in (("backend", EXACT_BACKENDS), ("p_backend", POLY_BACKENDS)):
            if getattr(self, k) != "auto" and getattr(self, k) not in names:
                raise ValueError(f"config key {k!r} must be 'auto' or one of {sorted(names)}, got {getattr(self, k)!r}")
        if self.device.startswith("cuda:") and not self.device[5:].isdigit():
            raise ValueError(f"config key 'device' must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.stop_at > self.steps:
            raise ValueError(f"config key 'stop_at' ({self.stop_at}) must be <= 'steps' ({self.steps}) or 0")
        if self.seed > MAX_SEED:
            raise ValueError(f"config key 'seed' must be in [0, {MAX_SEED}] (seed + 1 seeds the batch generator, and "
                             f"torch seeds are 64-bit), got {self.seed}")
        if self.task == "mfeat":
            from .data import MFEAT_VIEWS

            unknown = [v for v in self.mfeat_views if v not in MFEAT_VIEWS]
            if unknown or not self.mfeat_views:
                raise ValueError(f"config key 'mfeat_views' must be a non-empty list of views from "
                                 f"{sorted(MFEAT_VIEWS)}, got {self.mfeat_views!r}"
                                 + (f" (unknown: {unknown})" if unknown else ""))
        if self.task == "lmatch3" and (self.lmatch3_k < 2 or self.lmatch3_n - 1 - self.lmatch3_gap < self.lmatch3_k):
            raise ValueError(f"config keys 'lmatch3_n' ({self.lmatch3_n}), 'lmatch3_k' ({self.lmatch3_k}) and "
                             f"'lmatch3_gap' ({self.lmatch3_gap}): need lmatch3_k >= 2 marks at distinct positions "
                             "before lmatch3_n - 1 - lmatch3_gap")
        if self.task in ("match3", "kjv", "lmatch3"):
            from .model import parse_pattern

            try:
                layers = parse_pattern(self.pattern, self.n_layer)
            except ValueError as e:
                raise ValueError(f"config keys 'pattern'/'n_layer': {e}") from None
            if "P" in layers:
                self._check_poly_rank()
        if self.task in BUILTIN_TASKS:  # a user task owns its data and model sizes
            self._check_sizes()
        return self

    def _head_dims(self):
        hd = self.head_dim or self.dim // self.n_heads
        th = self.t_heads or self.n_heads
        thd = self.t_head_dim or hd
        return hd, th, thd

    def _check_poly_rank(self) -> None:
        """Fast (P) layers: the degree and the feature rank C(Dk + p_degree, p_degree) within poly's limits."""
        try:
            from .poly import MAX_DEGREE, MAX_RANK, poly_rank
        except ImportError:  # pragma: no cover - poly is part of the package
            return
        dk = self.p_key_dim or self._head_dims()[2]
        if self.p_degree > MAX_DEGREE:
            raise ValueError(f"config key 'p_degree' must be <= {MAX_DEGREE} (tensorattn.poly.MAX_DEGREE: higher "
                             f"powers overflow the float32 features), got {self.p_degree}")
        k = poly_rank(dk, self.p_degree)
        if k > MAX_RANK:
            raise ValueError(f"config keys 'p_degree' ({self.p_degree}) and the fast layers' key dim Dk ({dk}, from "
                             f"'p_key_dim', else 't_head_dim' or 'head_dim') give the feature rank C(Dk + p_degree, "
                             f"p_degree) = {k:,}, above tensorattn.poly.MAX_RANK = {MAX_RANK:,}; lower p_degree or "
                             "set a smaller p_key_dim")

    def _check_sizes(self) -> None:
        """Refuse sizes that would exhaust memory, before anything is allocated (MAX_ACTIVATION, MAX_PARAMS,
        MAX_EVAL_TOKENS), naming the size, the limit and the keys to change."""
        bs = self.batch_size
        if self.task == "mfeat":
            from .data import MFEAT_VIEWS

            seq, seq_key = self.mfeat_tokens * len(self.mfeat_views), "mfeat_tokens"
            width, width_keys = max(self.dim, self.hidden), "dim/hidden"
            feats = sum(MFEAT_VIEWS.get(v, 0) for v in self.mfeat_views)
            params = feats * self.dim + 6 * self.dim * self.dim + self.hidden * (feats + seq * self.dim + self.hidden)
        else:
            hd, th, thd = self._head_dims()
            seq, seq_key = {"match3": (self.match3_n, "match3_n"), "lmatch3": (self.lmatch3_n, "lmatch3_n")}.get(
                self.task, (self.block_size, "block_size"))
            width, width_keys = self.dim * max(1, self.mlp_ratio), "dim/mlp_ratio"
            vocab = (self.match3_m or round(0.7 * self.match3_n ** 2)) if self.task == "match3" else 256
            per_layer = 2 * self.mlp_ratio * self.dim ** 2 + max(4 * self.dim * self.n_heads * hd,
                                                                  6 * self.dim * th * thd)
            params = self.n_layer * per_layer + (2 * vocab + seq) * self.dim
        checks = [
            (bs * seq * width, MAX_ACTIVATION, "MAX_ACTIVATION",
             f"one activation [batch_size, seq_len, width] = [{bs}, {seq}, {width}]", f"batch_size, {seq_key} or "
             f"{width_keys}", max(1, MAX_ACTIVATION // max(1, seq * width))),
            (params, MAX_PARAMS, "MAX_PARAMS", "the model's parameter count (estimated)",
             "dim, n_layer, mlp_ratio, the head counts and dims" + (", match3_n" if self.task == "match3" else ""),
             None),
        ]
        if self.task == "match3":  # labels are computed from [batch_size, n, n] pair sums
            checks.append((bs * seq * seq, MAX_ACTIVATION, "MAX_ACTIVATION",
                           f"the match3 pair sums [batch_size, match3_n, match3_n] = [{bs}, {seq}, {seq}]",
                           "batch_size or match3_n", max(1, MAX_ACTIVATION // max(1, seq * seq))))
        if self.task != "mfeat":
            checks.append((self.eval_batches * bs * seq, MAX_EVAL_TOKENS, "MAX_EVAL_TOKENS",
                           f"the validation set eval_batches x batch_size x seq_len = {self.eval_batches} x {bs} x "
                           f"{seq} tokens", f"eval_batches, batch_size or {seq_key}",
                           max(1, MAX_EVAL_TOKENS // max(1, self.eval_batches * seq))))
        for size, limit, lname, what, keys, bs_max in checks:
            if size > limit:
                hint = f" (batch_size at most {bs_max} with the other keys as they are)" if bs_max and bs > bs_max \
                    else ""
                raise ValueError(f"config sizes too large: {what} has {size:,} elements, above the limit {limit:,} "
                                 f"({lname} in tensorattn.train); lower {keys}{hint}")


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)


def config_table() -> str:
    """Markdown table of every config key (section, name, type, default, meaning), read from the
    :class:`TrainConfig` source itself: the annotations, the defaults and the comment on each field's line. It is
    ``tensorattn train --help``'s epilog and ``docs/config.md`` (a test keeps the file equal to it)."""
    import inspect
    import re

    rows, section = [], ""
    for line in inspect.getsource(TrainConfig).splitlines():
        head = re.match(r"\s*# --- (.+)", line)
        if head:
            section = head.group(1).strip()
            continue
        m = re.match(r"\s{4}(\w+): [^=]+=(.*?)(?:  # (.*))?$", line)
        if m and m.group(1) in _FIELDS:
            f = _FIELDS[m.group(1)]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            t = getattr(_TYPES[f.name], "__name__", str(_TYPES[f.name])).replace("typing.", "")
            rows.append(f"| {section} | `{f.name}` | {t} | `{default!r}` | {(m.group(3) or '').replace('|', '/')} |")
    return "\n".join(["| section | key | type | default | meaning |", "|---|---|---|---|---|", *rows])


def _coerce(key: str, value: Any, source: str) -> Any:
    """Check ``value`` against the field's type; ints are accepted for floats. Raises TypeError."""
    t = _TYPES[key]
    if t is bool:
        ok = isinstance(value, bool)
    elif t is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif t is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif t is str:
        ok = isinstance(value, str)
    else:  # List[str]
        if isinstance(value, str):  # a bare override such as kjv_val_books=Ruth,Mark
            value = [s.strip() for s in value.split(",") if s.strip()]
        ok = isinstance(value, list) and all(isinstance(s, str) for s in value)
    if not ok:
        tname = getattr(t, "__name__", None) or str(t).replace("typing.", "")
        raise TypeError(f"config key {key!r} ({source}) must be of type {tname}, got "
                        f"{type(value).__name__} {value!r}")
    return value


def _unknown(key: str, source: str) -> ValueError:
    near = difflib.get_close_matches(key, list(_FIELDS), n=3)
    hint = f"; did you mean {' or '.join(map(repr, near))}?" if near else f"; valid keys: {', '.join(_FIELDS)}"
    return ValueError(f"unknown config key {key!r} ({source}){hint}")


def _parse_value(text: str) -> Any:
    """A TOML value (``3``, ``1e-3``, ``true``, ``"a"``, ``["x", "y"]``), else the bare text as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A validated config from a TOML file (top-level keys only) and ``key=value`` overrides (applied last)."""
    values: Dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {str(p)!r} does not exist")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {str(p)!r} is not valid TOML: {e}") from None
        for k, v in data.items():
            if k not in _FIELDS:
                raise _unknown(k, f"in {p}")
            values[k] = _coerce(k, v, f"in {p}")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must have the form key=value")
        k, text = item.split("=", 1)
        k = k.strip()
        if k not in _FIELDS:
            raise _unknown(k, f"override {item!r}")
        v = _parse_value(text.strip())
        if _TYPES[k] is str and not isinstance(v, str):
            v = text.strip()  # e.g. out_dir=2024 or pattern=SSST stays a string
        values[k] = _coerce(k, v, f"override {item!r}")
    return TrainConfig(**values).validate()


