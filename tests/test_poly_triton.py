"""Chunk-parallel Triton kernels of poly_tensor_attn: output and all five gradients vs the naive polynomial
reference in float64, under TRITON_INTERPRET=1 on tiny shapes (in a subprocess, so the variable, which must be
set before triton is imported, does not leak into other test modules) and on a CUDA device."""
import json
import textwrap

import pytest
import torch
from utils import WHERE, run_interpreter, run_script

pytest.importorskip("triton")


# (B, T, Hq, Hkv, Dk, Dv, state-chunk length F, segment budget in bytes or 0 for the default, feature block of both
#  backward passes, other TUNE settings)
INTERP_CASES = [
    (1, 1, 1, 1, 16, 16, 64, 0, 32, {}),  # one position: o = v1 ∘ v2, zero q/k gradients
    (1, 7, 1, 1, 16, 8, 64, 0, 32, {}),  # shorter than the feature kernels' row blocks
    (1, 63, 2, 1, 16, 20, 32, 0, 32, {}),  # GQA, Dv not a power of two, several chunks, the last one partial
    (1, 45, 4, 2, 16, 12, 16, 0, 32, {}),  # GQA with two kv heads: each query head must read its own
    (2, 96, 2, 2, 16, 40, 32, 50_000, 32, {}),  # B = 2, Dv padded to 64, one chunk per segment
    (1, 63, 2, 1, 16, 20, 32, 300_000, 32, {}),  # one forward segment of two chunks, two backward segments of one
    (1, 70, 2, 1, 16, 40, 32, 0, 16, {}),  # the backward in feature blocks of 16
    (1, 40, 1, 1, 32, 16, 16, 0, 32, {}),  # Dk = 32 (rank 561): more feature blocks
    # blocks of 8 features, one warp per program in both passes, other row counts for the feature kernels
    (1, 50, 2, 1, 16, 20, 16, 0, 8, {"WARPS_BWD1": 1, "R_PROJ": 32, "R_FEAT": 16}),
    (1, 50, 2, 2, 16, 64, 16, 0, 16, {"WARPS_BWD": 4, "WARPS_BWD1": 1}),
    # the chunk scan in tiles of 2 chunks x 16 columns (4 chunks: two tiles, a carry between them; states and
    # vectors in several column blocks each), and of one chunk (a carry at every step)
    (1, 60, 2, 1, 16, 20, 16, 0, 32, {"SCAN_U": 2, "SCAN_BW": 16}),
    (1, 60, 2, 1, 16, 20, 16, 0, 32, {"SCAN_U": 1}),
    # the forward walk in blocks of 32 features and of 8 (the warps matter on a GPU only: the interpreter has none)
    (1, 40, 2, 1, 16, 20, 32, 0, 32, {"BK_FWD": 32, "WARPS_FWD": 2}),
    (1, 30, 1, 1, 16, 8, 16, 0, 32, {"BK_FWD": 8}),
]

_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import tensorattn.triton.poly as tp
    from tensorattn.poly import naive_poly_tensor_attn, poly_tensor_attn
    B, T, Hq, Hkv, D, Dv, F, seg, bkb, tune = json.loads(sys.argv[1])
    tp.TUNE["F"] = F
    tp.TUNE["BK_BWD1"] = tp.TUNE["BK_BWD"] = bkb
    tp.TUNE.update(tune)
    if seg:
        tp.SEG_BYTES = seg
    g = torch.Generator().manual_seed(7)
    xs = [0.5 * torch.randn(*s, generator=g) for s in
          [(B, T, Hq, D), (B, T, Hkv, D), (B, T, Hkv, D), (B, T, Hkv, Dv), (B, T, Hkv, Dv)]]
    xs = [x.requires_grad_() for x in xs]
    out = poly_tensor_attn(*xs, causal=True, backend="triton")
    w = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * w).sum(), xs)
    xd = [x.detach().double().requires_grad_() for x in xs]
    ref = naive_poly_tensor_attn(*xd, causal=True)
    gref = torch.autograd.grad((ref * w.double()).sum(), xd)
    # relative error, with the reference's norm floored at 1 (a single position has zero q/k gradients)
    err = lambda a, b: float((a.detach().double() - b).norm() / max(float(b.norm()), 1.0))
    print(json.dumps({"out": err(out, ref), "grads": [err(a, b) for a, b in zip(grads, gref)],
                      "finite": bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(x).all()) for x in grads)}))
