"""Preprocessing (issue 18, point 7): every path to the backbone measured against
torchvision's own `weights.transforms()` on full-size decoded frames, on real 1080p EPIC
footage. ``--resize torchvision`` (stage 1, fine-tuning, predict) and `ekx live` agree
(cosine >= 0.999); the decoder's scaler (``--resize decoder``, the fast default) does not,
and the cache says so."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ekx.extract import backbones, sources
from ekx.extract.video import Request
from ekx.heads.data import extractor_spec


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double())


def _nchw(frames) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)


@pytest.mark.slow
def test_every_path_against_torchvision_on_full_size_frames(clips):
    """ResNet-50, random weights with BatchNorm calibrated on the clip (they magnify input
    differences: a lower bound for pretrained weights)."""
    import cv2

    from ekx.finetune.clips import Clips
    from ekx.live import _to_tensor

    path = clips / "epic55_wall_04x04_zoom2_h264_1080p50.mp4"
    bb = backbones.get("resnet50")
    pre, reference = bb.preprocess, bb.weights.DEFAULT.transforms()
    decord = sources.get("decord")
    req = Request(0, 1.0, 13.0)
    full = next(decord.decode(path, [req], 6, 1, None))  # --resize torchvision: full size
    assert full.error is None and full.frames.shape[1:3] == (1080, 1920)
    ref_in = reference(_nchw(full.frames))
    model, _ = backbones.load_weights(bb, "none", 0)
    backbones.calibrate_batchnorm(model, [ref_in])
    scaled = next(decord.decode(path, [req], 6, 1, pre.decode_size))  # --resize decoder
    assert (scaled.centres == full.centres).all()
    with torch.inference_mode():
        ref = model(ref_in)
        stage1 = model(pre(_nchw(full.frames)))
        live_in = torch.cat([_to_tensor(cv2, cv2.cvtColor(f, cv2.COLOR_RGB2BGR)) for f in full.frames])
        live = model(pre(live_in))
        scaler = model(pre(_nchw(scaled.frames)))
        area = np.stack([cv2.resize(f, scaled.frames.shape[2:0:-1], interpolation=cv2.INTER_AREA) for f in full.frames])
        old_live = model(pre(_nchw(area)))
    assert _cos(stage1, ref).min() >= 0.999
    assert _cos(live, ref).min() >= 0.999
    assert _cos(scaler, ref).min() < 0.999  # the check can fail: the decoder's scaler is another resize
    assert _cos(old_live, ref).min() < 0.999  # and so was live's cv2.INTER_AREA
    # fine-tuning reads as the run asks: full size with --resize torchvision
    clip_set = Clips([], {}, 6, bb, resize="torchvision")
    assert clip_set.size_fn is None and Clips([], {}, 6, bb).size_fn(1080, 1920) == pre.decode_size(1080, 1920)


@pytest.mark.slow
def test_cache_records_the_resize_that_ran(synth_data, tmp_path):
    """--resize torchvision decodes full-size frames and says so; predict reads a video as
    the run's cache did; an unknown --resize is refused before anything runs."""
    from ekx import EkxError
    from ekx.cache.reader import open_cache
    from ekx.extract.pipeline import ExtractConfig, extract

    base = {"split": "validation", "weights": "none", "frames": 2, "workers": 0, "limit": 1}
    out = {}
    for resize in ("decoder", "torchvision"):
        cfg = ExtractConfig(**base, resize=resize, out=tmp_path / f"{resize}.h5")
        extract(cfg, synth_data / "annotations", synth_data / "videos", tmp_path, warn=lambda m: None)
        out[resize] = dict(open_cache(tmp_path / f"{resize}.h5").attrs)
    assert out["decoder"]["resize"] == "decoder" and "scaler" in out["decoder"]["resize_method"]
    assert out["torchvision"]["resize"] == "torchvision" and "full-size" in out["torchvision"]["resize_method"]
    spec = extractor_spec(out["torchvision"], {})
    assert spec["resize"] == "torchvision" and spec["source"] == "decord"
    with pytest.raises(EkxError, match="--resize 'bilinear'"):
        extract(
            ExtractConfig(**base, resize="bilinear", out=tmp_path / "x.h5"),
            synth_data / "annotations",
            synth_data / "videos",
            tmp_path,
            warn=lambda m: None,
        )
    assert not (tmp_path / "x.h5").exists()
