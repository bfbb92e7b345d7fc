"""A head that sees around the segment: a time-interval query over a window of dense features.

After TIM (Chalk et al., "TIM: A Time Interval Machine for Audio-Visual Action
Recognition", CVPR 2024): the input is a window of dense features around the segment
(`ekx.heads.context` builds it from a dense store: by default 30 s in 50 tokens, TIM's
recognition setting of 50 features 0.6 s apart), each token told its time, and a query
that encodes the segment's [start, stop] in the window with a small MLP (TIM's Time
Interval MLP); the verb and noun logits come from the query's answer.

Where it differs from TIM (see `ContextHead`): the segment's own 16 positions (the
per-segment rule) come after the window's tokens and are read as the transformer head
reads a segment; that reading is the query, together with the interval, and it attends to
the window by cross-attention. Tokens past the video's ends are masked.

Input [B, T, D + 5]: the standardised features, then per token its stream (several dense
stores joined with `+` give each its own window tokens; 0 for the segment's own), its time in the window
(-1 .. 1 inside it), whether it holds a feature (1) or lies past the video's end (0), and
the query's start and stop in the window (clipped to -1 .. 1; the same on every token).
The last SEGMENT_TOKENS tokens are the segment's own.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ekx.heads.config import ATTENTION_HEADS
from ekx.heads.models import register
from ekx.heads.models.layers import Block, Classifier, check_width, sinusoidal

EXTRA = 5  # channels after the features: token stream, token time, token valid, query start, query stop
BANDS = 8  # Fourier frequencies per time value
SEGMENT_TOKENS = 16  # the input's last tokens are the segment's own positions (heads.context)


def _mlp(n_in: int, d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, d), nn.GELU(), nn.Linear(d, d))


def fourier(values: torch.Tensor, bands: int = 16) -> torch.Tensor:
    """[..., n] scalars -> [..., n * 2 * bands] sines and cosines at octave frequencies: a
    continuous time as well-conditioned as the transformer head's sinusoidal positions."""
    freq = math.pi * 2.0 ** torch.arange(bands, device=values.device, dtype=values.dtype) / 4
    angles = values[..., None] * freq
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


@register("context")
class ContextHead(nn.Module):
    """The segment's own tokens go through the transformer head's computation ([CLS],
    sinusoidal positions, pre-norm blocks); its [CLS] plus the interval MLP of [start, stop]
    is the query, which attends to the window's tokens (each with its time in the window and
    its progress through the query, as Fourier features, and whether it lies inside) through
    cross-attention blocks; the context's answer joins the segment's through a learned gate
    that starts small, so the head starts as a segment head and takes from the window what
    helps. Measured on the demo: one encoder over all tokens together stayed 25-35 points of
    verb top-1 below the transformer head on the classes that need no context."""

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
        heads: int = ATTENTION_HEADS,
        context_layers: int = 2,
        context_drop: float = 0.5,
        streams: int = 1,
    ):
        super().__init__()
        check_width(d_model, heads)
        if dim <= EXTRA:
            raise ValueError(f"the context head takes D + {EXTRA} channels, got {dim}")
        self.proj = nn.Sequential(nn.Dropout(dropout * 0.5), nn.Linear(dim - EXTRA, d_model))
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos: torch.Tensor
        self.register_buffer("pos", sinusoidal(SEGMENT_TOKENS + 1, d_model)[None], persistent=False)
        self.blocks = nn.ModuleList(
            Block(d_model, heads, dropout * 0.2, drop_path * i / max(layers - 1, 1)) for i in range(layers)
        )
        self.norm = nn.LayerNorm(d_model)
        # time in the window and progress through the query (Fourier features), inside or not
        self.token_time = _mlp(2 * 2 * BANDS + 1, d_model)
        self.interval = _mlp(3, d_model)  # start, stop, length of the query in the window
        self.null = nn.Parameter(torch.zeros(1, 1, d_model))  # always there: no empty attention
        # which dense store a window token comes from (each also has its own input channels)
        self.stream = nn.Embedding(streams, d_model)
        nn.init.normal_(self.stream.weight, std=0.02)
        self.heads = heads
        self.context_drop = context_drop
        self.context = nn.ModuleList(
            Block(d_model, heads, dropout * 0.2, 0.0, cross=True) for _ in range(context_layers)
        )
        self.context_norm = nn.LayerNorm(d_model)
        self.gate = nn.Parameter(torch.full((1,), 1.0))
        self.classifier = Classifier(d_model, num_verbs, num_nouns, dropout)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # the windows of heads.context hold 50 + 16 tokens; a shorter input (the registry's
        # generic tests) is split in half, so both parts of the head always see tokens
        n_own = max(1, min(SEGMENT_TOKENS, x.shape[1] // 2))
        own, window = x[:, -n_own:], x[:, :-n_own]
        q = x[:, 0, -2:]
        # the segment, as the transformer head reads it
        h = torch.cat([self.cls.expand(len(x), -1, -1), self.proj(own[..., :-EXTRA])], dim=1)
        h = h + self.pos[:, : h.shape[1]]
        for block in self.blocks:
            h = block(h)
        seg = self.norm(h[:, 0])
        # the window around it, asked by the segment and its interval
        t, valid = window[..., -4], window[..., -3] > 0.5
        stream = window[..., -5].round().long().clamp(0, self.stream.num_embeddings - 1)
        length = (q[:, 1:] - q[:, :1]).clamp_min(1e-3)
        progress = ((t - q[:, :1]) / length).clamp(-3.0, 4.0)
        inside = ((progress >= 0) & (progress <= 1)).float()[..., None]
        if self.training and self.context_drop > 0:  # hide part of the window: less to memorise
            valid = valid & (torch.rand_like(t) >= self.context_drop)
        when = torch.cat([fourier(torch.stack([t, progress], dim=-1), BANDS), inside], dim=-1)
        embedded = self.proj(window[..., :-EXTRA]) + self.token_time(when) + self.stream(stream)
        tokens = torch.cat([self.null.expand(len(x), -1, -1), embedded], 1)
        blocked = torch.cat([valid.new_zeros(len(x), 1), ~valid], dim=1)  # [B, 1 + T]: the null token is never blocked
        mask = blocked[:, None, :].repeat_interleave(self.heads, dim=0)  # [B * heads, 1, 1 + T]
        query = (seg + self.interval(torch.cat([q, length], dim=1)))[:, None]
        for block in self.context:
            query = block(query, context=tokens, mask=mask)
        return self.classifier(seg + self.gate * self.context_norm(query[:, 0]))
