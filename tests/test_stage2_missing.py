"""Stage 2 validation under the one missing-segment policy (heads.missing): train-head, sweep
and search refuse a validation cache with failed/pending rows before training, or with
allow_missing count them wrong in every metric and record how many (issue 23 point 5)."""

from __future__ import annotations

import pytest
from conftest import fail_rows, make_cache

from ekx import EkxError
from ekx.heads import search as se
from ekx.heads import sweep as sw
from ekx.heads import train as tr
from ekx.heads.config import TrainConfig
from ekx.heads.evaluate import evaluate_run
from ekx.heads.runlog import read_metrics

FAILED = [0, 2, 4, 6]  # 4 of the 8 validation rows


@pytest.fixture()
def caches(tmp_path):
    """features/resnet50/{train,validation}.h5, half the validation rows failed."""
    root = tmp_path / "features"
    make_cache(root / "resnet50" / "train.h5", n=40, seed=0)
    val = make_cache(root / "resnet50" / "validation.h5", n=8, seed=1, split="validation")
    fail_rows(val, FAILED)
    return root


def test_train_head_refuses_missing_validation_rows_then_counts_them_wrong(caches, tmp_path):
    val = caches / "resnet50" / "validation.h5"
    cfg = TrainConfig(head="pooling", epochs=1, frames=4, name="r", device="cpu")
    runs = tmp_path / "runs"
    with pytest.raises(EkxError, match=rf"^{val} \(validation cache\): 4 of 8 segments .*--allow-missing"):
        tr.main(cfg, caches, runs)
    assert not (runs / "r").exists()  # refused before anything was trained or written
    said: list[str] = []
    run_dir, best = tr.main(cfg, caches, runs, allow_missing=True, warn=said.append)
    assert any("4 of 8" in m and "count as wrong" in m for m in said), said
    (row,) = read_metrics(run_dir)
    assert row["val_missing"] == 4 and best["val_missing"] == 4
    assert "4 of 8 validation segments" in (run_dir / "config.toml").read_text()
    # the logged figures are `ekx evaluate --allow-missing`'s: over all 8 rows, the failed ones wrong
    expect = evaluate_run(run_dir, val, device_name="cpu", allow_missing=True)["metrics"]
    assert {k: row[f"val_{k}"] for k in expect} == pytest.approx(expect)
    # and not the figures over the 4 done rows alone (each at most 50 % now)
    assert max(row[f"val_{k}"] for k in expect) <= 50.0


def test_sweep_and_search_refuse_missing_validation_rows_before_the_first_run(caches, tmp_path):
    val = caches / "resnet50" / "validation.h5"
    configs = sw.expand({"base": {"epochs": 1, "head": "pooling", "frames": 4}, "config": [{"name": "a"}]})
    with pytest.raises(EkxError, match=rf"^{val} \(validation cache\): 4 of 8 segments"):
        sw.run_sweep(configs, tmp_path / "runs" / "g", None, None, "cpu", features_root=caches)
    assert not (tmp_path / "runs" / "g").exists()
    results = sw.run_sweep(
        configs, tmp_path / "runs" / "g", None, None, "cpu", features_root=caches, allow_missing=True
    )
    assert results["a"]["status"] == "done" and results["a"]["best"]["val_missing"] == 4

    spec = se.parse(
        {"base": {"head": "pooling", "epochs": 1, "frames": 4}, "optuna": {"trials": 1, "sampler": "random"}}
    )
    with pytest.raises(EkxError, match=rf"^{val} \(validation cache\): 4 of 8 segments"):
        se.run_search(spec, tmp_path / "runs" / "s", caches, "cpu")
    assert not se.journal_path(tmp_path / "runs" / "s").exists()  # no study, no trial
    out = se.run_search(spec, tmp_path / "runs" / "s", caches, "cpu", allow_missing=True)
    assert out["trial-0000"]["status"] == "done"
    assert read_metrics(se.trial_dir(tmp_path / "runs" / "s", 0))[0]["val_missing"] == 4
