"""The cache contract: resume after SIGKILL, shards and merge, refusals, bad input, verify."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ekx import EkxError, epic
from ekx.cache import store, tools
from ekx.cache.reader import failures, open_cache
from ekx.cli import app
from ekx.extract import backbones
from ekx.extract.pipeline import ExtractConfig, extract, shard_videos

runner = CliRunner()
# one segment per backbone batch: results cannot depend on which segments shared a batch
BASE = {"split": "validation", "weights": "none", "frames": 4, "batch_size": 4, "workers": 1}


def run(data: Path, out: Path, **kw):
    cfg = ExtractConfig(**{**BASE, **kw}, out=out)
    return extract(cfg, data / "annotations", data / "videos", out.parent, warn=lambda m: None)


def cli_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "extract",
        "--annotations",
        str(data / "annotations"),
        "--videos",
        str(data / "videos"),
        "--split",
        "validation",
        "--weights",
        "none",
        "--frames",
        "4",
        "--batch-size",
        "4",
        "--workers",
        "1",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def reference(synth_data, tmp_path_factory) -> np.ndarray:
    """An uninterrupted single-process extraction of the validation split."""
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    assert run(synth_data, out).done == 6
    return open_cache(out).features()


def _done_count(path: Path) -> int:
    try:
        with h5py.File(path, "r") as f:
            return int((f["status"][...] == store.DONE).sum())
    except (OSError, KeyError):
        return 0


# `python -m ekx` with Ctrl-C's handling restored first: an ignored or blocked SIGINT in the
# test process is inherited across exec (then Python installs no KeyboardInterrupt handler),
# and in the full suite - not alone - the interrupted extraction ran on to 6/6, 3 times of 3
EKX_WITH_SIGINT = (
    "import runpy, signal, sys; signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
    "signal.signal(signal.SIGINT, signal.default_int_handler); sys.argv[0] = 'ekx'; "
    "runpy.run_module('ekx', run_name='__main__', alter_sys=True)"
)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_run_resumes_to_the_same_features(sig, synth_data, reference, tmp_path):
    env = dict(os.environ, HDF5_USE_FILE_LOCKING="FALSE")
    # the signal must land mid-run; on a loaded machine the 6 segments can all finish between
    # two polls (the file being written is unreadable for a moment): then start over, at most 3x
    for attempt in range(3):
        out, log = tmp_path / f"f{attempt}.h5", tmp_path / f"log{attempt}.txt"
        proc = subprocess.Popen(
            [sys.executable, "-c", EKX_WITH_SIGINT, *cli_args(synth_data, out)],
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 120
        while _done_count(out) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(sig)
        proc.wait(timeout=60)
        output = log.read_text()
        done = _done_count(out)
        if done < 6:
            break
    here = (signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, []))
    assert 2 <= done < 6, f"the kill should land mid-run (done={done}, 3 attempts; SIGINT here: {here}): {output}"
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "interrupted" in output and "Traceback" not in output
    summary = run(synth_data, out)
    assert summary.processed == 6 - done and summary.done == 6
    np.testing.assert_array_equal(open_cache(out).features(), reference)


@pytest.mark.slow
def test_shards_merge_to_the_single_process_cache(synth_data, reference, tmp_path):
    shards = [tmp_path / f"s{i}.h5" for i in range(2)]
    ann = epic.Annotations(synth_data / "annotations").segments("train")
    groups = shard_videos(ann, 2)
    assert set().union(*groups) == {s.video_id for s in ann} and not groups[0] & groups[1]
    # validation is one video: shard over train instead, with a few rows each
    for i, p in enumerate(shards):
        assert run(synth_data, p, split="train", shard=(i, 2), limit=8).done > 0
    single = tmp_path / "single.h5"
    run(synth_data, single, split="train", limit=8)
    merged = tmp_path / "merged.h5"
    result = runner.invoke(app, ["cache", "merge", str(merged), *map(str, shards)])
    assert result.exit_code == 0, result.output
    a, b = open_cache(merged), open_cache(single)
    assert a.narration_id == b.narration_id and (a.status == store.DONE).all()
    assert (a.frame_index == b.frame_index).all() and (a.verb_class == b.verb_class).all()
    np.testing.assert_array_equal(a.features(), b.features())
    # overlapping shards and shards of another extraction are refused
    with pytest.raises(EkxError, match=r"shard 0/2 given twice"):
        tools.merge(tmp_path / "m2.h5", [shards[0], shards[0]])
    with pytest.raises(EkxError, match=r"shard\(s\) 1/2 missing .*\.shard1of2\.h5"):
        tools.merge(tmp_path / "m4.h5", [shards[0]])
    assert not (tmp_path / "m4.h5").exists()
    other = tmp_path / "other.h5"
    run(synth_data, other, split="train", shard=(1, 2), frames=2, limit=8)
    with pytest.raises(EkxError, match=r"frames_per_segment"):
        tools.merge(tmp_path / "m3.h5", [shards[0], other])


@pytest.mark.slow
def test_mismatched_parameters_are_refused(synth_data, tmp_path):
    out = tmp_path / "f.h5"
    run(synth_data, out, limit=1)
    with pytest.raises(EkxError, match=r"other parameters \(frames_per_segment: file has 4, asked for 2"):
        run(synth_data, out, limit=1, frames=2)
    with pytest.raises(EkxError, match=r"different list of segments"):
        run(synth_data, out, limit=2)
    assert open_cache(out).counts()["done"] == 1


def _bad_dataset(synth_data: Path, tmp: Path) -> Path:
    """P04_01 real; P05 corrupt bytes; P06 truncated; P07 missing; one P04 segment beyond the end."""
    videos, ann = tmp / "videos", tmp / "annotations"
    videos.mkdir()
    ann.mkdir()
    good = epic.index_videos(synth_data / "videos")["P04_01"]
    (videos / "P04_01.mp4").symlink_to(good)
    (videos / "P05_01.mp4").write_bytes(np.random.default_rng(0).bytes(50_000))
    data = good.read_bytes()
    (videos / "P06_01.mp4").write_bytes(data[: len(data) // 2])
    for name in (epic.VERB_CLASSES, epic.NOUN_CLASSES):
        (ann / name).write_bytes((synth_data / "annotations" / name).read_bytes())
    with open(synth_data / "annotations" / epic.SPLIT_FILES["validation"]) as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:4]
    extra = []
    for vid in ("P05_01", "P06_01", "P07_01"):
        r = list(body[0])
        r[0], r[2] = f"{vid}_0", vid
        extra.append(r)
    beyond = list(body[1])
    beyond[0], beyond[4], beyond[5] = "P04_01_99", "01:00:00.00", "01:00:02.00"
    with open(ann / epic.SPLIT_FILES["validation"], "w", newline="") as fh:
        csv.writer(fh).writerows([header, *body, *extra, beyond])
    return tmp


@pytest.mark.slow
def test_bad_videos_fail_their_segments_and_the_run_goes_on(synth_data, tmp_path):
    data = _bad_dataset(synth_data, tmp_path)
    out = tmp_path / "f.h5"
    result = runner.invoke(app, cli_args(data, out))
    output = " ".join(result.output.split())  # undo rich's line wrapping
    assert result.exit_code == 1
    assert "4 segments failed" in output and "--skip-errors" in output
    assert "1 of 4 videos not found" in output
    reasons = dict(failures(out))
    assert set(reasons) == {"P05_01_0", "P06_01_0", "P07_01_0", "P04_01_99"}
    assert "cannot open video P05_01.mp4" in reasons["P05_01_0"]
    assert "cannot open video P06_01.mp4" in reasons["P06_01_0"]
    assert reasons["P07_01_0"] == "video P07_01 not found"
    assert "beyond the video's end" in reasons["P04_01_99"]
    assert open_cache(out).counts() == {"pending": 0, "done": 3, "failed": 4}
    again = runner.invoke(app, cli_args(data, out, "--skip-errors"))
    assert again.exit_code == 0, again.output


@pytest.mark.slow
def test_disk_full_is_a_clear_error_and_the_cache_resumes(synth_data, tmp_path, monkeypatch):
    out = tmp_path / "f.h5"
    real_write, calls = store.Writer.write, []

    def write(self, done, failed):
        calls.append(len(done))
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        real_write(self, done[:1], failed)

    monkeypatch.setattr(store.Writer, "write", write)
    with pytest.raises(EkxError, match=r"disk full while writing .*re-run the same command to resume"):
        run(synth_data, out)
    monkeypatch.setattr(store.Writer, "write", real_write)
    assert open_cache(out).counts()["done"] == 1
    assert run(synth_data, out).done == 6


def test_default_weights_come_from_the_torch_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    bb = backbones.get("resnet50")
    enum = bb.weights.DEFAULT
    torch.manual_seed(1)
    state = backbones.get("resnet50").build().state_dict()
    state["fc.weight"] = torch.zeros(1000, 2048)  # a full checkpoint: the classifier is dropped
    cached = tmp_path / "hub" / "checkpoints" / Path(enum.url).name
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    model, ident = backbones.load_weights(bb, "DEFAULT")
    assert ident == "torchvision:ResNet50_Weights.IMAGENET1K_V2"
    assert torch.equal(model.state_dict()["conv1.weight"], state["conv1.weight"])


def test_a_weights_file_fills_the_model_without_its_random_init(tmp_path):
    """The model is built on the meta device and given the file's tensors (a float16 file's
    cast to the model's float32, as a copy into built parameters would be); a model with a
    tensor no state dict holds (a non-persistent buffer) is built for real. Either way it
    equals the built model with the file loaded."""
    import dataclasses

    torch.manual_seed(3)
    bb = backbones.get("resnet50")
    ref = bb.build().eval()
    path = tmp_path / "w.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in ref.state_dict().items()}, path)
    assert all(p.is_meta for p in backbones._shell(bb).parameters())
    model, _ = backbones.load_weights(bb, str(path))
    got, want = model.state_dict(), ref.state_dict()
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k].half().to(want[k].dtype)) for k in want)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=0.05, rtol=0.05)

    class WithBuffer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)

        def forward(self, x):
            return self.lin(x) * self.scale

    odd = dataclasses.replace(bb, name="odd", build=WithBuffer, weights=None)
    torch.save(WithBuffer().state_dict(), path)
    model, _ = backbones.load_weights(odd, str(path))
    assert torch.equal(model.scale, torch.full((4,), 2.0))
    assert torch.equal(model.lin.weight, torch.load(path)["lin.weight"])


def test_batchnorm_folds_in_place_to_the_bits_of_torch_fx_fuse():
    """The BatchNorms go (folded where they lie, no copy of the model) and the features are
    bit for bit those of torch.fx's `fuse`; a convolution whose output also feeds something
    else keeps its BatchNorm."""
    import copy

    from torch.fx.experimental.optimization import fuse

    torch.manual_seed(0)
    model = backbones.get("resnet50").build().eval()
    for m in model.modules():  # statistics other than 0/1, so a missed fold would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = fuse(copy.deepcopy(model))(x)
        weight = model.conv1.weight
        folded = backbones.fuse_for_inference(model)
        assert folded is model and folded.conv1.weight is weight  # in place
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        assert torch.equal(folded(x), want)

    class Branch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    branch = Branch().eval()
    assert isinstance(backbones.fuse_for_inference(branch).bn, torch.nn.BatchNorm2d)


def test_offline_without_cached_weights_names_both_ways_out(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(EkxError) as e:
        backbones.load_weights(backbones.get("efficientnet_b3"), "DEFAULT")
    msg = str(e.value)
    assert "network unreachable" in msg and str(tmp_path / "hub" / "checkpoints") in msg
    assert "--weights PATH" in msg and "--weights none" in msg


def _fake_cache(path: Path, feats: np.ndarray) -> Path:
    n = len(feats)
    rows = store.Rows([f"x_{i}" for i in range(n)], ["x"] * n, np.zeros(n), np.zeros(n), np.arange(n))
    attrs = {"format": store.FORMAT, "format_version": 1, "views": 1, "frames_per_segment": 2, "feature_dim": 8}
    store.create(path, attrs, rows, 1, 2, 8)
    w = store.Writer(path)
    w.write([(i, feats[i], np.arange(2)) for i in range(n)], [])
    w.close()
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("zero", "all features are zero"),
        ("constant", "constant across segments"),
        ("overflow", "overflowed float16"),
        ("nan", "contain NaN"),
        ("one_zero", "1 of 5 done segments are all zeros"),
        ("f16_limit", "at the float16 limit"),
    ],
)
def test_verify_flags_degenerate_features(kind, message, tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(5, 1, 2, 8)).astype(np.float32)
    assert tools.verify(_fake_cache(tmp_path / "ok.h5", feats.astype(np.float16)))[0] == []
    bad = {
        "zero": np.zeros_like(feats),
        "constant": np.broadcast_to(feats[:1] + 38, feats.shape),
        "overflow": feats * 1e5,
        "nan": np.where(np.arange(8) == 3, np.nan, feats),
        "one_zero": np.where(np.arange(5)[:, None, None, None] == 2, 0.0, feats),
        "f16_limit": np.where(np.arange(8) == 3, 65504.0, feats),
    }[kind]
    path = _fake_cache(tmp_path / "bad.h5", bad.astype(np.float16))
    problems, _ = tools.verify(path)
    assert any(message in p for p in problems), problems
    result = runner.invoke(app, ["cache", "verify", str(path)])
    assert result.exit_code == 1 and message in result.output


@pytest.mark.slow
def test_verify_checks_the_annotation_hash_and_pending_rows(synth_data, tmp_path):
    out = tmp_path / "f.h5"
    run(synth_data, out, limit=2)
    ann = synth_data / "annotations"
    assert tools.verify(out, ann / "EPIC_100_validation.csv")[0] == []
    problems, _ = tools.verify(out, ann / "EPIC_100_train.csv")
    assert any("not the annotation file" in p for p in problems)
    with h5py.File(out, "r+") as f:
        f["status"][1] = store.PENDING
    assert any("1 of 2 segments still pending" in p for p in tools.verify(out)[0])
    info = runner.invoke(app, ["cache", "info", str(out)], terminal_width=200)
    assert info.exit_code == 0 and "done 1, failed 0, pending 1" in info.output


@pytest.mark.slow
def test_reader_bulk_and_memory_map_agree(synth_data, tmp_path):
    out = tmp_path / "f.h5"
    run(synth_data, out, limit=3)
    c = open_cache(out)
    mm = c.features(mmap=True)
    assert isinstance(mm, np.memmap)
    np.testing.assert_array_equal(np.asarray(mm), c.features())


def test_preprocessing_follows_the_weights_actually_loaded(synth_data, tmp_path, monkeypatch):
    """--weights IMAGENET1K_V1 gets V1's transforms (resize 256), not DEFAULT's (V2: 232)."""
    bb = backbones.get("resnet50")
    assert bb.preprocess.resize_size == (232,)
    assert backbones.with_weights(bb, "IMAGENET1K_V1").preprocess.resize_size == (256,)
    assert backbones.with_weights(bb, "torchvision:ResNet50_Weights.IMAGENET1K_V1").preprocess.resize_size == (256,)
    for same in ("DEFAULT", "none", "IMAGENET1K_V2", str(tmp_path / "x.pt")):
        assert backbones.with_weights(bb, same).preprocess.resize_size == (232,), same
    # end to end: a cache extracted with V1 weights (placed in the torch cache) records V1's resize
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    enum = bb.weights["IMAGENET1K_V1"]
    cached = tmp_path / "hub" / "checkpoints" / Path(enum.url).name
    cached.parent.mkdir(parents=True)
    torch.manual_seed(1)
    torch.save(bb.build().state_dict(), cached)
    s = run(synth_data, tmp_path / "v1.h5", weights="IMAGENET1K_V1", limit=1)
    attrs = open_cache(s.path).attrs
    assert attrs["weights"] == "torchvision:ResNet50_Weights.IMAGENET1K_V1"
    assert list(attrs["preprocess_resize_size"]) == [256]


def test_disk_full_at_creation_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """A cache the disk cannot hold is refused before HDF5 starts (needed vs free), and a
    creation that fails part-way removes its .creating file."""
    import shutil
    from collections import namedtuple

    from conftest import make_cache

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 300_000, 300_000))
    with pytest.raises(EkxError, match=r"train\.h5: a new cache needs .* MiB, .* has 0\.3 MiB free"):
        make_cache(tmp_path / "train.h5", n=64)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    def no_space(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "_early_dcpl", no_space)
    with pytest.raises(EkxError, match="disk full while creating"):
        make_cache(tmp_path / "train.h5", n=64)
    assert list(tmp_path.iterdir()) == []


def test_merge_refuses_a_missing_shard_or_an_incomplete_plan(tmp_path):
    """Shards i/N must cover 0..N-1 and their plan_index rows 0..M-1: nothing smaller merges."""
    from conftest import make_cache

    from ekx.cache import checksum

    def shard(name, i, n, rows, plan):
        path = make_cache(tmp_path / name, n=rows, seed=i)
        with h5py.File(path, "r+") as f:
            f.attrs["shard"] = f"{i}/{n}"
            f["plan_index"][...] = plan
            ids = [f"P01_01_{p}" for p in plan]  # distinct segments per shard
            f["narration_id"][...] = np.array(ids, dtype=f["narration_id"].dtype)
            meta = checksum.RowMeta.read(f)  # rows as this shard's writer would have sealed them
            f[checksum.DATASET][...] = [checksum.row_crc(f["features"][r], r, meta) for r in range(rows)]
        return path

    a = shard("train.shard0of3.h5", 0, 3, 4, [0, 2, 4, 6])
    b = shard("train.shard1of3.h5", 1, 3, 4, [1, 3, 5, 7])
    with pytest.raises(EkxError, match=r"shard\(s\) 2/3 missing \(e.g. train.shard2of3.h5"):
        tools.merge(tmp_path / "m.h5", [a, b])
    c = shard("train.shard2of3.h5", 2, 3, 2, [8, 10])  # plan row 9 is in no shard
    with pytest.raises(EkxError, match=r"first missing plan row: 9"):
        tools.merge(tmp_path / "m.h5", [a, b, c])
    c = shard("train.shard2of3.h5", 2, 3, 2, [8, 9])
    assert tools.merge(tmp_path / "m.h5", [a, b, c])["rows"] == 10
    assert open_cache(tmp_path / "m.h5").narration_id == [f"P01_01_{p}" for p in range(10)]


@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_runs_packed_and_equals_torchs(batch_first):
    """nn.MultiheadAttention self-attention in a prepared backbone (OpenCLIP's ViTs use it):
    the packed projection + scaled_dot_product_attention gives torch's outputs, in fp32 and
    under bf16 autocast; masked, cross- or weight-returning calls take torch's own forward."""
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(32, 4, batch_first=batch_first)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    net = Net().eval()
    x = torch.randn(3, 7, 32) if batch_first else torch.randn(7, 3, 32)
    with torch.inference_mode():
        want = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want_bf16 = net(x).float()
        mask = torch.zeros(7, 7, dtype=torch.bool)
        mask[0, 1:] = True
        masked = net.attn(x, x, x, attn_mask=mask, need_weights=False)[0]
        prepared = backbones.fuse_for_inference(net)
        assert prepared.attn.forward.__func__ is backbones._self_attention
        assert torch.allclose(prepared(x), want, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = prepared(x).float()
        assert torch.allclose(got, want_bf16, atol=3e-2) and not torch.allclose(got, want, atol=1e-6)
        assert torch.equal(prepared.attn(x, x, x, attn_mask=mask, need_weights=False)[0], masked)
        out, weights = prepared.attn(x, x, x)  # attention weights asked for: torch's forward
        assert weights is not None and torch.allclose(out, want, atol=1e-5)
