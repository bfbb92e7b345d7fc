"""Auditory SlowFast (Kazakos et al., ICASSP 2021), the EPIC-Sounds backbone that TIM reads:
a two-pathway ResNet-50 over a log-mel spectrogram, time on the first axis, frequency on
the second. Ported from the authors' code (epic-kitchens/epic-sounds-annotations,
src/slowfast/models/auditory_slowfast.py and helpers/*_2d.py; TIM's copy of it,
feature_extractors/auditory_slowfast) with their module and attribute names, so the
state dict of their checkpoints (``{"model_state": ...}``, saved by their
utils/checkpoint.py) loads key for key: ``s1.pathway0_stem.conv.weight``,
``s2.pathway0_res0.branch2.a_bn.running_mean``, ``s1_fuse.conv_f2s.weight``, ...

The feature is TIM's: each pathway's last stage averaged over time and frequency
(`AdaptiveAvgPool2d((1, 1))`), concatenated - 2048 (slow) + 256 (fast) = 2304 values, the
input of their classifier (``head.projection``, which ekx drops). Their config (SLOWFAST
alpha 4, beta_inv 8, fusion ratio 2, fusion kernel 7, ResNet-50, temporal kernels of
`_TEMPORAL_KERNEL_BASIS`) is the only one built: the EPIC-Sounds and TIM checkpoints use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

ALPHA, BETA_INV, FUSION_RATIO, FUSION_KERNEL = 4, 8, 2, 7
DEPTHS = (3, 4, 6, 3)  # ResNet-50
# temporal kernel of each stage (stem, res2..res5) for the slow and the fast pathway
TEMPORAL = ((1, 5), (1, 3), (1, 3), (3, 3), (3, 3))
FREQ_STRIDES = (1, 2, 2, 2)
WIDTH = 64
DIM = WIDTH * 32 + WIDTH * 32 // BETA_INV  # 2304


class ResNetBasicStem(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, kernel: tuple[int, int], padding: tuple[int, int]):
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out, kernel, stride=(2, 2), padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(dim_out, eps=1e-5, momentum=0.1)
        self.relu = nn.ReLU(True)
        self.pool_layer = nn.MaxPool2d(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool_layer(self.relu(self.bn(self.conv(x))))


class AudioModelStem(nn.Module):
    def __init__(self):
        super().__init__()
        for p, (t, width) in enumerate(zip(TEMPORAL[0], (WIDTH, WIDTH // BETA_INV), strict=True)):
            self.add_module(f"pathway{p}_stem", ResNetBasicStem(1, width, (t, 7), (t // 2, 3)))

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        return [getattr(self, f"pathway{p}_stem")(x[p]) for p in range(2)]


class FuseFastToSlow(nn.Module):
    def __init__(self, dim_in: int):
        super().__init__()
        self.conv_f2s = nn.Conv2d(
            dim_in,
            dim_in * FUSION_RATIO,
            kernel_size=(FUSION_KERNEL, 1),
            stride=(ALPHA, 1),
            padding=(FUSION_KERNEL // 2, 0),
            bias=False,
        )
        self.bn = nn.BatchNorm2d(dim_in * FUSION_RATIO, eps=1e-5, momentum=0.1)
        self.relu = nn.ReLU(True)

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        fuse = self.relu(self.bn(self.conv_f2s(x[1])))
        return [torch.cat([x[0], fuse], 1), x[1]]


class BottleneckTransform(nn.Module):
    """Their bottleneck: a (t, 1) convolution over time, a (1, 3) one over frequency
    (carrying the stride), a 1x1 expansion (STRIDE_1X1 False)."""

    def __init__(self, dim_in: int, dim_out: int, t: int, stride: int, dim_inner: int):
        super().__init__()
        self.a = nn.Conv2d(dim_in, dim_inner, (t, 1), stride=(1, 1), padding=(t // 2, 0), bias=False)
        self.a_bn = nn.BatchNorm2d(dim_inner, eps=1e-5, momentum=0.1)
        self.a_relu = nn.ReLU(True)
        self.b = nn.Conv2d(dim_inner, dim_inner, (1, 3), stride=(1, stride), padding=(0, 1), bias=False)
        self.b_bn = nn.BatchNorm2d(dim_inner, eps=1e-5, momentum=0.1)
        self.b_relu = nn.ReLU(True)
        self.c = nn.Conv2d(dim_inner, dim_out, (1, 1), stride=(1, 1), padding=(0, 0), bias=False)
        self.c_bn = nn.BatchNorm2d(dim_out, eps=1e-5, momentum=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a_relu(self.a_bn(self.a(x)))
        x = self.b_relu(self.b_bn(self.b(x)))
        return self.c_bn(self.c(x))


class ResBlock(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, t: int, stride: int, dim_inner: int):
        super().__init__()
        if dim_in != dim_out or stride != 1:
            self.branch1 = nn.Conv2d(dim_in, dim_out, kernel_size=1, stride=(1, stride), padding=0, bias=False)
            self.branch1_bn = nn.BatchNorm2d(dim_out, eps=1e-5, momentum=0.1)
        self.branch2 = BottleneckTransform(dim_in, dim_out, t, stride, dim_inner)
        self.relu = nn.ReLU(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "branch1"):
            return self.relu(self.branch1_bn(self.branch1(x)) + self.branch2(x))
        return self.relu(x + self.branch2(x))


class ResStage(nn.Module):
    """One stage of both pathways (their NUM_BLOCK_TEMP_KERNEL equals the block counts:
    every block keeps the stage's temporal kernel)."""

    def __init__(
        self, dim_in: Sequence[int], dim_out: Sequence[int], dim_inner: Sequence[int], temporal, stride: int, n: int
    ):
        super().__init__()
        self.n = n
        for p in range(2):
            for i in range(n):
                block = ResBlock(dim_in[p] if i == 0 else dim_out[p], dim_out[p], temporal[p], stride if i == 0 else 1,
                                 dim_inner[p])  # fmt: skip
                self.add_module(f"pathway{p}_res{i}", block)

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for p in range(2):
            y = x[p]
            for i in range(self.n):
                y = getattr(self, f"pathway{p}_res{i}")(y)
            out.append(y)
        return out


class AuditorySlowFast(nn.Module):
    """[B, 1, T, F] log-mel spectrogram (their layout after ``unsqueeze(0)``) -> [B, 2304].
    The slow pathway reads T // alpha frames picked as their `pack_pathway_output` picks
    them (``linspace(0, T - 1, T // alpha).long()``)."""

    def __init__(self):
        super().__init__()
        self.s1 = AudioModelStem()
        self.s1_fuse = FuseFastToSlow(WIDTH // BETA_INV)
        slow_in, fast_in = WIDTH + WIDTH // (BETA_INV // FUSION_RATIO), WIDTH // BETA_INV
        for s, (n, stride) in enumerate(zip(DEPTHS, FREQ_STRIDES, strict=True)):
            out = WIDTH * 4 * 2**s
            inner = WIDTH * 2**s
            stage = ResStage((slow_in, fast_in), (out, out // BETA_INV), (inner, inner // BETA_INV), TEMPORAL[s + 1],
                             stride, n)  # fmt: skip
            self.add_module(f"s{s + 2}", stage)
            if s < 3:
                self.add_module(f"s{s + 2}_fuse", FuseFastToSlow(out // BETA_INV))
            slow_in, fast_in = out + out // (BETA_INV // FUSION_RATIO), out // BETA_INV
        for p in range(2):  # their _POOL1: (1, 1) kernels, an identity kept for the layout
            self.add_module(f"pathway{p}_pool", nn.MaxPool2d(kernel_size=(1, 1), stride=(1, 1), padding=(0, 0)))
        self.head = nn.AdaptiveAvgPool2d((1, 1))  # their head's pooling (TIM's x_feature), no projection
        _init(self)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        m: Any = self  # the stages are attributes by their names (their state dict's keys)
        t = spec.shape[2]
        slow_idx = torch.linspace(0, t - 1, t // ALPHA, device=spec.device).long()
        x = [spec.index_select(2, slow_idx), spec]
        x = m.s2_fuse(m.s2(m.s1_fuse(m.s1(x))))
        x = [m.pathway0_pool(x[0]), m.pathway1_pool(x[1])]
        x = m.s5(m.s4_fuse(m.s4(m.s3_fuse(m.s3(x)))))
        return torch.cat([m.head(x[0]), m.head(x[1])], 1).flatten(1)

    def stages(self) -> list[list[nn.Module]]:
        """finetune's stages: the stem (with its fusion), then each residual stage."""
        m: Any = self
        return [[m.s1, m.s1_fuse], [m.s2, m.s2_fuse], [m.s3, m.s3_fuse], [m.s4, m.s4_fuse], [m.s5]]


def _init(model: nn.Module) -> None:
    """Their weight_init_helper's convolutions (Caffe2's MSRA fill: kaiming normal over
    fan_out), BatchNorm at weight 1, bias 0. Their ZERO_INIT_FINAL_BN (each block's last
    BatchNorm at 0, a training choice) is not taken: with random weights it makes every
    block an identity, and random features are what ``--weights none`` gives tests."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
