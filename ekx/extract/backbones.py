"""Backbones as registry entries: builder, weights, the weights' own preprocessing,
feature dim, per-frame or per-clip.

A new backbone is one `register(...)` call. Preprocessing is read from the torchvision
weights' `transforms()` (resize, crop, mean/std, interpolation), never from a shared
constants module: R(2+1)D uses Kinetics statistics and a 128x171 resize, EfficientNet-B3
a 320 -> 300 bicubic pipeline. Open-ended families (`timm:<model>`, `open_clip:<arch>/<tag>`,
`hf:<repo or dir>`) are resolved by `ekx.extract.families` on first use of the name, with
their library's own preprocessing and weights. Weights are loaded by `ekx.extract.weights`.
"""

from __future__ import annotations

import collections
import dataclasses
import types
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torchvision import models
from torchvision.models.video import R2Plus1D_18_Weights, r2plus1d_18

from ekx import EkxError
from ekx.cache.store import sha256_file
from ekx.extract import bn_cache, config, families
from ekx.extract.backbone_spec import Backbone, Preprocess, resnet_stages
from ekx.extract.weights import _shell, fit_state, load_weights, read_state_file  # noqa: F401  (callers' names)

__all__ = ["REGISTRY", "Backbone", "Preprocess", "get", "load_weights", "register", "resnet_stages"]


def with_weights(backbone: Backbone, weights: str) -> Backbone:
    """The backbone whose preprocessing is that of the weights actually loaded: an enum name
    (``IMAGENET1K_V1``, or an identity ``torchvision:ResNet50_Weights.IMAGENET1K_V1``) brings
    its own transforms (V1 resizes to 256, V2 to 232); DEFAULT, ``none`` and local files use
    DEFAULT's, which is what a state dict fine-tuned from DEFAULT expects."""
    name = weights.rsplit(".", 1)[-1] if weights.startswith("torchvision:") else weights
    if backbone.weights is None:  # a family's model: its library's preprocessing, whatever the weights
        return backbone
    if name != "DEFAULT" and name in {w.name for w in backbone.weights}:
        return dataclasses.replace(backbone, weights_name=name)
    return backbone


REGISTRY: dict[str, Backbone] = {}


def register(backbone: Backbone) -> Backbone:
    if backbone.name in REGISTRY:
        raise ValueError(f"backbone {backbone.name!r} is already registered")
    REGISTRY[backbone.name] = backbone
    config.BACKBONES.add(backbone.name)  # the CLI's and ExtractConfig's check accepts it from now on
    return backbone


