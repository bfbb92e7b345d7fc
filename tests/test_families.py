"""Backbone families (timm, OpenCLIP, Hugging Face): a real clip's features equal the
library's own transform + forward on frames chosen by hand; a weights file is what runs;
one decode pass serves a torchvision, a timm and a Hugging Face model; stage 2 and
fine-tuning take a family's model."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_videomae

from ekx import EkxError, epic
from ekx.cache.reader import open_cache
from ekx.config import backbone_folder
from ekx.extract import backbones
from ekx.extract.pipeline import ExtractConfig, extract, extract_many

CLIP = "epic55_wall_04x04_h264_720p60.mp4"
SEGMENTS = [(1.0, 2.0), (2.5, 4.0)]
K = 4


def need(module: str):
    pytest.importorskip(module, reason=f"{module} is not installed (pip install 'ekx[timm,clip,hf]')")


@pytest.fixture(scope="module")
def tiny_videomae(tmp_path_factory) -> Path:
    """A local VideoMAE directory as save_pretrained writes it (config, processor, weights):
    4 frames, 64 px, 2 layers of width 48 - the shape of videomae-base, made tiny."""
    need("transformers")
    return save_tiny_videomae(
        tmp_path_factory.mktemp("tiny-videomae"), 7,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    )  # fmt: skip


def workspace(clips: Path, root: Path) -> tuple[Path, Path]:
    """One real clip as a video of a test CSV with two segments."""
    videos, ann = root / "videos", root / "annotations"
    videos.mkdir(parents=True)
    ann.mkdir()
    (videos / "P90_01.mp4").symlink_to(clips / CLIP)
    rows = [
        [f"P90_01_{i}", "P90", "P90_01", "00:00:00.000", f"00:00:{a:05.2f}", f"00:00:{b:05.2f}", 0, 0]
        for i, (a, b) in enumerate(SEGMENTS)
    ]
    with open(ann / "EPIC_100_test_timestamps.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([epic.TEST_COLUMNS, *rows])
    for name in (epic.VERB_CLASSES, epic.NOUN_CLASSES):
        (ann / name).write_text("id,key,instances,category\n0,x,['x'],x\n")
    return videos, ann


def frames_by_hand(path: Path, clip_len: int) -> list[np.ndarray]:
    """Per segment, the RGB frames displayed at its K centre times (a clip model: clip_len
    frames 1/15 s apart around each), decoded in order by PyAV: the last frame whose pts is
    at or before each time."""
    import av

    with av.open(str(path)) as c:
        decoded = [(float(f.pts * f.time_base), f.to_ndarray(format="rgb24")) for f in c.decode(video=0)][:300]
    pts = np.array([p for p, _ in decoded])
    out = []
    for a, b in SEGMENTS:
        t = a + (np.arange(K) + 0.5) * (b - a) / K
        t = (t[:, None] + (np.arange(clip_len) - clip_len // 2)[None, :] / 15.0).reshape(-1)
        idx = np.searchsorted(pts, t + 1e-9, side="right") - 1
        out.append(np.stack([decoded[i][1] for i in idx]))
    return out


def own_forward(name: str, model: torch.nn.Module, frames: np.ndarray, tiny_dir: Path | None) -> torch.Tensor:
    """The library's own eval transform and forward, on PIL images / numpy frames."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    with torch.inference_mode():
        if name.startswith("timm:"):
            from timm.data import create_transform, resolve_data_config

            t = create_transform(**resolve_data_config({}, model=model))
            return model(torch.stack([t(im) for im in images]))
        if name.startswith("open_clip:"):
            import open_clip

            _, _, t = open_clip.create_model_and_transforms(name.split(":")[1].split("/")[0], pretrained=None)
            return model(torch.stack([t(im) for im in images]))
        from transformers import VideoMAEImageProcessor

        proc = VideoMAEImageProcessor.from_pretrained(tiny_dir)
        clips = frames.reshape(-1, model.model.config.num_frames, *frames.shape[1:])
        x = proc([list(c) for c in clips], return_tensors="pt")["pixel_values"]
        return model.model(pixel_values=x).last_hidden_state.mean(1)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


FAMILY_MODELS = {"timm": "timm:vit_tiny_patch16_224", "open_clip": "open_clip:ViT-B-32", "hf": None}
MODULES = {"timm": "timm", "open_clip": "open_clip", "hf": "transformers"}


