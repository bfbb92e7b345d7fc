"""The seed's phase 3: verb <-> noun cross-attention.

shared projection + positional encoding
  -> multi-scale temporal modelling: attention restricted to windows of 4, 8 and 16
     frames, fused (short and long-range dependencies)
  -> separate verb and noun branches (one self-attention layer each)
  -> bidirectional cross-attention: verb attends to noun, noun attends to verb
     (e.g. "open" goes with "fridge")
  -> verb logits from the verb branch's [CLS], noun logits from the noun branch's.
Same regularisation as the transformer head: dropout, drop path, label smoothing.
"""

from __future__ import annotations

import torch
from torch import nn

from ekx.heads.config import ATTENTION_HEADS
from ekx.heads.models import register
from ekx.heads.models.layers import Block, Classifier, check_width, sinusoidal


def window_mask(length: int, window: int) -> torch.Tensor:
    """[L+1, L+1] bool, True = blocked: frame i sees frame j iff |i - j| < window / 2;
    the [CLS] token (index 0) sees and is seen by everything."""
    idx = torch.arange(length)
    blocked = (idx[:, None] - idx[None, :]).abs() >= max(window // 2, 1)
    mask = torch.zeros(length + 1, length + 1, dtype=torch.bool)
    mask[1:, 1:] = blocked
    return mask


@register("cross-attention")
class CrossAttentionHead(nn.Module):
    def __init__(
        self,
        dim: int,
        num_verbs: int,
        num_nouns: int,
        frames: int,
        dropout: float = 0.5,
        drop_path: float = 0.1,
        d_model: int = 512,
        heads: int = ATTENTION_HEADS,
        windows: tuple[int, ...] = (4, 8, 16),
    ):
        super().__init__()
        check_width(d_model, heads)
        self.proj = nn.Sequential(nn.Dropout(dropout * 0.5), nn.Linear(dim, d_model))
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos: torch.Tensor
        self.masks: torch.Tensor
        self.register_buffer("pos", sinusoidal(frames + 1, d_model)[None], persistent=False)
        attn_drop = dropout * 0.2
        self.scales = nn.ModuleList(Block(d_model, heads, attn_drop, drop_path) for _ in windows)
        self.register_buffer("masks", torch.stack([window_mask(frames, w) for w in windows]), persistent=False)
        self.fuse = nn.Linear(d_model * len(windows), d_model)
        self.verb_branch = Block(d_model, heads, attn_drop, drop_path)
        self.noun_branch = Block(d_model, heads, attn_drop, drop_path)
        self.verb_from_noun = Block(d_model, heads, attn_drop, drop_path, cross=True)
        self.noun_from_verb = Block(d_model, heads, attn_drop, drop_path, cross=True)
        self.norm_v, self.norm_n = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.classifier = Classifier(d_model, num_verbs, num_nouns, dropout)

    def forward(self, x):
        x = self.proj(x)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos[:, : x.shape[1] + 1]
        multi = [block(x, mask=mask) for block, mask in zip(self.scales, self.masks, strict=False)]
        shared = x + self.fuse(torch.cat(multi, dim=-1))
        v, n = self.verb_branch(shared), self.noun_branch(shared)
        v, n = self.verb_from_noun(v, context=n), self.noun_from_verb(n, context=v)
        return self.classifier(self.norm_v(v[:, 0]), self.norm_n(n[:, 0]))
