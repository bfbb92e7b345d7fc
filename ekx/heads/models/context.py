"""A head that sees around the segment: a time-interval query over a window of dense features.

After TIM (Chalk et al., "TIM: A Time Interval Machine for Audio-Visual Action
Recognition", CVPR 2024): the input is a window of dense features around the segment
(`ekx.heads.context` builds it from a dense store: by default 30 s in 50 tokens, TIM's
recognition setting of 50 features 0.6 s apart), each feature token told its time in the
window; one query token encodes the segment's [start, stop] in the window with a small MLP
(TIM's Time Interval MLP); a transformer encoder runs over query + feature tokens, and the
verb and noun logits come from the query's output. Tokens past the video's ends are masked.

Input [B, T, D + 4]: the standardised features, then per token its time in the window
(-1 .. 1), whether it holds a feature (1) or lies past the video's end (0), and the query's
start and stop in the window (-1 .. 1; the same on every token).
"""

from __future__ import annotations

import torch
from torch import nn

from ekx.heads.models import register
from ekx.heads.models.layers import Block, Classifier

EXTRA = 4  # channels after the features: token time, token valid, query start, query stop


def _mlp(n_in: int, d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, d), nn.GELU(), nn.Linear(d, d))


@register("context")
class ContextHead(nn.Module):
    reads_context = True  # the data path gives it windows of a dense store, not segments

    def __init__(
        self,
        dim: int,
        num_verbs: int,
        num_nouns: int,
        frames: int,
        dropout: float = 0.5,
        drop_path: float = 0.1,
        d_model: int = 256,
        layers: int = 4,
        heads: int = 8,
    ):
        super().__init__()
        if dim <= EXTRA:
            raise ValueError(f"the context head takes D + {EXTRA} channels, got {dim}")
        self.features = nn.Sequential(nn.Dropout(dropout * 0.5), nn.Linear(dim - EXTRA, d_model))
        self.token_time = _mlp(1, d_model)
        self.interval = _mlp(3, d_model)  # start, stop, length of the query in the window
        self.heads = heads
        self.blocks = nn.ModuleList(
            Block(d_model, heads, dropout * 0.2, drop_path * i / max(layers - 1, 1)) for i in range(layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.classifier = Classifier(d_model, num_verbs, num_nouns, dropout)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats, t, valid, q = x[..., :-EXTRA], x[..., -4:-3], x[..., -3] > 0.5, x[:, 0, -2:]
        tokens = self.features(feats) + self.token_time(t)
        query = self.interval(torch.cat([q, q[:, 1:] - q[:, :1]], dim=1))[:, None]
        h = torch.cat([query, tokens], dim=1)
        # keys past the video's ends are blocked for every query; the query token is always
        # there, so no row of attention is empty
        blocked = torch.cat([torch.zeros_like(valid[:, :1]), ~valid], dim=1)  # [B, 1 + T]
        mask = blocked[:, None, :].expand(-1, h.shape[1], -1).repeat_interleave(self.heads, dim=0)
        for block in self.blocks:
            h = block(h, mask=mask)
        return self.classifier(self.norm(h[:, 0]))
