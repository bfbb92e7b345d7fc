"""`ekx import`: each published format read in its publisher's own convention (frame rate,
which instant a time means) and stored at ekx's (the centre of what a feature covers) -
each checked against the publisher's own code or rule on the same data - and bad inputs
refused naming the file or flag."""

from __future__ import annotations

import csv
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from test_dense import N, V, annotations, write_split
from typer.testing import CliRunner

from ekx import EkxError, api
from ekx.cache import identity, tools
from ekx.cache.imports import import_features
from ekx.cache.reader import open_cache
from ekx.cli import app
from ekx.extract.video import centre_times, frame_at
from ekx.heads.data import load_split

# ---------------------------------------------------------------- the layouts, as each tool writes them


def video_info(ann: Path, rows: dict[str, tuple[float, float]]) -> None:
    """EPIC_100_video_info.csv (video_id, duration, fps, resolution), as EPIC's annotations hold it."""
    with open(ann / "EPIC_100_video_info.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["video_id", "duration", "fps", "resolution"])
        for vid, (duration, fps) in rows.items():
            w.writerow([vid, duration, fps, "1920x1080"])


def video_features_layout(out: Path, vids: dict[str, np.ndarray], fps: float = 30.0, key: str = "resnet") -> None:
    """A frame-wise model's save_numpy output (base_framewise_extractor + VideoLoader +
    make_path): <video>_<feature_type>.npy, <video>_fps.npy, and <video>_timestamps_ms.npy
    = (frame index) / fps * 1000."""
    out.mkdir(parents=True, exist_ok=True)
    for vid, x in vids.items():
        np.save(out / f"{vid}_{key}.npy", x)
        np.save(out / f"{vid}_fps.npy", np.array(fps))
        np.save(out / f"{vid}_timestamps_ms.npy", np.arange(len(x)) * 1000.0 / fps)


def rulstm_lmdb(out: Path, vids: dict[str, np.ndarray]) -> None:
    """RULSTM's FEATEXT: key = the frame's jpg name (<video>_frame_<10 digits>.jpg, 1-based)."""
    import lmdb

    env = lmdb.open(str(out), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for vid, x in vids.items():
            for i, row in enumerate(x):
                txn.put(f"{vid}_frame_{i + 1:010d}.jpg".encode(), row.astype(np.float32).tobytes())
    env.close()


def rulstm_frames(times: np.ndarray, fps: float = 30) -> np.ndarray:
    """RULSTM's own time -> key (RULSTM/dataset.py, SequenceDataset, fps=30):
    ``frames = np.floor(time_stamps*self.fps).astype(int)``, below 1 padded with the first."""
    frames = np.floor(times * fps).astype(int)
    if frames.max() >= 1:
        frames[frames < 1] = frames[frames >= 1].min()
    return frames


def i3d_reference(n_frames: int, fps: float, stack: int, step: int) -> tuple[list, list, list]:
    """video_features' ExtractI3D.extract loop on a video of n_frames: (timestamps_ms,
    rgb stacks' frame indices, flow stacks' frame indices). OpenCV's CAP_PROP_POS_MSEC after a
    read is the pts of the frame just read (its index / fps)."""
    timestamps_ms, rgb, flow = [], [], []
    rgb_stack: list[int] = []
    for idx in range(n_frames):  # while cap.isOpened(): frame_exists, rgb = cap.read()
        rgb_stack.append(idx)
        if len(rgb_stack) - 1 == stack:  # "- 1 is used because we need B+1 frames to calculate B frames"
            rgb.append(rgb_stack[:-1])  # stream_slice = rgb_stack[:-1]
            flow.append(list(rgb_stack))  # flow_xtr_model(rgb_stack[:-1], rgb_stack[1:])
            rgb_stack = rgb_stack[step:]
            timestamps_ms.append(idx / fps * 1000)  # cap.get(cv2.CAP_PROP_POS_MSEC)
    return timestamps_ms, rgb, flow


def form_slices(size: int, stack_size: int, step_size: int) -> list[tuple[int, int]]:
    """video_features' utils.form_slices (r21d, s3d): the frames [start, end) of each row."""
    slices = []
    full_stack_num = (size - stack_size) // step_size + 1
    for i in range(full_stack_num):
        start_idx = i * step_size
        end_idx = start_idx + stack_size
        slices.append((start_idx, end_idx))
    return slices


def covered_centre(frames, fps: float) -> float:
    """ekx's time of a feature over these frames: the centre of [first, last + 1) / fps."""
    return (min(frames) + max(frames) + 1) / 2 / fps


def stored(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per video (features [T, V, D] float32, times [T]) as the store holds them."""
    c = open_cache(path)
    f = c.features()
    out: dict[str, list] = {}
    for i, vid in enumerate(c.video_id):
        ok = np.isfinite(c.time[i])
        out.setdefault(vid, []).append((f[i][:, ok].transpose(1, 0, 2).astype(np.float32), c.time[i][ok]))
    return {v: (np.concatenate([a for a, _ in r]), np.concatenate([b for _, b in r])) for v, r in out.items()}


def ann_of(tmp_path: Path, segs) -> Path:
    return annotations(tmp_path / "ann", segs)


# ---------------------------------------------------------------- every format


@pytest.mark.parametrize("fmt", ["npy-dir", "video_features", "pickle", "lmdb", "tim", "actionformer"])
def test_each_import_format_round_trips(fmt, tmp_path):
    if fmt == "lmdb":
        pytest.importorskip("lmdb", reason="lmdb is not installed (pip install 'ekx[lmdb]')")
    rng = np.random.default_rng(1)
    vids = {
        "P01_01": rng.normal(size=(37, 12)).astype(np.float32),
        "P02_03": rng.normal(size=(5, 12)).astype(np.float32),
    }
    ann = ann_of(tmp_path, [("P01_01", 0.1, 0.5, 0, 0), ("P02_03", 0.0, 0.4, 1, 1)])
    src = tmp_path / "src"
    kw: dict = {}
    n = {v: np.arange(len(x)) for v, x in vids.items()}
    if fmt == "npy-dir":
        src.mkdir()
        for vid, x in vids.items():
            np.save(src / f"{vid}.npy", x)
        kw["rate"] = 8.0
        want_t = {v: (i + 0.5) / 8 for v, i in n.items()}
    elif fmt == "video_features":
        video_features_layout(src, vids)
        want_t = {v: (i + 0.5) / 30 for v, i in n.items()}  # frame i's centre
    elif fmt == "pickle":
        src = tmp_path / "feats.pkl"
        src.write_bytes(pickle.dumps({k: v for k, v in vids.items()}))
        kw["rate"] = 2.0
        want_t = {v: (i + 0.5) / 2 for v, i in n.items()}
    elif fmt == "lmdb":
        rulstm_lmdb(src, vids)  # no --fps: RULSTM's 30
        want_t = {v: (i + 1 + 0.5) / 30 for v, i in n.items()}  # key i + 1
    elif fmt == "tim":
        src.mkdir()
        with open(tmp_path / "times.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["narration_id", "video_id", "start_sec", "stop_sec", "narration_sec"])
            for vid, x in vids.items():
                np.save(src / f"{vid}.npy", x[:, None, :])
                for i in range(len(x)):
                    w.writerow([f"{vid}_{i + 1}", vid, f"{0.2 * i:.2f}", f"{0.2 * i + 0.2:.2f}", ""])
        kw["times"] = tmp_path / "times.csv"
        want_t = {v: 0.2 * i + 0.1 for v, i in n.items()}
    else:
        src.mkdir()
        for vid, x in vids.items():
            np.savez(src / f"{vid}.npz", feats=x)
        want_t = {v: (16 * i + 16) / 30 for v, i in n.items()}  # its EPIC config: 16, 32, 30 fps
    out = tmp_path / "store.h5"
    summary = import_features("npy-dir" if fmt == "video_features" else fmt, src, ann, "train", out, "x", **kw)
    assert summary == {"videos": 2, "vectors": 42, "rows": 3 + 1, "dim": 12}
    got = stored(out)
    for vid, x in vids.items():
        assert np.array_equal(got[vid][0][:, 0], x.astype(np.float16).astype(np.float32))
        assert np.allclose(got[vid][1], want_t[vid], rtol=0, atol=1e-9)
    a = open_cache(out).attrs
    assert a["kind"] == "dense" and a["source_sha256"].startswith("sha256:") and a["backbone"] == "imported:x"
    assert tools.verify(out) == ([], [])
    assert load_split(out, torch.device("cpu")).rows.tolist() == [0, 1]


# ---------------------------------------------------------------- RULSTM


def test_rulstm_features_are_read_at_30fps_as_its_loader_reads_them(tmp_path):
    """RULSTM numbered the frames of each video converted to 30 fps, whatever
    EPIC_100_video_info.csv says of the original (59.94 here): without --fps every segment
    gathers the keys RULSTM's own loader reads for its times, up to the video's last
    segment (none missing); the rate is in the identity."""
    pytest.importorskip("lmdb", reason="lmdb is not installed (pip install 'ekx[lmdb]')")
    duration = 40.0
    keys = np.arange(1, int(duration * 30) + 1)
    rng = np.random.default_rng(3)
    segs = []
    for i in range(12):
        a = float(rng.uniform(0.2, duration - 4))
        segs.append(("P01_01", round(a, 2), round(a + float(rng.uniform(0.4, 3.5)), 2), i % V, i % N))
    segs.append(("P01_01", 0.39, 4.58, 0, 0))
    segs.append(("P01_01", 36.5, 39.8, 1, 1))  # the video's end
    ann = ann_of(tmp_path, segs)
    video_info(ann, {"P01_01": (duration, 59.9400599400599)})
    src = tmp_path / "rgb"
    rulstm_lmdb(src, {"P01_01": np.repeat(keys[:, None], 4, axis=1).astype(np.float32)})  # value = its key
    out = tmp_path / "rulstm.h5"
    import_features("lmdb", src, ann, "train", out, "rulstm-tsn-rgb")
    got = api.segments(out)
    assert got.present.all()  # the last segments too
    for i, (_, a, b, _, _) in enumerate(segs):
        t = centre_times(a, b, 16)
        assert np.abs(t * 30 - np.round(t * 30)).min() > 1e-6  # no time on a tie between two keys
        want = rulstm_frames(t)
        assert got.features[i, 0, :, 0].tolist() == want.tolist(), (a, b)
    attrs = open_cache(out).attrs
    assert attrs["import_fps"] == "30" and "floor(t * fps)" in attrs["dense_times"]
    # --fps video: the old reading (EPIC_100_video_info.csv's 59.94) stretches the keys over
    # half the video, and the span check says so, naming the video, both spans and the flag
    with pytest.raises(EkxError, match=r"P01_01 span 20\.0 s .* gives the video 40\.0 s; check --fps"):
        import_features("lmdb", src, ann, "train", tmp_path / "other.h5", "x", fps="video")


# ---------------------------------------------------------------- video_features


@pytest.mark.parametrize("stream", ["rgb", "flow"])
def test_video_features_i3d_stacks_are_timed_at_their_centres(stream, tmp_path):
    """I3D's timestamps mark the end of each stack (OpenCV's position once the stack and one
    more frame are read): the store puts each stack at the centre of the frames it ran on
    (rgb: S frames, flow: S + 1), from video_features' own loop on the same video."""
    fps, stack, step, n_frames = 25.0, 16, 8, 230
    stamps, rgb, flow = i3d_reference(n_frames, fps, stack, step)
    stacks = rgb if stream == "rgb" else flow
    centres = np.array([covered_centre(f, fps) for f in stacks])
    src = tmp_path / "i3d"
    src.mkdir()
    np.save(src / f"P01_01_{stream}.npy", np.repeat(centres[:, None], 4, axis=1).astype(np.float32))
    np.save(src / "P01_01_fps.npy", np.array(fps))
    np.save(src / "P01_01_timestamps_ms.npy", np.array(stamps))
    ann = ann_of(tmp_path, [("P01_01", 1.0, 6.0, 0, 0)])
    out = tmp_path / "i3d.h5"
    import_features("npy-dir", src, ann, "train", out, "i3d", key=stream, stack_size=stack)
    _, t = stored(out)["P01_01"]
    assert np.allclose(t, centres, rtol=0, atol=1e-9)
    assert np.abs(np.array(stamps) / 1000 - centres).min() > 0.25  # the timestamps are not the centres
    attrs = open_cache(out).attrs
    assert (attrs["import_key"], attrs["import_stack_size"]) == (stream, stack)
    with pytest.raises(EkxError, match=r"give --stack-size.*i3d 64"):
        import_features("npy-dir", src, ann, "train", tmp_path / "a.h5", "i3d", key=stream)
    with pytest.raises(EkxError, match=r"a stack of about 16 frames, not --stack-size 64"):
        import_features("npy-dir", src, ann, "train", tmp_path / "b.h5", "i3d", key=stream, stack_size=64)
    with pytest.raises(EkxError, match=r"--step-size does not apply to video_features " + stream):
        import_features("npy-dir", src, ann, "train", tmp_path / "c.h5", "i3d", key=stream, stack_size=16, step_size=8)


def test_video_features_frames_are_the_frames_ekx_reads_at_each_time(tmp_path):
    """Frame-wise models (timestamp = the frame's start, index / fps) and raft (one flow per
    pair of frames, one timestamp per frame): each segment position gathers the frame ekx's
    own extraction shows at that time (`frame_at` on the frames' pts) - raft the flow across
    the frame boundary nearest that time."""
    fps, n = 30.0, 300
    pts = np.arange(n) / fps
    src = tmp_path / "vf"
    video_features_layout(src, {"P01_01": np.repeat(np.arange(n)[:, None], 3, axis=1).astype(np.float32)}, fps)
    flows = src.parent / "raft"
    flows.mkdir()
    np.save(flows / "P01_01_raft.npy", np.repeat(np.arange(n - 1)[:, None], 3, axis=1).astype(np.float32))
    np.save(flows / "P01_01_fps.npy", np.array(fps))
    np.save(flows / "P01_01_timestamps_ms.npy", pts * 1000)  # base_flow_extractor: every frame's
    segs = [("P01_01", 0.37, 2.11, 0, 0), ("P01_01", 3.01, 3.93, 1, 1), ("P01_01", 7.2, 9.55, 2, 2)]
    ann = ann_of(tmp_path, segs)
    for name, folder in (("resnet", src), ("raft", flows)):
        out = tmp_path / f"{name}.h5"
        import_features("npy-dir", folder, ann, "train", out, name)
        got = api.segments(out)
        for i, (_, a, b, _, _) in enumerate(segs):
            t = centre_times(a, b, 16)
            want = frame_at(pts, t)
            if name == "raft":  # in the first half of frame m: the flow (m - 1, m), else (m, m + 1)
                want = np.where(t * fps - want < 0.5, want - 1, want)
            assert np.abs(t * fps - np.round(t * fps * 2) / 2).min() > 1e-6  # no time on a tie
            assert got.features[i, 0, :, 0].tolist() == want.tolist(), (name, a, b)


def test_video_features_r21d_s3d_and_vggish_rows_are_timed_by_their_stacks(tmp_path):
    """No timestamps: r21d/s3d rows are form_slices' stacks at --fps (centre of each), vggish
    rows 0.96 s examples of 25 ms log-mel frames every 10 ms (centre of each example's audio)."""
    fps, stack, step, n_frames = 25.0, 16, 12, 400
    slices = form_slices(n_frames, stack, step)
    src = tmp_path / "vf"
    src.mkdir()
    np.save(src / "P01_01_r21d.npy", np.ones((len(slices), 5), np.float32))
    np.save(src / "P01_01_vggish.npy", np.ones((17, 128), np.float32))
    ann = ann_of(tmp_path, [("P01_01", 1.0, 6.0, 0, 0)])
    out = tmp_path / "r21d.h5"
    import_features("npy-dir", src, ann, "train", out, "r21d", key="r21d", stack_size=stack, step_size=step, fps=fps)
    want = np.array([covered_centre(range(a, b), fps) for a, b in slices])
    assert np.allclose(stored(out)["P01_01"][1], want, rtol=0, atol=1e-9)
    a = open_cache(out).attrs
    assert (a["import_stack_size"], a["import_step_size"], a["import_fps"]) == (stack, step, "25")
    out = tmp_path / "vggish.h5"
    import_features("npy-dir", src, ann, "train", out, "vggish", key="vggish")
    hop, win, examples = 0.010, 0.025, 96  # vggish_params: STFT hop/window, NUM_FRAMES
    want = np.array([(i * examples * hop + (i * examples + examples - 1) * hop + win) / 2 for i in range(17)])
    assert np.allclose(stored(out)["P01_01"][1], want, rtol=0, atol=1e-9)
    with pytest.raises(EkxError, match=r"video_features r21d: give --fps"):
        import_features("npy-dir", src, ann, "train", tmp_path / "a.h5", "x", key="r21d", stack_size=16)
    with pytest.raises(EkxError, match=r"video_features r21d: give --stack-size"):
        import_features("npy-dir", src, ann, "train", tmp_path / "a.h5", "x", key="r21d", fps=25.0)


def test_the_feature_type_read_is_in_the_identity(tmp_path):
    """--key: two feature types of one video_features folder are other features - a head
    trained on one is refused the other (was: trained on rgb, validated on flow, exit 0)."""
    segs = [("P01_01", 1.0 + i, 1.8 + i, i % V, i % N) for i in range(8)]
    ann = annotations(tmp_path / "ann", segs, segs)
    src = tmp_path / "vf"
    x = np.random.default_rng(0).normal(size=(400, 6)).astype(np.float32)
    video_features_layout(src, {"P01_01": x}, key="resnet")
    np.save(src / "P01_01_clip.npy", x[:, ::-1].copy())
    paths = {}
    for split, key in (("train", "resnet"), ("validation", "clip")):
        r = CliRunner().invoke(
            app, ["import", "npy-dir", str(src), "--key", key, "--name", "vf", "--split", split,
                  "--annotations", str(ann), "--features", str(tmp_path / "f")],
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        paths[split] = tmp_path / "f" / "imported:vf" / f"{split}.dense.h5"
    r = CliRunner().invoke(
        app, ["train-head", "pooling", "--train-features", str(paths["train"]), "--val-features",
              str(paths["validation"]), "--runs", str(tmp_path / "runs"), "--epochs", "1", "--device", "cpu"],
    )  # fmt: skip
    assert r.exit_code == 1 and "import_key: train cache 'resnet', validation cache 'clip'" in r.output
    # I3D's two streams, likewise
    ids = []
    for stream in ("rgb", "flow"):
        d = tmp_path / stream
        d.mkdir()
        stamps, _, _ = i3d_reference(200, 25.0, 16, 16)
        np.save(d / f"P01_01_{stream}.npy", np.ones((len(stamps), 4), np.float32))
        np.save(d / "P01_01_fps.npy", np.array(25.0))
        np.save(d / "P01_01_timestamps_ms.npy", np.array(stamps))
        import_features("npy-dir", d, ann, "train", tmp_path / f"{stream}.h5", "i3d", key=stream, stack_size=16)
        ids.append(identity.identity(open_cache(tmp_path / f"{stream}.h5").attrs))
    bad = identity.mismatch(ids[0], ids[1])
    assert any(b.startswith("import_key:") for b in bad) and any(b.startswith("dense_times:") for b in bad)


# ---------------------------------------------------------------- TIM


def tim_load_feats(rows: list[dict], v_id: str) -> np.ndarray:
    """TIM's datasets/sliding_window.load_feats for one video, without pandas: its rows
    sorted by start_sec, video_id and narration_sec dropped, [:, :2] = (start, stop)."""
    vid_times = sorted((r for r in rows if r["video_id"] == v_id), key=lambda r: float(r["start_sec"]))
    return np.array([[float(r["start_sec"]), float(r["stop_sec"])] for r in vid_times])


def test_tim_features_keep_their_views_at_their_interval_centres(tmp_path):
    """TIM's <split>/<video>.npy [N, views, D] (view 0 unaugmented) with its interval table
    (make_framepickle.py's CSV: 1.1 s every 0.2 s, rows in any order): row i is TIM's i-th
    interval, stored at its centre, every view kept."""
    rows = []
    for vid, n in (("P01_01", 60), ("P02_03", 25)):
        for i in range(n):
            a = 0.2 * i
            rows.append({"narration_id": f"{vid}_{i + 1}", "video_id": vid, "start_sec": f"{a:.2f}",
                         "stop_sec": f"{a + 1.1:.2f}", "narration_sec": f"{a + 0.55:.2f}"})  # fmt: skip
    np.random.default_rng(0).shuffle(rows)
    table = tmp_path / "EPIC_100_train_visual_feature_intervals.csv"
    with open(table, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    src = tmp_path / "train"
    src.mkdir()
    feats = {}
    for vid in ("P01_01", "P02_03"):
        t = tim_load_feats(rows, vid)
        # view v of row i: (TIM's interval start, stop, v)
        x = np.stack([np.stack([t[:, 0], t[:, 1], np.full(len(t), v)], 1) for v in range(4)], 1).astype(np.float32)
        np.save(src / f"{vid}.npy", x)
        feats[vid] = (x, t)
    ann = ann_of(tmp_path, [("P01_01", 2.0, 4.0, 0, 0), ("P02_03", 1.0, 2.0, 1, 1)])
    out = tmp_path / "tim.h5"
    import_features("tim", src, ann, "train", out, "omnivore", times=table)
    got = stored(out)
    for vid, (x, t) in feats.items():
        assert np.array_equal(got[vid][0], x.astype(np.float16).astype(np.float32))  # all 4 views
        assert np.allclose(got[vid][1], t.mean(1), rtol=0, atol=1e-9)
        assert np.allclose(got[vid][0][:, 0, :2], t, atol=0.01)  # each row at its own interval
    attrs = open_cache(out).attrs
    assert attrs["views"] == 4 and "view 0 unaugmented" in attrs["augmentation"]
    split = load_split(out, torch.device("cpu"))
    assert split.views == 4
    bad = tmp_path / "intervals.pkl"
    bad.write_bytes(pickle.dumps({"not": "a frame"}))
    with pytest.raises(EkxError, match=r"intervals.pkl: a pickle; .*to_csv"):
        import_features("tim", src, ann, "train", tmp_path / "x.h5", "x", times=bad)
    with open(table, "a") as fh:
        fh.write("P01_01_99,P01_01,30.00,31.10,30.55\n")
    with pytest.raises(EkxError, match=r"P01_01.npy: 60 feature rows, .* has 61 intervals for P01_01"):
        import_features("tim", src, ann, "train", tmp_path / "x.h5", "x", times=table)


# ---------------------------------------------------------------- ActionFormer


def test_actionformer_features_sit_where_its_loader_puts_them(tmp_path):
    """ActionFormer maps seconds to its feature grid as ``segments * fps / feat_stride -
    feat_offset`` (feat_offset = 0.5 * num_frames / feat_stride, datasets/epic_kitchens.py):
    every stored time maps back to its own row; defaults = its EPIC config (16, 32, 30 fps),
    or a YAML config's dataset section."""
    src = tmp_path / "af"
    src.mkdir()
    np.savez(src / "P01_01.npz", feats=np.ones((90, 8), np.float32))
    ann = ann_of(tmp_path, [("P01_01", 1.0, 6.0, 0, 0)])

    def grid(times, fps, feat_stride, num_frames):
        feat_offset = 0.5 * num_frames / feat_stride
        return times * fps / feat_stride - feat_offset

    out = tmp_path / "epic.h5"
    import_features("actionformer", src, ann, "train", out, "slowfast")
    t = stored(out)["P01_01"][1]
    assert np.allclose(grid(t, 30, 16, 32), np.arange(90), atol=1e-9)
    a = open_cache(out).attrs
    assert (a["import_stride"], a["import_num_frames"], a["import_fps"], a["import_key"]) == (16, 32, "30", "feats")
    cfg = tmp_path / "thumos.yaml"
    cfg.write_text("dataset_name: x\ndataset: {\n  feat_stride: 4,\n  num_frames: 16,\n  default_fps: 15,\n}\n")
    out = tmp_path / "cfg.h5"
    import_features("actionformer", src, ann, "train", out, "sf", config=cfg)
    assert np.allclose(grid(stored(out)["P01_01"][1], 15, 4, 16), np.arange(90), atol=1e-9)
    out = tmp_path / "flag.h5"
    import_features("actionformer", src, ann, "train", out, "sf", config=cfg, stride=8)  # a flag wins
    assert np.allclose(grid(stored(out)["P01_01"][1], 15, 8, 16), np.arange(90), atol=1e-9)
    cfg.write_text("dataset: {feat_stride: 16, num_frames: 32, default_fps: ~}\n")
    with pytest.raises(EkxError, match=r"default_fps is null\): give --fps"):
        import_features("actionformer", src, ann, "train", tmp_path / "x.h5", "sf", config=cfg)


# ---------------------------------------------------------------- refusals


def test_bad_sources_are_refused_naming_the_file(tmp_path):
    ann = ann_of(tmp_path, [("P01_01", 0.1, 0.5, 0, 0), ("P02_03", 0.0, 0.1, 1, 1)])
    src = tmp_path / "npy"
    src.mkdir()
    np.save(src / "P01_01.npy", np.ones((4, 3), np.float32))
    out = tmp_path / "s.h5"
    with pytest.raises(EkxError, match=r"1 of the 2 videos of EPIC_100_train.csv are not in the source \(P02_03\)"):
        import_features("npy-dir", src, ann, "train", out, "x", rate=1.0)
    np.save(src / "P02_03.npy", np.ones((4, 5), np.float32))
    with pytest.raises(EkxError, match=r"P02_03.npy: 5 values per feature, .*P01_01.npy 3"):
        import_features("npy-dir", src, ann, "train", out, "x", rate=1.0)
    bad = np.ones((4, 3), np.float32)
    bad[2, 1] = np.nan
    np.save(src / "P02_03.npy", bad)
    with pytest.raises(EkxError, match=r"P02_03.npy: 1 feature rows hold NaN.*row 2"):
        import_features("npy-dir", src, ann, "train", out, "x", rate=1.0)
    assert not out.exists() and not list(tmp_path.glob("*.importing*"))  # nothing half-written left
    np.save(src / "P02_03.npy", np.ones(4, np.float32))
    with pytest.raises(EkxError, match=r"P02_03.npy: an array of shape \(4,\)"):
        import_features("npy-dir", src, ann, "train", out, "x", rate=1.0)
    with pytest.raises(EkxError, match="give --rate"):
        import_features("npy-dir", src, ann, "train", out, "x")
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"P01_01": __import__("collections").Counter()}))
    with pytest.raises(EkxError, match=r"evil.pkl: not a pickle of a dict of arrays .*collections.Counter"):
        import_features("pickle", evil, ann, "train", out, "x", rate=1.0)
    r = CliRunner().invoke(app, ["import", "hdf9", str(src), "--annotations", str(ann)])
    assert r.exit_code == 1 and "choose npy-dir, pickle, lmdb, tim, actionformer" in r.output


def _huge_header_npy(path: Path) -> None:
    header = repr({"descr": "<f4", "fortran_order": False, "shape": (3, 2)}) + " " * 20000 + "\n"
    path.write_bytes(b"\x93NUMPY\x02\x00" + struct.pack("<I", len(header)) + header.encode() + bytes(24))


def test_unreadable_arrays_are_named_not_raised_as_library_errors(tmp_path):
    """An empty, huge-header, object or text .npy, a ragged pickle, a 0-byte LMDB value and
    an empty data.mdb: an EkxError naming the file (was: EOFError, ValueError, lmdb.Error)."""
    ann = ann_of(tmp_path, [("P01_01", 0.1, 0.5, 0, 0)])
    src = tmp_path / "npy"
    src.mkdir()
    arr = src / "P01_01.npy"
    cases = {
        "empty": lambda: arr.write_bytes(b""),
        "huge header": lambda: _huge_header_npy(arr),
        "object": lambda: np.save(arr, np.array([[1, "a"]], dtype=object), allow_pickle=True),
        "text": lambda: np.save(arr, np.array([["a", "b"]])),
    }
    for write in cases.values():
        write()
        with pytest.raises(EkxError, match=r"P01_01.npy: (not a readable .npy array|holds <U1 values)"):
            import_features("npy-dir", src, ann, "train", tmp_path / "s.h5", "x", rate=1.0)
    ragged = tmp_path / "ragged.pkl"
    ragged.write_bytes(pickle.dumps({"P01_01": [[1.0, 2.0], [3.0]]}))
    with pytest.raises(EkxError, match=r"ragged.pkl \['P01_01'\]: not one \[T, D\] array \(.*inhomogeneous"):
        import_features("pickle", ragged, ann, "train", tmp_path / "s.h5", "x", rate=1.0)
    pytest.importorskip("lmdb", reason="lmdb is not installed (pip install 'ekx[lmdb]')")
    zero = tmp_path / "zero"
    rulstm_lmdb(zero, {"P01_01": np.zeros((3, 0), np.float32)})
    with pytest.raises(EkxError, match=r"zero: P01_01_frame_0000000001.jpg holds 0 bytes"):
        import_features("lmdb", zero, ann, "train", tmp_path / "s.h5", "x")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "data.mdb").write_bytes(b"")
    with pytest.raises(EkxError, match=r"empty/data.mdb: not a readable LMDB store"):
        import_features("lmdb", empty, ann, "train", tmp_path / "s.h5", "x")
    nothing = tmp_path / "nothing"
    rulstm_lmdb(nothing, {})
    with pytest.raises(EkxError, match=r"nothing: the LMDB store is empty"):
        import_features("lmdb", nothing, ann, "train", tmp_path / "s.h5", "x")