@pytest.mark.slow
@pytest.mark.parametrize("fam", sorted(FAMILY_MODELS))
def test_family_features_equal_the_librarys_own_transform_and_forward(fam, clips, tiny_videomae, tmp_path):
    """A real 720p60 clip, ``--resize torchvision``, weights from a file (a state dict of
    seed-123 random weights): every cached feature is within cosine 0.999 of the library's
    own transform + forward on the frames chosen by hand, and far from ``--weights none``'s
    features (seed 0): the file is what ran."""
    need(MODULES[fam])
    name = FAMILY_MODELS[fam] or f"hf:{tiny_videomae}"
    bb = backbones.get(name)
    torch.manual_seed(123)
    model = bb.build().eval()
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    videos, ann = workspace(clips, tmp_path / "ws")
    common = dict(split="test", frames=K, workers=0, precision="fp32", resize="torchvision", backbone=name)
    for w, out in ((str(weights), "file.h5"), ("none", "none.h5")):
        cfg = ExtractConfig(**common, weights=w, out=tmp_path / out)
        s = extract(cfg, ann, videos, tmp_path, warn=lambda m: None)
        assert (s.done, s.failed) == (2, 0), s.failures
    got = open_cache(tmp_path / "file.h5")
    assert got.attrs["backbone"] == name and got.attrs["backbone_family"] == fam
    assert got.attrs["weights"].startswith("sha256:")
    # what the build and the preprocessing depend on is in the cache (and so in its identity)
    assert {k: got.attrs[k] for k in bb.attrs} == bb.attrs
    assert {k: got.attrs[k] for k in bb.preprocess.to_attrs()} == bb.preprocess.to_attrs()
    feats = got.features()[:, 0]  # [2, K, D]: view 0
    for row, frames in enumerate(frames_by_hand(clips / CLIP, bb.clip_len)):
        mine = own_forward(name, model, frames, tiny_videomae).numpy()
        assert mine.shape == feats[row].shape
        c = cosine(feats[row], mine)
        assert c.min() >= 0.999, (name, row, c)
    rand = open_cache(tmp_path / "none.h5").features()[:, 0]
    assert cosine(feats.reshape(-1, feats.shape[-1]), rand.reshape(-1, rand.shape[-1])).max() < 0.99


def test_a_family_name_is_checked_and_its_library_named(monkeypatch):
    from ekx.extract import families
    from ekx.extract.config import BACKBONES

    assert BACKBONES.canonical("timm:anything") == "timm:anything"  # the CLI's torch-free check
    with pytest.raises(EkxError, match="unknown backbone family 'tim'"):
        BACKBONES.canonical("tim:resnet18")
    with pytest.raises(EkxError, match="name a model after the colon"):
        families.resolve("timm:")
    need("timm")
    with pytest.raises(EkxError, match="timm cannot build it"):
        backbones.get("timm:no_such_model_xyz")
    monkeypatch.setitem(__import__("sys").modules, "open_clip", None)  # as if not installed
    families.resolve.cache_clear()
    with pytest.raises(EkxError, match=r"pip install 'ekx\[clip\]'"):
        backbones.get("open_clip:ViT-B-32")
    families.resolve.cache_clear()


def test_backbone_folders_fold_a_models_slashes():
    assert backbone_folder("resnet50") == "resnet50"
    assert backbone_folder("hf:MCG-NJU/videomae-base") == "hf:MCG-NJU--videomae-base"
    assert backbone_folder("hf:/models/vmae/") == "hf:models--vmae"
    assert backbone_folder("open_clip:ViT-B-16/openai") == "open_clip:ViT-B-16--openai"


def test_a_file_of_another_model_is_refused_naming_a_missing_key(tmp_path):
    need("timm")
    bb = backbones.get("timm:vit_tiny_patch16_224")
    path = tmp_path / "resnet.pt"
    torch.save(backbones.get("resnet50").build().state_dict(), path)
    with pytest.raises(EkxError, match=r"resnet.pt: not a timm:vit_tiny_patch16_224 state dict \(\d+ missing keys"):
        backbones.load_weights(bb, str(path))


