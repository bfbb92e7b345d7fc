"""The context head (`ekx train-head context`): windows of a dense store around each segment,
a time-interval query, and everything the other heads have (evaluate, submission, resume,
searches). The synthetic task that needs context runs in the demo (tests/test_demo.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_cache
from test_dense import N, V, annotations, time_store
from typer.testing import CliRunner

from ekx import EkxError
from ekx.cache.imports import import_features
from ekx.cli import app
from ekx.extract.video import centre_times
from ekx.heads import context
from ekx.heads.data import load_split


def test_a_window_holds_the_nearest_dense_times_and_masks_the_video_ends(tmp_path):
    """Features are their own times (8 s at 4/s): each window token holds the dense time
    nearest its own, tokens before 0 s and after 8 s are masked, the segment's own 16 tokens
    follow (its positions by the per-segment rule), and the query channels place the segment
    in the window."""
    segs = [("P01_01", 0.5, 1.5, 0, 0), ("P01_01", 3.0, 5.0, 1, 1)]
    store, _ = time_store(tmp_path, {"P01_01": 32}, 4.0, segs)
    split = load_split(store, torch.device("cpu"))
    zero, one = torch.zeros(8), torch.ones(8)
    idx = torch.tensor([0, 1])
    x = context.windows(split, idx, 4.0, None, torch.zeros(2, 1, dtype=torch.long), zero, one, torch.device("cpu"))
    assert x.shape == (2, context.TOKENS + context.SEGMENT_TOKENS, 8 + context.EXTRA)
    grid = (np.arange(32) + 0.5) / 4
    for i, (_, a, b, _, _) in enumerate(segs):
        c = (a + b) / 2
        window = c - 2 + (np.arange(context.TOKENS) + 0.5) * 4 / context.TOKENS
        t = np.concatenate([window, centre_times(a, b, context.SEGMENT_TOKENS)])
        valid = x[i, :, -3].numpy() > 0.5
        inside = (t >= grid[0] - 0.125 - 1e-6) & (t <= grid[-1] + 0.125 + 1e-6)  # within half a period
        assert (valid == inside).all(), (i, valid, inside)
        nearest = grid[np.abs(grid[None] - t[:, None]).argmin(1)]
        assert np.allclose(x[i, valid, 0].numpy(), nearest[valid], atol=4e-3)
        assert (x[i, ~valid, :8] == 0).all()
        assert np.allclose(x[i, :, -4].numpy(), (t - c) / 2, atol=1e-5)
        assert np.allclose(x[i, 0, -2:].numpy(), [(a - c) / 2, (b - c) / 2], atol=1e-6)
    shifted = context.windows(split, idx, 4.0, torch.ones(2), torch.zeros(2, 1, dtype=torch.long), zero, one, "cpu")
    assert np.allclose(shifted[:, 0, -2:].numpy(), x[:, 0, -2:].numpy() - 0.5, atol=1e-6)  # centre moved by W/4


def test_the_context_head_refuses_a_per_segment_cache(tmp_path):
    feats = tmp_path / "features"
    make_cache(feats / "resnet50" / "train.h5", n=16)
    make_cache(feats / "resnet50" / "validation.h5", n=16, seed=1, split="validation")
    r = CliRunner().invoke(
        app, ["train-head", "context", "--features", str(feats), "--runs", str(tmp_path / "r"), "--device", "cpu"]
    )
    assert r.exit_code == 1 and "reads windows of a dense store" in r.output, r.output
    with pytest.raises(EkxError, match="dense store"):
        context.check(load_split(feats / "resnet50" / "train.h5", torch.device("cpu")), "context")


def stores(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Train and validation dense stores (4/s) whose features mark each segment's classes."""
    rng = np.random.default_rng(0)
    segs = {"train": [], "validation": []}
    for split, vids in (("train", ["P01_01", "P02_01"]), ("validation", ["P03_01"])):
        for vid in vids:
            t = 1.0
            for i in range(12):
                b = t + float(rng.uniform(1, 3))
                segs[split].append((vid, round(t, 2), round(b, 2), i % V, (i * 5) % N))
                t = b + 1.0
    ann = annotations(tmp_path / "ann", segs["train"], segs["validation"])
    out = []
    for split, rows in segs.items():
        src = tmp_path / f"src-{split}"
        src.mkdir()
        for vid in {r[0] for r in rows}:
            x = rng.normal(size=(240, 12)).astype(np.float32)
            t = (np.arange(240) + 0.5) / 4
            for v, a, b, verb, noun in rows:
                if v == vid:
                    x[(t >= a) & (t < b), verb] += 3
                    x[(t >= a) & (t < b), V + noun % 8] += 3
            np.save(src / f"{vid}.npy", x)
        path = tmp_path / f"{split}.dense.h5"
        import_features("npy-dir", src, ann, split, path, "marks", rate=4.0)
        out.append(path)
    return out[0], out[1], ann


