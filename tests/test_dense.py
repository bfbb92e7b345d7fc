"""Dense stores (`ekx extract --dense`, `ekx import`): per-video features at known times,
read by stage 2 through any annotation file's segments."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ekx import EkxError, epic
from ekx.cache import dense, store, tools
from ekx.cache.imports import import_features
from ekx.cache.reader import open_cache
from ekx.cli import app
from ekx.extract.pipeline import ExtractConfig, extract, extract_many
from ekx.extract.video import centre_times
from ekx.heads.data import load_split, make_batch

V, N = 4, 6  # classes of verbs and nouns in the test workspaces


def hhmmss(t: float) -> str:
    return f"00:{int(t // 60):02d}:{t % 60:05.2f}"


def write_split(path: Path, segments: list[tuple[str, float, float, int, int]]) -> Path:
    """An annotation CSV in the official format: (video, start, stop, verb, noun) per row."""
    rows = []
    for i, (vid, a, b, verb, noun) in enumerate(segments):
        rows.append(
            [f"{vid}_{i}", vid.split("_")[0], vid, hhmmss(a), hhmmss(a), hhmmss(b), 0, 0,
             "x", "v", verb, "n", noun, "['n']", f"[{noun}]"]
        )  # fmt: skip
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([epic.LABELLED_COLUMNS, *rows])
    return path


def annotations(root: Path, train, validation=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, n in ((epic.VERB_CLASSES, V), (epic.NOUN_CLASSES, N)):
        lines = ["id,key,instances,category"] + [f"{i},c{i},['c{i}'],c" for i in range(n)]
        (root / name).write_text("\n".join(lines) + "\n")
    write_split(root / epic.SPLIT_FILES["train"], train)
    if validation is not None:
        write_split(root / epic.SPLIT_FILES["validation"], validation)
    return root


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# ---------------------------------------------------------------- the grid and the gather


def test_the_grid_plans_runs_of_k_positions_and_pads_past_the_end():
    segs = [epic.Segment("P01_01_0", "P01", "P01_01", 1.0, 2.0), epic.Segment("P01_01_1", "P01", "P01_01", 9.0, 9.5)]
    runs, times = dense.plan(segs, {"P01_01": (10.0, 30.0)}, dense.Rate.parse("2"), 4)
    assert [r.narration_id for r in runs] == [f"P01_01@{c}" for c in range(5)]
    assert np.allclose(times.reshape(-1), (np.arange(20) + 0.5) / 2)  # 20 positions before 10 s
    for r, t in zip(runs, times, strict=True):  # each run's segment centres are its grid times
        assert np.allclose(centre_times(r.start, r.stop, 4), t)
    runs, times = dense.plan(segs, {"P01_01": (9.9, 30.0)}, dense.Rate.parse("every:10"), 4)
    assert len(runs) == 8 and np.isnan(times[-1, -2:]).all()  # 3 fps: 30 positions, the last run padded
    runs, _ = dense.plan(segs, {"P01_01": (10.0, 30.0)}, dense.Rate.parse("2"), 4, "annotated", 0.5)
    assert [r.narration_id for r in runs] == ["P01_01@0", "P01_01@1", "P01_01@4"]  # 0.5-2.5 s and 8.5-10 s
    for bad in ("0", "-1", "every:0", "fast", "nan"):
        with pytest.raises(EkxError, match="--dense"):
            dense.Rate.parse(bad)


def time_store(root: Path, lengths: dict[str, int], rate: float, segments, name="t") -> tuple[Path, Path]:
    """An imported dense store whose every feature is its own time (all D values)."""
    src = root / "src"
    src.mkdir(parents=True)
    for vid, n in lengths.items():
        t = (np.arange(n) + 0.5) / rate
        np.save(src / f"{vid}.npy", np.repeat(t[:, None], 8, axis=1).astype(np.float32))
    ann = annotations(root / "ann", segments)
    out = root / f"{name}.h5"
    import_features("npy-dir", src, ann, "train", out, name, rate=rate)
    return out, ann


def test_every_segment_reads_the_positions_the_rule_picks(tmp_path):
    """Features encode their time: each segment's K gathered positions are the dense times
    nearest its K centre times; a segment at the very end reads the last positions, one past
    the features' end is missing (counted, not dropped)."""
    rate, n = 4.0, 40  # 10 s of features, the last at 9.875 s
    segs = [
        ("P01_01", 1.0, 3.3, 1, 2),
        ("P01_01", 0.0, 0.2, 0, 0),  # shorter than a period
        ("P01_01", 9.2, 10.0, 2, 3),  # the very end
        ("P01_01", 10.5, 12.0, 3, 4),  # past the features' end
        ("P02_01", 2.0, 4.0, 1, 1),
    ]
    store_path, _ = time_store(tmp_path, {"P01_01": n, "P02_01": 24}, rate, segs)
    split = load_split(store_path, torch.device("cpu"))
    assert split.index is not None and split.k == dense.SEGMENT_POSITIONS
    assert split.rows.tolist() == [0, 1, 2, 4]  # the segment past the end has no features
    grid = (np.arange(n) + 0.5) / rate
    k = split.k
    pos = torch.arange(k).expand(len(split.rows), k)
    x = make_batch(split, split.rows, torch.zeros(len(split.rows), 1, dtype=torch.long), pos,
                   torch.zeros(8), torch.ones(8), torch.device("cpu"))  # fmt: skip
    for row, got in zip(split.rows.tolist(), x[:, :, 0].numpy(), strict=True):
        _, a, b, _, _ = segs[row]
        want = centre_times(a, b, k)
        g = grid if segs[row][0] == "P01_01" else grid[:24]
        nearest = g[np.abs(g[None, :] - want[:, None]).argmin(1)]
        assert np.allclose(got, nearest, atol=2e-3), (row, got, nearest)  # float16 of the time
    assert split.attrs["dense_max_gap"] <= 0.125 + 1e-9  # half a period, where segments lie inside
    assert "1 of 5 segments missing" in __import__("ekx.heads.data", fromlist=["x"]).validation_note(
        split, True
    )  # fmt: skip
    with pytest.raises(EkxError, match="--allow-missing"):
        __import__("ekx.heads.data", fromlist=["x"]).validation_note(split, False)


