"""Stage 2 validation under the one missing-segment policy (heads.missing): train-head, sweep
and search refuse a validation cache with failed/pending rows before training, or with
allow_missing count them wrong in every metric and record how many (issue 23 point 5)."""

from __future__ import annotations

from pathlib import Path

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


# ---------------------------------------------------------------- dense stores: a failed row (issue 32 point 10)


def annotation_dir(root, splits: dict) -> Path:
    """Class lists and official-format split CSVs: ``splits`` name -> [(video, start, stop, verb, noun)]."""
    import csv

    from ekx import epic

    root.mkdir(parents=True)
    for name, n in ((epic.VERB_CLASSES, 5), (epic.NOUN_CLASSES, 7)):
        (root / name).write_text("id,key,instances,category\n" + "".join(f"{i},c{i},['c{i}'],c\n" for i in range(n)))
    for split, segs in splits.items():
        t = lambda s: f"00:00:{s:05.2f}"  # noqa: E731
        rows = [
            [f"{v}_{i}", v.split("_")[0], v, t(a), t(a), t(b), 0, 0, "x", "v", verb, "n", noun, "['n']", f"[{noun}]"]
            for i, (v, a, b, verb, noun) in enumerate(segs)
        ]
        with open(root / epic.SPLIT_FILES[split], "w", newline="") as fh:
            csv.writer(fh).writerows([epic.LABELLED_COLUMNS, *rows])
    return root


def dense_store(path: Path, segs, seconds: float = 12.0, rate: float = 4.0, k: int = 4, failed=()) -> Path:
    """A dense store written as extract writes one: runs of K positions (1 s each here, shorter
    than the segments), features marking each segment's classes; ``failed``: its rows failed."""
    import numpy as np

    from ekx.cache import store

    rng = np.random.default_rng(len(segs))
    n = int(seconds * rate)
    vids = list(dict.fromkeys(v for v, *_ in segs))
    t = (np.arange(n) + 0.5) / rate
    feats, times, nids, rows_video = [], [], [], []
    for vid in vids:
        x = rng.normal(size=(n, 16)).astype(np.float32)
        for v, a, b, verb, noun in segs:
            if v == vid:
                x[(t >= a) & (t < b), verb] += 3
                x[(t >= a) & (t < b), 5 + noun] += 3
        feats.append(x.reshape(n // k, 1, k, 16))
        times.append(t.reshape(n // k, k))
        nids += [f"{vid}@{c}" for c in range(n // k)]
        rows_video += [vid] * (n // k)
    attrs = {
        "format": store.FORMAT, "format_version": store.VERSION, "kind": "dense", "backbone": "imported:marks",
        "weights": "imported", "feature_dim": 16, "frames_per_segment": k, "views": 1, "num_verbs": 5,
        "num_nouns": 7, "verb_classes": [f"c{i}" for i in range(5)], "noun_classes": [f"c{i}" for i in range(7)],
        "dense_rate": f"{rate:g}", "split": path.stem,
    }  # fmt: skip
    m = len(nids)
    rows = store.Rows(nids, rows_video, np.full(m, -1), np.full(m, -1), np.arange(m))
    store.create(path, attrs, rows, 1, k, 16, None, np.concatenate(times))
    w = store.Writer(path)
    x = np.concatenate(feats)
    w.write([(i, x[i], np.full(k, -1)) for i in range(m) if i not in failed], [(i, "decode") for i in failed])
    w.close()
    return path


@pytest.fixture()
def dense_workspace(tmp_path):
    """Train (every row done) and validation stores; a validation segment spans 4-6.5 s, so rows
    4, 5 and 6 (1 s each) hold its positions, and row 5 failed."""
    segs = {
        "train": [(v, a, a + 2.5, i % 5, i % 7) for i, (v, a) in enumerate((v, a) for v in ("P01_01", "P02_01")
                                                                           for a in (0.5, 4.0, 8.0))],
        "validation": [(v, a, a + 2.5, i % 5, (i + 1) % 7) for i, (v, a) in enumerate((v, a) for v in ("P03_01",)
                                                                                      for a in (0.5, 4.0, 8.0))]
        + [("P04_01", 1.0, 3.0, 1, 1), ("P04_01", 5.0, 7.0, 2, 2), ("P04_01", 9.0, 11.0, 3, 3)],
    }  # fmt: skip
    ann = annotation_dir(tmp_path / "ann", segs)
    train = dense_store(tmp_path / "train.h5", segs["train"])
    val = dense_store(tmp_path / "validation.h5", segs["validation"], failed=(5,))  # P03_01@5: 5-6 s
    return ann, f"{train}@{ann / 'EPIC_100_train.csv'}", f"{val}@{ann / 'EPIC_100_validation.csv'}"


def test_a_segment_on_a_failed_dense_row_is_missing(dense_workspace):
    """(main: its positions in the failed row were read from the rows beside it, and train-head
    and evaluate said "0 of 6 segments missing".)"""
    import torch

    from ekx.heads.data import load_split

    _, _, val = dense_workspace
    split = load_split(val, torch.device("cpu"))
    assert split.rows.tolist() == [0, 2, 3, 4, 5]  # P03_01_1 (4-6.5 s) reads row 5 (5-6 s)
    assert split.narration_id[1] == "P03_01_1"


@pytest.mark.parametrize("head", ["pooling", "context"])
def test_train_head_and_submission_count_a_failed_dense_row(dense_workspace, tmp_path, head):
    from typer.testing import CliRunner

    from ekx.cli import app

    ann, train, val = dense_workspace
    runs = tmp_path / "runs"
    common = ["--train-features", train, "--val-features", val, "--runs", str(runs), "--epochs", "1",
              "--device", "cpu", "--annotations", str(ann), "--name", head]  # fmt: skip
    r = CliRunner().invoke(app, ["train-head", head, *common], terminal_width=300)
    assert r.exit_code == 1 and "1 of 6 segments have no features" in r.output, r.output
    r = CliRunner().invoke(app, ["train-head", head, *common, "--allow-missing"], terminal_width=300)
    assert r.exit_code == 0, r.output
    out = tmp_path / "sub.json"
    ev = ["evaluate", str(runs / head), "--features", val, "--device", "cpu", "--submission", str(out)]
    r = CliRunner().invoke(app, [*ev, "--allow-missing"], terminal_width=300)
    assert r.exit_code == 1 and "1 of 6 segments have no scores (e.g. P03_01_1)" in r.output, r.output
    assert not out.exists()
