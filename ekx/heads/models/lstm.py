"""2-layer LSTM, hidden 512 (phase 1 of the seed)."""

from __future__ import annotations

from torch import nn

from ekx.heads.models import register
from ekx.heads.models.layers import Classifier


@register("lstm")
class LSTMHead(nn.Module):
    def __init__(
        self,
        dim: int,
        num_verbs: int,
        num_nouns: int,
        frames: int,
        dropout: float = 0.5,
        drop_path: float = 0.0,
        hidden: int = 512,
        layers: int = 2,
    ):
        super().__init__()
        self.inp = nn.Sequential(nn.Dropout(dropout * 0.5), nn.Linear(dim, hidden), nn.GELU())
        self.lstm = nn.LSTM(hidden, hidden, num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.classifier = Classifier(hidden, num_verbs, num_nouns, dropout)

    def forward(self, x):
        out, _ = self.lstm(self.inp(x))
        return self.classifier(out[:, -1])  # the last state has seen the whole sequence in order
