"""The Python API: the docs' example (docs/python.md) runs as written, and its numbers are the CLI's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

PAGE = Path(__file__).resolve().parents[1] / "docs" / "python.md"


def readme_example() -> str:
    text = PAGE.read_text()
    section = text[text.index("# Using ekx from Python") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_python_example_runs(demo_workspace, monkeypatch, capsys):
    workdir, _ = demo_workspace
    monkeypatch.chdir(workdir)
    exec(compile(readme_example(), "docs/python.md (Using ekx from Python)", "exec"), {})
    out = capsys.readouterr().out
    assert "resnet50" in out and "action_top1" in out and "lstm" in out
    assert re.search(r"\d+\.\d-\s*\d+\.\d s ", out), out  # a predicted window line


@pytest.mark.slow
def test_api_predict_equals_ekx_evaluate(demo_workspace):
    from ekx import api
    from ekx.heads.evaluate import evaluate_run

    workdir, _ = demo_workspace
    val = workdir / "features" / "resnet50" / "validation.h5"
    cache = api.open_cache(val)
    run = api.load_run(workdir / "runs" / "lstm-demo", device="cpu")
    verb, noun = run.predict(cache.features(mmap=True)[cache.done])
    ref = evaluate_run(workdir / "runs" / "lstm-demo", val, device_name="cpu")
    torch.testing.assert_close(verb, ref["verb"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(noun, ref["noun"], rtol=1e-5, atol=1e-5)
    m = api.metrics(verb, noun, cache.verb_class[cache.done], cache.noun_class[cache.done])
    from ekx.heads import metrics

    assert m == metrics.compute(
        ref["verb"],
        ref["noun"],
        torch.as_tensor(cache.verb_class[cache.done]).long(),
        torch.as_tensor(cache.noun_class[cache.done]).long(),
    )


def test_create_head_and_registry():
    from ekx import api

    head = api.create_head("lstm", dim=16, frames=4, num_verbs=3, num_nouns=5)
    out = head(torch.randn(2, 4, 16))
    assert out["verb"].shape == (2, 3) and out["noun"].shape == (2, 5)
    assert api.heads() == sorted(["pooling", "lstm", "transformer", "cross-attention", "context"])
