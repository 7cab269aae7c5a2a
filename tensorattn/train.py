"""Training: one ``train(config)`` function over a :class:`~tensorattn.config.TrainConfig` (TOML file plus
``key=value`` overrides: :mod:`tensorattn.config`).

Run it as::

    tensorattn train --config configs/match3_tensor.toml seed=1 out_dir=runs/m3_T_seed1
    python -m tensorattn train --config configs/kjv_ssst_exact.toml device=cuda steps=200

Tasks: ``match3`` (synthetic, per-token labels, fresh batches every step), ``lmatch3`` (its long-range variant:
one label per sequence, the evidence far before the query), ``kjv`` (character LM on the
King James Bible, held-out books as validation, reported in bits per character) and ``mfeat`` (UCI
Multiple Features digits, several views, test accuracy). Features: CPU or CUDA, bf16 autocast on CUDA,
AdamW with gradient clipping and a cosine schedule with linear warm-up, periodic evaluation, a tqdm
progress bar, metrics as JSON lines (``metrics.jsonl``), atomic resumable checkpoints (``ckpt.pt``)
and a fixed seed. A run resumed from its checkpoint produces the same metrics as an uninterrupted one:
batches come from a ``torch.Generator`` whose state is checkpointed, evaluation uses its own fixed one.

What is checked: ``ckpt.pt`` holds only tensors and plain data and is read with ``weights_only=True`` (a
file holding other Python objects is refused unread, as are truncated, foreign and non-finite ones,
with an error naming the file); sizes are checked before anything is allocated (``MAX_ACTIVATION``,
``MAX_PARAMS``, ``MAX_EVAL_TOKENS`` of :mod:`tensorattn.config`); a metrics line that is not a record is skipped with a warning;
temporary files that a kill during an atomic write left in ``out_dir`` are removed at the next start.
Config problems found only at run time (no such device, an ``out_dir`` that is a file) raise
:class:`ConfigError`; ``tensorattn train`` reports them, and bad checkpoints, in one line (status 2).

Data parallelism under ``torchrun`` (``strategy = "ddp"`` or ``"fsdp"``, see :mod:`tensorattn.distributed`)::

    torchrun --standalone --nproc_per_node=2 -m tensorattn train --config configs/match3_ddp.toml

Every rank draws the same global batch of ``batch_size`` examples and trains on its contiguous
``batch_size / world_size`` share (so ``batch_size`` must be divisible by the world size); gradients are
averaged over ranks, so a step equals the single-process step on the whole batch up to rounding. Rank 0
alone shows the progress bar and writes ``config.json``, ``metrics.jsonl``, ``ckpt.pt`` and
``summary.json``; checkpoints hold the full (unsharded) model and optimizer state, so a run may be resumed
with another world size or strategy, or in a single process. Evaluation runs on every rank (FSDP2
forwards are collective) on the whole validation set. With more than one rank each uses
``cuda:LOCAL_RANK`` (nccl), or the CPU (gloo) when CUDA is absent or ``device = "cpu"``. A plain
``python`` launch is a single process whatever ``strategy`` says.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from . import distributed as td
from .config import _FIELDS, ConfigError, TrainConfig, _coerce, config_table, load_config
from .tasks import Task, build_task
from ._io import atomic_write, atomic_write_json, read_metrics_lines, remove_stale_temps
from .layers import param_count

__all__ = ["train", "main", "load_run", "lr_at"]

# the run's files, whose atomic writes leave ".<name>.XXXXXXXX.tmp" behind when the process is killed mid-write
RUN_FILES = ("ckpt.pt", "metrics.jsonl", "config.json", "summary.json")
_RESUME_HINT = "; resume=false starts afresh (overwriting the run's files), or use another out_dir"



def _build(cfg: TrainConfig, device, task: Optional[Task] = None):
    """The task (``task``, else the one ``cfg.task`` names) and its model; a ValueError/TypeError there comes
    from the config (a ConfigError)."""
    try:
        task = build_task(cfg, device) if task is None else task
        return task, task.build_model()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"the config does not make a valid {cfg.task} model or data set: {e}") from None


# ---------------------------------------------------------------------------------------------- training
def lr_at(cfg: TrainConfig, step: int, train_time: float = 0.0) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``steps``, or with
    ``time_budget_s`` at the end of the budget (``train_time`` seconds of training steps so far, whichever of the
    two ends first)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.time_budget_s > 0:
        frac = max(frac, train_time / cfg.time_budget_s)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac))) * (cfg.lr - cfg.min_lr)


def _over_budget(cfg: TrainConfig, train_time: float) -> bool:
    return cfg.time_budget_s > 0 and train_time >= cfg.time_budget_s


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key 'device' is {cfg.device!r} but CUDA is not available here; use device=cpu "
                          "or device=auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"config key 'device' is {cfg.device!r} but this machine has {torch.cuda.device_count()} "
                          f"CUDA device(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return dev


def _check_out_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.out_dir)
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            what = "is" if p == out else f"is inside {str(p)!r}, which is"
            raise ConfigError(f"config key 'out_dir' ({cfg.out_dir!r}) {what} a file, not a directory; choose "
                              "another out_dir")
        if p.exists():
            break
    return out


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether training runs under bf16 autocast: ``amp = "bf16"``, or ``"auto"`` on CUDA."""
    return cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")


