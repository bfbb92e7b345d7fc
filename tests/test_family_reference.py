"""Each backbone family against its library's own code on the same uint8 frames.

ekx's side is the extraction path: `load_weights` (the library's pretrained loader, or a
file), `fuse_for_inference`, then `inputs.make_view` (resize, crop, normalise on tensors).
The library's side is its own entry point: timm's `resolve_data_config` + `create_transform`
+ `create_model(num_classes=0)`, OpenCLIP's `create_model_and_transforms` (tagged, untagged,
a timm tower), transformers' `AutoImageProcessor` + `AutoModel`. The preprocessing values are
compared exactly, the model on the same input to float precision, and the whole path within
the difference between a PIL resize and a tensor resize (measured below).

No weights are downloaded: the libraries' own local-file hooks stand in for their hubs
(timm's ``pretrained_cfg_overlay=dict(file=...)``, OpenCLIP's pretrained config ``file``, a
``save_pretrained`` directory), and OpenCLIP's tags are checked on the meta device (their
configs, no weights) or on tiny architectures given a tag's config.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_videomae

from ekx.extract import backbones, families, inputs

# Measured here on `frames()`: PIL resizes 8-bit images in its own fixed-point arithmetic and
# torchvision's tensor resize in float, each rounding to uint8, so a pixel differs by up to
# 3 LSB (0.16-0.21 LSB on average). Through the (random-weight) networks below that moves a
# feature by 0.07-1.0% of its norm, and by at most 1.5% of the distance to the nearest other
# frame's feature; the same input gives the same features to float precision (< 2e-7).
# The bounds leave room for other CPUs' rounding; the wrong normalisation this guards
# against moved features by many times the distance between two frames.
MAX_LSB, MEAN_LSB, FEATURE_REL, OF_FRAME_GAP = 4, 0.5, 2e-2, 0.05


def need(module: str):
    return pytest.importorskip(module, reason=f"{module} is not installed (pip install 'ekx[timm,clip,hf]')")


def frames(n: int = 3, h: int = 90, w: int = 120, seed: int = 0) -> torch.Tensor:
    """uint8 [n, 3, h, w] landscape frames with image-like structure (smooth shapes + noise),
    so the resize and the crop both do work."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, h // 8, w // 8, generator=g) * 255
    big = torch.nn.functional.interpolate(small, size=(h, w), mode="bicubic", align_corners=False)
    return (big + torch.randn(n, 3, h, w, generator=g) * 8).clamp(0, 255).round().to(torch.uint8)


def pil_inputs(transform, fr: torch.Tensor) -> torch.Tensor:
    from PIL import Image

    return torch.stack([transform(Image.fromarray(f.permute(1, 2, 0).numpy())) for f in fr])


def transform_values(transform) -> dict:
    """A torchvision eval transform's steps as plain values, read here independently of ekx."""
    out: dict = {}
    for t in transform.transforms:
        name = type(t).__name__
        if name == "Resize":
            size = t.size if isinstance(t.size, int) else tuple(t.size)
            out["resize"], out["interpolation"] = ((size,) if isinstance(size, int) else size), t.interpolation.value
        elif name == "CenterCrop":
            out["crop"] = tuple(t.size)
        elif name == "Normalize":
            out["mean"], out["std"] = tuple(float(x) for x in t.mean), tuple(float(x) for x in t.std)
    out.setdefault("crop", out["resize"])  # OpenCLIP's "squash": an exact resize, no crop
    return out


def assert_same_preprocessing(pre, want: dict) -> None:
    assert pre.resize_size == want["resize"] and pre.crop_size == want["crop"], (pre, want)
    assert pre.interpolation == want["interpolation"], (pre, want)
    assert pre.mean == pytest.approx(want["mean"], abs=1e-7) and pre.std == pytest.approx(want["std"], abs=1e-7)