def test_times_that_cannot_be_right_are_refused_naming_the_flag_or_file(tmp_path):
    """Refused before anything is written: infinite / zero / NaN rates and frame rates,
    flags a format does not take, a rate that stretches the features over twice the video
    (EPIC_100_video_info.csv's duration), a video_info frame rate of 0, and NaN, negative or
    non-increasing timestamps (one row was silently dropped)."""
    ann = ann_of(tmp_path, [("P01_01", 0.1, 0.5, 0, 0)])
    src = tmp_path / "npy"
    src.mkdir()
    np.save(src / "P01_01.npy", np.ones((120, 3), np.float32))  # 120 s of 1/s features
    base = ["import", "npy-dir", str(src), "--annotations", str(ann), "--features", str(tmp_path / "f")]
    for extra, said in (
        (["--rate", "inf"], "--rate inf"),
        (["--rate", "nan"], "--rate nan"),
        (["--rate", "0"], "--rate 0.0"),
        (["--key", "rgb", "--stack-size", "0"], "--stack-size 0"),
        (["--rate", "1", "--stride", "4"], "--stride does not apply to ekx import npy-dir"),
    ):
        r = CliRunner().invoke(app, [*base, *extra])
        assert r.exit_code == 1 and said in r.output, (extra, r.output)
    for fmt, extra, said in (
        ("lmdb", ["--fps", "inf"], "--fps inf"),
        ("lmdb", ["--fps", "0"], "--fps 0.0"),
        ("lmdb", ["--rate", "2"], "--rate does not apply to ekx import lmdb (it takes --fps)"),
    ):
        r = CliRunner().invoke(app, ["import", fmt, str(src), "--annotations", str(ann), *extra])
        assert r.exit_code == 1 and said in r.output, (extra, r.output)
    video_info(ann, {"P01_01": (121.3, 59.94)})
    import_features("npy-dir", src, ann, "train", tmp_path / "ok.h5", "x", rate=1.0)
    with pytest.raises(EkxError, match=r"P01_01.npy: 120 features of P01_01 span 240\.0 s .*121\.3 s; check --rate"):
        import_features("npy-dir", src, ann, "train", tmp_path / "s.h5", "x", rate=0.5)
    with pytest.raises(EkxError, match=r"span 60\.0 s .*121\.3 s; check --rate"):
        import_features("npy-dir", src, ann, "train", tmp_path / "s.h5", "x", rate=2.0)
    video_info(ann, {"P01_01": (121.3, 0)})
    af = tmp_path / "af"
    af.mkdir()
    np.savez(af / "P01_01.npz", feats=np.ones((10, 3), np.float32))
    with pytest.raises(EkxError, match=r"EPIC_100_video_info.csv:2: P01_01 has fps '0'; fix the file, or give --fps N"):
        import_features("actionformer", af, ann, "train", tmp_path / "s.h5", "x", fps="video")
    (ann / "EPIC_100_video_info.csv").unlink()
    vf = tmp_path / "vf"
    video_features_layout(vf, {"P01_01": np.ones((6, 3), np.float32)})
    stamps = vf / "P01_01_timestamps_ms.npy"
    for values, said in (
        ([0, 33, np.nan, 100, 133, 166], r"row 2 of P01_01 is at nan s \(not a number\)"),
        ([-66, -33, 0, 33, 66, 100], r"row 0 of P01_01 is at -0.0\d+ s \(negative\)"),
        ([0, 33, 66, 66, 133, 166], r"row 3 of P01_01 at 0.0\d+ s is not after row 2"),
        ([0, 33, 100, 66, 133, 166], r"row 3 of P01_01 at 0.0\d+ s is not after row 2"),
    ):
        np.save(stamps, np.array(values, np.float64))
        with pytest.raises(EkxError, match=r"P01_01_timestamps_ms.npy: " + said):
            import_features("npy-dir", vf, ann, "train", tmp_path / "s.h5", "x")
    assert not list(tmp_path.glob("s.h5*"))


