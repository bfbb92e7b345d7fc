"""Memory (issue 35): full-size frames are read without decord's unbounded read-ahead, and
dense stores fused on one grid are held once (the context head's streams are views of
the fused tensor). The peaks themselves: bench/memory_bench.py."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_dense import annotations

from ekx.cache.imports import import_features
from ekx.extract import sources, video
from ekx.heads import context
from ekx.heads.data import feature_stats, load_split, make_batch

CLIP_1080 = "epic55_wall_04x04_zoom2_h264_1080p50.mp4"


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.fail("no VmRSS in /proc/self/status")


@pytest.mark.parametrize("name", [CLIP_1080, "epic100_visor_cut_0.mp4", "imageio_cockatoo.mp4"])
def test_full_size_frames_are_decords_own_bit_for_bit(clips, name):
    """The decord source's full-size reader (``--resize torchvision``) is PyAV's, and its
    frames are decord's exactly - read forward, across keyframes (seeks) and backwards."""
    import decord

    path = clips / name
    reader = sources.get("decord").open(path, None)
    assert isinstance(reader.forward, video.AVForwardReader)
    k = int(reader.forward.keys[1]) if len(reader.forward.keys) > 1 else reader.num_frames // 2
    wanted = [np.array([0, 3, k + 4]), np.array([k + 6, k + 9]), np.array([5, 6])]  # past a keyframe; back
    ref = decord.VideoReader(str(path), num_threads=1)
    for idx in wanted:
        expect = np.stack([ref.get_batch([int(i)]).asnumpy()[0] for i in idx])
        got = reader.get(idx)
        assert got.dtype == np.uint8 and np.array_equal(got, expect), (name, idx)
    reader.close()


def test_full_size_reading_holds_no_frames_ahead(clips):
    """decord 0.6.0, after one full-size read, goes on decoding the rest of the video into
    memory (measured: +270 MB a second on the 1080p50 clip, up to all its 700 frames,
    4.3 GiB); the reader used now holds nothing once a read returns."""
    reader = sources.get("decord").open(clips / CLIP_1080, None)
    reader.get(np.arange(16))
    before = rss_mib()
    time.sleep(2.0)
    grew = rss_mib() - before
    reader.close()
    assert grew < 100, f"RSS grew {grew:.0f} MiB in 2 s after one read"


def store(root: Path, name: str, rate: float, dim: int, segs, seed: int) -> Path:
    """An imported dense store of random features over two videos (20 s and 12 s)."""
    src = root / f"src-{name}"
    src.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for vid, seconds in (("P01_01", 20), ("P02_01", 12)):
        np.save(src / f"{vid}.npy", rng.standard_normal((int(seconds * rate), dim)).astype(np.float32))
    out = root / f"{name}.h5"
    import_features("npy-dir", src, annotations(root / f"ann-{name}", segs), "train", out, name, rate=rate)
    return out


SEGS = [("P01_01", 1.0, 3.5, 0, 1), ("P02_01", 2.0, 2.4, 1, 2), ("P01_01", 12.0, 19.0, 2, 3), ("P02_01", 8, 11, 3, 0)]


def test_dense_stores_fused_on_one_grid_are_held_once(tmp_path):
    """Two stores at one rate over the same videos: the fused split is each position's
    features side by side, read through the index; every segment's features, batches,
    statistics and the context head's streams are what the parts give, and the streams
    are views of the fused tensor (no second copy of the input)."""
    a = store(tmp_path, "a", 4.0, 16, SEGS, 0)
    b = store(tmp_path, "b", 4.0, 8, SEGS, 1)
    cpu = torch.device("cpu")
    pa, pb = load_split(a, cpu), load_split(b, cpu)
    fused = load_split(Path(f"{a}+{b}"), cpu)
    expect = torch.cat([pa.per_segment(), pb.per_segment()], dim=-1)  # what the per-segment join held
    assert torch.equal(fused.per_segment(), expect)
    assert fused.index is not None and fused.feats.shape == (pa.feats.shape[0], 1, 24)
    assert fused.rows.tolist() == pa.rows.tolist() == [0, 1, 2, 3]
    assert fused.streams is not None and len(fused.streams) == 2
    base = fused.feats.untyped_storage().data_ptr()
    for s, p in zip(fused.streams, (pa, pb), strict=True):
        assert torch.equal(s.feats, p.feats)
        assert s.feats.untyped_storage().data_ptr() == base  # a view: one copy of the features
    idx, view = torch.tensor([0, 2, 3]), torch.zeros(3, 1, dtype=torch.long)
    pos = torch.tensor([[0, 5, 15]]).expand(3, -1)
    zero, one = torch.zeros(24), torch.ones(24)
    want = expect[idx[:, None], view, pos].float()
    assert torch.equal(make_batch(fused, idx, view, pos, zero, one, cpu), want)
    mean, std = feature_stats(fused)
    flat = expect[fused.rows].reshape(-1, 24).double()
    assert torch.allclose(mean.double(), flat.mean(0), atol=1e-5)
    assert torch.allclose(std.double(), flat.std(0, unbiased=False), atol=1e-4)
    x = context.windows(fused, idx, 4.0, None, view, zero, one, cpu)
    assert x.shape == (3, 2 * context.TOKENS + context.SEGMENT_TOKENS, 24 + context.EXTRA)


def test_dense_stores_on_other_grids_are_fused_per_segment(tmp_path):
    """Other rates: no common positions, so the fused split stays per segment (no index),
    the same features as before; the streams keep each store's own."""
    a = store(tmp_path, "a", 4.0, 16, SEGS, 0)
    b = store(tmp_path, "b", 2.0, 8, SEGS, 1)
    cpu = torch.device("cpu")
    pa, pb = load_split(a, cpu), load_split(b, cpu)
    fused = load_split(Path(f"{a}+{b}"), cpu)
    assert fused.index is None
    assert torch.equal(fused.feats, torch.cat([pa.per_segment(), pb.per_segment()], dim=-1))
    assert fused.streams is not None
    assert [torch.equal(s.feats, p.feats) for s, p in zip(fused.streams, (pa, pb), strict=True)] == [True, True]


def test_the_decoder_side_resize_frame_by_frame_is_the_batched_resize():
    """`FrameResize` resizes one frame at a time (the batched antialiased resize of 16 1080p
    frames held 390 MB of temporaries); the values are torchvision's batched call's."""
    from ekx.extract import backbones
    from ekx.extract.inputs import FrameResize

    frames = np.random.default_rng(0).integers(0, 256, (3, 270, 480, 3), dtype=np.uint8)
    pre = backbones.get("resnet50").preprocess
    want = pre.resize(torch.from_numpy(frames).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    got = FrameResize(pre)(frames)
    assert got.dtype == np.uint8 and got.flags.c_contiguous and np.array_equal(got, want)
