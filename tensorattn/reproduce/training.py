"""Section 6: gradient descent on the paper's objective with the exact and the fast gradient from one start."""
from __future__ import annotations

import math
import time

import torch

from .. import paper
from ..bench.harness import _sync, fmt, markdown_table
from .common import Report, Section, _plt, bounded_problem


def _grad_to_weights(G: torch.Tensor, WQ, WK1, WK2):
    """Chain rule from dLoss/dX (X[a, b·d+e] = Σ_c WQ[a,c] WK1[b,c] WK2[e,c]) to the three weights."""
    d = WQ.shape[0]
    G3 = G.reshape(d, d, d)
    return (torch.einsum("abe,bc,ec->ac", G3, WK1, WK2), torch.einsum("abe,ac,ec->bc", G3, WQ, WK2),
            torch.einsum("abe,ac,bc->ec", G3, WQ, WK1))


def train_paper_objective(As, E, Ws, *, steps: int, lr: float, method: str, degree=None, device="cpu"):
    """Gradient descent on Definition 2.8 over (WQ, WK1, WK2) through dLoss/dX (values fixed, as in the paper).

    Returns ``(losses, seconds per step, diverged_at)``: the loss before every step (and after the last one),
    the mean time of a step (gradient + update), and the step at which the run stopped because the loss or the
    gradient stopped being finite, or the fast gradient refused the weights (logits too large for any degree):
    ``None`` if it ran to the end.
    """
    WQ, WK1, WK2, WV1, WV2 = [w.clone() for w in Ws]
    losses, times, diverged_at = [], [], None
    for step in range(steps):
        losses.append(paper.loss(*As, E, WQ, WK1, WK2, WV1, WV2).item())
        if not math.isfinite(losses[-1]):
            diverged_at = step
            break
        _sync(device)
        t0 = time.perf_counter()
        kw = {"method": "fast", "degree": degree} if method == "fast" else {}
        try:
            G = paper.loss_grad(*As, E, WQ, WK1, WK2, WV1, WV2, **kw)
        except ValueError:  # the fast method refuses non-finite or unboundedly large logits
            diverged_at = step
            break
        if not bool(torch.isfinite(G).all()):
            diverged_at = step
            break
        gq, g1, g2 = _grad_to_weights(G, WQ, WK1, WK2)
        WQ, WK1, WK2 = WQ - lr * gq, WK1 - lr * g1, WK2 - lr * g2
        _sync(device)
        times.append(time.perf_counter() - t0)
    else:
        losses.append(paper.loss(*As, E, WQ, WK1, WK2, WV1, WV2).item())
    timed_steps = times[1:] or times  # the first step includes warm-up
    return losses, sum(timed_steps) / max(1, len(timed_steps)), diverged_at


def section_training(rep: Report, progress) -> Section:
    p, dev = rep.preset, rep.device
    s = Section("training", "Training on the paper's objective: exact against fast gradients", {
        "n": p.tr_n, "d": p.tr_d, "steps": p.tr_steps, "learning rate": p.tr_lr, "fast degrees": p.tr_degrees,
        "parameters": "WQ, WK1, WK2 (values fixed, as in Definition 2.8)", "start entry bound B": p.tr_B,
        "target": f"E = attention output of a teacher with entry bound {1.5 * p.tr_B:g}"})
    # a teacher with other weights defines the target, so the loss can really fall
    As, _, Ws = bounded_problem(p.tr_n, p.tr_d, p.tr_B, seed=p.seed, device=dev)
    _, _, Wt = bounded_problem(p.tr_n, p.tr_d, 1.5 * p.tr_B, seed=p.seed + 99, device=dev)
    E = paper.attention(*As, Wt[0], Wt[1], Wt[2], Ws[3], Ws[4])
    runs = {"exact": train_paper_objective(As, E, Ws, steps=p.tr_steps, lr=p.tr_lr, method="exact", device=dev)}
    progress("training exact")
    for g in p.tr_degrees:
        runs[f"fast g={g}"] = train_paper_objective(As, E, Ws, steps=p.tr_steps, lr=p.tr_lr, method="fast",
                                                    degree=g, device=dev)
        progress(f"training fast g={g}")
    ex = runs["exact"][0]
    rows = []
    for name, (losses, t, div) in runs.items():
        done = div is None
        rows.append({"gradient": name, "initial loss": losses[0], "final loss": losses[-1] if done else float("nan"),
                     "final gap to exact": losses[-1] - ex[-1] if done else float("nan"),
                     "max abs gap over the run": max(abs(a - b) for a, b in zip(losses, ex)),
                     "stopped at step": float("nan") if done else div, "time per step (ms)": t * 1e3})
    s.tables.append(markdown_table(rows, list(rows[0].keys())))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (losses, _, div) in runs.items():
        line = ax.semilogy(losses, ls="-" if name == "exact" else "--", label=name + ("" if div is None else
                                                                                      f" (stopped at step {div})"))[0]
        if div is not None and losses:
            ax.plot([len(losses) - 1], [losses[-1]], "x", color=line.get_color(), ms=9, mew=2)
    ax.set(xlabel="step", ylabel="loss (Definition 2.8)", title=f"gradient descent, n = {p.tr_n}, d = {p.tr_d}")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    s.figures.append(rep.figure("training", fig))
    finished = [r for r in rows if r["gradient"] != "exact" and r["final gap to exact"] == r["final gap to exact"]]
    stopped = [f"{r['gradient']} (step {r['stopped at step']})" for r in rows if r["stopped at step"] == r["stopped at step"]]
    txt = ("All runs start from the same weights and take the same steps; only the gradient differs. "
           f"The exact run lowers the loss from {fmt(ex[0])} to {fmt(ex[-1])}. A low degree drifts away from it (the "
           "weights grow during training, so the logits leave the interval where the polynomial is accurate)")
    if finished:
        best = min(finished, key=lambda r: abs(r["final gap to exact"]))
        txt += f"; the closest fast run ({best['gradient']}) ends {fmt(abs(best['final gap to exact']))} from the exact loss"
    if stopped:
        txt += ("; runs that stopped because the loss or gradient stopped being finite (the approximate softmax "
                "goes wrong once the logits pass the polynomial's range): " + ", ".join(stopped))
    s.text.append(txt + ". Time per step includes the gradient and the update; at this n the closed form is "
                  "still cheap, the cost section shows where the fast method wins.")
    s.data = {name: {"losses": losses, "s_per_step": t, "stopped_at": div} for name, (losses, t, div) in runs.items()}
    return s
