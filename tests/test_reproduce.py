"""`tensorattn reproduce` at test size: every section and figure is produced and every number parses."""
import json
import math
import re

import pytest

from tensorattn.reproduce import SECTIONS, run
from tensorattn.bench.harness import loglog_slope
from tensorattn.reproduce.common import _taylor_bound_degree


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("rep")
    path = run("tiny", str(out), "cpu")
    return out, path.read_text()


def _tables(md):
    """Every markdown table as (header, rows)."""
    tables, cur = [], None
    for line in md.splitlines():
        if line.startswith("|") and line.endswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cur is None:
                cur = (cells, [])
            elif not all(set(c) <= set("-: ") for c in cells):
                cur[1].append(cells)
        elif cur is not None:
            tables.append(cur)
            cur = None
    return tables


def test_every_section_and_figure(report):
    out, md = report
    for i, title in enumerate(["Correctness", "Cost", "Approximation quality", "Order m", "Head dimension",
                               "Training"]):
        assert re.search(rf"^## {i + 1}\. {title}", md, re.M), title
    figs = re.findall(r"!\[[^]]*\]\(([^)]+\.png)\)", md)
    assert {"cost.png", "threshold_error.png", "threshold_degree.png", "threshold_time.png", "order.png",
            "headdim.png", "training.png"} <= set(figs)
    for f in figs:
        data = (out / f).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert md.count("Configuration:") == len(SECTIONS)
    assert "device:" in md and "torch" in md and "seed 0" in md


def test_every_number_parses(report):
    out, md = report
    tables = _tables(md)
    assert len(tables) >= 10
    numeric = re.compile(r"^-?[\d,]*\.?\d+(e[+-]?\d+)?$|^NaN$|^inf$")
    n_numbers = 0
    for header, rows in tables:
        for row in rows:
            assert len(row) == len(header)
            for cell in row:
                if cell and (cell[0].isdigit() or cell[0] == "-" or cell in ("NaN", "inf")):
                    assert numeric.match(cell), f"unparseable cell {cell!r} in table {header}"
                    float(cell.replace(",", ""))
                    n_numbers += 1
    assert n_numbers > 100
    data = json.loads((out / "report.json").read_text())
    assert set(data["sections"]) == set(SECTIONS)


def test_fast_is_accurate_in_report(report):
    out, _ = report
    data = json.loads((out / "report.json").read_text())
    errs = data["sections"]["correctness"]["data"]["grad_err_by_degree"]
    assert errs["4"] < errs["2"] / 10  # the error falls with the degree
    tr = data["sections"]["training"]["data"]
    assert tr["exact"]["losses"][-1] < tr["exact"]["losses"][0]


def test_helpers():
    assert abs(loglog_slope([1, 2, 4, 8], [3, 24, 192, 1536]) - 3) < 1e-12
    assert math.isnan(loglog_slope([1], [1]))
    g = _taylor_bound_degree(1.0, 2.1e-5)  # R=1, g=8 gives a bound of 2.0e-5
    assert g == 8


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="preset must be one of"):
        run("huge", str(tmp_path))
    with pytest.raises(ValueError, match="sections must be among"):
        run("tiny", str(tmp_path), sections=["nope"])


def test_cost_section_measures_each_method_in_a_child_process(tmp_path):
    """On the CPU (the quick preset) the cost section measures each method in a fresh process,
    ``python -m tensorattn.reproduce.cost_child``: its points come back for every n asked."""
    import dataclasses

    from tensorattn.reproduce.common import PRESETS, Report
    from tensorattn.reproduce.cost import _cost_points

    rep = Report(tmp_path, "cpu", dataclasses.replace(PRESETS["tiny"], cost_subprocess=True))
    pts = _cost_points(rep, "fast", "forward", [8, 16])
    assert [q["n"] for q in pts] == [8, 16]
    assert all(q["s"] > 0 and q["peak_mib"] >= 0 for q in pts), pts
