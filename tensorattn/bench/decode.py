"""``tensorattn bench decode``: incremental decoding speed and memory against the context length.

Three causal models of about equal parameter count (``--dim``, ``--layers``, ``--heads``): all-softmax (a key/value
cache that grows with the context), window-tensor (exact tensor layers with a ``(w, w)`` window: a cache of the
last ``w`` positions) and fast-tensor (polynomial layers: a fixed-size state). For each context length ``C`` the
prompt of ``C`` tokens is prefilled by the parallel ops, then ``--new`` tokens are decoded one at a time; the rows
give the prefill time, the time per decoded token (tokens/s), the cache bytes per sequence after the prefill and
the peak memory of the decoding steps. Writes ``<out>/<name>.{json,md,png}``, the device named.

    python -m tensorattn bench decode --device cuda --contexts 1024 4096 16384 65536
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .harness import _sync, guarded, loglog_axes, machine_info, peak_memory, save_figure, time_fn, write_report

DEFAULT_CONTEXTS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]


def build_models(dim: int, layers: int, heads: int, window: int, key_dim: int, vocab: int) -> Dict[str, torch.nn.Module]:
    """The three models; tensor layers get 2/3 of the softmax head dim, so that their five input projections and
    output projection (``6 dim H D``) match softmax attention's four (``4 dim H D``)."""
    from ..model import Transformer

    hd = dim // heads
    thd = max(2, (2 * hd) // 3 // 2 * 2)
    common = dict(vocab_size=vocab, block_size=8, dim=dim, n_layer=layers, n_heads=heads, pos="rope", causal=True)
    return {
        "softmax": Transformer(**common, pattern="S"),
        f"window-tensor (w={window})": Transformer(**common, pattern="T", t_head_dim=thd, window=window),
        f"fast-tensor (Dk={key_dim})": Transformer(**common, pattern="P", t_head_dim=thd, p_key_dim=key_dim),
    }


def _measure(model, C: int, new: int, device: torch.device, vocab: int, max_call_s: float) -> Dict[str, float]:
    g = torch.Generator(device="cpu").manual_seed(0)
    prompt = torch.randint(0, vocab, (1, C), generator=g).to(device)
    steps = torch.randint(0, vocab, (1, new), generator=g).to(device)
    with torch.no_grad():
        state = {}

        def prefill():
            state["cache"] = model.new_cache()
            model(prompt, cache=state["cache"])

        t_pre = time_fn(prefill, device=device, warmup=1, rep=2, max_time_s=max_call_s)["ms"]
        cache_bytes = state["cache"].nbytes()
        base = state["cache"]

        def decode(cache):
            for t in range(new):
                model(steps[:, t:t + 1], cache=cache)

        times = []  # each repetition decodes from a copy of the prefilled cache; the copy is not timed
        t_start = time.perf_counter()
        for rep in range(4):
            cache = copy.deepcopy(base)
            _sync(device)
            t1 = time.perf_counter()
            decode(cache)
            _sync(device)
            if rep:  # the first one warms up
                times.append((time.perf_counter() - t1) * 1e3)
            if time.perf_counter() - t_start > max_call_s and times:
                break
        t_dec = sorted(times)[len(times) // 2]
        cache = copy.deepcopy(base)
        peak = peak_memory(lambda: decode(cache), device=device)
    return dict(prefill_ms=t_pre, decode_ms_per_token=t_dec / new, tokens_per_s=1e3 * new / t_dec,
                cache_mib=cache_bytes / 2**20, decode_peak_gib=peak)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="tensorattn bench decode", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results", help="folder of the report")
    ap.add_argument("--name", default="bench_decode", help="file stem of the report")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="model dtype (auto: bfloat16 on CUDA, float32 on the CPU)")
    ap.add_argument("--contexts", type=int, nargs="+", default=DEFAULT_CONTEXTS)
    ap.add_argument("--new", type=int, default=32, help="tokens decoded one at a time after each prefill")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--window", type=int, default=64, help="window of the exact tensor layers")
    ap.add_argument("--key-dim", type=int, default=16, help="Dk of the fast layers")
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--max-call-s", type=float, default=20.0, help="time limit of one timing loop")
    ap.add_argument("--budget-s", type=float, default=500.0, help="no measurement starts after this many seconds")
    args = ap.parse_args(argv)
    for name in ("new", "dim", "layers", "heads", "window", "key_dim", "vocab"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(c < 1 for c in args.contexts):
        ap.error(f"--contexts must be >= 1, got {args.contexts}")
    device = torch.device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[args.dtype]
    t0 = time.perf_counter()
    models = build_models(args.dim, args.layers, args.heads, args.window, args.key_dim, args.vocab)
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = machine_info(device)
    meta.update(command="python -m tensorattn bench decode " + " ".join(argv if argv is not None else sys.argv[1:]),
                dtype=str(dtype), new_tokens=args.new, dim=args.dim, layers=args.layers, heads=args.heads)
    cols = ["model", "params", "context", "prefill_ms", "decode_ms_per_token", "tokens_per_s", "cache_mib",
            "decode_peak_gib", "note"]
    for name, model in models.items():
        model = model.to(device=device, dtype=dtype).eval()
        params = sum(p.numel() for p in model.parameters())
        for C in sorted(args.contexts):
            row = dict(model=name, params=params, context=C)
            if time.perf_counter() - t0 > args.budget_s:
                row["note"] = f"not run: past --budget-s {args.budget_s:g}"
            else:
                r = guarded(lambda: _measure(model, C, args.new, device, args.vocab, args.max_call_s), device=device)
                row.update({k: v for k, v in r.items() if k != "error"})
                if r.get("error"):
                    row["note"] = r["error"]
            rows.append(row)
            print(row, flush=True)
            write_report(out / args.name, title="Incremental decoding: speed and memory against the context", rows=rows,
                         columns=cols, meta=meta, preamble=_preamble(args, dtype))
        del model
    try:
        _plot(rows, out / (args.name + ".png"), meta)
    except ImportError:  # pragma: no cover - matplotlib is optional
        print("matplotlib missing: no plot", file=sys.stderr)
    return 0


def _preamble(args, dtype) -> str:
    return (f"Causal models, {args.layers} layers, width {args.dim}, {args.heads} heads, RoPE, {dtype}, batch 1. "
            f"Each context: the prompt prefilled by the parallel ops, then {args.new} tokens decoded one at a time "
            "(the time per token is their mean). cache_mib: the caches' bytes per sequence after the prefill "
            "(softmax: keys and values of every position; window-tensor: the last w positions; fast-tensor: the "
            "polynomial state, independent of the context). decode_peak_gib: the peak allocation of the decoding "
            "steps beyond what was allocated before (CUDA; on the CPU the growth of the resident set).")


def _plot(rows, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for name in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == name and r.get("tokens_per_s")]
        if not rs:
            continue
        axes[0].plot([r["context"] for r in rs], [r["tokens_per_s"] for r in rs], marker="o", label=name)
        axes[1].plot([r["context"] for r in rs], [max(r["cache_mib"], 1e-3) for r in rs], marker="o", label=name)
    loglog_axes(axes, "context (tokens)", ("decoded tokens / s", "cache per sequence (MiB)"))
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(f"incremental decoding, batch 1 — {meta.get('device')}")
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
