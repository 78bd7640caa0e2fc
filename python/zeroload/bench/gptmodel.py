"""The GPT model of the seed notebook, for demos, benchmarks and tests.

A re-implementation of the ``GPTModel`` used by "Memory-efficient Model Weight Loading"
(Sebastian Raschka, *LLMs from scratch*, ch05/08): token and position embeddings, a stack of
pre-LayerNorm transformer blocks (causal multi-head attention with a query/key/value bias,
GELU feed-forward), a final LayerNorm and an output head. Parameter names and shapes match
the seed's, so a ``model.pth`` saved by the notebook loads into this class and vice versa.
The causal mask is a persistent buffer, as in the seed, so it is part of the state dict
(for GPT-2 XL the state dict holds 1558M parameters plus 48 masks: ~6.4 GB in fp32).
"""

from __future__ import annotations

import math
from typing import Any, Dict

import torch
from torch import nn

from zeroload.bench import BASE_CONFIG, CONFIGS, SIZES

__all__ = [
    "BASE_CONFIG",
    "CONFIGS",
    "SIZES",
    "GPTModel",
    "config",
    "describe",
    "num_parameters",
]


def config(name: str) -> Dict[str, Any]:
    """Return a copy of the configuration called ``name`` (a short or a full name)."""
    full = SIZES.get(name, name)
    if full not in CONFIGS:
        choices = ", ".join(list(SIZES) + list(CONFIGS))
        raise KeyError(f"unknown model size {name!r}; choose one of: {choices}")
    return dict(CONFIGS[full])


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with separate query, key and value projections."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float,
        num_heads: int,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        if d_out % num_heads != 0:
            raise ValueError("d_out must be divisible by num_heads")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.mask: torch.Tensor
        self.register_buffer(
            "mask", torch.triu(torch.ones(context_length, context_length), diagonal=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, num_tokens, _ = x.shape
        keys = self.W_key(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        queries = self.W_query(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        scores = queries @ keys.transpose(2, 3)
        mask_bool = self.mask.bool()[:num_tokens, :num_tokens]
        scores.masked_fill_(mask_bool, -torch.inf)
        weights = torch.softmax(scores / keys.shape[-1] ** 0.5, dim=-1)
        weights = self.dropout(weights)
        context = (weights @ values).transpose(1, 2).contiguous().view(b, num_tokens, self.d_out)
        return self.out_proj(context)


class LayerNorm(nn.Module):
    """Layer normalisation with a learnable ``scale`` and ``shift`` (the seed's names)."""

    def __init__(self, emb_dim: int) -> None:
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class GELU(nn.Module):
    """GELU, tanh approximation (as in GPT-2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = math.sqrt(2.0 / math.pi)
        return 0.5 * x * (1 + torch.tanh(c * (x + 0.044715 * torch.pow(x, 3))))


class FeedForward(nn.Module):
    """Two linear layers with a 4x expansion and GELU in between."""

    def __init__(self, cfg: Dict[str, Any]) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]),
            GELU(),
            nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: attention and feed-forward, each with a shortcut."""

    def __init__(self, cfg: Dict[str, Any]) -> None:
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"],
            d_out=cfg["emb_dim"],
            context_length=cfg["context_length"],
            num_heads=cfg["n_heads"],
            dropout=cfg["drop_rate"],
            qkv_bias=cfg["qkv_bias"],
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    """GPT-2-style language model with the seed notebook's parameter names.

    ``cfg`` is a dict with ``vocab_size``, ``context_length``, ``emb_dim``, ``n_heads``,
    ``n_layers``, ``drop_rate`` and ``qkv_bias`` (see :data:`CONFIGS`; :func:`config` returns
    one by name). Calling the model on a ``(batch, tokens)`` tensor of token ids returns
    ``(batch, tokens, vocab_size)`` logits.
    """

    def __init__(self, cfg: Dict[str, Any]) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, in_idx: torch.Tensor) -> torch.Tensor:
        _, seq_len = in_idx.shape
        tok_embeds = self.tok_emb(in_idx)
        pos_embeds = self.pos_emb(torch.arange(seq_len, device=in_idx.device))
        x = self.drop_emb(tok_embeds + pos_embeds)
        x = self.trf_blocks(x)
        x = self.final_norm(x)
        return self.out_head(x)


def num_parameters(cfg: Dict[str, Any]) -> int:
    """Number of parameters of ``GPTModel(cfg)``, computed without building it."""
    with torch.device("meta"):
        model = GPTModel(cfg)
    return sum(p.numel() for p in model.parameters())


def describe(name: str) -> str:
    """A label for the model of this size that says what its parameter count is.

    GPT-2's names count 124M..1558M parameters with the output head tied to the token
    embedding; the seed's ``GPTModel`` has its own output head (``out_head``,
    vocab_size x emb_dim more parameters), so e.g. "gpt2-small (124M)" has 163M here.
    """
    full = SIZES.get(name, name)
    cfg = config(name)
    n = num_parameters(cfg)
    if full == "tiny":
        return f"tiny test model ({n / 1e6:.2f}M parameters)"
    head = cfg["vocab_size"] * cfg["emb_dim"]
    gpt2 = full.split(" ", 1)[0]
    return (
        f"{gpt2} config, {n / 1e6:.0f}M parameters "
        f"({(n - head) / 1e6:.0f}M as in GPT-2 + {head / 1e6:.1f}M untied output head)"
    )
