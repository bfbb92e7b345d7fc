"""One identity of a cache (`ekx.cache.identity`), compared wholesale by every consumer:
extract resume, merge, stage 2 pairing, evaluation, `finetune --init-head`. A field added
to the identity is checked by all of them without touching them."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import make_cache

from ekx import EkxError, epic
from ekx.cache import identity, store, tools
from ekx.cache.reader import open_cache
from ekx.extract.pipeline import ExtractConfig, extract, extract_many
from ekx.heads import train as tr
from ekx.heads.config import TrainConfig
from ekx.heads.evaluate import evaluate_run

quiet = {"warn": lambda m: None}


def cfg(**kw) -> ExtractConfig:
    base = {"split": "validation", "weights": "none", "frames": 2, "batch_size": 4, "workers": 0}
    return ExtractConfig(**{**base, **kw})


def set_attr(path: Path, key: str, value) -> Path:
    with h5py.File(path, "r+") as f:
        f.attrs[key] = value
    return path


# ---------------------------------------------------------------- the rule itself


def test_every_attribute_is_identity_unless_listed_as_one_that_may_differ():
    attrs = {"backbone": "resnet50", "weights": "none", "seed": 3, "brand_new_field": 1, "split": "train"}
    ident = identity.identity(attrs)
    assert ident["brand_new_field"] == 1 and ident["seed"] == 3  # unknown fields count; random weights: seed too
    assert "split" not in ident and "torch_version" not in identity.identity({**attrs, "torch_version": "x"})
    assert "seed" not in identity.identity({**attrs, "weights": "torchvision:X"})  # seeds only the views
    assert identity.extraction({**attrs, "weights": "torchvision:X"})["seed"] == 3  # one extraction: one seed
    assert "shard" not in identity.extraction({**attrs, "shard": "0/2"})
    bad = identity.mismatch({"a": 1, "b": [1, 2]}, {"a": 2, "b": np.array([1, 2]), "c": "x"})
    assert bad == ["a: file has 1, asked for 2", "c: file has None, asked for 'x'"]


# ---------------------------------------------------------------- point 1: the decode path per backbone


@pytest.mark.slow
def test_multi_backbone_pass_refuses_a_cache_decoded_at_its_own_size(synth_data, tmp_path):
    """Several backbones decode once at the largest size, torchvision resizing down for the
    others: resuming (or merging with) a single-backbone cache would mix two resize paths.
    (main: resumed with exit 0, rows 4-7 from torchvision's resize.)"""
    ann, videos = synth_data / "annotations", synth_data / "videos"
    extract(cfg(backbone="resnet50", limit=2), ann, videos, tmp_path, **quiet)
    single = store.open_attrs(tmp_path / "resnet50" / "validation.h5")
    assert single["decode_size"] == identity.OWN_SIZE
    with pytest.raises(EkxError, match=r"decode_size: file has .*this backbone's resize size.*efficientnet_b3"):
        extract_many(cfg(backbone="resnet50,efficientnet_b3", limit=2), ann, videos, tmp_path, **quiet)
    # efficientnet_b3 decodes at its own (larger) size either way: its single cache resumes
    extract(cfg(backbone="efficientnet_b3", limit=2), ann, videos, tmp_path / "b3", **quiet)
    shutil.copytree(tmp_path / "b3" / "efficientnet_b3", tmp_path / "both" / "efficientnet_b3")
    summaries = extract_many(
        cfg(backbone="efficientnet_b3,r2plus1d_18", limit=2), ann, videos, tmp_path / "both", **quiet
    )
    assert [s.processed for s in summaries] == [0, 2]
    r21d = store.open_attrs(tmp_path / "both" / "r2plus1d_18" / "validation.h5")
    assert "efficientnet_b3's resize size [320]" in r21d["decode_size"]


@pytest.mark.slow
def test_merge_refuses_shards_of_different_decode_paths(synth_data, tmp_path):
    ann, videos = synth_data / "annotations", synth_data / "videos"
    extract(cfg(split="train", backbone="resnet50", shard=(0, 2)), ann, videos, tmp_path / "a", **quiet)
    two = cfg(split="train", backbone="resnet50,efficientnet_b3", shard=(1, 2))
    extract_many(two, ann, videos, tmp_path / "b", **quiet)
    shards = [tmp_path / "a/resnet50/train.shard0of2.h5", tmp_path / "b/resnet50/train.shard1of2.h5"]
    with pytest.raises(EkxError, match=r"not a shard of the same extraction.*decode_size"):
        tools.merge(tmp_path / "m.h5", shards)
    assert not (tmp_path / "m.h5").exists()


# ---------------------------------------------------------------- point 2: stage 2 pairs whole identities


@pytest.mark.parametrize(
    "field, value",
    [
        ("resize", "torchvision"),
        ("sampling", "centres of K equal parts; frame = round(t * fps)"),
        ("source", "torchcodec"),
        ("decoder", "decord 0.5.0"),
        ("preprocess_mean", [0.5, 0.5, 0.5]),
        ("decode_size", identity.FULL_FRAMES),
        ("precision", "bf16"),
    ],
)
def test_train_and_validation_caches_must_share_the_whole_identity(tmp_path, field, value):
    """(main: `--resize torchvision` validation with a `--resize decoder` train cache trained
    and evaluated, exit 0: only 8 keys were compared.)"""
    train = make_cache(tmp_path / "train.h5")
    val = set_attr(make_cache(tmp_path / "val.h5", seed=1, split="validation"), field, value)
    with pytest.raises(EkxError, match=rf"mean different things \(.*{field}: train cache "):
        tr.load_data(train, val, "cpu")


def test_train_and_validation_may_differ_in_split_views_and_annotation_file(tmp_path):
    train = set_attr(make_cache(tmp_path / "train.h5", views=2), "annotation_sha256", "aa")
    val = set_attr(make_cache(tmp_path / "val.h5", seed=1, split="validation"), "annotation_sha256", "bb")
    set_attr(val, "torch_version", "0.0")
    data = tr.load_data(train, val, "cpu")
    assert data.train.identity() == data.val.identity()


# ---------------------------------------------------------------- a made-up field, checked everywhere


@pytest.mark.slow
def test_a_new_identity_field_is_checked_by_every_consumer(synth_data, tmp_path, monkeypatch):
    """Only `identity.input_attrs` learns the field: extract resume, merge, train-head,
    evaluate and finetune --init-head all refuse to mix its values, untouched."""
    ann, videos = synth_data / "annotations", synth_data / "videos"
    value = {"v": "a"}
    real = identity.input_attrs
    monkeypatch.setattr(identity, "input_attrs", lambda *a, **k: {**real(*a, **k), "made_up": value["v"]})
    feats = tmp_path / "features"
    for split in ("train", "validation"):
        extract(cfg(split=split, backbone="resnet50", limit=6), ann, videos, feats, **quiet)
    val = feats / "resnet50" / "validation.h5"
    assert store.open_attrs(val)["made_up"] == "a"
    value["v"] = "b"
    # extract resume
    with pytest.raises(EkxError, match=r"made_up: file has 'a', asked for 'b'"):
        extract(cfg(backbone="resnet50", limit=6), ann, videos, feats, **quiet)
    # merge
    extract(cfg(split="train", backbone="resnet50", limit=8, shard=(0, 2)), ann, videos, tmp_path / "s", **quiet)
    value["v"] = "a"
    extract(cfg(split="train", backbone="resnet50", limit=8, shard=(1, 2)), ann, videos, tmp_path / "s", **quiet)
    with pytest.raises(EkxError, match=r"made_up"):
        tools.merge(tmp_path / "m.h5", sorted((tmp_path / "s" / "resnet50").glob("*.h5")))
    # train-head: a validation cache whose features were made the other way
    other = set_attr(Path(shutil.copy(val, tmp_path / "validation-b.h5")), "made_up", "b")
    with pytest.raises(EkxError, match=r"made_up: train cache 'a', validation cache 'b'"):
        tr.load_data(feats / "resnet50" / "train.h5", other, "cpu")
    # evaluate: a head trained on 'a' features, evaluated on 'b' ones
    tcfg = TrainConfig(head="pooling", epochs=1, batch_size=4, device="cpu", name="r")
    run_dir, _ = tr.main(tcfg, feats, tmp_path / "runs", ann, warn=lambda m: None)
    assert evaluate_run(run_dir, val, device_name="cpu")["metrics"]["verb_top1"] >= 0
    with pytest.raises(EkxError, match=r"made_up: checkpoint 'a', cache 'b'"):
        evaluate_run(run_dir, other, device_name="cpu")
    # finetune --init-head: this run's input would be made the 'b' way
    from ekx.finetune import run as ft
    from ekx.finetune.config import FinetuneConfig

    value["v"] = "b"
    fcfg = FinetuneConfig(head="pooling", init_head=str(run_dir), limit=4, device="cpu", epochs=1)
    with pytest.raises(EkxError, match=r"--init-head .*made_up: its cache 'a', this run 'b'"):
        ft.main(fcfg, ann, videos, tmp_path / "ft", warn=lambda m: None)
    assert not (tmp_path / "ft").exists()


# ---------------------------------------------------------------- issue 32 point 7: the source videos


def copies(synth_data: Path, out: Path, short_side: int, which: set[str]) -> Path:
    """The synthetic videos, those of ``which`` re-encoded at another size (`ekx prepare`'s
    transcode: the same frames at the same times), the others linked as they are."""
    from ekx.prepare import Settings, transcode

    out.mkdir()
    for vid, path in epic.index_videos(synth_data / "videos").items():
        if vid in which:
            transcode(path, out / path.name, Settings(short_side=short_side))
        else:
            (out / path.name).symlink_to(path)
    return out


@pytest.mark.slow
def test_a_validation_cache_read_from_re_encoded_copies_is_refused(synth_data, tmp_path):
    """(main: a validation cache extracted from 96x72 copies of the videos paired with the train
    cache of the originals, equal attributes, features at cosine 0.92-0.96.) Each video's
    record is kept; train and validation must share the class of their frames; caches that
    read the same video must have read the same file."""
    ann, videos = synth_data / "annotations", synth_data / "videos"
    val_videos = {s.video_id for s in epic.Annotations(ann).segments("validation")}
    small = copies(synth_data, tmp_path / "small", 72, val_videos)  # 128x96 -> 96x72
    feats = tmp_path / "features"
    for split in ("train", "validation"):
        extract(cfg(split=split, backbone="resnet50", limit=4), ann, videos, feats, **quiet)
    extract(cfg(backbone="resnet50", limit=4), ann, small, tmp_path / "copy", **quiet)
    train, val = feats / "resnet50" / "train.h5", feats / "resnet50" / "validation.h5"
    val_copy = tmp_path / "copy" / "resnet50" / "validation.h5"
    got = store.open_attrs(val_copy)
    index = epic.index_videos(small)
    read = sorted({v for v in open_cache(val_copy).video_id})
    assert got[identity.VIDEOS] == [identity.probe(v, index[v]) for v in read]
    for r in got[identity.VIDEOS]:  # "<video> <W>x<H> <fps> fps <size> bytes"
        assert " 96x72 " in r and r.endswith(f" {index[r.split()[0]].stat().st_size} bytes")
    assert got[identity.FRAMES] == ["96x72, scaled up to the backbone's resize size"]
    assert store.open_attrs(val)[identity.FRAMES] == ["128x96, scaled up to the backbone's resize size"]
    data = tr.load_data(train, val, "cpu")  # the originals pair (the check can pass)
    with pytest.raises(EkxError, match=r"source_frames: train cache \[.128x96.*validation cache \[.96x72"):
        tr.load_data(train, val_copy, "cpu")
    # a head trained on the originals is not evaluated on the copies
    run_dir, _ = tr.main(
        TrainConfig(head="pooling", epochs=1, batch_size=4, device="cpu", name="r"), feats, tmp_path / "runs", ann
    )
    assert evaluate_run(run_dir, val, device_name="cpu")["segments"] == 4
    with pytest.raises(EkxError, match=r"source_frames: checkpoint \[.128x96"):
        evaluate_run(run_dir, val_copy, device_name="cpu")
    # the same video from another file: fusion and resume refuse it, by video
    from ekx.heads.data import load_split

    with pytest.raises(EkxError, match=r"read their videos from other files \(source_videos: .* 128x96 .* 96x72 "):
        load_split(f"{val}+{val_copy}", torch.device("cpu"))
    with pytest.raises(EkxError, match=r"source_videos: file has '.* 96x72 .*', asked for '.* 128x96 "):
        extract(cfg(backbone="resnet50", limit=4), ann, videos, tmp_path / "copy", **quiet)
    assert data.val.identity()[identity.FRAMES] != identity.NOT_RECORDED


def test_epic_s_own_mix_of_sizes_is_one_class_and_old_caches_are_not_compared():
    """EPIC mixes 1920x1080 and 1280x720 videos (50 and 59.94 fps) in every split: for every
    registered backbone both are scaled down, one class; a 96x72 copy is not."""
    from ekx.extract import backbones

    for bb in backbones.REGISTRY.values():
        big, small = (identity.video_record("P01_01", w, h, 59.94, 1) for w, h in ((1920, 1080), (1280, 720)))
        assert identity.frame_class(big, bb) == identity.frame_class(small, bb) == identity.SCALED_DOWN
        assert identity.frame_class(identity.video_record("P01_01", 96, 72, 30, 1), bb) != identity.SCALED_DOWN
    new = {identity.FRAMES: [identity.SCALED_DOWN], identity.VIDEOS: ["P01_01 1920x1080 50 fps 9 bytes"]}
    assert identity.mismatch(identity.identity({}), identity.identity(new)) == []  # made before: unknown
    other = {identity.FRAMES: ["96x72, scaled up to the backbone's resize size"], identity.VIDEOS: []}
    assert [b.split(":")[0] for b in identity.mismatch(new, other)] == [identity.FRAMES]


# ---------------------------------------------------------------- every option: stored, or listed


@pytest.mark.slow
def test_every_extract_and_import_option_is_stored_or_listed_as_not_changing_it(synth_data, tmp_path):
    """Each option of the two commands (read from the CLI itself, so a new one is held to it)
    is in the attributes of what the command writes, or in `identity.NOT_STORED` with why."""
    import typer.main
    from typer.testing import CliRunner

    from ekx.cache import dense
    from ekx.cli import app

    ann, videos = synth_data / "annotations", synth_data / "videos"
    written: dict[str, set[str]] = {"extract": set(), "import": set()}
    common = ["--split", "validation", "--annotations", str(ann), "--features", str(tmp_path / "f")]
    for extra in ([], ["--dense", "4", "--dense-span", "annotated", "--dense-margin", "0.5"]):
        out = tmp_path / f"e{len(extra)}.h5"
        args = ["extract", *common, "--weights", "none", "--frames", "2", "--limit", "2", "--workers", "0"]
        r = CliRunner().invoke(app, [*args, "--videos", str(videos), "--out", str(out), *extra])
        assert r.exit_code == 0, r.output
        written["extract"] |= set(store.open_attrs(out))
    src = tmp_path / "npy"
    src.mkdir()
    for vid in {s.video_id for s in epic.Annotations(ann).segments("validation")}:
        seconds, _ = dense.video_length(epic.index_videos(videos)[vid])
        np.save(src / f"{vid}.npy", np.ones((int(seconds * 2), 4), np.float32))
    out = tmp_path / "i.h5"
    r = CliRunner().invoke(app, ["import", "npy-dir", str(src), *common, "--rate", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    written["import"] |= set(store.open_attrs(out))
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    seen, unstored = set(), []
    for command, attrs in written.items():
        for option in (p.name for p in commands[command].params):
            seen.add(option)
            if option in identity.NOT_STORED:
                continue
            if identity.STORED_AS.get(option, option) not in attrs and f"import_{option}" not in attrs:
                unstored.append(f"{command} --{option.replace('_', '-')}")
    assert unstored == [], "options neither in the identity nor in identity.NOT_STORED"
    assert set(identity.NOT_STORED) | set(identity.STORED_AS) <= seen  # no stale entries
    assert all(identity.NOT_STORED.values())
