"""Building blocks shared by the heads."""

from __future__ import annotations

import math

import torch
from torch import nn

from ekx import EkxError


def check_width(d: int, heads: int) -> None:
    """An attention head's width splits evenly among its heads: said here, in the setting's
    name, before torch's AssertionError (or a division by zero) would say it otherwise."""
    if d <= 0 or d % heads:
        raise EkxError(
            f"width {d}: the width (--width, d_model) of an attention head must be a positive "
            f"multiple of its {heads} heads"
        )


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample during training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer layer with drop path on both residual branches. A ``cross``
    block attends to another sequence (``context``, required); a self-attention block
    has no context norm at all: a parameter that never receives a gradient makes
    DistributedDataParallel fail at its second step."""

    def __init__(self, d: int, heads: int, dropout: float, drop_path: float, mlp_ratio: int = 4, cross: bool = False):
        super().__init__()
        check_width(d, heads)
        self.norm1 = nn.LayerNorm(d)
        self.norm_ctx = nn.LayerNorm(d) if cross else None
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(
            nn.Linear(d, d * mlp_ratio),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(d * mlp_ratio, d),
            nn.Dropout(dropout),
        )
        self.drop_path = DropPath(drop_path)
        self._register_load_state_dict_pre_hook(self._drop_unused_norm_ctx)

    def _drop_unused_norm_ctx(self, state_dict, prefix, *args) -> None:
        # checkpoints from before this fix hold an (untrained) norm_ctx in self-attention
        # blocks too; it never took part in the output, so dropping it loads them unchanged
        if self.norm_ctx is None:
            for key in [k for k in state_dict if k.startswith(prefix + "norm_ctx.")]:
                del state_dict[key]

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        q = self.norm1(x)
        if (context is None) != (self.norm_ctx is None):
            raise ValueError("a cross block needs a context, a self-attention block takes none")
        kv = q if self.norm_ctx is None or context is None else self.norm_ctx(context)
        x = x + self.drop_path(self.attn(q, kv, kv, attn_mask=mask, need_weights=False)[0])
        return x + self.drop_path(self.mlp(self.norm2(x)))


def sinusoidal(length: int, d: int) -> torch.Tensor:
    """[length, d] fixed positional encoding (Vaswani et al.)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    pe = torch.zeros(length, d)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe


class Classifier(nn.Module):
    """Dropout + two linear layers: verb and noun logits, always float32. Under bf16 autocast
    the layers would round every logit to 8 significant bits, so close classes tie at the top
    and the scores a submission holds would rank unlike the model; these two small matmuls
    run in fp32 on the (up-cast) features instead."""

    def __init__(self, d: int, num_verbs: int, num_nouns: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.verb, self.noun = nn.Linear(d, num_verbs), nn.Linear(d, num_nouns)

    def forward(self, verb_feat: torch.Tensor, noun_feat: torch.Tensor | None = None) -> dict:
        noun_feat = verb_feat if noun_feat is None else noun_feat
        with torch.autocast(verb_feat.device.type, enabled=False):
            verb_feat, noun_feat = verb_feat.float(), noun_feat.float()
            return {"verb": self.verb(self.drop(verb_feat)), "noun": self.noun(self.drop(noun_feat))}