def ekx_features(bb, weights: str, fr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(inputs, features, weights identity) as `ekx extract --resize torchvision` computes them."""
    model, ident = backbones.load_weights(bb, weights)
    model = backbones.fuse_for_inference(model)
    x = inputs.make_view(fr, bb.preprocess, None)
    if bb.clip_len > 1:  # [K*clip, 3, h, w] -> [K, 3, clip, h, w], as segment_inputs
        x = x.reshape(-1, bb.clip_len, *x.shape[1:]).transpose(1, 2)
    with torch.inference_mode():
        return x, model(x), ident


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


def assert_close_path(x, x_lib, std, f: torch.Tensor, f_lib: torch.Tensor, same: torch.Tensor) -> None:
    """ekx's inputs within a few LSB of the library's PIL inputs; the library's model on ekx's
    inputs gives ekx's features (the same network); end to end, each feature far closer to
    the library's feature of its frame than to any other frame's."""
    lsb = torch.tensor([1 / 255 / s for s in std]).view(1, 3, *[1] * (x.dim() - 2))
    if x.dim() == 5:  # clips: channels are dim 1 in ekx's layout, dim 2 in the library's
        x, lsb = x.transpose(1, 2), lsb.transpose(1, 2)
    err = (x - x_lib).abs() / lsb
    assert err.max() <= MAX_LSB and err.mean() <= MEAN_LSB, (float(err.max()), float(err.mean()))
    assert rel(f, same) < 1e-5
    assert rel(f, f_lib) < FEATURE_REL
    gaps = torch.cdist(f, f).fill_diagonal_(float("inf")).min(dim=1).values
    assert ((f - f_lib).norm(dim=-1) / gaps).max() < OF_FRAME_GAP


# ---------------------------------------------------------------- timm


def test_timm_matches_timms_own_transform_and_pretrained_model(tmp_path, monkeypatch):
    """`timm:test_vit` with --weights DEFAULT (timm's loader, pointed at a local file as its
    ``pretrained_cfg_overlay`` does) against ``resolve_data_config`` + ``create_transform`` +
    ``create_model(pretrained=True, num_classes=0)``."""
    timm = need("timm")
    from timm.data import create_transform, resolve_data_config

    torch.manual_seed(3)
    path = tmp_path / "test_vit.pth"
    torch.save(timm.create_model("test_vit").state_dict(), path)  # a full checkpoint, classifier included
    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            kw["pretrained_cfg_overlay"] = {"file": str(path)}
        return real(name, pretrained=pretrained, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    families.resolve.cache_clear()
    try:
        bb = backbones.get("timm:test_vit")
        fr = frames()
        x, f, ident = ekx_features(bb, "DEFAULT", fr)
    finally:
        families.resolve.cache_clear()
    ref = offline("test_vit", pretrained=True, num_classes=0).eval()
    cfg = resolve_data_config({}, model=ref)
    transform = create_transform(**cfg)
    want = transform_values(transform)
    assert_same_preprocessing(bb.preprocess, want)
    assert want["crop"] == cfg["input_size"][1:] and want["mean"] == pytest.approx(cfg["mean"])
    assert ident == "pretrained:timm test_vit.r160_in1k"
    x_lib = pil_inputs(transform, fr)
    with torch.inference_mode():
        assert_close_path(x, x_lib, cfg["std"], f, ref(x_lib), ref(x))


# ---------------------------------------------------------------- OpenCLIP

TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}
# a SigLIP-shaped tower on a timm trunk (MAP pooling, no projection), timm's tiny test ViT
TINY_SIGLIP = {
    "embed_dim": 64,
    "custom_text": True,
    "vision_cfg": {"image_size": 160, "timm_model_name": "test_vit", "timm_pool": "map", "timm_proj": "none"},
    "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 64, "heads": 2, "layers": 1, "no_causal_mask": True},
}
INCEPTION = (0.5, 0.5, 0.5)


@pytest.fixture(scope="module")
def tiny_archs(tmp_path_factory):
    """Two tiny OpenCLIP architectures, registered as ``open_clip.add_model_config`` does."""
    open_clip = need("open_clip")
    need("timm")
    d = tmp_path_factory.mktemp("open_clip_configs")
    for name, cfg in (("ekx-tiny-ViT", TINY_VIT), ("ekx-tiny-SigLIP", TINY_SIGLIP)):
        (d / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d)
    return open_clip


def clip_checkpoint(open_clip, arch: str, path: Path, seed: int) -> Path:
    """A whole CLIP model's state dict (image and text towers), as OpenCLIP's checkpoints hold."""
    torch.manual_seed(seed)
    torch.save(open_clip.create_model(arch).state_dict(), path)
    return path


def tag(monkeypatch, open_clip, arch: str, name: str, **cfg) -> None:
    """A pretrained tag of ``arch`` whose weights are a local file (OpenCLIP's ``file`` key)."""
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, arch, {name: {"url": "", "hf_hub": "", **cfg}})
    families.resolve.cache_clear()


def library_model(open_clip, arch: str, tag_name: str | None, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=tag_name, **kw)
    return model.visual.eval(), transform, [str(w.message) for w in caught]


def test_open_clip_tag_sets_preprocessing_and_quick_gelu_from_the_tag_and_from_a_file(
    tiny_archs, tmp_path, monkeypatch
):
    """A tag whose config says QuickGELU, mean/std 0.5, bilinear, squash: ekx's tower and
    preprocessing equal ``create_model_and_transforms(arch, pretrained=tag,
    force_quick_gelu=True)`` (what OpenCLIP's own "QuickGELU mismatch" warning asks for),
    with --weights DEFAULT and with the same checkpoint as --weights FILE."""
    open_clip = tiny_archs
    arch, ckpt = "ekx-tiny-ViT", clip_checkpoint(tiny_archs, "ekx-tiny-ViT", tmp_path / "clip.pt", 11)
    tag(monkeypatch, open_clip, arch, "qg", file=str(ckpt), mean=INCEPTION, std=INCEPTION, interpolation="bilinear",
        resize_mode="squash", quick_gelu=True)  # fmt: skip
    bb = backbones.get(f"open_clip:{arch}/qg")
    fr = frames()
    x, f, ident = ekx_features(bb, "DEFAULT", fr)
    x_file, f_file, ident_file = ekx_features(bb, str(ckpt), fr)
    families.resolve.cache_clear()
    ref, transform, caught = library_model(open_clip, arch, "qg", force_quick_gelu=True)
    assert not caught
    assert_same_preprocessing(bb.preprocess, transform_values(transform))
    assert bb.preprocess.resize_size == (64, 64) and bb.preprocess.mean == INCEPTION  # the tag's, not the arch's
    assert ident == f"pretrained:open_clip {arch}/qg" and ident_file.startswith("sha256:")
    assert bb.attrs["open_clip_quick_gelu"] == "true" and bb.attrs["open_clip_resize_mode"] == "squash"
    x_lib = pil_inputs(transform, fr)
    with torch.inference_mode():
        assert_close_path(x, x_lib, INCEPTION, f, ref(x_lib), ref(x))
        assert torch.equal(x_file, x) and rel(f_file, f) < 1e-6  # the file runs the tag's network too
        plain, _, warned = library_model(open_clip, arch, "qg")  # GELU: what the tag's weights were not trained with
        assert any("QuickGELU mismatch" in w for w in warned)
        assert rel(plain(x), f) > 1e-3


def test_open_clip_untagged_is_the_archs_own(tiny_archs, tmp_path):
    """No tag: the arch's own preprocessing (OpenAI's statistics, bicubic, shortest side)
    and GELU; a whole-CLIP checkpoint as --weights FILE (its ``visual.`` keys)."""
    open_clip = tiny_archs
    arch = "ekx-tiny-ViT"
    ckpt = clip_checkpoint(open_clip, arch, tmp_path / "clip.pt", 12)
    families.resolve.cache_clear()
    bb = backbones.get(f"open_clip:{arch}")
    fr = frames()
    x, f, _ = ekx_features(bb, str(ckpt), fr)
    ref, transform, _ = library_model(open_clip, arch, str(ckpt))  # OpenCLIP's own load of a checkpoint file
    want = transform_values(transform)
    assert_same_preprocessing(bb.preprocess, want)
    assert want["resize"] == (64,) and want["interpolation"] == "bicubic"
    assert bb.attrs["open_clip_quick_gelu"] == "false" and bb.attrs["open_clip_resize_mode"] == "shortest"
    x_lib = pil_inputs(transform, fr)
    with torch.inference_mode():
        assert_close_path(x, x_lib, want["std"], f, ref(x_lib), ref(x))


def test_open_clip_timm_tower_siglip(tiny_archs, tmp_path, monkeypatch):
    """An OpenCLIP tower built on timm (SigLIP's shape: MAP pooling, no projection; it has no
    ``output_dim``) with a SigLIP tag's config (0.5/0.5, bicubic, squash)."""
    open_clip = tiny_archs
    arch = "ekx-tiny-SigLIP"
    ckpt = clip_checkpoint(open_clip, arch, tmp_path / "siglip.pt", 13)
    tag(monkeypatch, open_clip, arch, "webli", file=str(ckpt), mean=INCEPTION, std=INCEPTION,
        interpolation="bicubic", resize_mode="squash")  # fmt: skip
    bb = backbones.get(f"open_clip:{arch}/webli")
    fr = frames(h=180, w=240)
    x, f, _ = ekx_features(bb, "DEFAULT", fr)
    families.resolve.cache_clear()
    ref, transform, _ = library_model(open_clip, arch, "webli")
    assert bb.dim == f.shape[-1] == ref(torch.zeros(1, 3, 160, 160)).shape[-1]
    assert_same_preprocessing(bb.preprocess, transform_values(transform))
    assert bb.preprocess.resize_size == (160, 160)
    x_lib = pil_inputs(transform, fr)
    with torch.inference_mode():
        assert_close_path(x, x_lib, INCEPTION, f, ref(x_lib), ref(x))
    assert len(bb.stages(backbones.load_weights(bb, "none")[0])) > 2  # finetune's stages: the timm trunk's blocks


REAL_TAGS = [
    ("ViT-L-14", "laion2b_s32b_b82k"),  # 0.5/0.5 (the untagged arch: OpenAI's)
    ("ViT-B-32", "openai"),  # QuickGELU
    ("ViT-B-16-SigLIP", "webli"),  # a timm tower, squash
    ("ViT-L-14-CLIPA", "datacomp1b"),  # ImageNet statistics, bilinear, squash
]


@pytest.mark.parametrize(("arch", "tag_name"), REAL_TAGS)
def test_open_clip_real_tags_build_as_the_library_does(arch, tag_name, monkeypatch):
    """OpenCLIP's own tag table: ``create_model_and_transforms(arch, pretrained=tag)`` on the
    meta device (its weights lookup answered by a dummy path, no weights loaded) gives the
    transform and the tower's modules that ekx's resolved backbone has."""
    open_clip = need("open_clip")
    need("timm")
    cfg = open_clip.get_pretrained_cfg(arch, tag_name)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda *a, **k: "unused")
    with torch.device("meta"):
        model, _, transform = open_clip.create_model_and_transforms(
            arch, pretrained=tag_name, load_weights=False, device="meta",
            force_quick_gelu=bool(cfg.get("quick_gelu")), pretrained_text=False,
        )  # fmt: skip
    bb = backbones.get(f"open_clip:{arch}/{tag_name}")
    want = transform_values(transform)
    assert_same_preprocessing(bb.preprocess, want)
    assert want["mean"] == pytest.approx(cfg["mean"]) and want["interpolation"] == cfg["interpolation"]
    with torch.device("meta"):
        shell = bb.build()
    assert [type(m).__name__ for m in shell.modules()] == [type(m).__name__ for m in model.visual.modules()]
    assert ("QuickGELU" in {type(m).__name__ for m in shell.modules()}) == bool(cfg.get("quick_gelu"))
    assert bb.dim == open_clip.get_model_config(arch)["embed_dim"]