def test_another_annotation_file_reads_the_same_store(tmp_path):
    """`store.h5@segments.csv`: the same store, other segments; a changed or absent recorded
    annotation file is refused with that way out."""
    store_path, ann = time_store(tmp_path, {"P01_01": 40}, 4.0, [("P01_01", 1.0, 2.0, 0, 0)])
    other = write_split(tmp_path / "other.csv", [("P01_01", 5.0, 6.0, 1, 1), ("P01_01", 7.0, 8.0, 2, 2)])
    split = load_split(Path(f"{store_path}@{other}"), torch.device("cpu"))
    assert split.narration_id == ["P01_01_0", "P01_01_1"] and split.verbs.tolist() == [1, 2]
    assert split.attrs["annotation_file"] == "other.csv"
    (ann / epic.SPLIT_FILES["train"]).write_text((ann / epic.SPLIT_FILES["train"]).read_text() + "\n")
    with pytest.raises(EkxError, match=r"changed since the store was made.*@<file\.csv>"):
        load_split(store_path, torch.device("cpu"))


# ---------------------------------------------------------------- stage 2 on a dense store


def class_features(lengths: dict[str, int], rate: float, segments, dim: int, seed: int) -> dict[str, np.ndarray]:
    """Per video [T, dim] noise, with each segment's verb and noun marked where it lies."""
    rng = np.random.default_rng(seed)
    out = {}
    for vid, n in lengths.items():
        x = rng.normal(size=(n, dim)).astype(np.float32)
        t = (np.arange(n) + 0.5) / rate
        for v, a, b, verb, noun in segments:
            if v == vid:
                inside = (t >= a - 0.2) & (t <= b + 0.2)
                x[inside, verb] += 2.0
                x[inside, V + noun] += 2.0
        out[vid] = x
    return out


