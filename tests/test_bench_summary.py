"""bench/vs_video_features.py's report: per-round ratios, their median over at least three
rounds, and the rounds a collapsed side would otherwise carry into the table (issue 35)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "vs_video_features.py"


def bench():
    spec = importlib.util.spec_from_file_location("vs_video_features", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_collapsed_round_is_flagged_and_the_median_ignores_it():
    """The run that printed 32.6x: video_features took 1,042 s in one round and 53 s in the
    others. Per-round ratios are printed, the median of three is the typical one, and the
    round is flagged on the side that collapsed and marked in the ratios."""
    vf = bench()
    runs = {
        "video_features": [(1042.0, 1200.0, 900.0), (53.0, 100.0, 930.0), (55.0, 101.0, 931.0)],
        "ekx": [(32.0, 50.0, 1100.0), (33.0, 52.0, 1102.0), (31.0, 51.0, 1101.0)],
    }
    lines = vf.summary(runs, "video_features", {"ekx": "0.99 / 0.99"})
    table = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in lines if line.startswith("| ")}
    ekx = table["ekx"]
    assert ekx[4] == "32.56x (!), 1.61x, 1.77x"  # 1042/32, 53/33, 55/31
    assert ekx[5] == "**1.77x**"  # the median of three; the mean of all would say 11.98x
    assert ekx[6] == "none" and table["video_features"][6] == "1"  # the round that collapsed: video_features' first
    assert ekx[7] == "0.99 / 0.99 |"
    assert any(line.startswith("round 1, video_features: 1042.0 s against a median round of 55.0 s") for line in lines)


def test_rounds_within_2x_are_not_flagged_and_two_rounds_give_no_median():
    vf = bench()
    assert vf.off_rounds([50.0, 60.0, 119.0]) == []
    assert vf.off_rounds([50.0, 60.0, 121.0]) == [2]  # 121 > 2 x 60, the median round
    assert vf.off_rounds([50.0, 60.0, 24.0]) == [2]  # 24 < 50 / 2
    assert vf.off_rounds([1042.0, 53.0, 55.0, 54.0]) == [0]
    runs = {"video_features": [(50.0, 1.0, 1.0), (52.0, 1.0, 1.0)], "ekx": [(20.0, 1.0, 1.0), (21.0, 1.0, 1.0)]}
    lines = vf.summary(runs, "video_features")
    assert "needs 3 rounds" in next(line for line in lines if line.startswith("| ekx |"))
    assert vf.MIN_ROUNDS == 3
