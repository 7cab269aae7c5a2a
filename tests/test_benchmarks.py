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


def test_dist_bench_runs_under_torchrun_with_two_cpu_ranks(tmp_path):
    """benchmarks/dist_bench.py under torchrun (gloo, 2 ranks): every section writes finite rows."""
    import os
    import socket

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "dist"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # gloo on the CPU, also on a GPU machine
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                        f"--master_port={port}", str(ROOT / "benchmarks" / "dist_bench.py"), "--weak-lens", "48",
                        "--strong-lens", "100", "--chunk", "16", "--warmup", "0", "--rep", "1", "--ddp-steps", "1",
                        "--ddp-batch", "2", "--ddp-seq", "16", "--ddp-dim", "64", "--ddp-layers", "2",
                        "--out", str(out)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    rows = data["rows"]
    got = {(row["section"], row["mode"]) for row in rows}
    assert got == {("weak", "noncausal"), ("weak", "causal"), ("strong", "noncausal"), ("strong", "causal"),
                   ("ddp", "causal LM")}
    assert all(row["world"] == 2 and row["ms_fwd_bwd"] > 0 for row in rows)
    assert [row["global_tokens"] for row in rows if row["section"] == "weak"] == [96, 96]
    assert data["meta"]["world_size"] == 2 and data["meta"]["backend"] == "gloo"
    assert "| section |" in out.with_suffix(".md").read_text()


def test_scan_vs_pairs_benchmark_writes_both_algorithms(tmp_path):
    out = tmp_path / "svp"
    import os

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the CPU choice is asserted below, also on a GPU machine
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scan_vs_pairs.py"), "--T", "40", "--dks", "4",
                        "--rep", "1", "--warmup", "0", "--dtype", "float32", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert sorted(row["algo"] for row in rows) == ["pairs", "scan"]
    assert [row["default"] for row in rows if row["algo"] == "pairs"] == ["yes"]  # the CPU keeps the pairs
    assert all(row["ms_fwd_bwd"] > 0 for row in rows)
    assert "device" in out.with_suffix(".md").read_text()