def test_context_head_trains_evaluates_resumes_and_writes_a_submission(tmp_path):
    train, val, ann = stores(tmp_path)
    runs = tmp_path / "runs"
    common = ["--train-features", str(train), "--val-features", str(val), "--runs", str(runs), "--device", "cpu",
              "--window", "8", "--layers", "1", "--width", "32", "--lr", "2e-3", "--annotations", str(ann)]  # fmt: skip
    r = CliRunner().invoke(app, ["train-head", "context", "--name", "c", "--epochs", "2", *common])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["train-head", "context", "--name", "c", "--epochs", "4", "--resume", *common])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in (runs / "c" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3, 4]
    ckpt = torch.load(runs / "c" / "best.pt", weights_only=True)
    assert ckpt["config"]["window"] == 8.0 and ckpt["head_kwargs"]["dim"] == 12 + context.EXTRA
    assert ckpt["head_kwargs"]["layers"] == 1 and ckpt["head_kwargs"]["d_model"] == 32
    sub = tmp_path / "val.json"
    r = CliRunner().invoke(
        app, ["evaluate", str(runs / "c"), "--features", str(val), "--device", "cpu", "--submission", str(sub)]
    )
    assert r.exit_code == 0, r.output
    assert len(json.loads(sub.read_text())["results"]) == 12
    r = CliRunner().invoke(app, ["score", str(sub), "--split", "validation", "--annotations", str(ann)])
    assert r.exit_code == 0, r.output
    assert max(x["val_verb_top1"] for x in lines) > 100 / V  # the marks are learnt: it can fail