def get(name: str) -> Backbone:
    if name not in REGISTRY:
        if ":" in name:  # a family's model: resolved (and cached) by its library
            return families.resolve(name)
        raise EkxError(f"unknown backbone {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def _headless(build: Callable[..., nn.Module], attr: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        model = build(weights=None)
        setattr(model, attr, nn.Identity())  # the classifier goes; pooled features remain
        return model

    return make


register(
    Backbone(
        "resnet50",
        _headless(models.resnet50, "fc"),
        models.ResNet50_Weights,
        2048,
        stages=resnet_stages,
        classifier=("fc",),
    )
)
# features[0] is the stem, features[1..7] the MBConv stages, features[8] the last 1x1 conv
register(
    Backbone(
        "efficientnet_b3",
        _headless(models.efficientnet_b3, "classifier"),
        models.EfficientNet_B3_Weights,
        1536,
        stages=lambda m: [[f] for f in m.features],
        classifier=("classifier",),
    )
)
# 8 consecutive frames per sampled position: half the Kinetics clip, a quarter of the cost;
# the network pools time adaptively, so any clip length runs.
register(
    Backbone(
        "r2plus1d_18",
        _headless(r2plus1d_18, "fc"),
        R2Plus1D_18_Weights,
        512,
        clip_len=8,
        stages=resnet_stages,
        classifier=("fc",),
    )
)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def calibrate_batchnorm(
    model: nn.Module, batches: list[torch.Tensor], measured: dict[str, torch.Tensor] | None = None
) -> None:
    """Re-estimate BatchNorm running statistics on real (preprocessed) inputs.

    A randomly initialised network in eval mode normalises with mean 0 / var 1, which
    is wrong by orders of magnitude layer after layer: resnet50 then outputs nearly the
    same vector for every input and efficientnet_b3 values ~1e-14 (zero in float16).
    With statistics measured on the data, activations keep their scale and the random
    features stay input-dependent - good enough for tests and the demo. ``measured``: the
    statistics of an earlier calibration on the same inputs (`bn_cache.plan_path`), set as
    measuring would leave them.
    """
    model.eval()  # dropout / stochastic depth stay off: only BatchNorm measures
    for bn in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all calibration batches
        bn.train()
    stored = None
    if measured is None:
        stored = bn_cache.path_for(model, batches)  # None unless EKX_CALIBRATION_CACHE is set
        measured = bn_cache.load(stored)
    if measured is not None:
        model.load_state_dict(measured, strict=False)
    else:
        for x in batches:
            model(x)
        bn_cache.save(stored, batchnorm_state(model))
    model.eval()


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm into the convolution before it (frozen backbone, eval mode):
    measured here +8% resnet50, +58% efficientnet_b3, +36% r2plus1d_18 on the CPU, same
    features (cosine > 0.99999). The pairs come from a symbolic trace; the weights are
    scaled in place (torch.fx's `fuse` deep-copied the model and wrote every weight anew:
    1.1 s of each resnet50 extraction's start-up here). Returns the model as is if it
    cannot be traced. Every nn.MultiheadAttention self-attention also runs as one packed
    projection and `scaled_dot_product_attention` (`_self_attention`)."""
    from torch.fx import symbolic_trace

    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention) and m._qkv_same_embed_dim and m.bias_k is None and not m.add_zero_attn:
            m.forward = types.MethodType(_self_attention, m)  # type: ignore[method-assign]
    try:
        graph = symbolic_trace(model.eval()).graph
    except Exception:
        return model
    mods = dict(model.named_modules())
    calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    for node in graph.nodes:
        bn, src = mods.get(node.target), node.args[0] if node.args else None
        if not (node.op == "call_module" and isinstance(bn, nn.modules.batchnorm._BatchNorm)):
            continue
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module" and isinstance(mods.get(src.target), convs)):
            continue
        conv = mods[src.target]
        # only a conv whose one output feeds only this BN, each module called once
        if len(src.users) != 1 or calls[src.target] != 1 or calls[node.target] != 1 or bn.running_mean is None:
            continue
        _fold(conv, bn)
        parent, _, name = str(node.target).rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, nn.Identity())
    return model


def _self_attention(
    self: nn.MultiheadAttention,
    query,
    key,
    value,
    key_padding_mask=None,
    need_weights=True,
    attn_mask=None,
    average_attn_weights=True,
    is_causal=False,
):
    """nn.MultiheadAttention's forward for a frozen backbone's unmasked self-attention: the
    packed in-projection on a contiguous [N, L, E] tensor, then scaled_dot_product_attention.
    Under autocast torch leaves its fast path and projects a transposed [L, N, E] view,
    which matmul turns into a bmm over an expanded copy of the weight: OpenCLIP's ViT-B/32
    ran 3.5x slower in bf16 than in fp32 on the CPU (bench/precision_bench.py). Anything
    else (masks, cross-attention, attention weights asked for) takes torch's own forward."""
    plain = query is key is value and key_padding_mask is None and attn_mask is None and not is_causal
    if not plain or need_weights or self.training:
        return nn.MultiheadAttention.forward(
            self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )
    x = query if self.batch_first else query.transpose(0, 1)
    n, length, e = x.shape
    qkv = F.linear(x.contiguous(), self.in_proj_weight, self.in_proj_bias)
    q, k, v = qkv.view(n, length, 3, self.num_heads, e // self.num_heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, e)
    out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
    return (out if self.batch_first else out.transpose(0, 1)), None


@torch.no_grad()
def _fold(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """torch's `fuse_conv_bn_weights`, the same arithmetic in the same order (so the same
    bits), with the weight scaled where it lies instead of copied."""
    mean, var = bn.running_mean, bn.running_var
    assert isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor)  # tracked statistics (checked by caller)
    weight, old = conv.weight, conv.bias
    assert isinstance(weight, torch.Tensor)
    rsqrt = torch.rsqrt(var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(rsqrt)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(rsqrt)
    weight.mul_((gamma * rsqrt).reshape(-1, *[1] * (weight.dim() - 1)))
    bias = old if isinstance(old, torch.Tensor) else torch.zeros_like(rsqrt)
    conv.bias = nn.Parameter((bias - mean) * rsqrt * gamma + beta, requires_grad=False)


# ---------------------------------------------------------------- the extractor of a cache, rebuilt


def batchnorm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The BatchNorm buffers of a model (what `calibrate_batchnorm` measured)."""
    return {
        f"{name}.{b}": getattr(m, b).detach().cpu().clone()
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for b in ("running_mean", "running_var", "num_batches_tracked")
    }


def build_extractor(spec: dict) -> nn.Module:
    """The (unfused, eval-mode) backbone described by `ekx.heads.data.extractor_spec`."""
    bb = get(spec["backbone"])
    weights = spec["weights"]
    if weights == "none":
        model, _ = load_weights(bb, "none", spec["seed"])
        if not has_batchnorm(model):  # a ViT: the seed alone rebuilds it
            return model.eval()
        if not spec.get("bn_state"):
            raise EkxError(
                "this run's cache was extracted with --weights none but holds no BatchNorm "
                "statistics (made by an older ekx): re-extract it, then retrain the head"
            )
        missing = set(batchnorm_state(model)) - set(spec["bn_state"])
        if missing:
            raise EkxError(f"stored BatchNorm statistics do not fit {bb.name} (e.g. {sorted(missing)[0]})")
        model.load_state_dict(spec["bn_state"], strict=False)
        return model.eval()
    if weights.startswith("torchvision:"):
        return load_weights(bb, weights.split(".")[-1])[0]
    if weights.startswith("pretrained:"):  # a family's library weights
        return load_weights(bb, "DEFAULT")[0]
    if weights.startswith("sha256:"):
        path = Path(spec.get("weights_path", ""))
        if not path.is_file():
            raise EkxError(
                f"the backbone weights of this run ({path or 'a local file'}) are not found; "
                "put the file back at that path"
            )
        if f"sha256:{sha256_file(path)}" != weights:
            raise EkxError(f"{path} changed since the features were extracted (sha256 differs)")
        return load_weights(bb, str(path))[0]
    raise EkxError(f"cannot rebuild backbone weights {weights!r}")


def run_backbone(ckpt: dict) -> nn.Module:
    """The backbone of a run's checkpoint: a fine-tuned run carries its own state dict, a
    cached-feature run the extractor record of its cache."""
    if "backbone" in ckpt:
        model = get(ckpt["extractor"]["backbone"]).build()
        model.load_state_dict(ckpt["backbone"])
        return model.eval()
    return build_extractor(ckpt["extractor"])
