"""The store of calibrated BatchNorm statistics (ekx.extract.bn_cache) that the suite turns on:
a hit gives exactly the statistics calibrating again gives, anything the statistics depend on
misses, and without EKX_CALIBRATION_CACHE nothing is stored."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ekx import EkxError
from ekx.extract import bn_cache
from ekx.extract.backbones import batchnorm_state, calibrate_batchnorm


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4))


def calibrated(model: nn.Module, batches) -> tuple[dict, int]:
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    calibrate_batchnorm(model, batches)
    hook.remove()
    return batchnorm_state(model), len(calls)


def test_a_stored_calibration_equals_calibrating_again_and_any_change_misses(tmp_path, monkeypatch):
    x = [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))]
    monkeypatch.delenv(bn_cache.ENV, raising=False)
    fresh, forwards = calibrated(net(0), x)
    assert forwards == 1

    monkeypatch.setenv(bn_cache.ENV, str(tmp_path / "bn"))
    first, forwards = calibrated(net(0), x)
    assert forwards == 1 and len(list((tmp_path / "bn").glob("*.pt"))) == 1
    again, forwards = calibrated(net(0), x)
    assert forwards == 0  # read back, not measured
    for k in fresh:
        assert torch.equal(fresh[k], first[k]) and torch.equal(fresh[k], again[k]), k
    model = net(0)
    calibrate_batchnorm(model, x)
    assert not any(m.training for m in model.modules())  # eval mode after a hit as after a forward
    assert all(m.momentum is None for m in model.modules() if isinstance(m, nn.BatchNorm2d))

    # other weights, other inputs, the same inputs batched otherwise: each measured anew
    assert calibrated(net(1), x)[1] == 1
    assert calibrated(net(0), [x[0] + 1])[1] == 1
    assert calibrated(net(0), [x[0][:2], x[0][2:]])[1] == 2
    assert len(list((tmp_path / "bn").glob("*.pt"))) == 4

    # a torn file is measured again and rewritten
    for f in (tmp_path / "bn").glob("*.pt"):
        f.write_bytes(b"torn")
    assert calibrated(net(0), x)[1] == 1
    assert calibrated(net(0), x)[1] == 0


def test_a_folder_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(bn_cache.ENV, str(tmp_path / "file"))
    with pytest.raises(EkxError, match=r"EKX_CALIBRATION_CACHE=.*file: cannot keep .*writable folder, or unset it"):
        calibrate_batchnorm(net(0), [torch.randn(2, 3, 16, 16)])
    with pytest.raises(EkxError, match=r"EKX_CALIBRATION_CACHE=.*file: cannot keep .*writable folder, or unset it"):
        with bn_cache.locked(tmp_path / "file" / "plan-x.pt"):  # where extraction looks a calibration up
            pass


def test_extraction_keeps_a_calibration_by_what_its_inputs_are_made_of(synth_data, tmp_path, monkeypatch):
    """`inputs.calibrate` (`ekx extract --weights none`): each video decoded once, the statistics
    those of the segments decoded one by one; with the store on, the same network, videos,
    segments and settings again decode nothing and get exactly the statistics measured; other
    bytes in a video, or another --frames, are measured anew."""
    import shutil

    from ekx import epic
    from ekx.extract import backbones, inputs, sources
    from ekx.extract.pipeline import ExtractConfig
    from ekx.extract.video import Request

    cfg = ExtractConfig(weights="none", frames=3, source="decord")
    bb = backbones.get("resnet50")
    src, videos = sources.get("decord"), tmp_path / "videos"
    shutil.copytree(synth_data / "videos", videos)
    segments = epic.Annotations(synth_data / "annotations").segments("train")
    calib = inputs.calibration_plan(epic.Annotations(synth_data / "annotations"), segments, cfg)
    found = sources.locate(src, calib, videos)[0]
    assert len({s.video_id for s in calib[: cfg.calibration_segments]}) >= 2  # segments of several videos

    def small(seed: int = 0) -> nn.Module:  # a BatchNorm network fast on 224 x 224 inputs
        torch.manual_seed(seed)
        layers = [nn.Conv2d(3, 4, 8, stride=8), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 4), nn.BatchNorm2d(4)]
        return nn.Sequential(*layers)

    decodes = []

    def counted(decode, path, requests, limit):
        decodes.append(path.name)
        yield from sources_guarded(decode, path, requests, limit)

    sources_guarded = inputs.guarded
    monkeypatch.setattr(inputs, "guarded", counted)

    def calibrate(model: nn.Module, c=cfg) -> tuple[dict, str, int]:
        decodes.clear()
        used = inputs.calibrate(model, bb, c, calib, found, "cpu")
        return batchnorm_state(model), used, len(decodes)

    # the segments decoded one by one, as calibration did before it grouped them by video
    one_by_one = []
    for s in calib[: cfg.calibration_segments]:
        req = Request(0, s.start, s.stop, s.start_frame, s.stop_frame)
        res = next(iter(src.decode(found[s.video_id], [req], 3, 1, inputs.decode_size(cfg, [bb]))))
        one_by_one.append(inputs.segment_inputs(res, s.narration_id, cfg, bb, torch.device("cpu")))
    x = torch.cat(one_by_one)
    x = x[torch.linspace(0, len(x) - 1, min(len(x), 64)).long()]
    monkeypatch.delenv(bn_cache.ENV, raising=False)
    reference = small()
    calibrate_batchnorm(reference, [x[i : i + 32] for i in range(0, len(x), 32)])
    fresh, used, n = calibrate(small())
    assert n == len({s.video_id for s in calib[: cfg.calibration_segments]})  # one decode per video
    assert used == "first segments: " + ",".join(s.narration_id for s in calib[: cfg.calibration_segments])
    for k, v in batchnorm_state(reference).items():
        assert torch.equal(fresh[k], v), k

    monkeypatch.setenv(bn_cache.ENV, str(tmp_path / "bn"))
    assert calibrate(small())[2] == n  # measured, then kept
    again, used_again, n_again = calibrate(small())
    assert n_again == 0 and used_again == used  # nothing decoded
    assert all(torch.equal(again[k], fresh[k]) for k in fresh)
    # another process with the same key (here a thread) waits while one measures, then reads it
    import threading

    first = calib[: cfg.calibration_segments]
    stored = bn_cache.plan_path(small(), lambda: inputs.calibration_key(cfg, bb, first, found, "cpu"))
    assert stored is not None and stored.is_file()
    waited = []
    with bn_cache.locked(stored):
        reader = threading.Thread(target=lambda: waited.append(calibrate(small())))
        reader.start()
        reader.join(timeout=1.0)
        assert reader.is_alive() and not waited  # blocked on the lock
    reader.join(timeout=60)
    assert waited[0][2] == 0 and all(torch.equal(waited[0][0][k], fresh[k]) for k in fresh)

    assert calibrate(small(seed=1))[2] == n  # another network
    assert calibrate(small(), ExtractConfig(weights="none", frames=4, source="decord"))[2] == n  # other inputs
    with open(found[calib[0].video_id], "ab") as fh:  # a video's bytes changed (same name, size grown)
        fh.write(b"\0")
    assert calibrate(small())[2] == n
