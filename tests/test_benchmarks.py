"""The CPU-runnable benchmark scripts run end to end at tiny sizes and write their reports (no timing asserted)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_paper_grad_benchmark_writes_json_md_png(tmp_path):
    out = tmp_path / "paper_grad"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paper_grad.py"), "--n-max", "64", "--ds", "4",
                        "--gs", "2", "--rep", "1", "--no-rss", "--cap-s", "5", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())
    methods = {row["method"] for row in data["rows"]}
    assert methods == {"closed_form", "fast"}
    assert max(row["n"] for row in data["rows"]) == 64
    md = out.with_suffix(".md").read_text()
    assert "device" in md and "| method |" in md
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_bench_suites(capsys):
    import pytest
    import torch

    from tensorattn.bench import main

    assert main(["nope"]) == 2
    assert "suites:" in capsys.readouterr().out
    if torch.cuda.is_available():
        pytest.skip("the GPU suites run for real on a GPU (through the device tool)")
    for suite in ("exact", "poly"):
        assert main([suite]) != 0
        captured = capsys.readouterr()
        assert "needs a CUDA device" in captured.out + captured.err