def _optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    # weight decay on matrices only (nanoGPT): not on norms, biases or position tables of one row per token
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "tok_pos" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "tok_pos" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


# keys that may differ between an interrupted run and its resumption (checkpoints hold the full, unsharded
# state, so a run may resume under another strategy or world size: equal up to rounding)
_RESUMABLE = {"resume", "stop_at", "progress", "out_dir", "device", "threads", "strategy", "ckpt_every", "compile"}


def _default(key: str) -> Any:
    f = _FIELDS[key]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _truncate_metrics(path: Path, step: int) -> List[Dict[str, Any]]:
    """Drop lines logged after the checkpoint a run resumes from (they will be logged again), and lines that
    are not metrics records (a line torn by a crash mid-append, a hand edit: skipped with a warning naming
    the file and line). Returns the records kept."""
    if not path.exists():
        return []
    keep = [(ln, rec) for ln, rec in read_metrics_lines(path) if rec["step"] <= step]
    atomic_write(path, lambda f: f.write("".join(ln + "\n" for ln, _ in keep)))
    return [rec for _, rec in keep]


# entries of a train checkpoint besides "model" and "optimizer", with their types
_CKPT_ENTRIES = {"config": dict, "gen": torch.Tensor, "torch_rng": torch.Tensor, "step": int, "acc_loss": float,
                 "acc_n": int, "train_time": float, "tokens": int}


def _check_train_checkpoint(ck: Dict[str, Any], path: Path) -> None:
    """A checkpoint read safely is also one that ``train`` wrote: its entries present and of their types."""
    missing = [k for k in _CKPT_ENTRIES if k not in ck] + ([] if "optimizer" in ck else ["optimizer"])
    if missing:
        raise td.CheckpointError(f"checkpoint {path} is not a checkpoint of tensorattn train: it lacks the entries "
                                 f"{missing}{_RESUME_HINT}")
    for k, t in _CKPT_ENTRIES.items():
        v = ck[k]
        ok = (isinstance(v, (int, float)) if t is float else isinstance(v, t)) and not isinstance(v, bool)
        if t is torch.Tensor and ok:
            ok = v.dtype == torch.uint8 and v.dim() == 1
        if t is int and ok:
            ok = v >= 0
        if not ok:
            want = "a 1-D uint8 tensor (an RNG state)" if t is torch.Tensor else f"a {t.__name__}"
            raise td.CheckpointError(f"checkpoint {path} is corrupt: entry {k!r} must be {want}, got "
                                     f"{type(v).__name__} {v!r:.60}{_RESUME_HINT}")
    opt = ck["optimizer"]
    if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)):
        raise td.CheckpointError(f"checkpoint {path} is corrupt: its optimizer entry is not an optimizer state dict "
                                 f"(with 'state' and 'param_groups'){_RESUME_HINT}")


def _optim_state_as(state: Dict[str, Any], order: List[str], by_name: bool) -> Dict[str, Any]:
    """An optimizer state dict re-keyed by parameter names (``by_name``, the form of a checkpoint written
    under a process group) or by the integer ids of ``Optimizer.state_dict`` (a single process).

    ``order`` holds the names of the optimizer's parameters in its order (groups, then parameters), which
    is also the order of the integer ids.
    """
    flat = [p for g in state["param_groups"] for p in g["params"]]
    if not flat or isinstance(flat[0], str) == by_name:
        return state
    if by_name:
        if len(flat) != len(order):
            raise ValueError(f"checkpoint optimizer has {len(flat)} parameters, the model {len(order)}")
        key: Dict[Any, Any] = dict(zip(flat, order))
    else:
        idx = {n: i for i, n in enumerate(order)}
        missing = [n for n in flat if n not in idx]
        if missing:
            raise ValueError(f"checkpoint optimizer holds parameters the model does not have: {missing[:5]}")
        key = {n: idx[n] for n in flat}
    return {"state": {key[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [key[p] for p in g["params"]]} for g in state["param_groups"]]}


