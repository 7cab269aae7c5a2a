import subprocess
import sys

import tensorattn.check as check
from tensorattn.cli import main


def test_check_passes_and_prints_table(capsys):
    assert main(["check", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "max rel err" in out and "FAIL" not in out and " 0 failed" in out


def test_check_fails_loudly(monkeypatch, capsys):
    def broken(gen, device):
        return [check.Result("deliberately wrong", 1.0, 1.0, 1e-12)]

    monkeypatch.setattr(check, "CHECKS", (broken,))
    assert main(["check"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_python_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "tensorattn", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "check" in r.stdout


def test_import_without_triton():
    """`import tensorattn` and the CPU paths work on a machine without Triton."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, tensorattn\n"
            "x = torch.randn(1, 6, 2, 4)\n"
            "assert tensorattn.tensor_attn(x, x, x, x, x, causal=True).shape == x.shape\n"
            "assert tensorattn.poly_tensor_attn(x, x, x, x, x, causal=True).shape == x.shape\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
