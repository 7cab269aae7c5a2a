"""``tensorattn reproduce``: the experiments the paper lacks, as one command that writes a report with plots.

Sections (each states its configuration, seed, device and versions):

1. correctness: the closed-form gradient against autograd; the fast forward and gradient against the exact
   ones at several degrees; orders 1, 2, 3 against the exact order-m reference;
2. cost: wall time and peak memory against n for the exact and the fast method, forward and gradient,
   with fitted log-log slopes;
3. approximation quality and the paper's threshold: error against the entry bound B at fixed n and degree;
   the degree and the rank needed for a target error as B grows, with the break-even rank of the fast method
   and the curve B³ = ln n; the measured time of the fast gradient against B next to the exact one;
4. order m: the same threshold for m = 1, 2, 3 key factors (logits bounded by B^(m+1));
5. head dimension: rank, time and error against d at a fixed target error, and what projecting keys to a
   small dimension buys;
6. training: gradient descent on the paper's objective (Definition 2.8) with the exact and the fast gradient
   from the same start.

``--preset quick`` is CPU-sized (a few minutes on 2 cores); ``--preset full`` is meant for a GPU. All
numerics are float64 (the paper's regime of exact arithmetic; the point is the algorithm, not the dtype).

One module per section (:mod:`.correctness`, :mod:`.cost` with its child process :mod:`.cost_child`,
:mod:`.threshold`, :mod:`.order`, :mod:`.headdim`, :mod:`.training`), what they share in :mod:`.common`, and
here the driver: :func:`run` and the command line.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional, Sequence

from .._io import atomic_write_json, atomic_write_text, remove_stale_temps
from .common import PRESETS, Report
from .correctness import section_correctness
from .cost import section_cost
from .headdim import section_headdim
from .order import section_order
from .threshold import section_threshold
from .training import section_training


SECTIONS = ("correctness", "cost", "threshold", "order", "headdim", "training")


def check_args(preset: str, out: str, device: str, sections: Sequence[str]) -> None:
    """The checks of :func:`run`'s arguments, done before anything runs (ValueError naming the argument)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if isinstance(sections, str):
        raise TypeError(f"sections must be a sequence of section names, got the string {sections!r}")
    sections = list(sections)
    if not sections:
        raise ValueError(f"sections selects nothing; expected one or more of {list(SECTIONS)}")
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise ValueError(f"sections must be among {list(SECTIONS)}, got {bad}")
    dup = sorted({s for s in sections if sections.count(s) > 1})
    if dup:
        raise ValueError(f"sections must name each section once, got {dup} more than once")
    from ..check import check_device

    check_device(device)
    o = Path(out)
    for q in (o, *o.parents):
        if q.exists():
            if not q.is_dir():
                raise ValueError(f"out {str(out)!r} must be a directory, but {str(q)!r} is a file")
            break


def run(preset: str = "quick", out: str = "reports/quick", device: str = "cpu",
        sections: Sequence[str] = SECTIONS, command: Optional[str] = None) -> Path:
    """Run the chosen sections and write ``out/report.md``, ``out/report.json`` and the PNG figures.

    Raises ValueError (before running anything) for an unknown preset, an unknown, repeated or empty
    selection of sections, a device that is not available, or an ``out`` that is a file.
    """
    check_args(preset, out, device, sections)
    p = PRESETS[preset]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir, ["report.md", "report.json"])  # left by a run killed mid-write
    rep = Report(out_dir, device, p)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(sections), desc="reproduce", unit="section", file=sys.stderr)
    progress = lambda msg: bar.set_postfix_str(msg)  # noqa: E731
    t0 = time.perf_counter()
    funcs = {"correctness": lambda: section_correctness(rep), "cost": lambda: section_cost(rep, progress),
             "threshold": lambda: section_threshold(rep, progress), "order": lambda: section_order(rep, progress),
             "headdim": lambda: section_headdim(rep, progress), "training": lambda: section_training(rep, progress)}
    command = command or f"tensorattn reproduce --preset {preset} --out {out} --device {device}"

    def write(done: bool) -> None:
        # written after every section, so a run cut short still leaves a complete report of what it finished
        status = "" if done else (f"\n\n**Partial report: {len(rep.sections)} of {len(sections)} sections "
                                  "finished so far.**\n")
        label = "Total run time" if done else "Run time so far"
        text = rep.render(command) + status + f"\n\n{label}: {time.perf_counter() - t0:.1f} s.\n"
        atomic_write_json(out_dir / "report.json", {
            "meta": rep.meta, "preset": asdict(p), "command": command, "complete": done,
            "sections": {s.key: {"title": s.title, "config": s.config, "data": s.data, "figures": s.figures}
                         for s in rep.sections}})
        atomic_write_text(out_dir / "report.md", text)

    for name in sections:
        bar.set_description(f"reproduce: {name}")
        rep.sections.append(funcs[name]())
        bar.update(1)
        write(done=len(rep.sections) == len(sections))
    bar.close()
    return out_dir / "report.md"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="tensorattn reproduce", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                    help="quick: CPU-sized, minutes; full: GPU-sized; tiny: seconds (tests)")
    ap.add_argument("--out", default=None, help="output folder (default reports/<preset>)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    args = ap.parse_args(argv)
    out = args.out or f"reports/{args.preset}"
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    try:
        if not sections:
            raise ValueError(f"--sections {args.sections!r} selects nothing; expected a comma-separated subset of "
                             f"{','.join(SECTIONS)}")
        check_args(args.preset, out, args.device, sections)
    except (ValueError, TypeError) as e:
        print(f"tensorattn reproduce: {e}", file=sys.stderr)
        return 2
    path = run(args.preset, out, args.device, sections,
               command="tensorattn reproduce " + " ".join(argv if argv is not None else sys.argv[2:]))
    print(f"report written to {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