def _init_dist(cfg: TrainConfig) -> "td.DistInfo":
    """This process's place: a torchrun launch (``WORLD_SIZE`` set) or an existing process group joins it,
    anything else is a single process on ``cfg.device`` (no group, no change of the current CUDA device)."""
    dev = _device(cfg)
    joined = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not joined and not os.environ.get("WORLD_SIZE"):
        return td.DistInfo(0, 1, 0, dev, None, False)
    # "auto" lets the group decide (an existing gloo group means CPU ranks, even where CUDA exists)
    info = td.init_distributed(device=None if cfg.device == "auto" else dev.type)
    if info.world_size == 1 and cfg.device != "auto":
        info = dataclasses.replace(info, device=dev)
    return info


def train(cfg: TrainConfig, task: Optional[Task] = None) -> Dict[str, Any]:
    """Train as ``cfg`` says; write ``config.json``, ``metrics.jsonl``, ``ckpt.pt`` and ``summary.json`` in
    ``cfg.out_dir``; return the summary (final metrics, parameter count, throughput, machine).

    ``task``: a task object (:mod:`tensorattn.tasks` has the protocol) to train on instead of the one ``cfg.task``
    names; ``cfg.task`` is then only recorded. To resume such a run, pass the same task again.

    With ``resume`` and an existing ``ckpt.pt`` it continues from the checkpoint's step; the config must
    then match the checkpoint's (``steps`` too, since the schedule depends on it) except for the keys in
    ``_RESUMABLE``; an error names the keys that differ.

    Under ``torchrun`` (or inside an existing process group) every rank calls it: ``cfg.strategy`` must
    then be ``"ddp"`` or ``"fsdp"``, ``batch_size`` (the global batch) divisible by the world size; rank 0
    writes the files, every rank returns the summary (its ``final`` metrics on other ranks cover only
    this invocation's steps). A process group created here is destroyed at the end.
    """
    cfg.validate()
    _check_out_dir(cfg)
    if task is not None:
        from .tasks import _check_task

        _check_task(task, f"task ({type(task).__name__})")
    info = _init_dist(cfg)
    try:
        return _train(cfg, info, task)
    finally:
        if info.initialized_here:
            td.cleanup()


