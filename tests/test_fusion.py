"""Stage 2 on fused caches (`--backbone a+b`, `--features a.h5+b.h5`): features concatenated
per position, rows aligned by narration id, every part's identity kept and checked."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_cache
from typer.testing import CliRunner

from ekx import EkxError
from ekx.cli import app
from ekx.heads.data import Split, load_split
from ekx.heads.fusion import fuse


def split(nids: list[str], feats: torch.Tensor, verbs: list[int], backbone: str, done=None) -> Split:
    n = len(nids)
    return Split(
        path=__import__("pathlib").Path(f"{backbone}.h5"),
        feats=feats,
        rows=torch.tensor(done if done is not None else list(range(n))),
        verbs=torch.tensor(verbs),
        nouns=torch.tensor(verbs),
        narration_id=nids,
        video_id=[x.rsplit("_", 1)[0] for x in nids],
        attrs={"backbone": backbone, "feature_dim": feats.shape[-1], "frames_per_segment": feats.shape[2]},
        extractor={"backbone": backbone},
    )


def test_fusion_aligns_rows_by_narration_id_and_keeps_only_rows_done_everywhere():
    nids = ["P01_01_0", "P01_01_1", "P01_01_2"]
    a = split(nids, torch.arange(3.0)[:, None, None, None].expand(3, 1, 2, 2).clone(), [0, 1, 2], "resnet50")
    order = [2, 0, 1]  # part b lists the same segments in another order; its row of P01_01_1 failed
    b_feats = torch.tensor([10.0 * i for i in order])[:, None, None, None].expand(3, 1, 2, 3).clone()
    b = split([nids[i] for i in order], b_feats, [order[i] for i in range(3)], "efficientnet_b3", done=[0, 1])
    f = fuse([a, b], __import__("pathlib").Path("a+b"), torch.device("cpu"))
    assert f.feats.shape == (3, 1, 2, 5)
    for i in range(3):  # row i: a's value i, then b's value for the same segment, 10 * i
        assert f.feats[i, 0, 0].tolist() == [i, i, 10 * i, 10 * i, 10 * i]
    assert f.rows.tolist() == [0, 2]  # P01_01_1 is not done in b
    ident = f.identity()
    assert ident["fusion"] == "resnet50+efficientnet_b3"
    assert ident["part1.backbone"] == "resnet50" and ident["part2.backbone"] == "efficientnet_b3"
    with pytest.raises(EkxError, match="label the same segments differently"):
        fuse([a, split(nids, b_feats, [2, 2, 2], "x")], __import__("pathlib").Path("a+x"), torch.device("cpu"))
    with pytest.raises(EkxError, match="hold different segments"):
        fuse([a, split(nids[:2], b_feats[:2], [0, 1], "x")], __import__("pathlib").Path("a+x"), torch.device("cpu"))


def test_a_fused_run_trains_evaluates_and_refuses_a_swapped_part(tmp_path):
    feats = tmp_path / "features"
    for split_name, seed in (("train", 0), ("validation", 1)):  # one seed per split: the parts share labels
        make_cache(feats / "resnet50" / f"{split_name}.h5", n=48, k=4, dim=32, seed=seed, split=split_name)
        make_cache(
            feats / "efficientnet_b3" / f"{split_name}.h5", n=48, k=4, dim=16, seed=seed,
            backbone="efficientnet_b3", split=split_name,
        )  # fmt: skip
    make_cache(
        feats / "r2plus1d_18" / "validation.h5", n=48, k=4, dim=16, seed=1, backbone="r2plus1d_18", split="validation"
    )
    runs = tmp_path / "runs"
    common = ["--features", str(feats), "--runs", str(runs), "--epochs", "2", "--device", "cpu"]
    r = CliRunner().invoke(
        app, ["train-head", "pooling", "--backbone", "resnet50+efficientnet_b3", "--name", "f", *common]
    )
    assert r.exit_code == 0, r.output
    ckpt = torch.load(runs / "f" / "best.pt", weights_only=True)
    assert ckpt["head_kwargs"]["dim"] == 48  # 32 + 16, concatenated per position
    assert ckpt["cache"]["part1.backbone"] == "resnet50" and ckpt["cache"]["part2.backbone"] == "efficientnet_b3"
    val = f"{feats}/resnet50/validation.h5+{feats}/efficientnet_b3/validation.h5"
    out = tmp_path / "m.json"
    r = CliRunner().invoke(app, ["evaluate", str(runs / "f"), "--features", val, "--device", "cpu", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "action" in json.dumps(json.loads(out.read_text()))  # the fused validation set's metrics
    swapped = f"{feats}/resnet50/validation.h5+{feats}/r2plus1d_18/validation.h5"
    r = CliRunner().invoke(app, ["evaluate", str(runs / "f"), "--features", swapped, "--device", "cpu"])
    assert r.exit_code == 1 and "part2.backbone" in r.output and "r2plus1d_18" in r.output, r.output
    assert load_split(val, torch.device("cpu")).feats.shape[-1] == 48


def test_a_store_fused_with_itself_is_refused(tmp_path):
    """(main: `a+a` trained on every feature doubled, without a word.) Named twice, or a copy
    under another name (the same identity)."""
    import shutil

    feats = tmp_path / "features"
    for split_name, seed in (("train", 0), ("validation", 1)):
        make_cache(feats / "resnet50" / f"{split_name}.h5", n=16, k=4, seed=seed, split=split_name)
    a = feats / "resnet50" / "train.h5"
    with pytest.raises(EkxError, match=r"train.h5 is named twice; a fusion of a store with itself"):
        load_split(f"{a}+{tmp_path}/features/../features/resnet50/train.h5", torch.device("cpu"))
    copy = shutil.copy(a, tmp_path / "copy.h5")
    with pytest.raises(EkxError, match=r"train.h5 and .*copy.h5 hold the same features \(equal identity\)"):
        load_split(f"{a}+{copy}", torch.device("cpu"))
    v = feats / "resnet50" / "validation.h5"
    r = CliRunner().invoke(
        app, ["train-head", "pooling", "--train-features", f"{a}+{a}", "--val-features", f"{v}+{v}",
              "--runs", str(tmp_path / "runs"), "--epochs", "1", "--device", "cpu"], terminal_width=300,
    )  # fmt: skip
    assert r.exit_code == 1 and "is named twice" in r.output, r.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