""")


@pytest.mark.parametrize("case", INTERP_CASES, ids=lambda c: "B{}-T{}-H{}/{}-Dk{}-Dv{}-F{}-seg{}-bk{}{}".format(
    *c[:9], "".join(f"-{k}{v}" for k, v in c[9].items())))
def test_triton_interpreter_matches_naive(case):
    res = json.loads(run_interpreter(_SCRIPT, json.dumps(case)).strip().splitlines()[-1])
    assert res["finite"]
    # float32 inputs, exact (ieee) products under the interpreter: float32 rounding only
    assert res["out"] < 1e-5, res
    assert max(res["grads"]) < 1e-5, res


_DEG4_SCRIPT = textwrap.dedent("""
    import json, os
    import torch
    import tensorattn.triton.poly as tp
    from tensorattn.poly import naive_poly_tensor_attn, poly_tensor_attn
    dev = os.environ.get("TA_TEST_DEVICE", "cpu")
    tp.TUNE["F"] = 16
    # the walks do not depend on the degree: in blocks of 32 features, half the programs of the defaults (16 in the
    # forward and the second pass), which the degree-2 cases cover
    tp.TUNE["BK_FWD"] = tp.TUNE["BK_BWD"] = 32
    g = torch.Generator().manual_seed(3)
    xs = [0.5 * torch.randn(*s, generator=g) for s in [(1, 12, 1, 16), (1, 12, 1, 16), (1, 12, 1, 16), (1, 12, 1, 8),
                                                       (1, 12, 1, 8)]]
    w = torch.randn(1, 12, 1, 8, generator=g)
    a = [x.to(dev).requires_grad_() for x in xs]
    out = poly_tensor_attn(*a, causal=True, degree=4, backend="triton")
    grads = torch.autograd.grad((out * w.to(dev)).sum(), a)
    xd = [x.double().requires_grad_() for x in xs]
    ref = naive_poly_tensor_attn(*xd, causal=True, degree=4)
    gref = torch.autograd.grad((ref * w.double()).sum(), xd)
    err = lambda a, b: float((a.detach().cpu().double() - b.detach()).norm() / max(float(b.detach().norm()), 1.0))
    print(json.dumps({"out": err(out, ref), "grads": [err(x, y) for x, y in zip(grads, gref)],
                      "degree2": err(naive_poly_tensor_attn(*xd, causal=True, degree=2), ref)}))
