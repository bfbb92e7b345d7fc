"""Temporal average pooling: the order-blind baseline (phase 1 of the seed)."""

from __future__ import annotations

from torch import nn

from ekx.heads.models import register
from ekx.heads.models.layers import Classifier


@register("pooling")
class Pooling(nn.Module):
    def __init__(
        self, dim: int, num_verbs: int, num_nouns: int, frames: int, dropout: float = 0.5, drop_path: float = 0.0
    ):
        super().__init__()
        self.classifier = Classifier(dim, num_verbs, num_nouns, dropout)

    def forward(self, x):
        return self.classifier(x.mean(dim=1))