# ---------------------------------------------------------------- Hugging Face


@pytest.fixture(scope="module")
def videomae_without_mean(tmp_path_factory) -> Path:
    """A tiny VideoMAE directory whose processor config names no image_mean/image_std (the
    processor class's own defaults apply: 0.5/0.5) and resamples bicubic."""
    need("transformers")
    out = save_tiny_videomae(tmp_path_factory.mktemp("videomae-no-mean"), 9, resample=3)
    path = out / "preprocessor_config.json"
    proc = json.loads(path.read_text())
    del proc["image_mean"], proc["image_std"]
    path.write_text(json.dumps(proc))
    return out


def test_hugging_face_matches_its_image_processor_class_and_model(videomae_without_mean):
    """``hf:<dir>`` against ``AutoImageProcessor`` + ``AutoModel`` from the same directory: the
    processor class's mean/std (0.5, not ImageNet's) and its resample (bicubic)."""
    from transformers import AutoImageProcessor, AutoModel

    d = videomae_without_mean
    bb = backbones.get(f"hf:{d}")
    proc = AutoImageProcessor.from_pretrained(d)
    assert bb.preprocess.mean == tuple(proc.image_mean) == (0.5, 0.5, 0.5) and bb.preprocess.std == (0.5, 0.5, 0.5)
    assert bb.preprocess.interpolation == "bicubic" and bb.preprocess.resize_size == (64,)
    assert bb.preprocess.crop_size == (64, 64) and bb.attrs["hf_processor"] == type(proc).__name__
    fr = frames(n=8)  # two clips of 4 frames
    x, f, _ = ekx_features(bb, "DEFAULT", fr)
    clips = fr.permute(0, 2, 3, 1).numpy().reshape(2, 4, *fr.shape[2:], 3)
    x_lib = proc([list(c) for c in clips], return_tensors="pt")["pixel_values"]  # [2, 4, 3, 64, 64]
    ref = AutoModel.from_pretrained(d).eval()
    with torch.inference_mode():
        assert_close_path(
            x, x_lib, proc.image_std, f, ref(pixel_values=x_lib).last_hidden_state.mean(1),
            ref(pixel_values=x.transpose(1, 2)).last_hidden_state.mean(1),
        )  # fmt: skip
