"""The CPU-runnable benchmark scripts run end to end at tiny sizes and write their reports (no timing asserted)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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

    out = tmp_path / "dist"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # gloo on the CPU, also on a GPU machine
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        str(ROOT / "benchmarks" / "dist_bench.py"), "--weak-lens", "48",
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


def test_packed_bench_compares_packed_with_padded(tmp_path):
    out = tmp_path / "pb"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "packed_bench.py"), "--lengths", "5,1,17", "--heads",
                        "2", "--head-dim", "16", "--window", "6,3", "--dtype", "float32", "--rep", "1", "--warmup", "0",
                        "--device", "cpu", "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(row["op"], row["layout"]) for row in rows] == [("exact", "packed"), ("exact", "padded"),
                                                            ("poly", "packed"), ("poly", "padded")]
    assert [row["rows_computed"] for row in rows] == [23, 51, 23, 51]
    for row in rows:
        assert row["ms_fwd_bwd"] > 0 and row["tokens_per_s"] > 0
        if row["layout"] == "packed":  # the same function as the padded run on the real rows
            assert row["max_rel_diff"] < 1e-5 and row["speedup_vs_padded"] > 0
    assert "device" in out.with_suffix(".md").read_text()


def test_bench_poly_help_lists_the_peer_flags():
    r = subprocess.run([sys.executable, "-m", "tensorattn", "bench", "poly", "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for flag in ("--no-fla", "--no-power", "--no-sdpa", "--sdpa-max-T", "--T", "--budget-s", "--degree"):
        assert flag in r.stdout
    r = subprocess.run([sys.executable, "-m", "tensorattn", "bench", "poly", "--degree", "4", "--dk", "16", "64"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "--degree 4 needs --dk 16" in r.stderr, r.stderr[-2000:]


def _row(impl, mode, Dk, T, ms, peer=False, **kw):
    return dict(impl=impl, mode=mode, Dk=Dk, T=T, ms=ms, peak_gib=kw.pop("peak_gib", 1.0), peer=peer, **kw)


def test_bench_poly_summary_ratios_and_targets():
    from tensorattn.bench import poly as bp
    from tensorattn.bench import poly_report as pr

    P, S, W, F = bp.POLY, bp.sdpa_name(64), bp.WINDOW, bp.FLA
    rows = []
    for T, poly_fb, sdpa_fb in ((16384, 20.0, 10.0), (32768, 40.0, 45.0), (1048576, 200.0, None)):
        rows += [_row(P, "fwd", 16, T, poly_fb / 4), _row(P, "fwd+bwd", 16, T, poly_fb, peak_gib=12.0, input_gib=5.5),
                 _row(F, "fwd+bwd", 16, T, poly_fb * 3), _row(W, "fwd+bwd", 16, T, poly_fb * 1.5)]
        if sdpa_fb:
            rows.append(_row(S, "fwd+bwd", 64, T, sdpa_fb, peer=True))
    rows.append(_row(S, "fwd+bwd", 64, 1048576, float("nan"), peer=True, note="not run at T >= 1048576: beyond"))
    rows.append(dict(impl=bp.power_name(64, 128), mode="-", Dk=64, peer=True, ms=float("nan"), note="unavailable: x"))
    rows.append(_row(P, "fwd+bwd", 64, 16384, 100.0))  # another Dk: in the summary, not in the targets
    summary, targets = pr.summarize(rows, target_dk=16)
    by = {(s["Dk"], s["T"]): s for s in summary}
    assert set(by) == {(16, 16384), (16, 32768), (16, 1048576), (64, 16384)}
    s = by[(16, 32768)]
    assert s["bwd_over_fwd"] == 3.0 and s["fla_over_poly"] == 3.0 and s["window_over_poly"] == 1.5
    assert abs(s["sdpa_over_poly"] - 45 / 40) < 1e-12 and s["power_over_poly"] is None
    assert by[(16, 16384)]["sdpa_over_poly"] == 0.5 and by[(16, 1048576)]["sdpa_over_poly"] is None
    assert by[(64, 16384)]["sdpa_over_poly"] == 0.1 and by[(64, 16384)]["fla_over_poly"] is None
    verdict = {t["target"].split(" (")[0]: t["verdict"] for t in targets}
    assert verdict["poly fwd+bwd at T = 1,048,576 <= 250 ms"] == "met"
    assert verdict["poly fwd+bwd peak at T = 1,048,576 <= 16 GiB"] == "met"
    assert verdict["poly fwd+bwd >= 2x faster than fla at every T"] == "met"
    assert verdict["poly fwd+bwd faster than SDPA from T = 32,768"] == "met"  # 16K (0.5) is before 32K
    assert verdict["poly fwd+bwd faster than exact window(512,32) at every T >= 16,384"] == "met"
    assert verdict["poly bwd <= 3x fwd"] == "met"
    md = pr.summary_markdown(summary, targets)
    assert "## Summary" in md and "## Targets" in md and "sdpa/poly" in md and "—" in md

    rows[1]["ms"] = 300.0  # poly fwd+bwd at 16K: slower than SDPA, fla and window only by < 2x; bwd > 3x fwd
    _, targets = pr.summarize(rows, target_dk=16)
    verdict = {t["target"].split(" (")[0]: t["verdict"] for t in targets}
    assert verdict["poly fwd+bwd >= 2x faster than fla at every T"] == "missed"
    assert verdict["poly fwd+bwd faster than exact window(512,32) at every T >= 16,384"] == "missed"
    assert verdict["poly bwd <= 3x fwd"] == "missed"
    _, targets = pr.summarize([r for r in rows if r["impl"] != P], target_dk=16)
    assert [t["verdict"] for t in targets] == ["not measured"]


def test_bench_poly_main_writes_report_with_peer_notes(tmp_path, monkeypatch):
    """The whole loop on the CPU with fake measurements: a peer that fails to import, one that crashes and one that
    runs out of memory are notes in their rows; the length and memory predictions stop jobs; files are written."""
    import torch

    from tensorattn.bench import poly as bp

    calls = []

    def fake_measure(fn, xs, mode, max_s):
        T = xs[0][2] if fn is bp._sdpa else xs[0][1]
        calls.append((getattr(fn, "tag", "?"), mode, T))
        if getattr(fn, "tag", "") == "power" and T >= 65536:
            raise RuntimeError("triton compile failed")
        if fn is bp._sdpa and mode == "fwd+bwd" and T >= 32768:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        ms = 1e-4 * T * (3 if mode == "fwd+bwd" else 1)
        return dict(ms=ms, ms_p20=ms, ms_p80=ms, reps=5, peak_gib=T * 2e-5)

    def load_power(chunk):
        f = lambda q, k, v: None  # noqa: E731
        f.tag = "power"
        return f

    def no_fla():
        raise ModuleNotFoundError("No module named 'fla'")

    monkeypatch.setattr(bp, "randn_inputs", lambda shapes, **kw: list(shapes))
    monkeypatch.setattr(bp, "_measure", fake_measure)
    monkeypatch.setattr(bp, "_load_power", load_power)
    monkeypatch.setattr(bp, "_load_fla", no_fla)
    monkeypatch.setattr(bp, "_cuda_ok", lambda: True)
    monkeypatch.setattr(bp, "machine_info", lambda device: {"device": "fake GPU", "torch": torch.__version__})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (60 * 2**30, 140 * 2**30))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    out = tmp_path / "bp"
    rc = bp.main(["--out", str(out), "--T", "16384", "32768", "65536", "131072", "262144", "4194304",
                  "--dk", "16", "--no-errors", "--sdpa-max-T", "131072", "--max-call-s", "60"])
    assert rc == 0
    data = json.loads((out / "bench_poly.json").read_text())
    rows = data["rows"]
    note = {(r["impl"], r["mode"], r.get("T")): r.get("note", "") for r in rows}
    assert note[(bp.FLA, "-", None)].startswith("unavailable: ModuleNotFoundError")
    pw = bp.power_name(64, 128)
    assert note[(pw, "fwd", 65536)] == "RuntimeError: triton compile failed"
    assert (pw, "fwd", 131072) not in note  # a crashed peer is not tried at longer lengths
    assert note[(bp.sdpa_name(64), "fwd+bwd", 32768)] == "OOM"
    assert note[(bp.sdpa_name(64), "fwd", 262144)].startswith("not run at T >= 262144: beyond --sdpa-max-T")
    # 4M: poly's memory at 256K (5.2 GiB peak + 1.4 GiB inputs) extrapolates past 92% of the 60 GiB free
    assert "GiB free" in note[(bp.POLY, "fwd+bwd", 4194304)]
    assert note[(bp.EXACT_FULL, "fwd", 16384)].startswith("not run at T >= 16384: beyond --exact-full-max-T")
    assert ("power", "fwd", 32768) in calls and not any(c[2] == 4194304 for c in calls)
    meta = data["meta"]
    assert {t["verdict"] for t in meta["targets"]} <= {"met", "missed", "not measured"}
    assert [s["T"] for s in meta["summary"]] == [16384, 32768, 65536, 131072, 262144, 4194304]
    md = (out / "bench_poly.md").read_text()
    assert "## Summary" in md and "## Targets" in md and "| note |" in md and "fake GPU" in md
    assert (out / "bench_poly.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_decode_writes_rows_and_the_fast_cache_stays_flat(tmp_path):
    from tensorattn.bench.decode import main as bench_decode

    assert bench_decode(["--out", str(tmp_path), "--device", "cpu", "--contexts", "16", "48", "--new", "2",
                         "--dim", "32", "--layers", "1", "--heads", "2", "--window", "8", "--key-dim", "4"]) == 0
    rows = json.loads((tmp_path / "bench_decode.json").read_text())["rows"]
    by = {(r["model"].split(" ")[0], r["context"]): r for r in rows}
    assert all(r["tokens_per_s"] > 0 and not r.get("note") for r in rows), rows
    assert by[("softmax", 48)]["cache_mib"] == 3 * by[("softmax", 16)]["cache_mib"]  # grows with the context
    assert by[("window-tensor", 48)]["cache_mib"] == by[("window-tensor", 16)]["cache_mib"]  # the last w only
    assert by[("fast-tensor", 48)]["cache_mib"] == by[("fast-tensor", 16)]["cache_mib"]  # a fixed-size state
    assert "device" in (tmp_path / "bench_decode.md").read_text()


_FBGEMM_STUB = '''
import torch
from tensorattn import naive_tensor_attn

SCALE = {scale}


def triton_fwd(q, k1, k2, v1, v2, w1, w2):
    o = naive_tensor_attn(q, k1, k2, v1, v2, causal=True, window=(w1, w2), scale=SCALE * q.shape[3] ** -0.5)
    return o, torch.zeros(q.shape[0], q.shape[2], q.shape[1])
'''

_FBGEMM_BWD_STUB = '''
import torch
from tensorattn import naive_tensor_attn


def triton_bwd(q, k1, k2, v1, v2, o, dO, m, w1, w2):
    assert k1.shape[2] == q.shape[2], "the peer's backward takes k, v with the query heads"
    xs = [x.detach().float().requires_grad_() for x in (q, k1, k2, v1, v2)]
    out = naive_tensor_attn(*xs, causal=True, window=(w1, w2))
    return torch.autograd.grad(out, xs, dO.float())
'''


def test_fbgemm_peer_adapter(tmp_path):
    """The optional FBGEMM row: a missing folder is a FileNotFoundError naming the file; with stand-ins of the
    peer's two entry points (the naive reference in its calling convention) the row carries the times from
    ``measure`` and errors against tensorattn's results near zero, a stand-in with another scale shows a large
    error, and the backward is skipped with a note unless w2 == 32 (the peer asserts it)."""
    from tensorattn import naive_tensor_attn
    from tensorattn.bench import fbgemm

    with pytest.raises(FileNotFoundError, match="fwd.py"):
        fbgemm.load(str(tmp_path / "none"))
    g = torch.Generator().manual_seed(0)
    B, T, Hq, D = 1, 12, 4, 8
    xs = [torch.randn(B, T, Hq if i == 0 else 1, D, generator=g).to(torch.bfloat16) for i in range(5)]
    do = torch.randn(B, T, Hq, D, generator=g).to(torch.bfloat16)
    def measure(f, b, fb):  # the bench's _measure without timing: calls what it is given, returns fixed figures
        f()
        if b is not None:
            b()
            fb()
        return dict(fwd_ms=1.0, bwd_ms=2.0 if b else math.nan, fwdbwd_ms=3.0 if fb else math.nan, peak_gib=0.1)

    def ours(window):
        a = [x.float().requires_grad_() for x in xs]
        o = naive_tensor_attn(*a, causal=True, window=window)
        return o, torch.autograd.grad(o, a, do.float())

    for scale, window, bwd_text in ((1.0, (4, 32), _FBGEMM_BWD_STUB), (3.0, (4, 32), _FBGEMM_BWD_STUB),
                                    (1.0, (32, 4), _FBGEMM_BWD_STUB), (1.0, (4, 32), "raise ValueError('key')")):
        d = tmp_path / f"s{scale}-{window[1]}-{len(bwd_text)}"
        d.mkdir()
        (d / "fwd.py").write_text(_FBGEMM_STUB.format(scale=scale))
        (d / "bwd.py").write_text(bwd_text)
        o, grads = ours(window)
        row = fbgemm.peer_row({}, xs, do, window, o, lambda: grads, measure, str(d))
        assert row["fwd_ms"] == 1.0
        if scale == 1.0:
            assert row["err_o"] < 1e-2
        else:
            assert row["err_o"] > 0.1
        if window[1] == 32 and bwd_text == _FBGEMM_BWD_STUB:
            assert row["bwd_ms"] == 2.0 and row["fwdbwd_ms"] == 3.0 and "expanded" in row["note"]
            assert scale != 1.0 or row["err_grads"] < 2e-2
        else:  # no backward: neither its time nor a fwd+bwd of the forward alone
            assert math.isnan(row["bwd_ms"]) and math.isnan(row["fwdbwd_ms"]) and "err_grads" not in row
            assert ("w2 == 32" if window[1] != 32 else "did not load") in row["note"], row["note"]
    with pytest.raises(RuntimeError, match="one kv head"):
        fbgemm.peer_row({}, [xs[0]] + [x.expand(-1, -1, 2, -1) for x in xs[1:]], do, (4, 32), o, lambda: grads,
                        measure, str(d))
    with pytest.raises(RuntimeError, match="bf16 only"):
        fbgemm.peer_row({}, [x.float() for x in xs], do, (4, 32), o, lambda: grads, measure, str(d))


def test_exact_kernel_split_times_the_kernels_that_exist(capsys):
    """benchmarks/exact_kernel_split.py matches profiler events by kernel name: its names are the Triton kernels'
    own (a renamed kernel would otherwise drop out of the table silently), and without CUDA it stops with exit
    code 2 and says why."""
    pytest.importorskip("triton")
    import importlib.util

    from tensorattn.triton import exact_bwd, exact_fwd

    spec = importlib.util.spec_from_file_location("exact_kernel_split", ROOT / "benchmarks" / "exact_kernel_split.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    kernels = (exact_fwd._exact_fwd_kernel, exact_bwd._bwd_q_kernel, exact_bwd._bwd_k2_kernel)
    assert set(mod.KERNELS) == {k.fn.__name__ for k in kernels}
    if not torch.cuda.is_available():
        assert mod.main(["--tag", "x"]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err


def test_poly_tune_reports_the_kernels_that_exist():
    """benchmarks/poly_tune.py reads each kernel's registers and spills by name from tensorattn.triton.poly: every
    name it lists is a Triton kernel there (a removed or renamed kernel would otherwise show as '?' in every row)."""
    pytest.importorskip("triton")
    import importlib.util

    import triton

    import tensorattn.triton.poly as tp

    spec = importlib.util.spec_from_file_location("poly_tune", ROOT / "benchmarks" / "poly_tune.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.KERNELS and all(isinstance(getattr(tp, k, None), triton.runtime.JITFunction) for k in mod.KERNELS)


def test_poly_sass_counts_the_walks_loops_without_a_gpu(tmp_path):
    """benchmarks/poly_sass.py compiles the three walks for sm_90 with Triton's own ptxas (no GPU) and counts their
    inner loops: three rows, each loop longer than its float32 arithmetic, the second pass the longest; and a
    variant module (here the same kernels from another path) counts the same."""
    triton = pytest.importorskip("triton")
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 3):
        pytest.skip("benchmarks/poly_sass.py compiles through Triton >= 3.3's ASTSource signature")
    src = ROOT / "tensorattn" / "triton" / "poly_kernels.py"
    for name, extra in (("base", []), ("variant", ["--module", str(src)])):
        r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "poly_sass.py"), "--out", str(tmp_path),
                            "--name", name, *extra], capture_output=True, text=True, cwd=ROOT, timeout=600)
        if r.returncode != 0 and "cuobjdump" in r.stderr:
            pytest.skip("no cuobjdump with this Triton build")
        assert r.returncode == 0, r.stderr[-3000:]
    rows = {n: json.loads((tmp_path / f"{n}.json").read_text())["rows"] for n in ("base", "variant")}
    assert [r["kernel"] for r in rows["base"]] == ["forward walk", "pass 1", "pass 2"]
    for r in rows["base"]:
        assert 0 < r["fp32"] < r["loop"] and r["regs"] and r["regs"] <= 255, r
    assert max(rows["base"], key=lambda r: r["loop"])["kernel"] == "pass 2"
    # the walks' atomic adds return nothing (RED, not ATOM): no step waits on one
    for r in (rows["base"][0], rows["base"][2]):
        assert r["red"] > 0 and r["atom"] == 0, r
    assert [r["loop"] for r in rows["variant"]] == [r["loop"] for r in rows["base"]]
    assert "| forward walk |" in (tmp_path / "base.md").read_text()
