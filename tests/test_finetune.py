"""`ekx finetune`: clip-consistent augmentation, warm start from a cached-feature head,
two-process DDP on CPU (gloo), and the fine-tuned backbone fed back to `ekx extract`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ekx.cache.store import sha256_file
from ekx.extract import backbones
from ekx.finetune.clips import clip_augmentation, clip_inputs
from ekx.finetune.config import FinetuneConfig
from ekx.finetune.model import VideoModel, frozen_modules

# where the backbone is not what a test is about (resume, DDP): timm's 0.4M-parameter test
# ResNet (BatchNorm, 160 px; 14x less compute than resnet50), so the test times the loop
TINY = "timm:test_resnet"


def _moving_clip(t=6, h=240, w=320) -> torch.Tensor:
    """uint8 [T, 3, H, W]: an asymmetric scene with a square that moves right frame by frame."""
    x = torch.zeros(t, 3, h, w, dtype=torch.uint8)
    x[:, 0] = torch.linspace(0, 255, w).to(torch.uint8)  # left-right asymmetric red ramp
    x[:, 2, : h // 3] = 200
    for i in range(t):
        x[i, 1, 100:140, 40 + 30 * i : 80 + 30 * i] = 255
    return x


def test_augmentation_draws_once_per_clip():
    aug = clip_augmentation(backbones.get("resnet50").preprocess)
    same = _moving_clip()[:1].expand(8, -1, -1, -1).contiguous()  # 8 identical frames
    outs = []
    for seed in range(12):
        torch.manual_seed(seed)
        y = aug(same)
        assert y.shape == (8, 3, 224, 224) and y.dtype == torch.float32
        for t in range(1, 8):  # per-frame draws would make these differ
            assert torch.equal(y[0], y[t]), seed
        outs.append(y[0])
    # ... and every clip draws its own: the 12 clips are all different
    assert len({o.sum().item() for o in outs}) == 12
    # a moving clip: frame i of the clip is what frame i alone gets with the same draws
    clip = _moving_clip()
    torch.manual_seed(5)
    whole = aug(clip)
    for i in (0, 3, 5):
        torch.manual_seed(5)
        alone = aug(clip[i : i + 1])
        assert torch.allclose(whole[i], alone[0], atol=1e-5)


def test_horizontal_flip_applies_to_the_whole_clip():
    from torchvision.transforms import v2

    clip = _moving_clip()
    flips = 0
    for seed in range(10):
        torch.manual_seed(seed)
        y = clip_inputs(
            clip.permute(0, 2, 3, 1).numpy(),
            6,
            backbones.get("resnet50"),
            torch.device("cpu"),
            v2.Compose([v2.CenterCrop(224), v2.RandomHorizontalFlip(0.5)]),
        )
        ramp = y[:, 0, 0, :].float()  # the red ramp rises left to right unless flipped
        rising = ramp[:, -1] > ramp[:, 0]
        assert rising.all() or (~rising).all()  # never some frames flipped and others not
        flips += int((~rising).all())
    assert 0 < flips < 10


def test_freeze_blocks_freezes_stem_and_first_stages_and_their_batchnorm():
    bb = backbones.get("resnet50")
    net = bb.build()
    head = torch.nn.Linear(2048, 2)
    frozen = frozen_modules(bb, net, 2)
    m = VideoModel(net, head, torch.zeros(2048), torch.ones(2048), frozen, train_bn=True)
    m.train()
    assert not any(p.requires_grad for p in net.layer2.parameters())
    assert not net.conv1.weight.requires_grad and not net.bn1.training and not net.layer1[0].bn1.training
    assert all(p.requires_grad for p in net.layer3.parameters()) and net.layer3[0].bn1.training
    m2 = VideoModel(bb.build(), head, torch.zeros(2048), torch.ones(2048), [], train_bn=False).train()
    assert not m2.backbone.layer4[0].bn1.training and m2.head.training  # default: statistics fixed
    with pytest.raises(Exception, match="stem and 4 stages"):
        frozen_modules(bb, net, 5)


def test_warm_start_refuses_another_resize(demo_workspace, tmp_path):
    """A head trained on --resize decoder features is not fine-tuned on torchvision-resized
    frames unasked: refused, naming the flag (before any video is decoded)."""
    from ekx import EkxError
    from ekx.finetune import run as ft

    workdir, _ = demo_workspace
    cfg = FinetuneConfig(
        head="lstm", init_head=str(workdir / "runs" / "lstm-demo"), resize="torchvision", limit=4, device="cpu"
    )
    with pytest.raises(EkxError, match="--resize decoder"):
        ft.main(cfg, workdir / "data" / "annotations", workdir / "data" / "videos", tmp_path / "runs", warn=print)
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.slow
def test_warm_start_begins_at_the_cached_heads_accuracy(demo_workspace, tmp_path):
    """A fine-tune started from the demo's lstm run scores, before its first step, what the
    head scores on the cache for the same segments (decoded video -> same backbone -> same
    standardisation), not chance; `ekx evaluate` then scores the run by decoding video."""
    from ekx import epic
    from ekx.finetune import run as ft
    from ekx.heads.evaluate import evaluate_run

    workdir, _ = demo_workspace
    ann = workdir / "data" / "annotations"
    n = 16
    cfg = FinetuneConfig(
        head="lstm",
        init_head=str(workdir / "runs" / "lstm-demo"),
        epochs=1,
        limit=n,
        batch_size=4,
        workers=1,
        name="warm",
        device="cpu",
    )
    run_dir, _best = ft.main(cfg, ann, workdir / "data" / "videos", tmp_path / "runs", warn=lambda m: None)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    cached = evaluate_run(workdir / "runs" / "lstm-demo", workdir / "features" / "resnet50" / "validation.h5")
    segs = epic.Annotations(ann).segments("validation")[:n]
    assert cached["narration_ids"][:n] == [s.narration_id for s in segs]
    yv = torch.tensor([s.verb_class for s in segs])
    yn = torch.tensor([s.noun_class for s in segs])
    head_verb = 100 * float((cached["verb"][:n].argmax(1) == yv).float().mean())
    head_noun = 100 * float((cached["noun"][:n].argmax(1) == yn).float().mean())
    assert abs(rows[0]["val_verb_top1"] - head_verb) <= 100 * 2 / n, (rows[0], head_verb)
    assert abs(rows[0]["val_noun_top1"] - head_noun) <= 100 * 2 / n, (rows[0], head_noun)
    assert rows[0]["val_verb_top1"] >= 12.5 + 30  # chance is 1 in 8 verbs
    # evaluate by decoding video: the same numbers as the run's own last evaluation
    sub = tmp_path / "sub.csv"
    with open(epic.Annotations(ann).split_path("validation")) as fh:
        lines = fh.read().splitlines()
    sub.write_text("\n".join(lines[: n + 1]) + "\n")
    res = ft.evaluate_video(run_dir, ann, workdir / "data" / "videos", str(sub), "cpu", "best.pt", workers=1)
    assert res["metrics"]["verb_top1"] == pytest.approx(rows[1]["val_verb_top1"])
    assert res["metrics"]["action_top1"] == pytest.approx(rows[1]["val_action_top1"])


@pytest.mark.slow
def test_torchrun_two_processes_then_extract_with_the_finetuned_backbone(synth_data, tmp_path):
    runs = tmp_path / "runs"
    common = ["--annotations", synth_data / "annotations", "--videos", synth_data / "videos"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "ekx",
        "finetune",
        "pooling",
        "--backbone",
        TINY,
        "--weights",
        "none",
        "--frames",
        "2",
        "--limit",
        "4",
        "--epochs",
        "1",
        "--batch-size",
        "1",
        "--workers",
        "0",
        "--lr",
        "1e-3",
        "--warmup-epochs",
        "0",
        "--device",
        "cpu",
        "--runs",
        runs,
        "--name",
        "ddp",
        *common,
    ]
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = runs / "ddp"
    assert sorted(p.name for p in runs.iterdir()) == ["ddp"]  # one run directory, both ranks in it
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.toml", "curves.png", "last.pt", "metrics.jsonl"]
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1  # rank 0 alone logs
    # 4 segments, 2 ranks, batch 1: each rank took 2 steps and saw its own half
    ckpt = torch.load(run / "best.pt", weights_only=True)
    assert "backbone" in ckpt and ckpt["config"]["frames"] == 2
    # the fine-tuned run read back where it runs in this process (the CLI's code, without three
    # more interpreters importing torch): evaluation by decoding video, predict, extract
    from typer.testing import CliRunner

    from ekx.cli import app

    def ekx(*args) -> str:
        r = CliRunner().invoke(app, [str(a) for a in args], terminal_width=200)
        assert r.exit_code == 0, r.output
        return r.output

    assert "verb_top1" in ekx("evaluate", run, "--device", "cpu", *common)
    video = sorted((synth_data / "videos").rglob("*.MP4"))[0]
    ekx("predict", video, "--run", run, "--device", "cpu", "--stride", "1", "--json", tmp_path / "p.json")
    assert len(json.loads((tmp_path / "p.json").read_text())["windows"]) > 3
    # closing the loop: extract with the fine-tuned weights, compare with the original backbone
    caches = {}
    for name, weights in (("orig", "none"), ("tuned", str(run / "best.pt"))):
        caches[name] = tmp_path / f"{name}.h5"
        extract = ["extract", "--backbone", TINY, "--split", "train", "--weights", weights, "--frames", "2"]
        ekx(*extract, "--limit", "4", "--workers", "0", "--device", "cpu", "--out", caches[name], *common)
    from ekx.cache.reader import open_cache

    orig, tuned = open_cache(caches["orig"]), open_cache(caches["tuned"])
    assert tuned.attrs["weights"] == f"sha256:{sha256_file(run / 'best.pt')}"
    assert tuned.attrs["weights_path"] == str((run / "best.pt").resolve())
    a, b = orig.features().astype(np.float32), tuned.features().astype(np.float32)
    assert a.shape == b.shape and not np.allclose(a, b, atol=1e-2)


@pytest.mark.slow
def test_finetune_resume_equals_uninterrupted(synth_data, tmp_path):
    """Killed after epoch 1 and resumed == run straight through (sampler, augmentation draws
    and model state all restored from last.pt)."""
    from ekx.finetune import run as ft

    def run(name, epochs, resume=False):
        cfg = FinetuneConfig(
            head="pooling",
            backbone=TINY,
            weights="none",
            frames=2,
            limit=4,
            epochs=epochs,
            batch_size=2,
            workers=0,
            lr=1e-3,
            warmup_epochs=0.0,
            device="cpu",
            name=name,
        )
        if resume:  # as `ekx finetune pooling --name part --resume --epochs 2`: the rest from the run
            cfg = FinetuneConfig(head="pooling", name=name, epochs=epochs)
        given = {"head", "name", "epochs"} if resume else None
        ann, videos = synth_data / "annotations", synth_data / "videos"
        return ft.main(cfg, ann, videos, tmp_path, resume, warn=lambda m: None, given=given)[0]

    full = run("full", 2)
    run("part", 1)
    part = run("part", 2, resume=True)
    a = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in b] == [1, 2]
    for ra, rb in zip(a, b, strict=False):
        for k in ("train_loss", "val_loss", "val_verb_top1", "val_noun_top5"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5), k
    sa, sb = (torch.load(p / "last.pt", weights_only=True) for p in (full, part))
    for k in sa["backbone"]:
        assert torch.allclose(sa["backbone"][k].float(), sb["backbone"][k].float(), atol=1e-6), k


@pytest.mark.slow
def test_clips_open_each_video_once_when_grouped_by_video(synth_data, monkeypatch):
    """Fine-tuning kept no reader: each sample re-opened its video (twice: probe, then at the
    decode size), and decord scans the whole file on every open. Grouped by video, a video
    opens once per worker; the frames are those stage 1 decodes."""
    import decord

    from ekx import epic
    from ekx.extract.sources import decode_video
    from ekx.extract.video import Request
    from ekx.finetune.clips import Clips, VideoChunks

    real = decord.VideoReader
    opened: list[str] = []

    def counting(path, *a, **k):
        opened.append(str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(decord, "VideoReader", counting)
    segs = epic.Annotations(synth_data / "annotations").segments("train")
    paths = epic.index_videos(synth_data / "videos")
    bb = backbones.get("resnet50")
    data = Clips(segs, paths, 2, bb)
    order = list(VideoChunks([s.video_id for s in segs], 4, seed=0))
    assert sorted(set(order)) == list(range(len(segs)))
    items = [data[i] for i in order]
    videos = {s.video_id for s in segs}
    assert len(order) == len(segs)  # one rank: no padding (it was padded to whole chunks)
    assert data.opens == len(videos)
    assert len(opened) <= 2 * len(videos) < len(segs)  # the old Clips: 2 per sample
    i, frames, err = items[0]
    ref = next(
        decode_video(
            paths[segs[i].video_id], [Request(i, segs[i].start, segs[i].stop)], 2, 1, bb.preprocess.decode_size
        )
    )
    assert err is None and np.array_equal(frames, ref.frames)


def test_video_chunks_deal_equal_grouped_shares_to_every_rank():
    from ekx.finetune.clips import VideoChunks

    vids = [f"P01_{i % 5:02d}" for i in range(37)]  # 5 videos, interleaved
    shares = [list(VideoChunks(vids, 4, replicas=3, rank=r, seed=1)) for r in range(3)]
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) == len(VideoChunks(vids, 4, 3, 0, 1))
    assert set().union(*map(set, shares)) == set(range(37))  # every segment, some repeated as padding
    for s in shares:  # each batch of 4 reads at most two videos
        assert all(len({vids[i] for i in s[k : k + 4]}) <= 2 for k in range(0, len(s), 4))
    a, b = VideoChunks(vids, 4, seed=1), VideoChunks(vids, 4, seed=1)
    b.set_epoch(1)
    assert list(a) == list(VideoChunks(vids, 4, seed=1)) and list(a) != list(b)  # a function of (seed, epoch)


def test_video_chunks_pad_at_most_world_minus_one():
    """EPIC scale (67,217 training segments, chunks = batches of 16, 8 ranks): dealing whole
    chunks padded every epoch with 111 repeated segments; now at most world - 1, as
    DistributedSampler (ceil(N / world) * world - N): equal shares, every segment, still
    grouped by video (a rank's share is runs of one video's segments)."""
    import itertools

    from ekx.finetune.clips import VideoChunks

    rng = np.random.default_rng(0)
    counts = rng.integers(20, 240, 600)
    counts = counts[: int(np.searchsorted(np.cumsum(counts), 67_217)) + 1]
    counts[-1] -= int(counts.sum()) - 67_217
    vids = [f"P{v // 30:02d}_{v:03d}" for v, c in enumerate(counts) for _ in range(int(c))]
    assert len(vids) == 67_217
    for world, chunk in ((8, 16), (3, 4), (1, 16), (5, 1)):
        shares = [list(VideoChunks(vids, chunk, world, r, seed=7)) for r in range(world)]
        per_rank = -(-len(vids) // world)
        assert [len(s) for s in shares] == [per_rank] * world == [len(VideoChunks(vids, chunk, world, 0, 7))] * world
        dealt = np.concatenate(shares)
        assert len(dealt) - len(vids) == per_rank * world - len(vids) <= world - 1  # (8, 16): 7, was 111
        assert set(dealt.tolist()) == set(range(len(vids)))
        for s in shares:  # grouped: a video's segments come in runs (switches ~ videos per rank, not per sample)
            switches = sum(vids[a] != vids[b] for a, b in itertools.pairwise(s))
            assert switches <= len(set(vids[i] for i in s)) + len(s) // chunk + 1, (world, chunk, switches)