def _train(cfg: TrainConfig, info: "td.DistInfo", task: Optional[Task] = None) -> Dict[str, Any]:
    from .bench.harness import machine_info

    W, main_rank = info.world_size, info.is_main
    if W > 1 and cfg.strategy == "none":
        raise ValueError(f"config key 'strategy' is 'none' but this is rank {info.rank} of {W} processes (torchrun); "
                         "set strategy=ddp or strategy=fsdp, or launch a single process")
    if cfg.batch_size % W:
        raise ValueError(f"config key 'batch_size' (the global batch, {cfg.batch_size}) must be divisible by the "
                         f"world size {W}")
    if cfg.kjv_pack and W > 1:
        raise ValueError(f"config key 'kjv_pack' packs one row per step, which is not split over ranks yet: run it "
                         f"in a single process (this is one of {W})")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = info.device
    use_bf16 = uses_bf16(cfg, device)

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)

    out = _check_out_dir(cfg)
    if main_rank:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"config key 'out_dir' ({cfg.out_dir!r}) cannot be made a directory: "
                              f"{e.strerror or e}") from None
        remove_stale_temps(out, RUN_FILES)  # what a kill during an atomic write left behind
    ckpt_path, metrics_path = out / "ckpt.pt", out / "metrics.jsonl"

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    task, model = _build(cfg, device, task)
    model = model.to(device)
    n_params = param_count(model)
    model = td.wrap_model(model, cfg.strategy)  # unchanged without a process group
    opt = _optimizer(cfg, td.unwrap_model(model))  # after wrapping (FSDP2 replaces the parameters)
    # the compiled module shares the parameters; checkpoints keep the eager module's names, so compiled and eager
    # runs load each other's checkpoints
    run_model = torch.compile(model) if cfg.compile else model
    names = {id(p): n for n, p in td.unwrap_model(model).named_parameters()}
    opt_order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    by_name = torch.distributed.is_available() and torch.distributed.is_initialized()
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # training batches only; the same on every rank
    step, acc_loss, acc_n, train_time, tokens = 0, 0.0, 0, 0.0, 0
    last: Dict[str, Any] = {}  # the latest value of every logged metric

    if cfg.resume and ckpt_path.exists():
        # every rank reads it; tensors and plain data only (a crafted pickle is refused unread)
        ck = td.read_checkpoint(ckpt_path, check_finite=True, hint=_RESUME_HINT)
        _check_train_checkpoint(ck, ckpt_path)
        old = ck["config"]
        # a finished run continues with a longer schedule: the cosine schedule is then the new `steps`' one
        extend = ck["step"] >= old.get("steps", 0) and cfg.steps > old.get("steps", 0)
        diff = [k for k in _FIELDS if k not in _RESUMABLE and not (extend and k == "steps")
                and old.get(k, _default(k)) != getattr(cfg, k)]
        if diff:
            raise ValueError(f"cannot resume {ckpt_path}: config key(s) {diff} differ from the checkpoint's "
                             f"({', '.join(f'{k}: checkpoint {old.get(k)!r}, now {getattr(cfg, k)!r}' for k in diff)}); "
                             "use another out_dir or resume=false")
        try:
            ck["optimizer"] = _optim_state_as(ck["optimizer"], opt_order, by_name)
            ck = td.load_checkpoint(ck, model=model, optimizer=opt)  # the entries other than model/optimizer
            gen.set_state(ck["gen"])
            torch.set_rng_state(ck["torch_rng"])
        except (ValueError, RuntimeError) as e:  # CheckpointError included
            raise td.CheckpointError(f"cannot resume from checkpoint {ckpt_path}: {e}{_RESUME_HINT}") from None
        step, acc_loss, acc_n = ck["step"], ck["acc_loss"], ck["acc_n"]
        train_time, tokens = ck["train_time"], ck["tokens"]
        if main_rank:
            if extend:
                _say(f"continuing the finished run in {out} from step {step} to {cfg.steps} (the learning-rate schedule "
                     f"is now that of steps={cfg.steps})")
            elif step >= cfg.steps:
                _say(f"{out} is already finished (step {step} of {cfg.steps}); nothing to train. Raise steps to "
                     "continue it with a longer schedule, or resume=false to start afresh")
            elif _over_budget(cfg, train_time):
                _say(f"{out} is already finished (its time budget of {cfg.time_budget_s:g} s is spent, at step "
                     f"{step}); nothing to train. Use resume=false to start afresh")
        if main_rank:
            for rec in _truncate_metrics(metrics_path, step):
                last.update(rec)
    elif main_rank and metrics_path.exists():
        metrics_path.unlink()  # a fresh run starts a fresh log
    if main_rank:
        atomic_write_json(out / "config.json", dataclasses.asdict(cfg))

    def checkpoint():  # collective (FSDP2 gathers the shards); rank 0 writes atomically
        td.save_checkpoint(ckpt_path, model=model, optimizer=opt, gen=gen.get_state(),
                           torch_rng=torch.get_rng_state(), step=step, acc_loss=acc_loss, acc_n=acc_n,
                           train_time=train_time, tokens=tokens, config=dataclasses.asdict(cfg))

    def log(rec: Dict[str, Any]) -> None:
        if main_rank:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")

    end = cfg.stop_at or cfg.steps
    bar = None
    if cfg.progress and main_rank and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=f"{cfg.task}:{cfg.pattern if cfg.task != 'mfeat' else cfg.mixer}",
                   dynamic_ncols=True, file=sys.stderr)
    model.train()
    while step < end and not _over_budget(cfg, train_time):
        lr = lr_at(cfg, step, train_time)
        for gr in opt.param_groups:
            gr["lr"] = lr
        batch = task.train_batch(gen)  # the global batch (every rank draws it) ...
        if W > 1:
            batch = td.shard_batch(batch, info.rank, W)  # ... and trains on its share
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with autocast():
            loss = task.loss(run_model, batch)
        loss.backward()  # DDP/FSDP2: gradients averaged over ranks
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm  # FSDP2: a DTensor
        opt.step()
        opt.zero_grad(set_to_none=True)
        lval = loss.item()  # also synchronises, so the timing below is the step's real time
        dt = time.perf_counter() - t0
        if W > 1:
            lval = td.all_reduce_mean(lval)  # equal shares: the mean of the shares' means is the batch mean
            if cfg.time_budget_s > 0:  # the ranks' mean step time: every rank stops at the same step
                dt = td.all_reduce_mean(dt)
        train_time += dt
        tokens += task.tokens_per_batch
        step += 1
        acc_loss += lval
        acc_n += 1
        if not math.isfinite(lval):  # the same value on every rank, so all of them stop
            raise FloatingPointError(f"training loss is {lval} at step {step}; lower 'lr' or check the data")
        rec: Dict[str, Any] = {}
        final = step == cfg.steps or _over_budget(cfg, train_time)  # the last step: log, evaluate, checkpoint
        if step % cfg.log_every == 0 or final:
            rec.update(step=step, lr=lr, train_loss=acc_loss / acc_n, grad_norm=float(gnorm), tokens=tokens,
                       tokens_per_s=tokens / max(train_time, 1e-9))
            acc_loss, acc_n = 0.0, 0
        if step % cfg.eval_every == 0 or final:
            model.eval()
            rec.update(step=step, **task.evaluate(run_model, autocast))  # every rank: FSDP2 forwards are collective
            model.train()
        if rec:
            rec["train_time_s"] = train_time  # training wall time so far (tensorattn plot --x time)
            log(rec)
            last.update(rec)
            if bar is not None:
                bar.set_postfix({k: f"{v:.4g}" for k, v in rec.items() if k.startswith(("train_loss", "val_"))})
            elif main_rank and any(k.startswith(("val_", "test_")) for k in rec):  # a log file: one plain line
                _say(f"step {step}/{cfg.steps} " + " ".join(f"{k}={v:.4g}" for k, v in rec.items()
                                                          if k.startswith(("train_loss", "val_", "test_"))))
        if (step % cfg.eval_every == 0 or final or step == cfg.stop_at
                or (cfg.ckpt_every and step % cfg.ckpt_every == 0)):
            checkpoint()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    finished = step >= cfg.steps or _over_budget(cfg, train_time)
    if main_rank and not finished:
        _say(f"stopped at step {step} of {cfg.steps} (stop_at); run again with resume=true to continue")
    elif main_rank and step < cfg.steps:
        _say(f"stopped at step {step} of {cfg.steps}: the time budget of {cfg.time_budget_s:g} s is spent")
    summary = {"step": step, "finished": finished, "params": n_params, "tokens": tokens,
               "train_time_s": train_time, "tokens_per_s": tokens / max(train_time, 1e-9),
               "final": {k: v for k, v in last.items() if k.startswith(("val_", "test_", "train_loss"))},
               "config": dataclasses.asdict(cfg), "task_info": getattr(task, "info", {}),
               "machine": machine_info(device), "world_size": W}
    if main_rank:
        atomic_write_json(out / "summary.json", summary)
    return summary