def test_stage2_on_a_dense_store_equals_the_per_segment_cache_at_those_positions(tmp_path):
    """A head trained and validated on dense stores gives the metrics of the same head on
    per-segment caches holding exactly the positions the stores' gather picks."""
    rng = np.random.default_rng(0)
    rate, lengths = 4.0, {"P01_01": 400, "P02_01": 400, "P03_01": 400}

    def segs(vids, n):  # one after another in each video, 1-3 s long, 0.5-1 s apart
        out, at = [], dict.fromkeys(vids, 0.5)
        for i in range(n):
            vid = vids[i % len(vids)]
            a = at[vid]
            b = a + float(rng.uniform(1, 3))
            at[vid] = b + float(rng.uniform(0.5, 1))
            out.append((vid, round(a, 2), round(b, 2), i % V, (i * 7) % N))
        return out

    train, val = segs(["P01_01", "P02_01"], 48), segs(["P03_01"], 24)
    ann = annotations(tmp_path / "ann", train, val)
    dim = 16
    paths = {}
    for split_name, rows in (("train", train), ("validation", val)):
        src = tmp_path / f"src-{split_name}"
        src.mkdir()
        for vid, x in class_features(lengths, rate, rows, dim, seed=len(rows)).items():
            np.save(src / f"{vid}.npy", x)
        out = tmp_path / f"{split_name}.dense.h5"
        import_features("npy-dir", src, ann, split_name, out, "cls", rate=rate)
        paths[split_name] = out
        # the per-segment cache of the same positions: the gathered features, copied
        s = load_split(out, torch.device("cpu"))
        feats = s.per_segment().numpy()  # [S, 1, K, D] float16
        n = len(s.narration_id)
        per = tmp_path / f"{split_name}.h5"
        attrs = {k: v for k, v in s.attrs.items()}
        for key in ("kind", "dense_rate", "dense_times", "dense_span", "dense_gather", "dense_max_gap"):
            attrs.pop(key)
        rows_ = store.Rows(s.narration_id, s.video_id, s.verbs.numpy(), s.nouns.numpy(), np.arange(n))
        store.create(per, attrs, rows_, 1, s.k, dim)
        w = store.Writer(per)
        w.write([(i, feats[i], np.arange(s.k)) for i in range(n)], [])
        w.close()
    best = {}
    for kind, tr, va in (
        ("dense", paths["train"], paths["validation"]),
        ("cache", tmp_path / "train.h5", tmp_path / "validation.h5"),
    ):
        r = CliRunner().invoke(
            app,
            ["train-head", "pooling", "--train-features", str(tr), "--val-features", str(va), "--name", kind,
             "--runs", str(tmp_path / "runs"), "--epochs", "6", "--lr", "3e-3", "--device", "cpu",
             "--annotations", str(ann)],
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        lines = (tmp_path / "runs" / kind / "metrics.jsonl").read_text().splitlines()
        best[kind] = [{k: v for k, v in json.loads(x).items() if k.startswith("val_")} for x in lines]
    assert best["dense"] == best["cache"]
    assert max(m["val_verb_top1"] for m in best["dense"]) > 100 / V  # learnt something: the test can fail
    config = (tmp_path / "runs" / "dense" / "config.toml").read_text()
    assert "largest gap" in config and "dense store" in config  # the rule and the gap, kept with the run


# ---------------------------------------------------------------- extraction


CLIP = "epic55_wall_04x04_h264_720p60.mp4"


@pytest.mark.slow
def test_a_dense_store_of_a_real_clip_equals_per_segment_extraction_at_its_frames(clips, tmp_path):
    """The 720p60 clip at 2 positions per second (20 in 10 s, rows of 4) against a per-segment
    cache whose segments are the store's runs: every position within cosine 0.999; then the
    store's shards merge into the single-process store, and a dense store resumes."""
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "P90_01.mp4").symlink_to(clips / CLIP)
    runs = [("P90_01", 2.0 * c, 2.0 * (c + 1), c % V, c % N) for c in range(5)]
    ann = annotations(tmp_path / "ann", runs)
    common = dict(backbone="resnet50", split="train", frames=4, workers=1, precision="fp32", weights="none")
    warn = lambda m: None  # noqa: E731
    per = extract(ExtractConfig(**common), ann, videos, tmp_path / "seg", warn=warn)
    d = extract(ExtractConfig(**common, dense="2"), ann, videos, tmp_path / "dense", warn=warn)
    assert d.path.name == "train.dense-2fps.h5" and (d.done, d.failed) == (5, 0)
    a, b = open_cache(per.path), open_cache(d.path)
    assert b.dense and np.allclose(b.time.reshape(-1), (np.arange(20) + 0.5) / 2)
    assert (a.frame_index == b.frame_index).all()  # the same frames were read
    c = cosine(a.features().reshape(-1, 2048), b.features().reshape(-1, 2048))
    assert c.min() >= 0.999, c
    assert tools.verify(d.path) == ([], [])
    # shards 0/2 and 1/2 (one video: one shard is empty of it, so two videos here)
    (videos / "P91_01.mp4").symlink_to(clips / CLIP)
    two = annotations(tmp_path / "ann2", [*runs, ("P91_01", 0.5, 1.5, 0, 0)])
    shards = [
        extract(ExtractConfig(**common, dense="2", shard=(i, 2)), two, videos, tmp_path / "sh", warn=warn).path
        for i in range(2)
    ]
    merged = tmp_path / "merged.h5"
    tools.merge(merged, shards)
    whole = extract(ExtractConfig(**common, dense="2"), two, videos, tmp_path / "whole", warn=warn)
    m, w = open_cache(merged), open_cache(whole.path)
    assert m.narration_id == w.narration_id and np.array_equal(m.time, w.time, equal_nan=True)
    assert np.array_equal(m.features(), w.features())
    assert tools.verify(merged)[0] == []
    again = extract(ExtractConfig(**common, dense="2"), two, videos, tmp_path / "whole", warn=warn)
    assert again.processed == 0 and again.done == len(w.narration_id)  # resumed: nothing left to do


