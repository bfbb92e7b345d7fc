"""`ekx score` and the submission file: scored as the official evaluation scores it, equal to
`ekx evaluate`'s figures, worked out by hand, and malformed files refused by name."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_cache
from typer.testing import CliRunner

from ekx import EkxError, epic, scoring
from ekx.cli import app
from ekx.heads import metrics
from ekx.heads import train as tr
from ekx.heads.config import TrainConfig
from ekx.heads.data import load_split
from ekx.heads.evaluate import submission, write_json

runner = CliRunner()


def write_annotations(
    root: Path,
    segments: list[tuple[str, str, int, int]],
    num_verbs: int,
    num_nouns: int,
    tail_verbs=(),
    tail_nouns=(),
    unseen=(),
    split: str = "validation",
) -> Path:
    """An annotation directory in the official formats: (narration_id, video_id, verb, noun) rows."""
    root.mkdir(parents=True, exist_ok=True)
    for name, n in ((epic.VERB_CLASSES, num_verbs), (epic.NOUN_CLASSES, num_nouns)):
        (root / name).write_text("id,key,instances,category\n" + "".join(f"{i},c{i},[],x\n" for i in range(n)))
    with (root / epic.SPLIT_FILES[split]).open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(epic.LABELLED_COLUMNS)
        for nid, vid, verb, noun in segments:
            w.writerow(
                [
                    nid,
                    vid.split("_")[0],
                    vid,
                    "00:00:01.00",
                    "00:00:01.00",
                    "00:00:02.00",
                    60,
                    120,
                    "do it",
                    f"v{verb}",
                    verb,
                    f"n{noun}",
                    noun,
                    f"['n{noun}']",
                    f"[{noun}]",
                ]
            )
    (root / epic.TAIL_VERBS).write_text("verb\n" + "".join(f"{v}\n" for v in tail_verbs))
    (root / epic.TAIL_NOUNS).write_text("noun\n" + "".join(f"{n}\n" for n in tail_nouns))
    (root / epic.UNSEEN.format(split=split)).write_text("participant_id\n" + "".join(f"{p}\n" for p in unseen))
    return root


def old_submission(result: dict) -> dict:
    """The file as ekx wrote it before issue 12: softmax probabilities rounded to 6 decimals."""
    pv, pn = result["verb"].softmax(1), result["noun"].softmax(1)
    return {
        "version": "0.2",
        "challenge": "action_recognition",
        "sls_pt": 2,
        "sls_tl": 3,
        "sls_td": 4,
        "results": {
            nid: {
                "verb": {str(c): round(float(s), 6) for c, s in enumerate(pv[i].tolist())},
                "noun": {str(c): round(float(s), 6) for c, s in enumerate(pn[i].tolist())},
            }
            for i, nid in enumerate(result["narration_ids"])
        },
    }


# ---------------------------------------------------------------- the file scores as evaluate reports


def test_score_of_the_written_submission_equals_evaluate_on_a_trained_run(tmp_path):
    # 8 x 20 classes, 3 epochs: a run that ranks true actions anywhere from 1st to far down, where
    # ranking pairs by product or by sum of probabilities (a second softmax) differs on some segments
    train = make_cache(tmp_path / "train.h5", n=192, num_verbs=8, num_nouns=20, seed=0)
    val = make_cache(tmp_path / "val.h5", n=300, num_verbs=8, num_nouns=20, seed=1, split="validation")
    split = load_split(val, torch.device("cpu"))
    rows = split.rows.tolist()
    ann = write_annotations(
        tmp_path / "ann",
        [(split.narration_id[r], split.video_id[r], int(split.verbs[r]), int(split.nouns[r])) for r in rows],
        8,
        20,
        tail_verbs=(6, 7),
        tail_nouns=(16, 17, 18, 19),
        unseen=("P02",),
    )
    cfg = TrainConfig(
        head="pooling", epochs=3, frames=4, lr=1e-2, batch_size=16, train_features=str(train), val_features=str(val)
    )
    tr.run(cfg, tmp_path / "r", tr.load_data(train, val, "cpu"))
    m_json, sub, figs = tmp_path / "m.json", tmp_path / "sub.json", tmp_path / "figs.json"
    res = runner.invoke(
        app,
        [
            "evaluate",
            str(tmp_path / "r"),
            "--features",
            str(val),
            "--annotations",
            str(ann),
            "--json",
            str(m_json),
            "--submission",
            str(sub),
        ],
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["score", str(sub), "--annotations", str(ann), "--json", str(figs)], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "action_top5" in res.output
    reported, scored = json.loads(m_json.read_text())["metrics"], json.loads(figs.read_text())["metrics"]
    assert set(reported) >= {
        "verb_top1",
        "verb_top5",
        "noun_top1",
        "noun_top5",
        "action_top1",
        "action_top5",
        "tail_verb_top1",
        "tail_noun_top1",
        "tail_action_top1",
        "unseen_verb_top1",
        "unseen_noun_top1",
        "unseen_action_top1",
    }
    assert 0 < reported["action_top5"] < 100, "the run must rank some but not all true actions in its top-5"
    assert scored == reported
    # the values in the file are the run's float32 logits, exactly
    entry = json.loads(sub.read_text())["results"][split.narration_id[rows[0]]]
    assert all(float(np.float32(s)) == s for s in entry["verb"].values())


@pytest.mark.slow
def test_score_equals_metrics_on_the_real_validation_csv_with_random_logits(epic100, tmp_path):
    ann = epic.Annotations(epic100)
    segments = ann.segments("validation")
    n = len(segments)
    verbs = torch.tensor([s.verb_class for s in segments])
    nouns = torch.tensor([s.noun_class for s in segments])
    g = torch.Generator().manual_seed(0)
    verb, noun = torch.randn(n, 97, generator=g) * 2, torch.randn(n, 300, generator=g) * 2
    # random logits with some signal, so every figure (tail, unseen, action top-5) is far from 0 and 100
    verb[torch.arange(n), verbs] += 4 * (torch.rand(n, generator=g) < 0.5)
    noun[torch.arange(n), nouns] += 4 * (torch.rand(n, generator=g) < 0.5)
    order = torch.randperm(n, generator=g).tolist()  # a submission need not follow the CSV's order
    result = {"verb": verb[order], "noun": noun[order], "narration_ids": [segments[i].narration_id for i in order]}
    path = tmp_path / "val.json"
    write_json(path, submission(result))
    scored = scoring.score(path, epic100, "validation")
    tails = ann.tail_classes()
    unseen = ann.unseen_participants("validation")
    expected = metrics.compute(
        verb, noun, verbs, nouns, *tails, unseen=torch.tensor([s.participant_id in unseen for s in segments])
    )
    assert scored["segments"] == n == 9668
    assert len(expected) == 12 and all(0 < v < 100 for v in expected.values()), expected
    assert scored["metrics"] == expected


# ---------------------------------------------------------------- known answers, by hand

P_A = [0.75, 0.15, 0.10]
Q_A = [0.45, 0.40, 0.10, 0.04, 0.007, 0.003]
P_B = [0.20, 0.70, 0.10]
Q_B = Q_A[::-1]
# (narration_id, video_id, verb, noun, verb probabilities, noun probabilities)
HAND = [
    ("P01_01_0", "P01_01", 1, 1, P_A, Q_A),
    ("P01_01_1", "P01_01", 0, 3, P_A, Q_A),
    ("P02_01_2", "P02_01", 0, 0, P_A, Q_A),
    ("P02_01_3", "P02_01", 2, 0, P_B, Q_B),
    ("P01_01_4", "P01_01", 1, 0, P_A, Q_A),
]


@pytest.fixture()
def hand(tmp_path):
    """5 segments, 3 verbs x 6 nouns; the logits are log-probabilities, so the official top-100
    softmax gives back exactly P and Q."""
    ann = write_annotations(
        tmp_path / "ann", [h[:4] for h in HAND], 3, 6, tail_verbs=(0,), tail_nouns=(1, 3), unseen=("P02",)
    )
    sub = {
        "version": "0.2",
        "challenge": "action_recognition",
        "sls_pt": 2,
        "sls_tl": 3,
        "sls_td": 4,
        "results": {
            nid: {
                "verb": {str(c): math.log(p) for c, p in enumerate(pv)},
                "noun": {str(c): math.log(q) for c, q in enumerate(pn)},
            }
            for nid, _, _, _, pv, pn in HAND
        },
    }
    return ann, sub


def test_score_by_hand_product_not_sum(hand, tmp_path):
    ann, sub = hand
    path = tmp_path / "hand.json"
    path.write_text(json.dumps(sub))
    m = scoring.score(path, ann)["metrics"]
    # Segments 0, 1, 2, 4 share P_A x Q_A. Products p(v) x q(n), best first:
    #   (0,0) .75*.45=.3375  (0,1) .75*.40=.30  (0,2) .075  (1,0) .15*.45=.0675  (1,1) .15*.40=.06
    #   | 6th (2,0) .045, (2,1) .04, (0,3) .75*.04=.03, (0,4) .00525 ...
    # The sum p(v) + q(n) - what a second softmax over probabilities ranks by - would instead give
    #   (0,0) 1.20 (0,1) 1.15 (0,2) .85 (0,3) .79 (0,4) .757 | (0,5) .753 (1,0) .60 (1,1) .55 ...
    # Segment 3 (P_B x Q_B): (1,5) .315 (1,4) .28 (0,5) .09 (0,4) .08 (1,3) .07 | (2,5) .045 ... truth (2,0)
    #   is .1*.003 - last; noun 0 is the 6th noun; verb 2 the 3rd (of 3) verb.
    # seg truth   verb@1 verb@5 noun@1 noun@5 action@1 action@5 (product)  action@5 (sum)
    #  0  (1,1)     -      y      -      y        -       y  (5th)          - (8th)
    #  1  (0,3)     y      y      -      y  (4th) -       -  (8th)          y (4th)
    #  2  (0,0)     y      y      y      y        y       y                 y
    #  3  (2,0)     -      y      -      -  (6th) -       -                 -
    #  4  (1,0)     -      y      y      y        -       y  (4th)          - (7th)
    assert m["verb_top1"] == pytest.approx(40.0) and m["verb_top5"] == pytest.approx(100.0)
    assert m["noun_top1"] == pytest.approx(40.0) and m["noun_top5"] == pytest.approx(80.0)
    assert m["action_top1"] == pytest.approx(20.0)
    assert m["action_top5"] == pytest.approx(60.0)  # 3 of 5; the sum rule would give 40
    # tail verbs {0}: segments 1, 2 -> verb top-1 both right
    # tail nouns {1, 3}: segments 0, 1 -> noun top-1 both wrong
    # tail actions (tail verb or tail noun): segments 0, 1, 2 -> action top-1 only segment 2
    assert m["tail_verb_top1"] == pytest.approx(100.0) and m["tail_noun_top1"] == pytest.approx(0.0)
    assert m["tail_action_top1"] == pytest.approx(100 / 3)
    # unseen participant P02: segments 2 (all right) and 3 (all wrong)
    assert m["unseen_verb_top1"] == m["unseen_noun_top1"] == m["unseen_action_top1"] == pytest.approx(50.0)
    # The same segments written as probabilities (ekx before issue 12): scored as the server would,
    # softmax(p) x softmax(q) ranks by p + q, and action top-5 becomes the sum rule's 2 of 5.
    logits = {
        "verb": torch.tensor([h[4] for h in HAND]).log(),
        "noun": torch.tensor([h[5] for h in HAND]).log(),
        "narration_ids": [h[0] for h in HAND],
    }
    path.write_text(json.dumps(old_submission(logits)))
    assert scoring.score(path, ann)["metrics"]["action_top5"] == pytest.approx(40.0)


# ---------------------------------------------------------------- malformed files, refused by name


def _drop_segment(s):
    del s["results"]["P02_01_3"]


def _set(path, value):
    def edit(s):
        *parents, last = path
        for p in parents:
            s = s[p]
        s[last] = value

    return edit


def _delete(key):
    def edit(s):
        del s[key]

    return edit


BAD = {
    "missing segment": (
        _drop_segment,
        r"1 of the 5 segments of .*EPIC_100_validation.csv are missing \(e.g. "
        r"P02_01_3\); the official scoring needs every segment",
    ),
    "unknown id": (
        _set(["results", "P09_99_7"], {"verb": {}, "noun": {}}),
        r"1 narration id\(s\) are not segments of .*EPIC_100_validation.csv \(e.g. P09_99_7\); "
        r"was it written for another split",
    ),
    "verb count": (
        _set(["results", "P01_01_0", "verb"], {"0": 1.0, "1": 2.0}),
        r"segment P01_01_0: 2 verb scores, expected 3 with keys \"0\"..\"2\" \(one per class of "
        r".*EPIC_100_verb_classes.csv\)",
    ),
    "noun keys": (
        _set(["results", "P01_01_1", "noun"], {str(c): 0.0 for c in range(1, 7)}),
        r"segment P01_01_1: 6 noun scores, expected 6 .*unexpected keys 6",
    ),
    "nan": (
        _set(["results", "P02_01_2", "noun", "2"], float("nan")),
        r"segment P02_01_2: noun score for class 2 is nan, not a finite number",
    ),
    "infinity": (
        _set(["results", "P01_01_4", "verb", "1"], float("-inf")),
        r"segment P01_01_4: verb score for class 1 is -inf, not a finite number",
    ),
    "boolean": (  # JSON true is not 1.0: a writer's bug, not a score
        _set(["results", "P01_01_4", "verb", "1"], True),
        r"segment P01_01_4: verb score for class 1 is True, not a finite number",
    ),
    "string": (
        _set(["results", "P01_01_4", "verb", "0"], "0.5"),
        r"segment P01_01_4: verb score for class 0 is '0.5', not a finite number",
    ),
    "version": (_set(["version"], "0.1"), r"header field 'version' is '0.1', expected '0.2'"),
    "challenge": (
        _set(["challenge"], "action_anticipation"),
        r"header field 'challenge' is 'action_anticipation', expected 'action_recognition'",
    ),
    "no sls": (_delete("sls_td"), r"header field 'sls_td' is missing, expected a supervision level 0..5"),
    "sls range": (_set(["sls_pt"], 7), r"header field 'sls_pt' is 7, expected a supervision level 0..5"),
    "no results": (_delete("results"), r"no \"results\" object keyed by narration_id"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_submissions_are_refused_with_the_file_and_the_fault(hand, tmp_path, case):
    ann, sub = hand
    edit, message = BAD[case]
    edit(sub)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(sub))
    with pytest.raises(EkxError, match=re.escape(str(path)) + ": " + message):
        scoring.score(path, ann)
    res = runner.invoke(app, ["score", str(path), "--annotations", str(ann)], terminal_width=400)
    assert res.exit_code == 1 and "error:" in res.output


def test_unreadable_or_unlabelled_inputs_are_refused(hand, tmp_path, epic100):
    ann = hand[0]
    path = tmp_path / "s.json"
    path.write_text('{"version": "0.2", ')
    with pytest.raises(EkxError, match=re.escape(str(path)) + r": not a JSON file .*ekx evaluate RUN"):
        scoring.score(path, ann)
    path.write_text("[]")
    with pytest.raises(EkxError, match="top level is a JSON list, expected an object"):
        scoring.score(path, ann)
    with pytest.raises(
        EkxError,
        match=r"EPIC_100_test_timestamps.csv has no labels \(the test split\): only the "
        r"challenge server scores it",
    ):
        scoring.score(path, epic100, "test")
    with pytest.raises(EkxError, match="submission file not found"):
        scoring.score(tmp_path / "nope.json", ann)


def test_the_official_zip_is_read(hand, tmp_path):
    import zipfile

    ann, sub = hand
    path = tmp_path / "sub.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("test.json", json.dumps(sub))
    assert scoring.score(path, ann)["metrics"]["action_top5"] == pytest.approx(60.0)


def test_a_narration_id_twice_is_refused_naming_it(hand, tmp_path):
    ann, sub = hand
    text = json.dumps(sub)
    assert text.endswith("}}")  # "results" is the last key: append a second P01_01_0 to it
    path = tmp_path / "dup.json"
    path.write_text(text[:-2] + ', "P01_01_0": ' + json.dumps(sub["results"]["P01_01_1"]) + "}}")
    with pytest.raises(EkxError, match=re.escape(str(path)) + r": narration id 'P01_01_0' appears twice in results"):
        scoring.score(path, ann)
    # a class twice in one segment's scores: the same silent last-wins, refused too
    path.write_text(text.replace('"verb": {"0": ', '"verb": {"1": 0.5, "0": ', 1))
    with pytest.raises(EkxError, match=re.escape(str(path)) + r": key '1' appears twice in one object"):
        scoring.score(path, ann)


def _zip(path: Path, text: str) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("test.json", text)
    return path


def _declare_size(path: Path, size: int) -> None:
    """Rewrite the uncompressed size the zip's headers declare for its one member (local header
    and central directory), leaving the data as it was: a crafted or damaged zip."""
    import struct

    data = bytearray(path.read_bytes())
    local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
    struct.pack_into("<I", data, local + 22, size)
    struct.pack_into("<I", data, central + 24, size)
    path.write_bytes(bytes(data))


def test_a_submission_that_expands_past_the_limit_is_refused(hand, tmp_path, monkeypatch):
    ann, sub = hand
    text = json.dumps(sub)
    # the default limit: a zip whose member declares 2 GiB is refused before a byte is inflated
    bomb = _zip(tmp_path / "bomb.zip", text)
    _declare_size(bomb, 2 << 30)
    with pytest.raises(
        EkxError, match=re.escape(str(bomb)) + r": test.json expands to 2048.0 MiB, more than the 1024 MiB"
    ):
        scoring.score(bomb, ann)
    # with a 64 KiB limit: 1 MiB of padding compresses to ~1 KiB and is still refused, zipped or not
    monkeypatch.setattr(scoring, "MAX_BYTES", 64 << 10, raising=False)
    padded = text[:-1] + " " * (1 << 20) + "}"
    (plain := tmp_path / "padded.json").write_text(padded)
    zipped = _zip(tmp_path / "padded.zip", padded)
    assert zipped.stat().st_size < 64 << 10
    for path in (plain, zipped):
        with pytest.raises(EkxError, match=re.escape(str(path)) + r": .*more than the 0.0625 MiB"):
            scoring.score(path, ann)
    # a header that understates the size is not believed: the inflated bytes are counted
    liar = _zip(tmp_path / "liar.zip", padded)
    _declare_size(liar, 1000)
    with pytest.raises(EkxError, match=re.escape(str(liar)) + r": a damaged zip \(Bad CRC-32 for file 'test.json'\)"):
        scoring.score(liar, ann)
    short = _zip(tmp_path / "short.zip", text)  # one that overstates it: the bytes are counted too
    _declare_size(short, len(text) + 1000)
    with pytest.raises(EkxError, match=f"short.zip: test.json declares {len(text) + 1000} bytes but holds {len(text)}"):
        scoring.score(short, ann)
    assert scoring.score(_zip(tmp_path / "ok.zip", text), ann)["metrics"]["action_top5"] == pytest.approx(60.0)


# ---------------------------------------------------------------- ties, in bf16 (issue 32 C)


def test_a_bf16_run_whose_scores_tie_reports_what_its_submission_scores(tmp_path):
    """A bf16 head whose verbs 2 and 5 tie at the top of every segment: `ekx evaluate` counts the
    segments the official rule counts (np.argsort on the file's numbers, reversed - not
    torch.topk, which picks otherwise among equal scores), so it equals `ekx score` of the file it
    wrote; and the file holds fp32 logits, not bf16-rounded ones."""
    train = make_cache(tmp_path / "train.h5", n=64, num_verbs=8, num_nouns=20, seed=0)
    val = make_cache(tmp_path / "val.h5", n=100, num_verbs=8, num_nouns=20, seed=1, split="validation")
    split = load_split(val, torch.device("cpu"))
    rows = split.rows.tolist()
    ann = write_annotations(
        tmp_path / "ann",
        [(split.narration_id[r], split.video_id[r], int(split.verbs[r]), int(split.nouns[r])) for r in rows],
        8,
        20,
    )
    cfg = TrainConfig(
        head="pooling",
        epochs=1,
        frames=4,
        batch_size=32,
        precision="bf16",
        train_features=str(train),
        val_features=str(val),
    )
    run = tmp_path / "r"
    tr.run(cfg, run, tr.load_data(train, val, "cpu"))
    ckpt = torch.load(run / "best.pt", weights_only=True)
    w, b = ckpt["model"]["classifier.verb.weight"], ckpt["model"]["classifier.verb.bias"]
    w.mul_(0.05)  # the other verbs stay below the tie, yet differ from segment to segment
    w[[2, 5]] = 0.0
    b[:] = 0.0
    b[[2, 5]] = 3.0  # exactly equal logits: 0 * x sums to exactly 0 in any precision
    torch.save(ckpt, run / "best.pt")
    m_json, sub, figs = tmp_path / "m.json", tmp_path / "sub.json", tmp_path / "figs.json"
    args = ["evaluate", str(run), "--features", str(val), "--annotations", str(ann), "--json", str(m_json)]
    res = runner.invoke(app, [*args, "--submission", str(sub)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["score", str(sub), "--annotations", str(ann), "--json", str(figs)])
    assert res.exit_code == 0, res.output
    reported, scored = json.loads(m_json.read_text())["metrics"], json.loads(figs.read_text())["metrics"]
    results = json.loads(sub.read_text())["results"]
    ids = [split.narration_id[r] for r in rows]
    verb = np.array([[results[i]["verb"][str(c)] for c in range(8)] for i in ids])
    labels = split.verbs[rows].numpy()
    assert (verb[:, 2] == verb[:, 5]).all() and (verb.argmax(1) % 3 == 2).all(), "verbs 2 and 5 tie at the top"
    official = np.argsort(verb, axis=-1)[:, ::-1][:, 0]  # the official scores_to_ranks, first place
    topk = torch.from_numpy(verb).topk(1, 1).indices[:, 0].numpy()
    assert (official != topk)[np.isin(labels, (2, 5))].any(), "the tie must decide some segment for this test"
    assert reported["verb_top1"] == pytest.approx(100 * (official == labels).mean())
    assert scored == reported
    # fp32 logits: most values of the file are not bf16 numbers (a bf16 logit has 8 significant bits)
    as_bf16 = torch.from_numpy(verb).bfloat16().double().numpy()
    assert (as_bf16 != verb).mean() > 0.5
