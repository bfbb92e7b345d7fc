"""One policy for segments without scores (issue 18 point 3): `ekx evaluate` refuses a cache
with failed/pending rows unless --allow-missing, which counts them as wrong in every metric;
a submission holds every segment of the split or is not written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import fail_rows, make_cache
from typer.testing import CliRunner

from ekx import EkxError
from ekx.cache.reader import open_cache
from ekx.cli import app
from ekx.heads import config as hc
from ekx.heads import metrics, missing
from ekx.heads import train as tr
from ekx.heads.evaluate import check_complete, evaluate_run

runner = CliRunner()


def test_missing_rows_count_as_wrong_in_every_metric_and_subset():
    """Same figures as metrics.compute over all rows with the missing rows' logits made wrong."""
    torch.manual_seed(0)
    n = 60
    verb, noun = torch.randn(n, 97), torch.randn(n, 300)
    verbs, nouns = torch.randint(97, (n,)), torch.randint(300, (n,))
    verb[torch.arange(n), verbs] += 3.0  # most are right, so a wrong count shows
    noun[torch.arange(n), nouns] += 3.0
    present = torch.rand(n) > 0.3
    unseen = torch.rand(n) > 0.5
    tails = ({int(v) for v in verbs[:10]}, {int(x) for x in nouns[5:15]})
    wrong_v, wrong_n = verb.clone(), noun.clone()
    wrong_v[~present] = 0.0
    wrong_n[~present] = 0.0
    wrong_v[(~present).nonzero().flatten(), verbs[~present]] = -100.0  # not even in the top-5
    wrong_n[(~present).nonzero().flatten(), nouns[~present]] = -100.0
    expect = metrics.compute(wrong_v, wrong_n, verbs, nouns, *tails, unseen=unseen)
    got = missing.compute(verb[present], noun[present], present, verbs, nouns, *tails, unseen=unseen)
    assert got == pytest.approx(expect) and list(got) == list(expect)
    assert got["verb_top1"] < metrics.compute(verb[present], noun[present], verbs[present], nouns[present])["verb_top1"]


@pytest.fixture()
def run_and_caches(tmp_path):
    train = make_cache(tmp_path / "train.h5", n=40, num_verbs=97, num_nouns=300, seed=0)
    val = make_cache(tmp_path / "val.h5", n=20, num_verbs=97, num_nouns=300, seed=1, split="validation")
    data = tr.load_data(train, val, "cpu")
    cfg = hc.TrainConfig(head="pooling", epochs=1, frames=4, train_features=str(train), val_features=str(val))
    tr.run(cfg, tmp_path / "r", data)
    return tmp_path / "r", val


def test_evaluate_refuses_failed_rows_unless_allowed_then_counts_them_wrong(run_and_caches, tmp_path):
    run, val = run_and_caches
    whole = evaluate_run(run, val)["metrics"]
    fail_rows(val, [3, 7])
    with pytest.raises(EkxError, match=r"2 of 20 segments have no scores \(e.g. P01_01_3\).*--allow-missing"):
        evaluate_run(run, val)
    result = evaluate_run(run, val, allow_missing=True)
    assert result["segments"] == 20 and result["missing_ids"] == ["P01_01_3", "P02_02_7"]
    # each figure is over all 20 segments: the 18 scored rows' hits over 20, the 2 failed ones wrong
    labels = (
        torch.tensor(np.delete(open_cache(val).verb_class, [3, 7])),
        torch.tensor(np.delete(open_cache(val).noun_class, [3, 7])),
    )
    over_18 = metrics.compute(result["verb"], result["noun"], *labels)
    assert result["metrics"] == pytest.approx({k: v * 18 / 20 for k, v in over_18.items()})
    assert set(result["metrics"]) == set(whole)
    cli = runner.invoke(app, ["evaluate", str(run), "--features", str(val)])
    assert cli.exit_code == 1 and "--allow-missing" in cli.output
    js = tmp_path / "m.json"
    cli = runner.invoke(app, ["evaluate", str(run), "--features", str(val), "--allow-missing", "--json", str(js)])
    assert cli.exit_code == 0 and "2 of 20 segments have no scores and count as wrong" in cli.output, cli.output
    assert json.loads(js.read_text())["missing"] == 2
    # a submission is never written without every segment
    out = tmp_path / "sub.json"
    cli = runner.invoke(
        app, ["evaluate", str(run), "--features", str(val), "--allow-missing", "--submission", str(out)]
    )
    assert cli.exit_code == 1 and "no submission written" in cli.output and not out.exists(), cli.output


def test_a_test_split_submission_with_a_failed_segment_is_refused(run_and_caches, tmp_path):
    run, _ = run_and_caches
    test = make_cache(tmp_path / "test.h5", n=30, num_verbs=97, num_nouns=300, seed=2, labelled=False, split="test")
    fail_rows(test, [29])
    out = tmp_path / "sub.json"
    cli = runner.invoke(app, ["evaluate", str(run), "--features", str(test), "--submission", str(out)])
    assert cli.exit_code == 1 and "1 of 30 segments have no scores" in cli.output, cli.output
    assert not out.exists()


def test_a_submission_lacking_segments_of_the_annotated_split_is_refused(epic100):
    """A cache extracted with --limit holds fewer segments than the split's CSV: refused."""
    from ekx import epic

    ids = [s.narration_id for s in epic.Annotations(epic100).segments("test")]
    result = {"missing_ids": [], "segments": 5, "split": "test", "narration_ids": ids[:5], "features": "t.h5"}
    with pytest.raises(EkxError, match=rf"{len(ids) - 5} of {len(ids)} segments of the test split are not in t.h5"):
        check_complete(result, epic100)
    check_complete({**result, "narration_ids": ids, "segments": len(ids)}, epic100)
