"""Multi-GPU benchmark: context-parallel polynomial tensor attention and DDP training throughput.

Run under torchrun (one process per GPU; world size 1 on one GPU, gloo on the CPU)::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
        torchrun --nproc_per_node=8 benchmarks/dist_bench.py --out benchmarks/results/dist_bench_ws8

What it measures (rank 0 writes ``OUT.json`` and ``OUT.md`` with :func:`tensorattn.bench.harness.write_report`):

* ``weak``: every rank holds ``--weak-lens`` tokens (so the global sequence is ``W`` times longer);
  ideal weak scaling keeps the time flat as ``W`` grows.
* ``strong``: the global sequence ``--strong-lens`` is split over the ``W`` ranks
  (:func:`tensorattn.distributed.shard_range`); ideal strong scaling divides the time by ``W``.
  Both for non-causal and causal :func:`tensorattn.distributed.cp_poly_tensor_attn`: forward plus
  backward time (median over repetitions of the slowest rank), peak memory of one fwd+bwd on the rank,
  global tokens per second. On world size 1 the single-process op :func:`tensorattn.poly.poly_tensor_attn`
  is timed on the same problem too (row ``impl = poly``), as the baseline for the communication-free case.
* ``ddp``: training steps per second of the small :class:`tensorattn.model.Transformer` (random tokens,
  AdamW, bf16 autocast on CUDA) wrapped in DDP, global tokens per second.

The budget (``--budget-s``) is checked between rows only, so keep single rows short: the baseline
rows stop at ``--baseline-max-tokens``. Do not pipe the output through ``grep`` without ``--line-buffered``: a
command killed at its time limit then loses everything printed.

Timings are device time (CUDA events) of this rank around a call that includes the collectives; compare
rows only within one report. An out-of-memory error on world size 1 becomes NaN; with several ranks an
OOM on one rank would desynchronise the collectives, so size the flags for the smallest GPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from tensorattn import distributed as td
from tensorattn.bench.harness import (attn_shapes, guarded, machine_info, peak_memory, randn_inputs, time_fn,
                                      write_report)


def _ints(s: str):
    return [int(float(x)) for x in s.split(",") if x.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weak-lens", type=_ints, default=_ints("131072,524288"),
                    help="tokens per rank for weak scaling (comma list); 524288 x 8 GPUs = 4M tokens")
    ap.add_argument("--strong-lens", type=_ints, default=_ints("1048576,4194304"),
                    help="global tokens for strong scaling (comma list), split over the ranks")
    ap.add_argument("--modes", default="noncausal,causal", help="comma list of noncausal, causal")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4, help="query heads")
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--key-dim", type=int, default=4, help="Dk (feature rank C(Dk + degree, degree))")
    ap.add_argument("--value-dim", type=int, default=32, help="Dv")
    ap.add_argument("--degree", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=0,
                    help="causal chunk (memory knob of cp_poly_tensor_attn); 0: its automatic choice")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--no-baseline", action="store_true", help="skip the single-process poly_tensor_attn rows")
    ap.add_argument("--baseline-max-tokens", type=int, default=262144,
                    help="time poly_tensor_attn only up to this length (the baseline rows double the run time)")
    ap.add_argument("--ddp-steps", type=int, default=20, help="timed DDP steps (0 skips the DDP section)")
    ap.add_argument("--ddp-batch", type=int, default=16, help="sequences per rank per step")
    ap.add_argument("--ddp-seq", type=int, default=256)
    ap.add_argument("--ddp-dim", type=int, default=256)
    ap.add_argument("--ddp-layers", type=int, default=4)
    ap.add_argument("--ddp-pattern", default="SP", help="model pattern: S softmax, P fast tensor, T exact tensor")
    ap.add_argument("--ddp-strategy", default="ddp", choices=["ddp", "fsdp"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rep", type=int, default=5)
    ap.add_argument("--max-time", type=float, default=10.0, help="seconds of timing per row at most")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="skip the remaining rows (recorded as skipped) once this many seconds have passed; 0 = no limit")
    ap.add_argument("--out", default=None, help="report stem (default benchmarks/results/dist_bench_ws{W})")
    return ap.parse_args(argv)


def _max_over_ranks(x: float, device) -> float:
    if td.get_world_size() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _inputs(args, T, device, dtype, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    B, Hq, Hkv, D, Dv = args.batch, args.heads, args.kv_heads, args.key_dim, args.value_dim

    xs = randn_inputs(attn_shapes(B, T, Hq, Hkv, D, Dv), dtype=dtype, device=device, generator=g, requires_grad=True)
    do = torch.randn(B, T, Hq, Dv, device=device, generator=g).to(dtype)
    return xs, do


_T_START = time.perf_counter()


def _over_budget(args, device) -> bool:
    # decided on the slowest rank's clock, so every rank skips the same rows
    return args.budget_s > 0 and _max_over_ranks(time.perf_counter() - _T_START, device) > args.budget_s


def _chunk(args, impl, causal, T):
    """The causal scan's chunk for a cp row (the automatic one unless --chunk), else empty."""
    if impl != "cp" or not causal:
        return ""
    from tensorattn.poly import poly_rank
    from tensorattn.poly.scan import _scan_chunk

    return args.chunk or _scan_chunk(T, args.batch, args.kv_heads, poly_rank(args.key_dim, args.degree),
                                     args.value_dim)


