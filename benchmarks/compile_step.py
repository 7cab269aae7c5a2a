"""One training step (forward, backward, optimizer) of a ``tensorattn train`` model, eager against
``torch.compile``, on one device: the step time, tokens/s and the first compiled step's wall time.

    python benchmarks/compile_step.py --config configs/kjv_ssst_exact.toml --out benchmarks/results

The model, task, optimizer and autocast are the training loop's (``tensorattn.train``); one batch is reused so
both modes do the same work. Device time by CUDA events on a GPU (``tensorattn.bench.harness.time_fn``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from tensorattn import train as tt
from tensorattn.config import load_config
from tensorattn.bench.harness import machine_info, time_fn, write_report


def _rows(path: str, overrides, warmup: int, rep: int):
    cfg = load_config(path, overrides)
    device = tt._device(cfg)
    torch.manual_seed(cfg.seed)
    task, model = tt._build(cfg, device)
    model = model.to(device)
    opt = tt._optimizer(cfg, model)
    use_bf16 = tt.uses_bf16(cfg, device)
    batch = task.train_batch(torch.Generator().manual_seed(cfg.seed + 1))
    model.train()
    rows = []
    for mode in ("eager", "compiled"):
        run_model = torch.compile(model) if mode == "compiled" else model

        def step():
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = task.loss(run_model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t0 = time.perf_counter()
        step()  # the compiled mode compiles here
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first_s = time.perf_counter() - t0
        r = time_fn(step, device=device, warmup=warmup, rep=rep, max_time_s=60)
        rows.append(dict(config=Path(path).name, mode=mode, device=str(device), amp="bf16" if use_bf16 else "off",
                         step_ms=r["ms"], step_ms_p20=r["ms_p20"], step_ms_p80=r["ms_p80"],
                         tokens_per_s=task.tokens_per_batch / (r["ms"] / 1e3), first_step_s=first_s))
        print(rows[-1], flush=True)
    rows[1]["speedup"] = rows[0]["step_ms"] / rows[1]["step_ms"]
    return rows, device


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", nargs="+", default=["configs/kjv_ssst_exact.toml"])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every config")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rep", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="compile_step")
    args = ap.parse_args(argv)
    rows, device = [], None
    for path in args.config:
        r, device = _rows(path, args.set, args.warmup, args.rep)
        rows += r
    meta = machine_info(device)
    meta["command"] = "python benchmarks/compile_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cols = ["config", "mode", "device", "amp", "step_ms", "step_ms_p20", "step_ms_p80", "tokens_per_s",
            "first_step_s", "speedup"]
    write_report(out / args.name, title="One training step, eager vs torch.compile", rows=rows, columns=cols,
                 meta=meta, notes="step_ms: median device time of one step (forward, backward, optimizer) on a "
                                  "fixed batch after the warm-up; first_step_s: wall time of the first step "
                                  "(compilation included); speedup: eager over compiled step time.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
