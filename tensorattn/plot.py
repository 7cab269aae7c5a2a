"""``tensorattn plot RUN_DIR... [--metric NAME ...] [--out FILE]``: training curves of one or more runs.

Each RUN_DIR holds the ``metrics.jsonl`` that :func:`tensorattn.train.train` writes. Runs whose directory
names differ only by a ``seed<N>`` suffix (``kjv_S_seed0``, ``kjv_S_seed1``) form one group, drawn as
the mean over seeds with a band from the minimum to the maximum. Needs matplotlib.

A metrics line that is not a record ``train`` writes (a hand edit, a line torn by a crash) is skipped
with a warning naming the file and line. A ``--metric`` that no run logged is an error listing those
logged; ``--out`` may name an image file or a directory (the image is then ``DIR/curves.png``).

A group keeps its colour in every plot (the colour follows from its name); every panel has a legend;
``--reference`` draws the majority-class accuracy that a run's ``summary.json`` records (``task_info``) on the
accuracy panels; ``--x time`` puts the training wall time on the x axis; ``--logy`` applies to loss panels only.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

_SEED = re.compile(r"[-_]?seed\d+$")
_DEFAULT = ("train_loss", "val_loss", "val_bpc", "val_acc", "test_acc")


def read_metrics(run_dir) -> List[dict]:
    """The records of ``run_dir/metrics.jsonl``; lines that are not records are skipped with a warning."""
    from ._io import read_metrics_lines

    p = Path(run_dir) / "metrics.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist (is {run_dir} a training run directory?)")
    return [rec for _, rec in read_metrics_lines(p)]


def _out_path(out) -> Path:
    """``out`` as an image path: a directory (existing, or written with a trailing slash) gets ``curves.png``;
    the suffix must be a format matplotlib writes."""
    text = str(out)
    out = Path(out)
    if out.is_dir() or text.endswith(("/", "\\")):
        out = out / "curves.png"
    elif out.exists() and not out.is_file():
        raise ValueError(f"--out {text!r} exists and is not a regular file or a directory")
    for q in out.parents:
        if q.exists():
            if not q.is_dir():
                raise ValueError(f"--out {text!r}: {str(q)!r} is a file, not a directory")
            break
    fmt = out.suffix.lstrip(".").lower()
    import matplotlib.figure

    formats = sorted(matplotlib.figure.Figure().canvas.get_supported_filetypes())
    if fmt not in formats:
        raise ValueError(f"--out {text!r}: the file name must end in an image format matplotlib writes, one of "
                         f"{', '.join('.' + f for f in formats)}; got "
                         + (f"{out.suffix!r}" if fmt else "no suffix (add .png, or end it with / for a directory)"))
    return out


def group_runs(run_dirs) -> Dict[str, List[Path]]:
    groups: Dict[str, List[Path]] = defaultdict(list)
    for d in run_dirs:
        d = Path(d)
        groups[_SEED.sub("", d.name.rstrip("/")) or d.name].append(d)
    return dict(groups)


def curve(runs: List[List[dict]], metric: str, x: str = "step"):
    """x values where every run logged ``metric`` (steps, or with ``x="time"`` the mean training time at those
    steps), and the values ``[n_runs, n_steps]``."""
    per = [{r["step"]: r[metric] for r in rows if metric in r} for rows in runs]
    steps = sorted(set.intersection(*(set(p) for p in per))) if per else []
    vals = np.array([[p[s] for s in steps] for p in per], dtype=float)
    if x == "time":
        times = [{r["step"]: r["train_time_s"] for r in rows if "train_time_s" in r} for rows in runs]
        steps = [s for s in steps if all(s in t for t in times)]
        vals = np.array([[p[s] for s in steps] for p in per], dtype=float)
        return np.array([np.mean([t[s] for t in times]) for s in steps]), vals
    return np.array(steps), vals


def group_colour(name: str):
    """The colour of a run group: the same in every plot (a hash of the name picks a tab10 colour)."""
    import matplotlib

    return matplotlib.colormaps["tab10"](zlib.crc32(name.encode()) % 10)


def _majority(dirs: List[Path]) -> Optional[float]:
    for d in dirs:
        try:
            v = json.loads((Path(d) / "summary.json").read_text())["task_info"]["majority"]
            return float(v)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def plot(run_dirs, metrics: Optional[List[str]] = None, out: str = "curves.png", title: Optional[str] = None,
         logy: bool = False, x: str = "step", reference: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = _out_path(out)
    groups = group_runs(run_dirs)
    data = {name: [read_metrics(d) for d in dirs] for name, dirs in groups.items()}
    present = {k for runs in data.values() for rows in runs for r in rows for k in r} - {"step"}
    if not metrics:
        metrics = [m for m in _DEFAULT if m in present]
        if not metrics:
            raise ValueError(f"none of the runs logged a metric to plot (expected one of {list(_DEFAULT)}; logged: "
                             f"{sorted(present) or 'nothing'})")
    unknown = [m for m in metrics if m not in present]
    if unknown:
        raise ValueError(f"metric(s) {unknown} not logged by any of the runs; available: "
                         f"{', '.join(sorted(present)) or 'none'}")
    if x not in ("step", "time"):
        raise ValueError(f"--x must be 'step' or 'time', got {x!r}")
    if x == "time" and not any("train_time_s" in r for runs in data.values() for rows in runs for r in rows):
        raise ValueError("--x time needs train_time_s in the metrics (runs trained before it was logged have none)")
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for name, runs in data.items():
            xs, vals = curve(runs, metric, x)
            if len(xs) == 0:
                continue
            label = name if len(runs) == 1 else f"{name} (n={len(runs)})"
            ax.plot(xs, vals.mean(0), label=label, color=group_colour(name))
            if len(runs) > 1:
                ax.fill_between(xs, vals.min(0), vals.max(0), color=group_colour(name), alpha=0.2)
            maj = _majority(groups[name]) if reference and metric.endswith("_acc") else None
            if maj is not None:
                ax.axhline(maj, color=group_colour(name), ls=":", lw=1, label=f"{name}: majority class")
        ax.set_xlabel("step" if x == "step" else "training time (s)")
        ax.set_ylabel(metric)
        if logy and "loss" in metric:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    from ._io import atomic_write

    fmt = out.suffix.lstrip(".").lower()
    atomic_write(out, lambda f: fig.savefig(f, format=fmt, dpi=110), binary=True)
    plt.close(fig)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="tensorattn plot", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    ap.add_argument("--metric", action="append", help="metric to plot (repeatable); default: the usual ones present")
    ap.add_argument("--out", default="curves.png",
                    help="output image (.png, .pdf, .svg, ...), or a directory to write curves.png in")
    ap.add_argument("--title")
    ap.add_argument("--logy", action="store_true", help="log scale on the loss panels")
    ap.add_argument("--x", choices=("step", "time"), default="step", help="x axis: steps or training wall time")
    ap.add_argument("--reference", action="store_true",
                    help="draw the majority-class accuracy of each group's summary.json on accuracy panels")
    args = ap.parse_args(argv)
    try:
        path = plot(args.runs, args.metric, args.out, args.title, args.logy, args.x, args.reference)
    except (OSError, ValueError) as e:  # a missing run, an unknown metric, an unusable --out
        print(f"tensorattn plot: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"tensorattn plot: needs matplotlib ({e}); pip install matplotlib", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
