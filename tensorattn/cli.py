"""The ``tensorattn`` command line: ``tensorattn <command> [args]`` (also ``python -m tensorattn``).

Each command lives in its own module exposing ``main(argv) -> int``; modules are imported only when
their command runs, so ``tensorattn check`` works without Triton, matplotlib or a GPU.
"""
from __future__ import annotations

import importlib
import sys
from typing import List, Optional

COMMANDS = {
    "check": ("tensorattn.check", "verify the reference, the paper's closed-form gradient and identities"),
    "bench": ("tensorattn.bench", "benchmark the attention ops (GPU; writes JSON and markdown)"),
    "reproduce": ("tensorattn.reproduce", "run the paper's missing experiments and write a report"),
    "train": ("tensorattn.train", "train a model from a TOML config with key=value overrides"),
    "plot": ("tensorattn.plot", "plot the metrics of one or more training runs"),
    "sample": ("tensorattn.sample", "print text sampled from a trained character model"),
}


def _usage() -> str:
    lines = ["usage: tensorattn <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "run 'tensorattn <command> --help' for a command's options"]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__
        print(f"tensorattn {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"tensorattn: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as e:  # a missing optional dependency, named in the message
        print(f"tensorattn {name}: cannot import {COMMANDS[name][0]}: {e}", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
