"""Transformer encoder head with the phase-2 regularisation: input projection to 512,
positional encoding, 6 pre-norm layers of 8 heads, dropout, drop path (stochastic
depth, linearly increasing with depth), a learned [CLS] token."""

from __future__ import annotations

import torch
from torch import nn

from ekx.heads.config import ATTENTION_HEADS
from ekx.heads.models import register
from ekx.heads.models.layers import Block, Classifier, check_width, sinusoidal


@register("transformer")
class TransformerHead(nn.Module):
    def __init__(
        self,
        dim: int,
        num_verbs: int,
        num_nouns: int,
        frames: int,
        dropout: float = 0.5,
        drop_path: float = 0.1,
        d_model: int = 512,
        layers: int = 6,
        heads: int = ATTENTION_HEADS,
    ):
        super().__init__()
        check_width(d_model, heads)
        self.proj = nn.Sequential(nn.Dropout(dropout * 0.5), nn.Linear(dim, d_model))
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos: torch.Tensor
        self.register_buffer("pos", sinusoidal(frames + 1, d_model)[None], persistent=False)
        self.blocks = nn.ModuleList(
            Block(d_model, heads, dropout * 0.2, drop_path * i / max(layers - 1, 1)) for i in range(layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.classifier = Classifier(d_model, num_verbs, num_nouns, dropout)

    def forward(self, x):
        x = self.proj(x)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos[:, : x.shape[1] + 1]
        for block in self.blocks:
            x = block(x)
        return self.classifier(self.norm(x[:, 0]))