def test_pretrained_weights_come_from_the_librarys_own_cache(tmp_path, monkeypatch):
    """--weights DEFAULT: timm's pretrained weights, where timm finds them (the Hugging Face
    cache on users' machines); here timm's loader is pointed at a local file, as its
    `pretrained_cfg_overlay=dict(file=...)` does, and the identity names the tag."""
    need("timm")
    import timm

    torch.manual_seed(5)
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    path = tmp_path / "pretrained.pth"
    torch.save(ref.state_dict(), path)
    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            kw["pretrained_cfg_overlay"] = {"file": str(path), "num_classes": 0}
        return real(name, pretrained=pretrained, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    from ekx.extract import families

    families.resolve.cache_clear()
    model, ident = backbones.load_weights(backbones.get("timm:vit_tiny_patch16_224"), "DEFAULT")
    families.resolve.cache_clear()
    assert ident.startswith("pretrained:timm vit_tiny_patch16_224.")
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_a_hugging_face_directorys_own_weights_are_its_default(tiny_videomae):
    """--weights DEFAULT with a local directory: the weights save_pretrained wrote (seed 7),
    not a random build; the identity names the files by sha256."""
    from transformers import VideoMAEModel

    model, ident = backbones.load_weights(backbones.get(f"hf:{tiny_videomae}"), "DEFAULT")
    assert ident.startswith(f"pretrained:hf {tiny_videomae} model.safetensors:")
    saved = VideoMAEModel.from_pretrained(tiny_videomae).state_dict()
    for k, v in saved.items():
        assert torch.equal(model.model.state_dict()[k], v), k
    rand, _ = backbones.load_weights(backbones.get(f"hf:{tiny_videomae}"), "none")
    assert not all(torch.equal(rand.model.state_dict()[k], v) for k, v in saved.items())


@pytest.mark.slow
def test_one_decode_pass_serves_torchvision_timm_and_hugging_face(clips, tiny_videomae, tmp_path):
    """`--backbone resnet50,timm:<vit>,hf:<tiny VideoMAE dir>` writes three caches, each
    within cosine 0.999 of its own single-backbone run."""
    need("timm")
    names = ["resnet50", "timm:vit_tiny_patch16_224", f"hf:{tiny_videomae}"]
    videos, ann = workspace(clips, tmp_path / "ws")
    common = dict(split="test", frames=K, workers=1, precision="fp32", resize="torchvision", weights="none")
    multi = extract_many(
        ExtractConfig(**common, backbone=",".join(names)), ann, videos, tmp_path / "multi", warn=lambda m: None
    )
    assert [(s.done, s.failed) for s in multi] == [(2, 0)] * 3
    # each cache in its own folder right under the features root, a directory's slashes folded
    assert [s.path.parent for s in multi] == [tmp_path / "multi" / backbone_folder(n) for n in names]
    assert multi[2].path.parent.parent == tmp_path / "multi"
    for name, s in zip(names, multi, strict=True):
        single = extract(
            ExtractConfig(**common, backbone=name, out=tmp_path / "single" / f"{len(name)}.h5"),
            ann, videos, tmp_path, warn=lambda m: None,
        )  # fmt: skip
        a, b = open_cache(s.path).features(), open_cache(single.path).features()
        c = cosine(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]))
        assert c.min() >= 0.999, (name, c)


@pytest.mark.slow
def test_train_head_and_finetune_take_a_timm_model(synth_data, tmp_path):
    from typer.testing import CliRunner

    from ekx.cli import app

    need("timm")
    name = "timm:vit_tiny_patch16_224"
    feats = tmp_path / "features"
    for split in ("train", "validation"):
        cfg = ExtractConfig(split=split, weights="none", frames=4, workers=0, backbone=name)
        s = extract(cfg, synth_data / "annotations", synth_data / "videos", feats, warn=lambda m: None)
        assert s.failed == 0
    cache = open_cache(s.path)
    assert cache.attrs["backbone"] == name and cache.features().shape[-1] == 192
    run = CliRunner().invoke(
        app,
        ["train-head", "pooling", "--features", str(feats), "--backbone", name, "--epochs", "2", "--frames", "4",
         "--runs", str(tmp_path / "runs"), "--name", "p", "--device", "cpu"],
    )  # fmt: skip
    assert run.exit_code == 0, run.output
    video = sorted(epic.index_videos(synth_data / "videos").values())[0]
    pred = CliRunner().invoke(app, ["predict", str(video), "--run", str(tmp_path / "runs" / "p"), "--device", "cpu"])
    assert pred.exit_code == 0 and "windows of 2 s" in pred.output, pred.output  # the ViT rebuilt from its seed
    ft = CliRunner().invoke(
        app,
        ["finetune", "pooling", "--backbone", name, "--weights", "none", "--epochs", "1", "--frames", "2",
         "--batch-size", "4", "--freeze-blocks", "10", "--grad-checkpoint",
         "--annotations", str(synth_data / "annotations"), "--videos", str(synth_data / "videos"),
         "--runs", str(tmp_path / "runs"), "--name", "ft", "--device", "cpu"],
    )  # fmt: skip
    assert ft.exit_code == 0, ft.output
    assert (tmp_path / "runs" / "ft" / "best.pt").is_file()


