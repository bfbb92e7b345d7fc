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