""")


@pytest.mark.parametrize("where", WHERE)
def test_triton_degree4_matches_naive(where):
    """Degree 4 on the fused kernels (Dk = 16: rank C(20, 4) = 4845, 152 feature blocks): output and the five
    gradients equal the float64 reference of degree 4 to float32 rounding, far closer than degree 2 is to it."""
    res = json.loads(run_script(where, _DEG4_SCRIPT).strip().splitlines()[-1])
    assert res["out"] < 1e-5 and max(res["grads"]) < 1e-5, res
    assert res["degree2"] > 100 * max([res["out"]] + res["grads"]), res


def _bf16_plain(q, k1, k2, v1, v2, scale=None):
    """The reference computed the plain way in bf16 (scores, polynomial and sums in bf16): flash-attention's
    yardstick for what bf16 costs."""
    B, T, Hq, D = q.shape
    g = Hq // k1.shape[2]
    scale = D ** -0.5 if scale is None else scale
    rep = lambda x: x.transpose(1, 2).repeat_interleave(g, 1)  # noqa: E731
    qh, k1h, k2h, v1h, v2h = q.transpose(1, 2), rep(k1), rep(k2), rep(v1), rep(v2)
    z = scale * torch.einsum("bhid,bhjd,bhkd->bhijk", qh, k1h, k2h)
    p = 1 + z + z * z / 2
    i = torch.arange(T, device=q.device)
    vis = (i[None, :] <= i[:, None])
    p = p * (vis[:, :, None] & vis[:, None, :])
    num = torch.einsum("bhijk,bhje,bhke->bhie", p, v1h, v2h)
    return (num / (p.sum((-1, -2))[..., None] + 1e-6)).transpose(1, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,Hq,Hkv,D,Dv", [(1, 1, 1, 1, 16, 64), (1, 7, 2, 2, 16, 64), (1, 63, 4, 1, 16, 32),
                                             (2, 300, 4, 2, 16, 64), (1, 1037, 1, 1, 16, 64),
                                             (1, 257, 2, 1, 32, 16), (1, 200, 2, 2, 64, 128)])
def test_triton_gpu_matches_naive(B, T, Hq, Hkv, D, Dv, dtype):
    from tensorattn.poly import naive_poly_tensor_attn, poly_tensor_attn

    g = torch.Generator(device="cuda").manual_seed(3)
    shapes = [(B, T, Hq, D), (B, T, Hkv, D), (B, T, Hkv, D), (B, T, Hkv, Dv), (B, T, Hkv, Dv)]
    xs = [(0.5 * torch.randn(*s, generator=g, device="cuda")).to(dtype).requires_grad_() for s in shapes]
    out = poly_tensor_attn(*xs, causal=True, backend="triton")
    w = torch.randn(out.shape, generator=g, device="cuda")
    grads = torch.autograd.grad((out.float() * w).sum(), xs)
    xd = [x.detach().double().requires_grad_() for x in xs]
    if T <= 400:
        ref = naive_poly_tensor_attn(*xd, causal=True)
    else:  # the T^3 reference is too large: the torch backend in float64 (held to it in test_poly.py)
        ref = poly_tensor_attn(*xd, causal=True, backend="torch")
    gref = torch.autograd.grad((ref * w.double()).sum(), xd)
    # one position: o = v1 ∘ v2 and the q/k gradients are exactly zero; what the kernels return there is float32
    # rounding of terms of order 1 that cancel (1e-7 absolute), so the reference's norm is floored at 1 as in the
    # interpreter test
    floor = 1.0 if T == 1 else 1e-2
    err = lambda a, b: float((a.detach().double() - b).norm() / max(float(b.norm()), floor))  # noqa: E731
    assert torch.isfinite(out).all() and all(torch.isfinite(x).all() for x in grads)
    if dtype == torch.float32:
        assert not torch.backends.cuda.matmul.allow_tf32
        assert err(out, ref) < 1e-5
        for n, a, b in zip(("q", "k1", "k2", "v1", "v2"), grads, gref):
            assert err(a, b) < 1e-5, (n, err(a, b))
        return
    # bf16 / fp16: at most 2x the error of the plain bf16 computation (flash-attention's rule), plus a floor
    if T > 400:  # the plain bf16 reference is T^3 too: hold the kernel to a fixed bound there
        assert err(out, ref) < 2e-2
        for n, a, b in zip(("q", "k1", "k2", "v1", "v2"), grads, gref):
            assert err(a, b) < 3e-2, (n, err(a, b))
        return
    xl = [x.detach().bfloat16().requires_grad_() for x in xs]
    low = _bf16_plain(*xl)
    glow = torch.autograd.grad((low.float() * w).sum(), xl)
    floor = 1e-3
    assert err(out, ref) <= 2 * err(low, ref) + floor, (err(out, ref), err(low, ref))
    for n, a, al, b in zip(("q", "k1", "k2", "v1", "v2"), grads, glow, gref):
        assert err(a, b) <= 2 * err(al, b) + floor, (n, err(a, b), err(al, b))


def test_exact_bf16_split_of_the_projection_only_on_cuda(monkeypatch):
    """The chain rule's one-hot products as three bf16 parts (TUNE PROJ_X3) are exact on the GPU (held to 1e-5 by
    the float32 case of test_triton_gpu_matches_naive) but not under the interpreter, whose bf16 products are not
    exact (relative errors of 1e7 when forced): CPU tensors must take the float32 product whatever TUNE says."""
    import tensorattn.triton.poly as tp

    monkeypatch.setitem(tp.TUNE, "PROJ_X3", 1)
    q = torch.zeros(1, 8, 2, 16)
    v = torch.zeros(1, 8, 2, 32)
    assert tp._Cfg(q, q, v, 64, tp.SEG_BYTES).x3 is False
    if torch.cuda.is_available():
        qc, vc = q.cuda(), v.cuda()
        assert tp._Cfg(qc, qc, vc, 64, tp.SEG_BYTES).x3 is (torch.cuda.get_device_capability()[0] >= 8)
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter on CUDA tensors: never the split
        assert tp._Cfg(qc, qc, vc, 64, tp.SEG_BYTES).x3 is False
        monkeypatch.delenv("TRITON_INTERPRET")
        monkeypatch.setitem(tp.TUNE, "PROJ_X3", 0)
        assert tp._Cfg(qc, qc, vc, 64, tp.SEG_BYTES).x3 is False


def test_fused_kernels_refuse_more_than_65535_batch_heads():
    """The walks put batch x query heads on the grid's axis 1 (at most 65535 on CUDA): the fused backend says so
    before anything is allocated (``backend="auto"`` then takes the torch backend), and the launchers' config
    refuses it with the same numbers named."""
    import tensorattn.triton.poly as tp
    from tensorattn.poly.op import BACKENDS

    kw = dict(device=torch.device("cpu"), dtype=torch.float32, degree=2, causal=True, head_dim=16, value_dim=16)
    assert any("65535" in r and "65536" in r for r in BACKENDS["triton"].not_supported_reasons(batch_heads=65536, **kw))
    assert not any("65535" in r for r in BACKENDS["triton"].not_supported_reasons(batch_heads=65535, **kw))
    q, k, v = torch.zeros(2, 1, 32768, 16), torch.zeros(2, 1, 1, 16), torch.zeros(2, 1, 1, 16)
    with pytest.raises(ValueError, match="2 x 32768 = 65536"):
        tp._Cfg(q, k, v, 64, tp.SEG_BYTES)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_onehot_split_product_is_float32_accurate():
    """``_onehot_dot`` with the three-part bf16 split against float64, to a few float32 ulps of the row sums (a
    two-part split, dropping ``lo``, is off by about 2^-16 relative)."""
    import triton
    import triton.language as tl
    from tensorattn.triton.poly_kernels import _onehot_dot

    @triton.jit
    def k(p_ptr, ix_ptr, o_ptr, X3: tl.constexpr):
        r = tl.arange(0, 32)
        c = tl.arange(0, 32)
        p = tl.load(p_ptr + r[:, None] * 32 + c[None, :])
        acc = _onehot_dot(p, tl.load(ix_ptr + c), tl.zeros((32, 16), tl.float32), 16, X3)
        tl.store(o_ptr + r[:, None] * 16 + tl.arange(0, 16)[None, :], acc)

    g = torch.Generator(device="cuda").manual_seed(0)
    p = torch.randn(32, 32, generator=g, device="cuda") * torch.logspace(-6, 6, 32, device="cuda")[:, None]
    ix = torch.randint(0, 17, (32,), generator=g, device="cuda", dtype=torch.int32)  # 16: the constant, no column
    ref = p.double() @ (ix[:, None] == torch.arange(16, device="cuda")).double()
    out = torch.empty(32, 16, device="cuda")
    k[(1,)](p, ix, out, X3=True)
    scale = p.abs().double() @ (ix[:, None] == torch.arange(16, device="cuda")).double()
    assert ((out.double() - ref).abs() <= 4 * 2.0 ** -24 * scale + 1e-30).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_gpu_float32_tf32_only_when_allowed():
    """With TF32 allowed, float32 inputs may lose digits (about 1e-3); without, they must not."""
    from tensorattn.poly import naive_poly_tensor_attn, poly_tensor_attn

    g = torch.Generator(device="cuda").manual_seed(5)
    xs = [torch.randn(1, 500, 2, 16, generator=g, device="cuda") for _ in range(3)]
    xs += [torch.randn(1, 500, 2, 64, generator=g, device="cuda") for _ in range(2)]
    ref = naive_poly_tensor_attn(*[x.double() for x in xs], causal=True)
    rel = lambda a: float((a.double() - ref).norm() / ref.norm())  # noqa: E731
    assert rel(poly_tensor_attn(*xs, causal=True, backend="triton")) < 1e-5
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert rel(poly_tensor_attn(*xs, causal=True, backend="triton")) < 1e-2
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


_PREFIX_SCRIPT = textwrap.dedent("""
    import json, os
    import torch
    import tensorattn.triton.poly as tp
    from tensorattn import distributed as td
    from tensorattn.features import rank
    from tensorattn.poly import naive_poly_tensor_attn
    from tensorattn.poly.fused import fused_attn_from_prefix
    from tensorattn.poly.scan import _scan_attn
    tp.TUNE["F"] = 16
    # T = 40: two forward segments (2 + 1 chunks, the state carried between them) and backward segments of one chunk
    # (two inside the first forward segment)
    tp.SEG_BYTES = 100_000
    g = torch.Generator().manual_seed(0)
    B, T, Hq, Hkv, D, Dv = 2, 40, 2, 1, 16, 8
    xs = [0.5 * torch.randn(B, T, Hq if i == 0 else Hkv, D if i < 3 else Dv, generator=g) for i in range(5)]
    prefix = 0.3 * torch.rand(B, Hkv, rank(D, 2), 2 * Dv + 2, generator=g)
    w = torch.randn(B, T, Hq, Dv, generator=g)
    dev = os.environ.get("TA_TEST_DEVICE", "cpu")
    xs, prefix, w = [x.to(dev) for x in xs], prefix.to(dev), w.to(dev)
    def run(fn, leaves):
        a = [x.clone().requires_grad_() for x in leaves]
        o = fn(*a)
        return o, torch.autograd.grad((o * w).sum(), a)
    rel = lambda x, y: float((x.detach() - y.detach()).norm() / y.detach().norm())
    o1, g1 = run(lambda *a: fused_attn_from_prefix(*a, 0.25), xs + [prefix])
    o2, g2 = run(lambda *a: _scan_attn(*a, 2, 0.25, 7), xs + [prefix])
    o3, g3 = run(lambda *a: td.cp_poly_tensor_attn(*a, causal=True, scale=0.25, backend="triton"), xs)
    o4, g4 = run(lambda *a: naive_poly_tensor_attn(*a, causal=True, scale=0.25), xs)
    # a shard's totals (what it sends to the later ranks) on the state kernel against the torch chunks
    from tensorattn.distributed.context_parallel import _ShardTotals
    from tensorattn.poly.common import _Feat
    from tensorattn.poly.fused import fused_shard_totals
    kv = xs[1:]
    wt = torch.randn(B, Hkv, rank(D, 2), 2 * Dv + 2, generator=g).to(dev)
    def run_t(fn):
        a = [x.clone().requires_grad_() for x in kv]
        t = fn(*a)
        return t, torch.autograd.grad((t * wt).sum(), a)
    t1, h1 = run_t(fused_shard_totals)
    t2, h2 = run_t(lambda *a: _ShardTotals.apply(*a, _Feat(D, 2, 0.25, torch.float32, dev), 7))
    # two ranks in one process: the second shard's rows started from the first's totals, against the reference
    def two_ranks(q, k1, k2, v1, v2, cut=17):
        s0 = [x[:, :cut] for x in (q, k1, k2, v1, v2)]
        s1 = [x[:, cut:] for x in (q, k1, k2, v1, v2)]
        o0 = fused_attn_from_prefix(*s0, torch.zeros_like(wt), 0.25)
        return torch.cat([o0, fused_attn_from_prefix(*s1, fused_shard_totals(*s0[1:]), 0.25)], 1)
    o5, g5 = run(two_ranks, xs)
    print(json.dumps({"prefix": [rel(o1, o2)] + [rel(a, b) for a, b in zip(g1, g2)],
                      "cp": [rel(o3, o4)] + [rel(a, b) for a, b in zip(g3, g4)],
                      "totals": [rel(t1, t2)] + [rel(a, b) for a, b in zip(h1, h2)],
                      "two_ranks": [rel(o5, o4)] + [rel(a, b) for a, b in zip(g5, g4)]}))
""")


@pytest.mark.parametrize("where", WHERE)
def test_fused_kernels_start_from_a_prefix_state(where):
    """Context parallelism's local part on the fused kernels: started from a packed prefix state (the torch
    scan's layout and feature order), output and gradients (the five inputs and the prefix) equal the scan's;
    cp_poly_tensor_attn(backend="triton") without a process group equals the reference; a shard's totals from the
    fused state kernel (and their gradients) equal the torch chunks'; two shards joined through them (the causal
    path of two ranks, in one process) equal the reference."""
    res = json.loads(run_script(where, _PREFIX_SCRIPT).strip().splitlines()[-1])
    assert len(res["prefix"]) == 7 and max(res["prefix"]) < 1e-5, res
    assert len(res["cp"]) == 6 and max(res["cp"]) < 1e-5, res
    assert len(res["totals"]) == 5 and max(res["totals"]) < 1e-5, res
    assert len(res["two_ranks"]) == 6 and max(res["two_ranks"]) < 1e-5, res