def test_dense_extraction_refuses_missing_videos_and_the_frames_source(synth_data, tmp_path):
    ann = synth_data / "annotations"
    videos = tmp_path / "videos"
    videos.mkdir()
    cfg = ExtractConfig(backbone="resnet50", weights="none", dense="4", workers=0)
    with pytest.raises(EkxError, match=r"videos of the split are not under .*plans each video from its length"):
        extract_many(cfg, ann, videos, tmp_path / "f", warn=lambda m: None)
    r = CliRunner().invoke(app, ["extract", "--dense", "fast", "--annotations", str(ann), "--videos", str(videos)])
    assert r.exit_code == 1 and "--dense 'fast'" in r.output


def test_dense_stores_of_other_rates_fuse_by_time(tmp_path):
    """Two stores whose features are their times, at 4 and 3 positions per second, joined with
    `+`: each segment's position p holds, side by side, each store's dense time nearest the
    same sampled time - the parts align by time, whatever their grids."""
    segs = [("P01_01", 1.0, 3.3, 1, 2), ("P01_01", 6.0, 6.9, 0, 1)]
    a, _ = time_store(tmp_path / "a", {"P01_01": 40}, 4.0, segs, "a")
    b, _ = time_store(tmp_path / "b", {"P01_01": 30}, 3.0, segs, "b")
    f = load_split(Path(f"{a}+{b}"), torch.device("cpu"))
    assert f.feats.shape == (2, 1, 16, 16) and f.identity()["fusion"] == "imported:a+imported:b"
    for i, (_, start, stop, _, _) in enumerate(segs):
        want = centre_times(start, stop, 16)
        got_a, got_b = f.feats[i, 0, :, 0].float().numpy(), f.feats[i, 0, :, 8].float().numpy()
        assert np.abs(got_a - want).max() <= 0.125 + 2e-3 and np.abs(got_b - want).max() <= 1 / 6 + 2e-3
        assert not np.allclose(got_a, got_b)  # two grids, each read on its own
