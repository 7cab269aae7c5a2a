"""Small models built from the attention layers (nanoGPT-like, one file).

* :class:`Transformer`: a stack of pre-LayerNorm blocks whose attention is chosen per layer by a
  pattern string (``S`` softmax, ``T`` exact tensor, ``P`` polynomial/fast tensor), e.g. ``"SSST"``
  repeated. Causal, it is a character language model; non-causal with per-token outputs, it is the
  Match3 classifier.
* :class:`MultiViewClassifier`: several feature views of one object, each cut into tokens; views are
  mixed by cross-view tensor attention, by matrix cross-attention, or (baseline) not at all: the raw
  features are concatenated into an MLP.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ._validate import check_bool, check_cu_seqlens, check_tensor, maybe_check_finite, values_checkable
from .layers import DecodeCache, PolyTensorAttention, SoftmaxAttention, TensorAttention, _check_dims, _init_like_gpt
from .packing import positions_in_documents

__all__ = ["Transformer", "ModelCache", "MultiViewClassifier", "parse_pattern"]

_LETTERS = {"S": "softmax", "T": "exact tensor", "P": "fast (polynomial) tensor"}


def _check_optional_dims(**dims) -> None:
    _check_dims(**{k: v for k, v in dims.items() if v is not None})


def parse_pattern(pattern: str, n_layer: int) -> str:
    """Expand ``pattern`` (letters S, T, P) by repetition to ``n_layer`` letters.

    ``n_layer`` must be a multiple of ``len(pattern)``: ``("SSST", 8) -> "SSSTSSST"``.
    """
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"pattern must be a non-empty string of the letters {sorted(_LETTERS)}, got {pattern!r}")
    bad = sorted(set(pattern) - set(_LETTERS))
    if bad:
        raise ValueError(f"pattern {pattern!r} has unknown letter(s) {bad}; expected letters from "
                         + ", ".join(f"{k} ({v})" for k, v in _LETTERS.items()))
    if isinstance(n_layer, bool) or not isinstance(n_layer, int) or n_layer < 1 or n_layer % len(pattern):
        raise ValueError(f"n_layer must be a positive multiple of len(pattern) = {len(pattern)} (pattern "
                         f"{pattern!r}), got {n_layer!r}")
    return pattern * (n_layer // len(pattern))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, out: Optional[int] = None):
        super().__init__()
        self.fc = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden, dim if out is None else out)

    def forward(self, x):
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    """``x + attn(LN(x))`` then ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), attn
        self.ln2, self.mlp = nn.LayerNorm(dim), MLP(dim, mlp_ratio * dim)

    def forward(self, x, cache: Optional[DecodeCache] = None, cu_seqlens: Optional[torch.Tensor] = None):
        if cache is not None:
            a = self.attn(self.ln1(x), cache=cache)
        elif cu_seqlens is not None:
            a = self.attn(self.ln1(x), cu_seqlens=cu_seqlens)
        else:
            a = self.attn(self.ln1(x))
        x = x + a
        return x + self.mlp(self.ln2(x))


@dataclass
class ModelCache:
    """Per-layer :class:`tensorattn.layers.DecodeCache` of a :class:`Transformer` and the positions seen."""

    layers: List[DecodeCache] = field(default_factory=list)
    length: int = 0

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers)


