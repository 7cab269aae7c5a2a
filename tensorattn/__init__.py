"""tensorattn: tensor (2-simplicial, third-order) attention for PyTorch.

Exact references (:func:`naive_tensor_attn`, :func:`naive_order_attn`), the paper's objects
(:mod:`tensorattn.paper`), and fast paths. ``import tensorattn`` needs neither a GPU nor Triton.
"""
from .naive import naive_order_attn, naive_tensor_attn

__version__ = "0.1.0"

__all__ = ["naive_tensor_attn", "naive_order_attn", "__version__"]