# ---------------------------------------------------------------- the command


def test_the_import_command_writes_a_store_train_head_reads(tmp_path):
    segs = [("P01_01", 1.0 + i, 1.8 + i, i % V, i % N) for i in range(8)]
    ann = annotations(tmp_path / "ann", segs, segs)
    src = tmp_path / "npy"
    src.mkdir()
    np.save(src / "P01_01.npy", np.random.default_rng(0).normal(size=(60, 6)).astype(np.float32))
    r = CliRunner().invoke(
        app, ["import", "npy-dir", str(src), "--rate", "5", "--name", "mine", "--split", "train",
              "--annotations", str(ann), "--features", str(tmp_path / "f"), "--describe", "test vectors"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    path = tmp_path / "f" / "imported:mine" / "train.dense.h5"
    assert path.is_file() and open_cache(path).attrs["describe"] == "test vectors"
    r = CliRunner().invoke(
        app, ["train-head", "pooling", "--train-features", str(path), "--val-features", str(path),
              "--runs", str(tmp_path / "runs"), "--epochs", "1", "--device", "cpu", "--name", "r"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    ckpt = torch.load(tmp_path / "runs" / "r" / "best.pt", weights_only=True)
    assert ckpt["cache"]["kind"] == "dense" and ckpt["cache"]["backbone"] == "imported:mine"
    # the Python API reads the store per segment, as stage 2 does, and the run scores it
    other = write_split(tmp_path / "two.csv", segs[:2])
    got = api.segments(path, other)
    assert got.features.shape == (2, 1, 16, 6) and got.present.all() and got.verb_class.tolist() == [0, 1]
    assert got.attrs["annotation_file"] == "two.csv"
    verb, noun = api.load_run(tmp_path / "runs" / "r", device="cpu").predict(got.features)
    assert verb.shape == (2, V) and noun.shape == (2, N)