def _say(msg: str) -> None:
    print(f"tensorattn train: {msg}", file=sys.stderr, flush=True)


def load_run(out_dir, *, device="cpu"):
    """``(config, task, model)`` of a ``tensorattn train`` run directory: the config from ``config.json``, the task
    it names and the model with the weights of ``ckpt.pt`` (loaded with ``weights_only=True``), in eval mode on
    ``device``. Errors name the file: a missing or unreadable ``config.json``, a missing or corrupt checkpoint."""
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"run directory {str(out)!r} does not exist")
    cfg_path, ckpt_path = out / "config.json", out / "ckpt.pt"
    try:
        values = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the run's config {cfg_path}: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object of config keys, got {type(values).__name__}")
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ValueError(f"{cfg_path} has unknown config keys {unknown} (a run of another tensorattn version?)")
    cfg = TrainConfig(**{k: _coerce(k, v, f"in {cfg_path}") for k, v in values.items()})
    cfg.device = str(torch.device(device))
    cfg.validate()
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"run directory {str(out)!r} has no checkpoint ckpt.pt (was it trained?)")
    task = build_task(cfg, device)
    model = task.build_model().to(device)
    td.load_checkpoint(ckpt_path, model=model)  # weights_only; CheckpointError naming the file if it does not fit
    return cfg, task, model.eval()


def main(argv: Optional[List[str]] = None) -> int:
    """``tensorattn train --config FILE [key=value ...]``."""
    ap = argparse.ArgumentParser(prog="tensorattn train", description=__doc__.split("\n\n")[0],
                                 epilog="config keys (TOML or key=value):\n\n" + config_table(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="TOML file with top-level keys of TrainConfig")
    ap.add_argument("overrides", nargs="*", help="key=value, applied after the file (TOML values; bare text is a string)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"tensorattn train: {e}", file=sys.stderr)
        return 2
    try:
        s = train(cfg)
    except (ConfigError, td.CheckpointError) as e:  # found at run time: no device, a bad out_dir or checkpoint
        print(f"tensorattn train: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports
        return 0
    print(json.dumps({"out_dir": cfg.out_dir, "params": s["params"], "tokens_per_s": round(s["tokens_per_s"]),
                      **s["final"]}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