def test_gradient_checkpointing_gives_the_same_gradients(tiny_videomae):
    """--grad-checkpoint turns on the library's own checkpointing (timm; Hugging Face), the
    gradients stay the same, and a backbone without it is refused, named."""
    need("timm")
    from ekx.finetune.model import grad_checkpointing

    for name, shape in (("timm:vit_tiny_patch16_224", (2, 3, 224, 224)), (f"hf:{tiny_videomae}", (2, 3, 4, 64, 64))):
        bb = backbones.get(name)
        torch.manual_seed(0)
        model = bb.build().train()
        x = torch.randn(shape)
        model(x).square().sum().backward()
        plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        grad_checkpointing(bb, model)
        inner = getattr(model, "model", model)
        assert getattr(inner, "grad_checkpointing", None) or getattr(inner, "is_activation_checkpointing", None), name
        model(x).square().sum().backward()
        for n, g in plain.items():
            assert torch.allclose(dict(model.named_parameters())[n].grad, g, atol=1e-5), (name, n)
    with pytest.raises(EkxError, match="--grad-checkpoint: resnet50 has no gradient checkpointing"):
        grad_checkpointing(backbones.get("resnet50"), backbones.get("resnet50").build())


# ---------------------------------------------------------------- what a name means (issue 32)


def test_ekx_backbones_shows_an_open_clip_tags_own_preprocessing():
    """`ekx backbones open_clip:ViT-L-14/laion2b_s32b_b82k`: LAION's tag normalises with
    0.5/0.5 (OpenCLIP's get_pretrained_cfg), not the untagged arch's OpenAI statistics; the
    tag's QuickGELU and resize mode are shown (and written into a cache) with it."""
    from typer.testing import CliRunner

    from ekx.cli import app

    need("open_clip")

    def shown(name: str) -> tuple[int, str]:
        run = CliRunner().invoke(app, ["backbones", name])
        return run.exit_code, " ".join(run.output.split())  # rich wraps long lines

    code, out = shown("open_clip:ViT-L-14/laion2b_s32b_b82k")
    assert code == 0 and "mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5]" in out, out
    assert "open_clip_quick_gelu: false" in out and "open_clip_resize_mode: shortest" in out
    code, out = shown("open_clip:ViT-B-32/openai")
    assert "open_clip_quick_gelu: true" in out and "mean [0.4814547," in out, out
    code, out = shown("open_clip:ViT-B-32/no_such_tag")
    assert code == 1 and "OpenCLIP has no pretrained tag 'no_such_tag' for ViT-B-32" in out, out


def test_hugging_face_resampling_is_the_processors_or_refused(tiny_videomae, tmp_path):
    """PIL's nearest (0) is torchvision's nearest-exact (as transformers' own tensor backend
    maps it); box (4) and hamming (5), which no tensor resize has, are refused, named -
    they were silently bilinear."""
    import json
    import shutil

    from ekx.extract import families

    for code, want in ((0, "nearest-exact"), (4, "box"), (5, "hamming")):
        d = tmp_path / f"resample{code}"
        shutil.copytree(tiny_videomae, d)
        cfg = json.loads((d / "preprocessor_config.json").read_text())
        (d / "preprocessor_config.json").write_text(json.dumps({**cfg, "resample": code}))
        if code == 0:
            assert backbones.get(f"hf:{d}").preprocess.interpolation == want
            continue
        with pytest.raises(EkxError, match=rf"hf:{d}: its image processor resamples with PIL code {code} \({want}\)"):
            families.resolve(f"hf:{d}")