def attn_rows(args, info, dtype):
    W, rank, dev = info.world_size, info.rank, info.device
    rows = []
    plans = [("weak", L, L * W, L) for L in args.weak_lens]
    plans += [("strong", G, G, (lambda s_e: s_e[1] - s_e[0])(td.shard_range(G, rank, W))) for G in args.strong_lens]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    impls = ["cp"] + (["poly"] if W == 1 and not args.no_baseline else [])
    for kind, nominal, global_T, local_T in plans:
        for mode in modes:
            causal = mode == "causal"
            for impl in impls:
                base = {"section": kind, "impl": impl, "mode": mode, "world": W, "global_tokens": global_T,
                        "tokens_per_rank": local_T, "chunk": _chunk(args, impl, causal, local_T)}
                if _over_budget(args, dev):
                    rows.append({**base, "ms_fwd_bwd": float("nan"), "note": "skipped (time budget)"})
                    continue
                if impl == "poly" and global_T > args.baseline_max_tokens:
                    rows.append({**base, "ms_fwd_bwd": float("nan"),
                                 "note": f"skipped (baseline limited to {args.baseline_max_tokens} tokens)"})
                    continue
                xs, do = _inputs(args, local_T, dev, dtype, seed=1 + rank)
                if impl == "cp":
                    def op():
                        return td.cp_poly_tensor_attn(*xs, degree=args.degree, causal=causal,
                                                      chunk_size=(args.chunk or None) if causal else None)
                else:
                    from tensorattn.poly import poly_tensor_attn

                    def op():
                        return poly_tensor_attn(*xs, degree=args.degree, causal=causal)

                def fwd_bwd():
                    for x in xs:
                        x.grad = None
                    op().backward(do)

                def measure():
                    t = time_fn(fwd_bwd, device=dev, warmup=args.warmup, rep=args.rep, max_time_s=args.max_time)
                    mem = peak_memory(fwd_bwd, device=dev)
                    return {"ms": t["ms"], "ms_p20": t["ms_p20"], "ms_p80": t["ms_p80"], "reps": t["reps"],
                            "peak_gib": mem}

                t0 = time.perf_counter()
                try:
                    res = guarded(measure, dev)
                except Exception as e:  # noqa: BLE001 - a failing op is reported, not fatal (same on every rank)
                    res = {"ms": float("nan"), "error": f"{type(e).__name__}: {str(e)[:200]}"}
                    td.print0(f"[{kind}] {impl} {mode} T_global={global_T}: {res['error']}")
                ms = _max_over_ranks(res["ms"], dev)
                row = {**base, "ms_fwd_bwd": ms, "ms_p20": res.get("ms_p20", float("nan")),
                       "ms_p80": res.get("ms_p80", float("nan")), "peak_gib": _max_over_ranks(
                           res.get("peak_gib", float("nan")), dev),
                       "tokens_per_s": global_T / (ms / 1e3) if ms == ms else float("nan"),
                       "oom": bool(res.get("oom", False)),
                       "note": "OOM" if res.get("oom") else res.get("error", "")}
                rows.append(row)
                td.print0(f"[{kind}] {impl} {mode} T_global={global_T} T_rank={local_T}: {ms:.2f} ms, "
                          f"{row['peak_gib']:.2f} GiB, {row['tokens_per_s']:.3g} tok/s "
                          f"({time.perf_counter() - t0:.1f} s)")
                del xs, do
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def ddp_rows(args, info):
    from tensorattn.model import Transformer

    dev, W = info.device, info.world_size
    torch.manual_seed(0)
    vocab = 256
    heads = max(1, args.ddp_dim // 64)
    model = Transformer(vocab, block_size=args.ddp_seq, dim=args.ddp_dim, n_layer=args.ddp_layers,
                        pattern=args.ddp_pattern, n_heads=heads, p_key_dim=4, causal=True).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    model = td.wrap_model(model, args.ddp_strategy)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator(device=dev).manual_seed(100 + info.rank)
    x = torch.randint(0, vocab, (args.ddp_batch, args.ddp_seq + 1), device=dev, generator=g)
    amp = torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def step():
        with amp:
            logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = time_fn(step, device=dev, warmup=3, rep=args.ddp_steps, max_time_s=args.max_time)
    ms = _max_over_ranks(t["ms"], dev)
    tokens = args.ddp_batch * args.ddp_seq * W
    td.print0(f"[ddp] {args.ddp_strategy} pattern={args.ddp_pattern} {n_params / 1e6:.2f}M params: {ms:.2f} ms/step, "
              f"{tokens / (ms / 1e3):.3g} tok/s")
    return [{"section": args.ddp_strategy, "impl": f"Transformer pattern {args.ddp_pattern}, {args.ddp_layers} layers, "
             f"dim {args.ddp_dim}, {n_params / 1e6:.2f}M params", "mode": "causal LM", "world": W,
             "global_tokens": tokens, "tokens_per_rank": args.ddp_batch * args.ddp_seq, "ms_fwd_bwd": ms,
             "ms_p20": t["ms_p20"], "ms_p80": t["ms_p80"], "peak_gib": float("nan"),
             "tokens_per_s": tokens / (ms / 1e3), "oom": False}]


def main(argv=None) -> int:
    args = parse_args(argv)
    info = td.init_distributed()
    if info.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // max(1, info.world_size)))
    dtype = getattr(torch, args.dtype) if info.device.type == "cuda" else torch.float32
    td.print0(f"world size {info.world_size}, backend {info.backend}, device {info.device}, dtype {dtype}")
    rows = attn_rows(args, info, dtype)
    if args.ddp_steps > 0 and not _over_budget(args, info.device):
        rows += ddp_rows(args, info)
    if td.is_main_process():
        from tensorattn.features import rank as feat_rank

        out = args.out or f"benchmarks/results/dist_bench_ws{info.world_size}"
        meta = machine_info(info.device)
        meta.update(command=" ".join(["torchrun", f"--nproc_per_node={info.world_size}"] + sys.argv),
                    world_size=info.world_size, backend=info.backend, dtype=str(dtype),
                    feature_rank=feat_rank(args.key_dim, args.degree), args=vars(args),
                    nccl_nvls_enable=os.environ.get("NCCL_NVLS_ENABLE"))
        notes = (f"Context-parallel poly attention: B={args.batch}, Hq={args.heads}, Hkv={args.kv_heads}, "
                 f"Dk={args.key_dim}, Dv={args.value_dim}, degree={args.degree} (feature rank k={meta['feature_rank']}), "
                 f"causal chunk {args.chunk or 'auto'}, {dtype} inputs (float32 accumulation). ms_fwd_bwd: median device time of "
                 "forward + backward on the slowest rank, collectives included; peak_gib: peak allocation of one "
                 "fwd+bwd beyond the inputs on the worst rank; tokens_per_s: global tokens / time. impl=poly: the "
                 "single-process tensorattn.poly.poly_tensor_attn on the same problem (world size 1 only). "
                 "DDP rows: one optimizer step (fwd+bwd+AdamW) on random tokens.")
        cols = ["section", "impl", "mode", "world", "global_tokens", "tokens_per_rank", "chunk", "ms_fwd_bwd", "ms_p20",
                "ms_p80", "peak_gib", "tokens_per_s", "note"]
        paths = write_report(out, title=f"Distributed benchmark (world size {info.world_size})", rows=rows,
                             columns=cols, meta=meta, notes=notes)
        print(f"wrote {paths['json']} and {paths['md']}", flush=True)
    td.barrier()
    td.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
