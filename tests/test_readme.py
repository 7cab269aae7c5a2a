"""The README's quick start runs as written, and its two set-up commands are the first lines."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs():
    text = README.read_text()
    code = re.search(r"## Quick start\n\n```python\n(.*?)```", text, re.S).group(1)
    ns = {}
    exec(compile(code, "README quick start", "exec"), ns)
    assert ns["y"].shape == (2, 64, 128)
    assert ns["o"].shape == (2, 128, 4, 64)
    assert ns["op"].shape == (1, 10, 2, 8)
    assert ns["pp"].shape == (1, 10, 2, 8)


def test_two_setup_commands_first():
    lines = [ln for ln in README.read_text().splitlines() if ln.strip()]
    assert lines[0] == "# tensorattn" and lines[1] == "```bash"
    assert lines[2].startswith("make demo") and lines[3].startswith("make test")
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci
