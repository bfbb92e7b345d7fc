"""`ekx demo` end to end: the README's main job, and the proof that frame order survives
decode -> cache -> head (the synthetic data's time-reversed verbs)."""

from __future__ import annotations

import pytest
import torch

from ekx.demo import reversal_scores
from ekx.heads.data import load_split
from ekx.heads.evaluate import evaluate_run


@pytest.mark.slow
def test_demo_runs_and_order_aware_heads_separate_reversed_verbs(demo_workspace):
    tmp_path, result = demo_workspace
    assert result.exit_code == 0, result.output
    assert "model comparison" in result.output
    val = tmp_path / "features" / "resnet50" / "validation.h5"
    split = load_split(val, torch.device("cpu"))
    scores = {}
    for head in ("pooling", "lstm", "transformer", "cross-attention"):
        assert head in result.output
        r = evaluate_run(tmp_path / "runs" / f"{head}-demo", val)
        scores[head] = reversal_scores(r["verb"], split.verbs[split.rows], split.attrs["verb_classes"])
    for head in ("lstm", "transformer", "cross-attention"):
        # which of the two mirrored verbs happened: only frame order can tell
        assert scores[head]["direction"] >= 90, scores
        assert scores[head]["reversal_top1"] >= 70, scores
    assert 25 <= scores["pooling"]["direction"] <= 75, scores  # order-blind: chance
