"""A plain hand-written decoder-only transformer (no transformers library).

It exists to prove the frontend is architecture-agnostic: its modules have names no table
knows (`mix`, `wq`/`wkv`/`proj`, `expand`/`contract`), a fused k/v projection, GELU MLP, and
pre-norm residual blocks. Save it with `torch.save(model, "model.pt")` (a full pickle: needs
--trust-pickle) to exercise the model.pt path.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, dim)
        self.wkv = nn.Linear(dim, 2 * dim)  # fused k and v
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k, v = self.wkv(x).chunk(2, dim=-1)
        k = k.reshape(b, t, -1, self.head_dim).transpose(1, 2)
        v = v.reshape(b, t, -1, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, dim: int, n_heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mix = Attention(dim, n_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.expand = nn.Linear(dim, hidden)
        self.contract = nn.Linear(hidden, dim)

    def forward(self, x):
        x = x + self.mix(self.norm1(x))
        return x + self.contract(F.gelu(self.expand(self.norm2(x))))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 96, dim: int = 48, n_heads: int = 4, hidden: int = 100,
                 n_layers: int = 3, context: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, n_heads, hidden) for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        for p in self.parameters():  # a non-trivial random init so outputs differ across masks
            if p.dim() > 1:
                nn.init.normal_(p, std=1 / math.sqrt(p.shape[-1]))

    def forward(self, input_ids):
        t = input_ids.shape[1]
        x = self.tok(input_ids) + self.pos(torch.arange(t, device=input_ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
