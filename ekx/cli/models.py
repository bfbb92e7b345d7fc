"""`ekx backbones`: the models stage 1 can extract with - built-in, families, sound."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from ekx import EkxError, tables
from ekx.cli.common import command, console
from ekx.extract.config import BACKBONES


@command()
def backbones(
    name: Annotated[
        str | None, typer.Argument(help="A backbone or family model (timm:convnext_tiny) to describe.")
    ] = None,
):
    """List the built-in backbones and the families, or describe one model: feature dim,
    clip length, input size and preprocessing.

    Example: ekx backbones timm:vit_small_patch14_dinov2.lvd142m
    """
    if name is not None:  # the name alone, before the registry (torch) loads: a slip is answered at once
        name = BACKBONES.canonical(name)
    from ekx.extract import backbones as bbs
    from ekx.extract import families

    if name is None:
        rows = []
        for b in bbs.REGISTRY.values():
            size = f"{b.preprocess.crop_size[0]}x{b.preprocess.crop_size[1]}"
            rows.append([b.name, str(b.dim), str(b.clip_len), size, _pre_text(b.preprocess)])
        header = ["backbone", "dim", "clip", "input", "preprocessing"]
        tables.show(console, header, rows, title="built-in backbones (torchvision)")
        rows = [
            [f"{f.prefix}:", f.example, f.what, f"pip install 'ekx[{f.extra}]'" if f.extra else ""]
            for f in families.FAMILIES.values()
        ]
        title = "families (any model of the library, by name)"
        tables.show(console, ["family", "example", "what", "extra"], rows, title)
        _sound_table(bbs)
        return
    try:
        b = bbs.get(name)
    except EkxError as e:  # the families name the flag a model usually comes by; here it is NAME
        raise EkxError(str(e).removeprefix("--backbone ")) from None
    if b.audio is not None:  # a model of sound: rate, window and front end instead of frames
        a = b.audio
        console.print(f"[bold]{escape(b.name)}[/bold]: {b.dim}-d features of sound, {a.rate} Hz mono, "
                      f"windows of {a.window:.4g} s ({a.samples} samples) centred on each feature's time")  # fmt: skip
        console.print(f"front end: {escape(a.describe)}")
        for k, v in {**a.attrs, **b.attrs}.items():
            console.print(f"{k}: {escape(str(v))}")
        return
    p = b.preprocess
    console.print(f"[bold]{escape(b.name)}[/bold]: {b.dim}-d features, " + (
        "per frame" if b.clip_len == 1 else f"clips of {b.clip_len} frames"
    ) + f", input {p.crop_size[0]}x{p.crop_size[1]}")  # fmt: skip
    console.print(f"preprocessing: {_pre_text(p)}; mean {list(p.mean)}, std {list(p.std)}")
    for k, v in b.attrs.items():
        console.print(f"{k}: {escape(str(v))}")


def _sound_table(bbs) -> None:
    """The built-in models of sound (`audio:`); Hugging Face's (AST, CLAP, wav2vec2) are hf: names."""
    from ekx.extract.audio import MODELS

    rows = []
    for name in MODELS:
        b = bbs.get(f"audio:{name}")
        rows.append([b.name, str(b.dim), f"{b.audio.rate} Hz", f"{b.audio.window:.4g} s", b.audio.describe])
    rows.append(["hf:<dir or repo>", "", "its extractor's", "its input", "the library's own AutoFeatureExtractor"])
    header = ["backbone", "dim", "rate", "window", "front end"]
    tables.show(console, header, rows, title="audio models (the videos' sound track)")


def _pre_text(p) -> str:
    resize = f"short side {p.resize_size[0]}" if len(p.resize_size) == 1 else f"{p.resize_size[0]}x{p.resize_size[1]}"
    return f"resize {resize} ({p.interpolation}), centre crop {p.crop_size[0]}x{p.crop_size[1]}"
