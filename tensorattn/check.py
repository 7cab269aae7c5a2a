"""``tensorattn check``: verify the references and the paper's closed-form gradient on random inputs.

Prints one row per check (max absolute and relative error, the tolerance, pass/fail) and exits non-zero
if any check fails. Every check draws fresh random inputs from ``--seed``.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import paper
from .naive import naive_order_attn, naive_tensor_attn

F64 = torch.float64


def loop_tensor_attn(q, k1, k2, v1, v2, *, scale=None, causal=False, window=None):
    """Tensor attention by explicit Python loops over ``(b, h, i, j1, j2)``: the definition, for tiny sizes."""
    B, T, Hq, D = q.shape
    S1, S2, Hkv, Dv = k1.shape[1], k2.shape[1], k1.shape[2], v1.shape[3]
    scale = D ** -0.5 if scale is None else scale
    w1, w2 = (window, window) if isinstance(window, int) else (window or (None, None))
    out = torch.zeros(B, T, Hq, Dv, dtype=F64)
    for b, h, i in itertools.product(range(B), range(Hq), range(T)):
        g = h // (Hq // Hkv)
        scores, vals = [], []
        for j1, j2 in itertools.product(range(S1), range(S2)):
            if (causal or window is not None) and (j1 > i or j2 > i):
                continue
            if window is not None and (j1 <= i - w1 or j2 <= i - w2):
                continue
            scores.append(scale * float((q[b, i, h] * k1[b, j1, g] * k2[b, j2, g]).double().sum()))
            vals.append((v1[b, j1, g] * v2[b, j2, g]).double())
        p = torch.tensor(scores, dtype=F64).softmax(0)
        out[b, i, h] = (p[:, None] * torch.stack(vals)).sum(0)
    return out


@dataclass
class Result:
    name: str
    max_abs: float
    max_rel: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.max_rel == self.max_rel and self.max_rel <= self.tol  # NaN fails


def max_errors(got: torch.Tensor, ref: torch.Tensor) -> Tuple[float, float]:
    """(max abs error, max abs error / max |ref|), computed in float64."""
    got, ref = got.detach().to(F64).cpu(), ref.detach().to(F64).cpu()
    diff = (got - ref).abs().max().item()
    return diff, diff / max(ref.abs().max().item(), 1e-300)


def _err(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> Result:
    return Result(name, *max_errors(got, ref), tol)


def _qkv(gen, B, T, Hq, Hkv, D, Dv, device, S=None):
    S = T if S is None else S
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64).to(device)  # noqa: E731
    return r(B, T, Hq, D), r(B, S, Hkv, D), r(B, S, Hkv, D), r(B, S, Hkv, Dv), r(B, S, Hkv, Dv)


def check_reference_vs_loop(gen, device) -> List[Result]:
    out = []
    for causal, window in [(False, None), (True, None), (True, (3, 2)), (False, (1, 1)), (True, (2, 5)),
                           (False, (50, 50))]:
        x = _qkv(gen, 2, 7, 4, 2, 5, 3, device)
        got = naive_tensor_attn(*x, causal=causal, window=window)
        ref = loop_tensor_attn(*(t.cpu() for t in x), causal=causal, window=window)
        out.append(_err(f"naive_tensor_attn vs loops (causal={causal}, window={window}, GQA 4/2)", got, ref, 1e-12))
    return out


def check_order(gen, device) -> List[Result]:
    out = []
    for causal in (False, True):
        q, k, _, v, _ = _qkv(gen, 2, 9, 2, 2, 8, 8, device)
        sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=causal).transpose(1, 2)
        out.append(_err(f"naive_order_attn m=1 vs SDPA (causal={causal})", naive_order_attn(q, [k], [v], causal=causal),
                        sdpa, 1e-12))
        x = _qkv(gen, 1, 8, 4, 2, 4, 6, device)
        out.append(_err(f"naive_order_attn m=2 vs naive_tensor_attn (causal={causal})",
                        naive_order_attn(x[0], [x[1], x[2]], [x[3], x[4]], causal=causal),
                        naive_tensor_attn(*x, causal=causal), 1e-12))
    return out


def check_gradcheck(gen, device) -> List[Result]:
    x = [t.requires_grad_(True) for t in _qkv(gen, 1, 4, 2, 1, 3, 2, device)]
    ok = torch.autograd.gradcheck(lambda *a: naive_tensor_attn(*a, window=(3, 2)), x, raise_exception=False)
    return [Result("gradcheck(naive_tensor_attn, window (3,2)) in float64", 0.0 if ok else float("inf"),
                   0.0 if ok else float("inf"), 0.0)]


def _paper_problem(gen, n, d, device, w_scale=0.5):
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64).to(device)  # noqa: E731
    As = [r(n, d) for _ in range(5)]
    Ws = [r(d, d) * w_scale for _ in range(5)]
    return As, r(n, d), Ws


def _autograd_grad(As, E, Ws):
    """dLoss/dX by torch.autograd through the loss written with an explicit X (the paper's variable)."""
    X, Y = paper.merge_weights(*Ws)
    X = X.clone().requires_grad_(True)
    f = paper.logits(As[0], As[1], As[2], X).softmax(-1)
    loss = 0.5 * ((f @ (paper.kron(As[3], As[4]) @ Y) - E) ** 2).sum()
    (g,) = torch.autograd.grad(loss, X)
    return g, loss


def check_closed_form(gen, device) -> List[Result]:
    out = []
    for n, d in [(3, 2), (6, 3), (9, 4), (12, 2)]:
        As, E, Ws = _paper_problem(gen, n, d, device)
        g_ref, l_ref = _autograd_grad(As, E, Ws)
        out.append(_err(f"paper.loss_grad closed form vs autograd (n={n}, d={d})",
                        paper.loss_grad(*As, E, *Ws), g_ref, 1e-9))
        out.append(_err(f"paper.loss vs loss through X (n={n}, d={d})", paper.loss(*As, E, *Ws), l_ref, 1e-12))
    return out


def check_identities(gen, device) -> List[Result]:
    As, E, Ws = _paper_problem(gen, 5, 3, device)
    A1, A2, A3, A4, A5 = As
    X, Y = paper.merge_weights(*Ws)
    Q, K1, K2, V1, V2 = (A @ W for A, W in zip(As, Ws))
    I = paper.closed_form_intermediates(*As, E, *Ws)
    out_ = I["f"] @ I["h"]
    return [
        _err("(i) A1 X (A2⊗A3)^T == Q (K1⊘K2)^T", A1 @ X @ paper.kron(A2, A3).T, Q @ paper.khatri_rao(K1, K2).T, 1e-12),
        _err("(i) (A4⊗A5) Y == V1⊘V2", paper.kron(A4, A5) @ Y, paper.khatri_rao(V1, V2), 1e-12),
        _err("(ii) vec(A1 X (A2⊗A3)^T) == (A1⊗A2⊗A3) vec(X)", paper.vec(A1 @ X @ paper.kron(A2, A3).T),
             paper.kron(paper.kron(A1, A2), A3) @ paper.vec(X), 1e-12),
        _err("(iii) r == rowsum(c∘O)", I["r"], (I["c"] * out_).sum(-1), 1e-12),
        _err("face_split^T == khatri_rao of transposes", paper.khatri_rao(A1.T, A2.T).T, paper.face_split(A1, A2), 0.0),
    ]


CHECKS: Sequence[Callable] = (check_reference_vs_loop, check_order, check_gradcheck, check_closed_form,
                              check_identities)


def check_device(device) -> torch.device:
    """``device`` as a torch.device that exists here: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (ValueError otherwise)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but CUDA is not available here "
                             "(torch.cuda.is_available() is False); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} was asked for but this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
    return dev


def run_checks(seed: int = 0, device: str = "cpu") -> List[Result]:
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(1 << 63) <= seed < (1 << 64):
        raise ValueError(f"seed must be an int in [-2**63, 2**64), got {seed!r}")
    dev = check_device(device)
    gen = torch.Generator().manual_seed(seed)
    results: List[Result] = []
    for fn in CHECKS:
        results.extend(fn(gen, dev))
    return results


def format_table(results: Sequence[Result]) -> str:
    w = max(len(r.name) for r in results)
    lines = [f"{'check':<{w}}  {'max abs err':>11}  {'max rel err':>11}  {'tol':>7}  result",
             "-" * (w + 45)]
    for r in results:
        lines.append(f"{r.name:<{w}}  {r.max_abs:>11.2e}  {r.max_rel:>11.2e}  {r.tol:>7.0e}  "
                     f"{'pass' if r.ok else 'FAIL'}")
    n_fail = sum(not r.ok for r in results)
    lines.append(f"{len(results) - n_fail} passed, {n_fail} failed")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="tensorattn check", description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    ap.add_argument("--device", default="cpu", help="device to run the checks on (default cpu)")
    args = ap.parse_args(argv)
    torch.set_printoptions(precision=3)
    try:
        check_device(args.device)
        if not -(1 << 63) <= args.seed < (1 << 64):
            raise ValueError(f"--seed must be in [-2**63, 2**64), got {args.seed}")
    except ValueError as e:
        print(f"tensorattn check: {e}", file=sys.stderr)
        return 2
    results = run_checks(args.seed, args.device)
    print(f"tensorattn check: seed {args.seed}, device {args.device}, torch {torch.__version__}, float64")
    print(format_table(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
