"""The child process of the cost section on the CPU: ``python -m tensorattn.reproduce.cost_child CONFIG_JSON``
prints :func:`tensorattn.reproduce.cost.cost_series`'s points as JSON (a fresh process per method, so that each
method's peak resident set is its own)."""
from __future__ import annotations

import json
import sys
from typing import List, Optional

import torch

from .cost import cost_series


def main(argv: Optional[List[str]] = None) -> int:
    cfg = json.loads((sys.argv[1:] if argv is None else argv)[0])
    torch.set_num_threads(cfg.pop("threads"))
    print(json.dumps(cost_series(**cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
