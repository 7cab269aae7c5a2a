"""The report of ``tensorattn bench poly``: the implementations' row names, the issue's targets, the summary per
length (poly's times and each peer's time over poly's in the same run) and the verdict on each target, as rows
and as markdown. Pure functions of the measured rows (the CPU tests drive them with made-up figures)."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

from .harness import fmt, markdown_table

POLY = "poly-triton"
EXACT_FULL = "exact-full"
WINDOW = "exact-window(512,32)"
FLA = "fla-fused_chunk_based"
TARGET_1M = 1048576
TARGETS = dict(ms_1m=250.0, peak_1m_gib=16.0, fla_speedup=2.0, sdpa_from_T=32768, window_from_T=16384,
               bwd_over_fwd=3.0)


def measured(r) -> bool:
    """Whether a row holds a finite time (not a skipped, failed or out-of-memory row)."""
    return r is not None and isinstance(r.get("ms"), float) and math.isfinite(r["ms"])


def summarize(rows: Sequence[Dict[str, Any]], target_dk: Optional[int] = 16):
    """Per (Dk, T) where poly-triton has a row: poly fwd+bwd / fwd ms, bwd/fwd, fwd+bwd peak, and each peer's
    fwd+bwd time over poly's (> 1: poly is faster); plus the issue's targets judged on ``target_dk`` (or the
    smallest Dk present when that one is absent). Returns (summary rows, target rows)."""
    at: Dict[Tuple[str, str, Any, Any], Dict[str, Any]] = {}
    peers = sorted({r["impl"] for r in rows if r.get("peer")})
    for r in rows:
        if r.get("T") is None:
            continue
        key = (r["impl"], r["mode"], None if r.get("peer") else r.get("Dk"), r["T"])
        at[key] = r

    def get(impl, mode, Dk, T):
        return at.get((impl, mode, Dk, T))

    def ratio(other, mine):
        return other["ms"] / mine["ms"] if measured(other) and measured(mine) else None

    power = next((p for p in peers if p.startswith("power-attention")), None)
    sdpa = next((p for p in peers if p.startswith("sdpa")), None)
    out = []
    dks = sorted({r["Dk"] for r in rows if r["impl"] == POLY and r.get("T") is not None})
    for Dk in dks:
        for T in sorted({r["T"] for r in rows if r.get("T") is not None and (r.get("peer") or r.get("Dk") == Dk)}):
            fb, f = get(POLY, "fwd+bwd", Dk, T), get(POLY, "fwd", Dk, T)
            if fb is None and f is None:
                continue
            s = dict(Dk=Dk, T=T, poly_fwdbwd_ms=fb["ms"] if measured(fb) else None, poly_fwd_ms=f["ms"] if measured(f) else None,
                     bwd_over_fwd=(fb["ms"] - f["ms"]) / f["ms"] if measured(fb) and measured(f) else None,
                     poly_fwdbwd_peak_gib=fb.get("peak_gib") if measured(fb) else None,
                     poly_fwdbwd_note=_short_note(fb),
                     fla_over_poly=ratio(get(FLA, "fwd+bwd", Dk, T) or {}, fb or {}),
                     fla_over_poly_fwd=ratio(get(FLA, "fwd", Dk, T) or {}, f or {}),
                     power_over_poly=ratio(get(power, "fwd+bwd", None, T) or {}, fb or {}) if power else None,
                     sdpa_over_poly=ratio(get(sdpa, "fwd+bwd", None, T) or {}, fb or {}) if sdpa else None,
                     window_over_poly=ratio(get(WINDOW, "fwd+bwd", Dk, T) or {}, fb or {}))
            out.append(s)
    if not dks:
        return out, [dict(target="all", verdict="not measured", detail="no poly-triton rows")]
    tdk = target_dk if target_dk in dks else dks[0]
    srows = [s for s in out if s["Dk"] == tdk]
    return out, _targets(srows, tdk, at)


def _short_note(r):
    if not r:
        return ""
    note = r.get("note") or ("OOM" if r.get("oom") else "")
    return "not run (see rows)" if note.startswith("not run") else note[:60]


def _verdict(pairs, ok, what, worst=min):
    """pairs: [(T, value)] with value None where not measured; ok(value) -> bool; worst: min or max."""
    got = [(T, v) for T, v in pairs if v is not None]
    if not got:
        return "not measured", f"no {what} in this run"
    bad = [(T, v) for T, v in got if not ok(v)]
    Ts = ", ".join(f"{T:,}" for T, _ in got)
    if bad:
        return "missed", f"at T = {', '.join(f'{T:,} ({v:.3g})' for T, v in bad)}; measured at T = {Ts}"
    return "met", f"{worst.__name__} {worst(v for _, v in got):.3g} over T = {Ts}"


def _targets(srows, Dk, at):
    t, res = TARGETS, []
    s1m = next((s for s in srows if s["T"] == TARGET_1M), None)
    ms = s1m["poly_fwdbwd_ms"] if s1m else None
    res.append(dict(target=f"poly fwd+bwd at T = 1,048,576 <= {t['ms_1m']:g} ms", Dk=Dk,
                    verdict="not measured" if ms is None else ("met" if ms <= t["ms_1m"] else "missed"),
                    detail="no fwd+bwd row at 1M" + (f" ({s1m['poly_fwdbwd_note']})" if s1m and s1m["poly_fwdbwd_note"]
                                                      else "") if ms is None else f"{ms:.4g} ms"))
    pk = s1m["poly_fwdbwd_peak_gib"] if s1m else None
    r1m = at.get((POLY, "fwd+bwd", Dk, TARGET_1M)) or {}
    res.append(dict(target=f"poly fwd+bwd peak at T = 1,048,576 <= {t['peak_1m_gib']:g} GiB (beyond inputs)", Dk=Dk,
                    verdict="not measured" if pk is None else ("met" if pk <= t["peak_1m_gib"] else "missed"),
                    detail="no fwd+bwd row at 1M" if pk is None else
                    f"{pk:.3g} GiB beyond inputs of {r1m.get('input_gib', float('nan')):.3g} GiB"))
    for key, name, lo_T, thr, strict, what in (
            ("fla_over_poly", f"poly fwd+bwd >= {t['fla_speedup']:g}x faster than fla at every T", 0, t["fla_speedup"],
             False, "fla fwd+bwd pair"),
            ("sdpa_over_poly", f"poly fwd+bwd faster than SDPA from T = {t['sdpa_from_T']:,}", t["sdpa_from_T"], 1.0,
             True, f"SDPA fwd+bwd pair at T >= {t['sdpa_from_T']:,}"),
            ("window_over_poly", f"poly fwd+bwd faster than exact window(512,32) at every T >= {t['window_from_T']:,}",
             t["window_from_T"], 1.0, True, f"window fwd+bwd pair at T >= {t['window_from_T']:,}")):
        v, d = _verdict([(s["T"], s[key]) for s in srows if s["T"] >= lo_T],
                        (lambda x, thr=thr, strict=strict: x > thr if strict else x >= thr), what)
        res.append(dict(target=name + " (ratio = their ms / poly's)", Dk=Dk, verdict=v, detail=d))
    v, d = _verdict([(s["T"], s["bwd_over_fwd"]) for s in srows], lambda x: x <= t["bwd_over_fwd"], "fwd and fwd+bwd pair",
                    worst=max)
    res.append(dict(target=f"poly bwd <= {t['bwd_over_fwd']:g}x fwd (bwd = fwd+bwd - fwd)", Dk=Dk, verdict=v, detail=d))
    return res


def summary_markdown(summary, targets) -> str:
    cols = [("Dk", "Dk"), ("T", "T"), ("poly_fwdbwd_ms", "poly fwd+bwd ms"), ("poly_fwd_ms", "poly fwd ms"),
            ("bwd_over_fwd", "bwd/fwd"), ("poly_fwdbwd_peak_gib", "fwd+bwd peak GiB"),
            ("fla_over_poly", "fla/poly"), ("fla_over_poly_fwd", "fla/poly fwd"), ("power_over_poly", "power/poly"),
            ("sdpa_over_poly", "sdpa/poly"), ("window_over_poly", "window/poly"), ("poly_fwdbwd_note", "note")]
    lines = ["## Summary", "",
             "Ratios are the other implementation's time over poly-triton's in this run, fwd+bwd unless marked fwd "
             "(> 1: poly is faster); — where either was not measured (see the rows below). power = power-attention, "
             "sdpa = causal SDPA (each at its own head dim, the same at every Dk), window = exact window(512,32) at the same Dk.", "",
             "| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for s in summary:
        cells = []
        for k, _ in cols:
            v = s.get(k)
            cells.append("—" if v is None or v == "" and k != "poly_fwdbwd_note" else fmt(v))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Targets", "", markdown_table(targets, ["target", "Dk", "verdict", "detail"])]
    return "\n".join(lines)
