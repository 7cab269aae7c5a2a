"""tensorattn: tensor (2-simplicial, third-order) attention for PyTorch.

* exact references: :func:`naive_tensor_attn`, :func:`naive_order_attn` (any order m);
* the paper's objects: :mod:`tensorattn.paper` (Definitions 2.5/2.8, Lemma 3.1, Algorithm 1 via ``method="fast"``);
* exact attention with autograd and backends (naive, streaming torch, fused Triton): :func:`tensor_attn`;
* the polynomial method as a trainable op, causal or not, with a decoding state: :func:`poly_tensor_attn`;
* layers: :class:`TensorAttention`, :class:`PolyTensorAttention`, :class:`SoftmaxAttention`;
* models: :class:`Transformer` (with ``generate``), :class:`MultiViewClassifier`;
* training on built-in or your own tasks: :mod:`tensorattn.train`, :mod:`tensorattn.tasks`.

``import tensorattn`` needs neither a GPU nor Triton: kernels are imported only when a Triton backend runs.
"""
from . import paper
from .exact import tensor_attn
from .fast import fast_order_attn
from .layers import PolyTensorAttention, SoftmaxAttention, TensorAttention
from .model import MultiViewClassifier, Transformer
from .naive import naive_order_attn, naive_tensor_attn
from .poly import PolyTensorAttnState, naive_poly_tensor_attn, poly_tensor_attn, poly_tensor_attn_step

__version__ = "0.1.0"

__all__ = [
    "naive_tensor_attn",
    "naive_order_attn",
    "tensor_attn",
    "fast_order_attn",
    "paper",
    "poly_tensor_attn",
    "naive_poly_tensor_attn",
    "PolyTensorAttnState",
    "poly_tensor_attn_step",
    "TensorAttention",
    "PolyTensorAttention",
    "SoftmaxAttention",
    "Transformer",
    "MultiViewClassifier",
    "__version__",
]
