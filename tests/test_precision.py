"""`--precision auto` on a CPU: bf16 exactly where the CPU has bf16 matrix math (AMX-BF16 or
AVX512-BF16, read from the kernel's flags), fp32 elsewhere; a cache keeps the precision it was started
in (part of its identity)."""

from __future__ import annotations

import pytest
import torch

from ekx import EkxError, runtime
from ekx.extract.pipeline import ExtractConfig, extract
from ekx.heads import models

CPU = torch.device("cpu")


def test_cpu_flags_are_read_from_the_kernels_list(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 amx_bf16 amx_tile\nbugs\t: x\n")
    assert {"amx_bf16", "avx2"} <= runtime.cpu_flags(info)
    assert runtime.cpu_flags(tmp_path / "absent") == set()


@pytest.mark.parametrize(
    ("flags", "want", "units"),
    [
        ({"avx2", "amx_bf16", "amx_tile", "avx512_bf16"}, "bf16", "AMX-BF16"),
        ({"avx2", "avx512f", "avx512_bf16"}, "bf16", "AVX512-BF16"),
        ({"avx2", "avx512f", "avx512_vnni"}, "fp32", None),
        ({"avx2", "fma"}, "fp32", None),
    ],
)
def test_auto_is_bf16_exactly_where_the_cpu_has_bf16_matrix_math(flags, want, units, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_flags", lambda *a: flags)
    runtime.cpu_bf16_units.cache_clear()
    try:
        assert runtime.resolve_precision("auto", CPU) == want
        assert runtime.resolve_precision("fp32", CPU) == "fp32"  # forcing fp32 always works
        note = runtime.precision_note("auto", CPU, want)
        assert (note is not None) == (want == "bf16")
        assert runtime.cpu_bf16_units() == units
        if note:
            assert units in note and "--precision fp32" in note
    finally:
        runtime.cpu_bf16_units.cache_clear()


def test_a_bf16_cache_is_not_resumed_in_fp32(synth_data, tmp_path):
    """The rule: precision is part of a cache's identity, so rows of two precisions never mix;
    a cache started by `auto` on an AMX CPU continues elsewhere with --precision bf16."""
    common = dict(split="validation", weights="none", frames=2, workers=0, limit=2, out=tmp_path / "c.h5")
    ann, videos = synth_data / "annotations", synth_data / "videos"
    extract(ExtractConfig(**common, precision="bf16"), ann, videos, tmp_path, warn=lambda m: None)
    with pytest.raises(EkxError, match=r"precision.*bf16.*fp32|precision.*fp32.*bf16"):
        extract(
            ExtractConfig(**common, precision="fp32"),
            ann,
            videos,
            tmp_path,
            warn=lambda m: None,
        )


def test_the_choice_is_said_once_as_information_not_as_a_warning(synth_data, tmp_path, monkeypatch):
    """auto on a CPU with bf16 units: the line saying bf16 and why goes to ``info``; ``warn``
    stays for what needs the user's attention (a test counting warnings failed on such a CPU)."""
    monkeypatch.setattr(runtime, "cpu_flags", lambda *a: {"avx2", "avx512_bf16"})
    runtime.cpu_bf16_units.cache_clear()
    said: dict[str, list[str]] = {"info": [], "warn": []}
    try:
        cfg = ExtractConfig(split="validation", weights="none", frames=2, workers=0, limit=1, out=tmp_path / "c.h5")
        extract(
            cfg,
            synth_data / "annotations",
            synth_data / "videos",
            tmp_path,
            warn=said["warn"].append,
            info=said["info"].append,
        )
    finally:
        runtime.cpu_bf16_units.cache_clear()
    assert [m for m in said["info"] if "bf16" in m and "AVX512-BF16" in m], said
    assert not [m for m in said["warn"] if "precision" in m], said


@pytest.mark.parametrize("name", sorted(models.REGISTRY))
def test_every_head_gives_fp32_logits_under_bf16_autocast(name):
    """The classifier runs outside autocast: bf16 logits (8 significant bits) tie at the top and
    round the scores a submission holds. Its logits equal the fp32 classifier's on the same
    (bf16-computed) features, exactly."""

    torch.manual_seed(0)
    head = models.create(name, dim=32, num_verbs=97, num_nouns=300, frames=4, dropout=0.0).eval()
    feats = {}
    head.classifier.register_forward_pre_hook(lambda m, args: feats.update(x=args))
    with torch.no_grad(), runtime.autocast(CPU, "bf16"):
        out = head(torch.randn(3, 4, 32))
    assert out["verb"].dtype == out["noun"].dtype == torch.float32
    with torch.no_grad():
        ref = head.classifier(*(x.float() for x in feats["x"]))
    assert torch.equal(out["verb"], ref["verb"]) and torch.equal(out["noun"], ref["noun"])
    assert len(out["verb"].unique()) == out["verb"].numel()  # no bf16 ties among 291 logits
