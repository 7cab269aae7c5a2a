"""Atomic file writes (a report, a JSON file or a checkpoint is either complete or absent), the clean-up of
what a killed write leaves behind, and tolerant reading of metrics files."""
from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, write: Callable[[Any], None], *, binary: bool = False) -> Path:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a report should get the usual permissions
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: PathLike, obj: Any) -> Path:
    return atomic_write(path, lambda f: json.dump(obj, f, indent=2, default=str, allow_nan=True))


# -------------------------------------------------------------------------------------- leftovers of a kill
def _temp_name(name: str) -> "re.Pattern[str]":
    # what atomic_write's mkstemp(prefix=".<name>.", suffix=".tmp") makes: 8 characters of tempfile's alphabet
    return re.compile(r"\." + re.escape(name) + r"\.[a-z0-9_]{8}\.tmp\Z")


def remove_stale_temps(directory: PathLike, names: Sequence[str]) -> List[Path]:
    """Delete the temporary files that :func:`atomic_write` leaves beside ``directory/<name>`` for each of
    ``names`` when its process is killed mid-write (``.<name>.XXXXXXXX.tmp``). Only regular files of exactly
    that pattern, directly in ``directory``, are removed. Returns the paths removed."""
    d = Path(directory)
    if not d.is_dir():
        return []
    pats = [_temp_name(n) for n in names]
    removed = []
    for p in sorted(d.iterdir()):
        if any(pt.match(p.name) for pt in pats) and p.is_file() and not p.is_symlink():
            try:
                p.unlink()
            except FileNotFoundError:  # another process of ours cleaned it first
                continue
            removed.append(p)
    return removed


# ------------------------------------------------------------------------------------------ metrics files
class MetricsLineWarning(UserWarning):
    """A line of a metrics file that is not a record :func:`tensorattn.train.train` writes; it is skipped."""


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_metrics_lines(path: PathLike) -> List[Tuple[str, Dict[str, Any]]]:
    """``(line, record)`` for each usable line of a JSON-lines metrics file (``metrics.jsonl``).

    A usable line is a JSON object with an integer ``"step" >= 0`` whose other values are numbers. Any other
    non-blank line (a line torn by a crash mid-append, a hand edit) is skipped with a
    :class:`MetricsLineWarning` naming the file and the line number.
    """
    path = Path(path)
    out: List[Tuple[str, Dict[str, Any]]] = []
    for i, ln in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
        except ValueError as e:  # json.JSONDecodeError
            why = f"is not valid JSON ({e.msg})"
        else:
            if not isinstance(rec, dict):
                why = f"is a JSON {type(rec).__name__}, not an object"
            elif not (isinstance(rec.get("step"), int) and not isinstance(rec["step"], bool) and rec["step"] >= 0):
                why = f"has no integer 'step' >= 0 (got {rec.get('step')!r})"
            else:
                bad = [k for k, v in rec.items() if not _number(v)]
                why = f"has non-numeric value(s) for {bad}" if bad else ""
            if not why:
                out.append((ln, rec))
                continue
        short = ln if len(ln) <= 60 else ln[:57] + "..."
        warnings.warn(f"{path}:{i}: skipping a metrics line that {why}: {short!r}", MetricsLineWarning, stacklevel=2)
    return out