def test_a_search_over_window_layers_and_width_runs(tmp_path):
    train, val, _ = stores(tmp_path)
    file = tmp_path / "ctx.toml"
    file.write_text(
        '[base]\nhead = "context"\nepochs = 2\n\n[optuna]\ntrials = 2\nseed = 0\npruner = "none"\n'
        "window = { uniform = [4.0, 12.0] }\nlayers = { int_uniform = [1, 2] }\nwidth = { choice = [16, 32] }\n"
    )
    r = CliRunner().invoke(
        app,
        ["sweep", str(file), "--train-features", str(train), "--val-features", str(val),
         "--runs", str(tmp_path / "runs"), "--device", "cpu"],
        terminal_width=200,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    done = sorted((tmp_path / "runs" / "ctx").glob("*/done.json"))
    assert len(done) == 2, r.output
    kws = [torch.load(d.parent / "best.pt", weights_only=True)["head_kwargs"] for d in done]
    assert {k["d_model"] for k in kws} <= {16, 32} and {k["layers"] for k in kws} <= {1, 2}


def test_fused_dense_stores_enter_as_separate_token_streams(tmp_path):
    """Two stores at 4/s and 1/s whose features are their own times, joined with `+`: each
    gives its own window tokens (its nearest times, in its own channels, zeros in the other's,
    told apart by the stream channel), the segment's own tokens hold both side by side, and
    the head's stream embedding learns from both streams."""
    segs = [("P01_01", 3.0, 5.0, 0, 0), ("P01_01", 1.0, 2.0, 1, 1)]
    a, _ = time_store(tmp_path / "a", {"P01_01": 40}, 4.0, segs, name="a")
    b, _ = time_store(tmp_path / "b", {"P01_01": 10}, 1.0, segs, name="b")
    split = load_split(Path(f"{a}+{b}"), torch.device("cpu"))
    assert split.streams is not None and len(split.streams) == 2 and split.dim == 16
    idx = torch.tensor([0, 1])
    x = context.windows(split, idx, 4.0, None, torch.zeros(2, 1, dtype=torch.long), torch.zeros(16),
                        torch.ones(16), torch.device("cpu"))  # fmt: skip
    tok, own = context.TOKENS, context.SEGMENT_TOKENS
    assert x.shape == (2, 2 * tok + own, 16 + context.EXTRA)
    for i, (_, s0, s1, _, _) in enumerate(segs):
        c = (s0 + s1) / 2
        window = c - 2 + (np.arange(tok) + 0.5) * 4 / tok
        mine = centre_times(s0, s1, own)
        for stream, (rate, n, ch) in enumerate([(4.0, 40, slice(0, 8)), (1.0, 10, slice(8, 16))]):
            grid = (np.arange(n) + 0.5) / rate
            part = x[i, stream * tok : (stream + 1) * tok]
            valid = part[:, -3].numpy() > 0.5
            inside = (window >= grid[0] - 0.5 / rate - 1e-6) & (window <= grid[-1] + 0.5 / rate + 1e-6)
            assert (valid == inside).all(), (i, stream)
            nearest = grid[np.abs(grid[None] - window[:, None]).argmin(1)]
            assert np.allclose(part[valid, ch][:, 0].numpy(), nearest[valid], atol=4e-3), (i, stream)
            other = slice(8, 16) if stream == 0 else slice(0, 8)
            assert (part[:, other] == 0).all() and (part[:, -5] == stream).all()
            nearest_own = grid[np.abs(grid[None] - mine[:, None]).argmin(1)]
            assert np.allclose(x[i, -own:, ch][:, 0].numpy(), nearest_own, atol=4e-3), (i, stream)
    head = context.REGISTRY["context"](16 + context.EXTRA, V, N, 16, d_model=16, layers=1, heads=2, streams=2)
    out = head(x)
    (out["verb"].sum() + out["noun"].sum()).backward()
    assert head.stream.weight.grad is not None and (head.stream.weight.grad.abs().sum(1) > 0).all()


def test_a_context_head_trains_on_two_fused_dense_stores(tmp_path):
    train, val, ann = stores(tmp_path)
    # a second store: the same marks imported again under another name (its own identity)
    other = {}
    for split in ("train", "validation"):
        other[split] = tmp_path / f"{split}.other.h5"
        import_features("npy-dir", tmp_path / f"src-{split}", ann, split, other[split], "marks-2", rate=2.0)
    runs = tmp_path / "runs"
    r = CliRunner().invoke(
        app,
        ["train-head", "context", "--train-features", f"{train}+{other['train']}", "--val-features",
         f"{val}+{other['validation']}", "--runs", str(runs), "--device", "cpu", "--window", "8", "--layers", "1",
         "--width", "32", "--epochs", "2", "--name", "two"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    ckpt = torch.load(runs / "two" / "best.pt", weights_only=True)
    assert ckpt["head_kwargs"]["streams"] == 2 and ckpt["head_kwargs"]["dim"] == 24 + context.EXTRA
    assert ckpt["model"]["stream.weight"].shape[0] == 2
    r = CliRunner().invoke(app, ["evaluate", str(runs / "two"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    # parts swapped (each part another store than the run's) are refused, as for any fused run
    swapped = f"{other['validation']}+{val}"
    r = CliRunner().invoke(app, ["evaluate", str(runs / "two"), "--device", "cpu", "--features", swapped])
    assert r.exit_code == 1 and "incompatible" in r.output, r.output
