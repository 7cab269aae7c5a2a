"""``tensorattn sample RUN_DIR``: text from a trained character model (a ``tensorattn train`` run).

    tensorattn sample runs/kjv --prompt "In the beginning" --tokens 300 --temperature 0.8 --top-k 20 --seed 0

Loads the run's config and checkpoint (``weights_only=True``: a crafted checkpoint is refused, never run),
prefills the prompt and decodes one character at a time through the layers' caches
(:meth:`tensorattn.model.Transformer.generate`), then prints the prompt and its continuation. The same seed gives
the same text; ``--top-k 1`` is greedy.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch

__all__ = ["main", "sample_text"]


def sample_text(out_dir, *, prompt: str = "\n", tokens: int = 200, temperature: float = 1.0,
                top_k: Optional[int] = None, seed: int = 0, device: str = "cpu") -> str:
    """The prompt followed by ``tokens`` sampled characters from the run in ``out_dir``."""
    from .train import load_run

    cfg, task, model = load_run(out_dir, device=device)
    if not (hasattr(task, "encode") and hasattr(task, "decode")):
        raise ValueError(f"run {str(out_dir)!r} trained task {cfg.task!r}, which has no text to sample (sample needs "
                         "a character language model, e.g. task = \"kjv\")")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    idx = torch.tensor([task.encode(prompt)], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, tokens, temperature=temperature, top_k=top_k, generator=gen)
    return task.decode(out[0].tolist())


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="tensorattn sample", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="output directory of a `tensorattn train` run (config.json, ckpt.pt)")
    ap.add_argument("--prompt", default="\n", help="text to continue (default: a newline, i.e. a new verse)")
    ap.add_argument("--tokens", type=int, default=200, help="characters to sample (default 200)")
    ap.add_argument("--temperature", type=float, default=1.0, help="softmax temperature, > 0 (default 1)")
    ap.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest characters (1: greedy)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default 0)")
    ap.add_argument("--device", default="cpu", help="device to run on (default cpu)")
    args = ap.parse_args(argv)
    try:
        text = sample_text(args.run_dir, prompt=args.prompt, tokens=args.tokens, temperature=args.temperature,
                           top_k=args.top_k, seed=args.seed, device=args.device)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        print(f"tensorattn sample: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