class Transformer(nn.Module):
    """Token model with a per-layer attention pattern; returns logits ``[B, T, n_out]``.

    Layer ``l`` uses :class:`SoftmaxAttention`, :class:`TensorAttention` or :class:`PolyTensorAttention`
    as letter ``l`` of the expanded pattern says (``S``, ``T``, ``P``). To compare patterns at equal
    parameter count, give tensor layers a smaller inner width: a tensor layer has ``6 · dim · H_t · D_t``
    attention weights, a softmax layer ``4 · dim · H · D``, so ``H_t · D_t = 2/3 · H · D`` matches them.

    Args:
        vocab_size: input token ids are in ``[0, vocab_size)``.
        n_out: output classes per position (default ``vocab_size``: next-token prediction).
        block_size: the longest sequence (size of the learned position table).
        dim: model width. n_layer: number of blocks. pattern: letters S/T/P, repeated to ``n_layer``.
        n_heads, head_dim, n_kv_heads: softmax layers' heads, head dim (default ``dim // n_heads``) and
            key/value heads (GQA).
        t_heads, t_head_dim, t_kv_heads: the same for tensor layers (T and P), defaulting to the softmax ones.
        window: window ``w`` (or ``(w1, w2)``) of exact tensor layers; ``None``: all causal pairs.
            Softmax and fast layers ignore it (they are linear or quadratic in T anyway).
        p_key_dim: key dim Dk of fast layers (default ``t_head_dim``). p_degree: their polynomial degree.
        causal: causal attention (language model) or full attention (sequence labelling).
        pos: ``"learned"`` (absolute position table), ``"rope"`` (rotary in every layer) or ``"none"``
            (permutation-equivariant, as Match3 needs).
        mlp_ratio: MLP hidden width over ``dim``.
        backend, p_backend: backends of the exact and the fast tensor op.
    """

    def __init__(self, vocab_size: int, *, n_out: Optional[int] = None, block_size: int, dim: int, n_layer: int,
                 pattern: str = "S", n_heads: int, head_dim: Optional[int] = None, n_kv_heads: Optional[int] = None,
                 t_heads: Optional[int] = None, t_head_dim: Optional[int] = None, t_kv_heads: Optional[int] = None,
                 window=None, p_key_dim: Optional[int] = None, p_degree: int = 2, causal: bool = True,
                 pos: str = "learned", mlp_ratio: int = 4, backend: str = "auto", p_backend: str = "auto"):
        super().__init__()
        _check_dims(vocab_size=vocab_size, block_size=block_size, dim=dim, n_layer=n_layer, n_heads=n_heads,
                    mlp_ratio=mlp_ratio)
        _check_optional_dims(n_out=n_out, head_dim=head_dim, n_kv_heads=n_kv_heads, t_heads=t_heads,
                             t_head_dim=t_head_dim, t_kv_heads=t_kv_heads, p_key_dim=p_key_dim)
        causal = check_bool("causal", causal)
        if pos not in ("learned", "rope", "none"):
            raise ValueError(f"pos must be 'learned', 'rope' or 'none', got {pos!r}")
        self.layout = parse_pattern(pattern, n_layer)
        self.vocab_size, self.n_out, self.causal = vocab_size, (vocab_size if n_out is None else n_out), causal
        self.block_size, self.pos = block_size, pos
        head_dim = dim // n_heads if head_dim is None else head_dim
        t_heads = n_heads if t_heads is None else t_heads
        t_head_dim = head_dim if t_head_dim is None else t_head_dim
        t_kv_heads = (n_kv_heads if t_heads == n_heads else None) if t_kv_heads is None else t_kv_heads
        rope = pos == "rope"
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(block_size, dim) if pos == "learned" else None
        blocks = []
        for letter in self.layout:
            if letter == "S":
                attn = SoftmaxAttention(dim, n_heads, head_dim=head_dim, n_kv_heads=n_kv_heads, causal=causal,
                                        rope=rope)
            elif letter == "T":
                attn = TensorAttention(dim, t_heads, head_dim=t_head_dim, n_kv_heads=t_kv_heads, causal=causal,
                                       window=window, rope=rope, backend=backend)
            else:
                attn = PolyTensorAttention(dim, t_heads, head_dim=t_head_dim, key_dim=p_key_dim,
                                           n_kv_heads=t_kv_heads, degree=p_degree, causal=causal, rope=rope,
                                           backend=p_backend)
            blocks.append(Block(dim, attn, mlp_ratio))
        self.blocks = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size if n_out is None else n_out, bias=False)
        _init_like_gpt(self)
        # GPT-2: shrink the residual-branch output projections by depth so the stream keeps its scale
        for b in self.blocks:
            nn.init.normal_(b.attn.o.weight, 0.0, 0.02 / (2 * n_layer) ** 0.5)
            nn.init.normal_(b.mlp.proj.weight, 0.0, 0.02 / (2 * n_layer) ** 0.5)

    def new_cache(self) -> ModelCache:
        """An empty cache for incremental decoding: ``model(idx_new, cache=cache)`` returns the logits the full
        forward gives at the new positions (a prompt at once, then one token at a time). Causal models only."""
        if not self.causal:
            raise ValueError("new_cache: this Transformer was built with causal=False; decoding needs causal=True")
        return ModelCache([b.attn.new_cache() for b in self.blocks])

    def forward(self, idx: torch.Tensor, cache: Optional[ModelCache] = None, *,
                cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``idx``: ``[B, T]`` token ids (int64 or int32) in ``[0, vocab_size)``, ``1 <= T <= block_size``.
        Returns logits ``[B, T, n_out]``. Ids out of range are refused for CPU tensors (on a GPU the check would
        synchronise; the embedding then fails with a device-side assert). The id check reads the values, so it is
        skipped while ``torch.compile`` traces (it would break the graph: :func:`tensorattn._validate.values_checkable`);
        a compiled model's embedding then raises its own ``IndexError`` on the CPU.

        With ``cache`` (:meth:`new_cache`), ``idx`` holds the next ``T`` positions after the ``cache.length`` ones
        already seen. Learned positions stop at ``block_size``; with ``pos="rope"`` or ``"none"`` decoding goes on
        past it (windowed and fast layers in bounded memory, full-causal layers with a growing cache).

        With ``cu_seqlens`` (:mod:`tensorattn.packing`), ``idx`` ``[1, total]`` packs documents (each at most
        ``block_size`` long); every layer attends inside each document and positions restart at each start, so
        the logits equal those of running each document alone."""
        check_tensor("idx", idx, ndim=2, floating=False)
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"idx must hold integer token ids (torch.int64 or torch.int32), got dtype {idx.dtype}")
        B, T = idx.shape
        if cache is not None and not isinstance(cache, ModelCache):
            raise TypeError(f"cache must be a ModelCache (from Transformer.new_cache()), got {type(cache).__name__}")
        L = 0 if cache is None else cache.length
        bounds = None
        if cu_seqlens is not None:
            if cache is not None:
                raise ValueError("cu_seqlens (packed documents) and cache cannot be combined")
            bounds = check_cu_seqlens(cu_seqlens, None, B=B, T=T, S1=T, S2=T, device=idx.device)
            longest = max(e - s for s, e in zip(bounds[:-1], bounds[1:]))
            if longest > self.block_size:
                raise ValueError(f"the longest packed document has {longest} positions, more than block_size "
                                 f"{self.block_size}")
        elif cache is None and T > self.block_size:
            raise ValueError(f"idx has sequence length {T} (idx.shape[1]), which exceeds block_size {self.block_size}")
        if self.pos_emb is not None and bounds is None and L + T > self.block_size:
            raise ValueError(f"positions {L}..{L + T - 1} exceed block_size {self.block_size}: the learned position "
                             "table ends there (build the model with pos='rope' or 'none' to decode further)")
        if T == 0:
            raise ValueError(f"idx must have at least one position (idx.shape[1] >= 1), got shape {tuple(idx.shape)}")
        if idx.device != self.tok.weight.device:
            raise ValueError(f"idx is on device {idx.device} but the model's parameters are on {self.tok.weight.device}")
        if idx.device.type == "cpu" and idx.numel() and values_checkable():  # skipped while compiling (see below)
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"idx must hold token ids in [0, vocab_size) = [0, {self.vocab_size}), got values in "
                                 f"[{lo}, {hi}]")
        x = self.tok(idx)  # [B, T, dim]
        if self.pos_emb is not None:
            pos = (torch.arange(L, L + T, device=idx.device) if bounds is None
                   else positions_in_documents(cu_seqlens, T))
            x = x + self.pos_emb(pos)
        for i, b in enumerate(self.blocks):
            x = b(x, cache=None if cache is None else cache.layers[i], cu_seqlens=cu_seqlens)
        if cache is not None:
            cache.length = L + T
        return self.head(self.ln_f(x))

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx`` ``[B, T]``; returns ``[B, T + max_new_tokens]``.

        nanoGPT's signature and sampling (logits of the last position over ``temperature``, optionally only the
        ``top_k`` largest, then a multinomial draw with ``generator``): ``top_k=1`` is greedy. The prompt is
        prefilled at once by the parallel ops; each new token then runs one incremental step per layer
        (:meth:`new_cache`)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if (isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature)
                or temperature <= 0):
            raise ValueError(f"temperature must be a finite number > 0 (use top_k=1 for greedy decoding), got "
                             f"{temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if self.n_out != self.vocab_size:
            raise ValueError(f"generate needs next-token logits (n_out == vocab_size), but this model has n_out = "
                             f"{self.n_out} outputs for a vocabulary of {self.vocab_size}")
        cache = self.new_cache()
        logits = self(idx, cache=cache)[:, -1]
        out = [idx]
        for t in range(max_new_tokens):
            logits = logits.float() / temperature
            if top_k is not None and top_k < logits.shape[-1]:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator).to(idx.dtype)  # [B, 1]
            out.append(nxt)
            if t + 1 < max_new_tokens:
                logits = self(nxt, cache=cache)[:, -1]
        return torch.cat(out, 1)


class MultiViewClassifier(nn.Module):
    """Classifier over ``V >= 3`` feature views of one object (e.g. pixels, Fourier, Zernike of a digit).

    View ``v`` (``F_v`` features) is zero-padded and cut into ``n_tokens`` chunks, each embedded by a
    per-view linear map plus a learned per-view token position, giving ``[B, n_tokens, dim]``. Then:

    * ``mixer="tensor"``: for each view ``a`` the tokens of ``a`` query pairs of tokens, one from view
      ``b = a+1`` and one from view ``c = a+2`` (mod V), with a :class:`TensorAttention` layer
      (``x, y, z`` = views a, b, c): the score of a pair is a three-way product across three views.
    * ``mixer="softmax"``: the tokens of view ``a`` attend to the concatenated tokens of views ``b`` and
      ``c`` with :class:`SoftmaxAttention` (pairwise interactions only).
    * ``mixer="concat"``: no tokens, no attention: the raw features of all views are concatenated into
      a two-layer MLP (the usual multi-view baseline).

    Attention mixers add the result to the view's tokens (residual), mean-pool each view, concatenate
    the views and classify with an MLP of width ``hidden``.

    Args:
        view_dims: features per view ``[F_1, ..., F_V]``.
        n_classes: number of classes.
        mixer: ``"tensor"``, ``"softmax"`` or ``"concat"``.
        n_tokens: tokens per view: one int, or one per view (views may have different token counts).
        dim: token width. n_heads: attention heads.
        head_dim: per-head dim of the softmax mixer. t_head_dim: per-head dim of the tensor mixer
            (use ``2/3`` of ``head_dim`` for an equal parameter count).
        hidden: width of the classifier MLP (and of the concat baseline's two hidden layers).
    """

    def __init__(self, view_dims: Sequence[int], n_classes: int, *, mixer: str = "tensor",
                 n_tokens: Union[int, Sequence[int]] = 8,
                 dim: int = 32, n_heads: int = 2, head_dim: Optional[int] = None, t_head_dim: Optional[int] = None,
                 hidden: int = 128):
        super().__init__()
        if mixer not in ("tensor", "softmax", "concat"):
            raise ValueError(f"mixer must be 'tensor', 'softmax' or 'concat', got {mixer!r}")
        if isinstance(view_dims, (str, bytes)) or not hasattr(view_dims, "__len__"):
            raise TypeError(f"view_dims must be a sequence of ints (features per view), got {type(view_dims).__name__}")
        _check_dims(**{f"view_dims[{v}]": int(d) if isinstance(d, np.integer) else d for v, d in enumerate(view_dims)})
        if isinstance(n_tokens, (list, tuple)):  # one token count per view
            if len(n_tokens) != len(view_dims):
                raise ValueError(f"n_tokens must be an int or one int per view ({len(view_dims)}), got {n_tokens!r}")
            _check_dims(**{f"n_tokens[{v}]": t for v, t in enumerate(n_tokens)})
            counts = [int(t) for t in n_tokens]
        else:
            _check_dims(n_tokens=n_tokens)
            counts = [n_tokens] * len(view_dims)
        _check_dims(n_classes=n_classes, dim=dim, n_heads=n_heads, hidden=hidden)
        _check_optional_dims(head_dim=head_dim, t_head_dim=t_head_dim)
        view_dims = [int(d) for d in view_dims]
        if len(view_dims) < 3 and mixer != "concat":
            raise ValueError(f"cross-view attention needs at least 3 views, got {len(view_dims)}")
        self.mixer, self.view_dims, self.n_tokens = mixer, view_dims, counts
        V = len(view_dims)
        if mixer == "concat":
            self.mlp = nn.Sequential(nn.Linear(sum(view_dims), hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                     nn.GELU(), nn.Linear(hidden, n_classes))
        else:
            self.chunk = [-(-d // t) for d, t in zip(view_dims, counts)]  # ceil(F_v / n_tokens_v)
            self.embed = nn.ModuleList(nn.Linear(c, dim) for c in self.chunk)
            self.tok_pos = nn.Parameter(torch.zeros(V, max(counts), dim))  # view v uses its first n_tokens_v rows
            self.norm = nn.ModuleList(nn.LayerNorm(dim) for _ in range(V))
            if mixer == "tensor":
                self.mix = nn.ModuleList(TensorAttention(dim, n_heads, head_dim=t_head_dim) for _ in range(V))
            else:
                self.mix = nn.ModuleList(SoftmaxAttention(dim, n_heads, head_dim=head_dim) for _ in range(V))
            self.head = nn.Sequential(nn.LayerNorm(V * dim), nn.Linear(V * dim, hidden), nn.GELU(),
                                      nn.Linear(hidden, n_classes))
        _init_like_gpt(self)

    def tokens(self, views: List[torch.Tensor]) -> List[torch.Tensor]:
        out = []
        for v, (x, c, t) in enumerate(zip(views, self.chunk, self.n_tokens)):
            pad = c * t - x.shape[1]
            x = nn.functional.pad(x, (0, pad)).view(x.shape[0], t, c)  # [B, n_tokens_v, chunk]
            out.append(self.embed[v](x) + self.tok_pos[v, :t])  # [B, n_tokens_v, dim]
        return out

    def forward(self, views: List[torch.Tensor]) -> torch.Tensor:
        """``views``: list of ``[B, F_v]`` floating tensors (one batch size, the parameters' device and dtype;
        NaN/Inf refused for CPU tensors). Returns logits ``[B, n_classes]``."""
        if not isinstance(views, (list, tuple)):
            raise TypeError(f"views must be a list (or tuple) of [B, F_v] tensors, got {type(views).__name__}")
        if len(views) != len(self.view_dims):
            raise ValueError(f"views must hold {len(self.view_dims)} tensors (one per view), got {len(views)}")
        w = next(self.parameters())
        for v, (x, d) in enumerate(zip(views, self.view_dims)):
            check_tensor(f"views[{v}]", x, ndim=2)
            if x.shape[1] != d:
                raise ValueError(f"view {v} must be [B, {d}] ({d} features), but views[{v}] has shape {tuple(x.shape)}")
            if x.shape[0] != views[0].shape[0]:
                raise ValueError(f"views[{v}] has batch size {x.shape[0]} but views[0] has {views[0].shape[0]}")
            if x.device != w.device:
                raise ValueError(f"views[{v}] is on device {x.device} but the model's parameters are on {w.device}")
            if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
                raise TypeError(f"views[{v}] has dtype {x.dtype} but the model's parameters are {w.dtype}")
        maybe_check_finite(None, [f"views[{v}]" for v in range(len(views))], list(views))
        if self.mixer == "concat":
            return self.mlp(torch.cat(views, dim=1))
        V = len(views)
        toks = self.tokens(views)
        normed = [self.norm[v](t) for v, t in enumerate(toks)]
        pooled = []
        for a in range(V):
            b, c = (a + 1) % V, (a + 2) % V
            if self.mixer == "tensor":
                h = toks[a] + self.mix[a](normed[a], normed[b], normed[c])  # [B, n_tokens, dim]
            else:
                h = toks[a] + self.mix[a](normed[a], torch.cat((normed[b], normed[c]), dim=1))
            pooled.append(h.mean(1))  # [B, dim]
        return self.head(torch.cat(pooled, dim=1))