def test_a_weights_file_of_a_deeper_resnet_is_refused_naming_its_extra_keys(tmp_path):
    """`--backbone resnet50 --weights resnet101.pt`: every resnet50 key is in the file, and
    its 300+ others were dropped without a word; now refused, naming the file and the first
    unexpected keys. A full resnet50 checkpoint (its fc. classifier) still loads."""
    from torchvision import models

    deeper = tmp_path / "resnet101.pt"
    torch.save(models.resnet101().state_dict(), deeper)
    bb = backbones.get("resnet50")
    refused = r"resnet101.pt: not a resnet50 state dict \(\d{3} unexpected keys, e.g. layer3.6"
    with pytest.raises(EkxError, match=refused):
        backbones.load_weights(bb, str(deeper))
    full = tmp_path / "resnet50_full.pt"
    ref = models.resnet50()
    torch.save(ref.state_dict(), full)
    model, ident = backbones.load_weights(bb, str(full))
    assert ident.startswith("sha256:") and torch.equal(model.state_dict()["layer4.2.bn3.bias"], ref.layer4[2].bn3.bias)


def test_a_full_timm_checkpoint_loads_as_timm_strips_its_classifier(tmp_path):
    """timm's pretrained_cfg names the classifier (`head.fc` of a ConvNeXt): a full checkpoint
    loads with it dropped, the same tensors as timm's own num_classes=0 load of that file."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(4)
    path = tmp_path / "convnext.pth"
    torch.save(timm.create_model("test_convnext").state_dict(), path)
    model, _ = backbones.load_weights(backbones.get("timm:test_convnext"), str(path))
    own = timm.create_model(
        "test_convnext", pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(path)}
    ).state_dict()
    assert model.state_dict().keys() == own.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in own.items())


def test_a_tensor_of_another_shape_and_a_damaged_safetensors_are_named(tmp_path):
    """One tensor of another shape (torch's raw "size mismatch" before) and a damaged
    .safetensors file (safetensors' own error before): each refused naming the file."""
    from safetensors.torch import save_file

    need("timm")
    bb = backbones.get("timm:test_vit")
    state = bb.build().state_dict()
    state["blocks.0.mlp.fc1.weight"] = state["blocks.0.mlp.fc1.weight"][:-1]
    odd = tmp_path / "odd.pt"
    torch.save(state, odd)
    with pytest.raises(
        EkxError, match=r"odd.pt: not a timm:test_vit state dict \(1 of another shape, e.g. blocks.0.mlp.fc1.weight"
    ):
        backbones.load_weights(bb, str(odd))
    good = tmp_path / "good.safetensors"
    save_file(bb.build().state_dict(), str(good))
    for name, data in (("cut.safetensors", good.read_bytes()[:-100]), ("junk.safetensors", b"not safetensors at all")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(EkxError, match=rf"{name}: not a readable .safetensors file"):
            backbones.load_weights(bb, str(tmp_path / name))
    assert backbones.load_weights(bb, str(good))[1].startswith("sha256:")


def test_a_hugging_face_model_or_task_model_state_dict_is_its_encoder(tiny_videomae, tmp_path):
    """--weights FILE for `hf:`: the library model's state dict (without ekx's wrapper prefix)
    and a VideoMAEForVideoClassification one (its `videomae.` encoder; the task head around
    it dropped) both load the encoder's tensors."""
    from transformers import VideoMAEForVideoClassification

    bb = backbones.get(f"hf:{tiny_videomae}")
    saved, _ = backbones.load_weights(bb, "DEFAULT")
    torch.manual_seed(2)
    task = VideoMAEForVideoClassification(saved.model.config)
    for module, name in ((saved.model, "model.pt"), (task, "task.pt")):
        torch.save(module.state_dict(), tmp_path / name)
        model, _ = backbones.load_weights(bb, str(tmp_path / name))
        want = getattr(module, "videomae", module).state_dict()
        assert model.model.state_dict().keys() == want.keys()
        assert all(torch.equal(model.model.state_dict()[k], v) for k, v in want.items()), name
