from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ekx import EkxError, epic


def test_real_validation_and_test_files_load_with_official_counts(epic100):
    ann = epic.Annotations(epic100)
    verbs, nouns = ann.verbs(), ann.nouns()
    assert (len(verbs), len(nouns)) == (97, 300)
    assert verbs.keys[0] == "take" and nouns.keys[0] == "tap"
    val = ann.segments("validation")
    test = ann.segments("test")
    assert len(val) == 9668 and len(test) == 13092
    assert all(s.verb_class == -1 and s.noun_class == -1 for s in test)
    assert all(0 <= s.verb_class < 97 and 0 <= s.noun_class < 300 for s in val)
    first = val[0]
    assert (first.narration_id, first.video_id, first.start, first.stop) == ("P01_11_0", "P01_11", 0.0, 1.89)
    assert (first.verb_class, first.noun_class) == (0, 2)
    assert min(s.duration for s in val) == pytest.approx(0.5, abs=0.01)


def test_real_tail_and_unseen_lists(epic100):
    ann = epic.Annotations(epic100)
    tail_verbs, tail_nouns = ann.tail_classes()
    assert (len(tail_verbs), len(tail_nouns)) == (86, 228)
    assert ann.unseen_participants("validation") == {"P18", "P32"}
    assert ann.unseen_participants("test") == {"P33", "P34", "P36"}


def test_timestamps():
    assert epic.parse_timestamp("00:00:02.86") == pytest.approx(2.86)
    assert epic.parse_timestamp("01:02:03.5") == pytest.approx(3723.5)
    assert epic.format_timestamp(3723.45) == "01:02:03.45"
    for bad in ("2.86", "00:61:00.00", "aa:bb:cc", ""):
        with pytest.raises(ValueError):
            epic.parse_timestamp(bad)


def _copy(epic100: Path, tmp_path: Path) -> Path:
    for f in epic100.glob("*.csv"):
        shutil.copy(f, tmp_path / f.name)
    return tmp_path


def _edit_line(path: Path, lineno: int, old: str, new: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    assert old in lines[lineno - 1]
    lines[lineno - 1] = lines[lineno - 1].replace(old, new, 1)
    path.write_text("".join(lines))


def test_missing_column_names_file_and_column(epic100, tmp_path):
    ann = epic.Annotations(_copy(epic100, tmp_path))
    path = tmp_path / "EPIC_100_validation.csv"
    _edit_line(path, 1, ",stop_timestamp,", ",stop_time,")
    with pytest.raises(EkxError, match=r"EPIC_100_validation.csv:1: missing column\(s\) stop_timestamp"):
        ann.segments("validation")


def test_unparsable_timestamp_names_line(epic100, tmp_path):
    ann = epic.Annotations(_copy(epic100, tmp_path))
    _edit_line(tmp_path / "EPIC_100_validation.csv", 5, ",00:05:27.28,", ",00:0x:27.28,")
    with pytest.raises(EkxError, match=r"EPIC_100_validation.csv:5: unparsable timestamp"):
        ann.segments("validation")


def test_stop_before_start_names_line_and_narration(epic100, tmp_path):
    ann = epic.Annotations(_copy(epic100, tmp_path))
    # line 2: P01_11_0 runs 00:00:00.00 -> 00:00:01.89
    _edit_line(tmp_path / "EPIC_100_validation.csv", 2, ",00:00:00.00,00:00:01.89,", ",00:00:05.00,00:00:01.89,")
    with pytest.raises(EkxError, match=r"EPIC_100_validation.csv:2: stop_timestamp .* before .* P01_11_0"):
        ann.segments("validation")


def test_class_id_outside_class_list(epic100, tmp_path):
    ann = epic.Annotations(_copy(epic100, tmp_path))
    # line 2 ends "...,plate,2,['plate'],[2]": give it noun class 300
    _edit_line(tmp_path / "EPIC_100_validation.csv", 2, ",plate,2,", ",plate,300,")
    with pytest.raises(
        EkxError, match=r"EPIC_100_validation.csv:2: noun_class 300 is outside the class list \(0..299\)"
    ):
        ann.segments("validation")


def test_class_list_with_bad_header(epic100, tmp_path):
    _copy(epic100, tmp_path)
    _edit_line(tmp_path / "EPIC_100_verb_classes.csv", 1, "id,key", "idx,key")
    with pytest.raises(EkxError, match=r"EPIC_100_verb_classes.csv:1: missing column\(s\) id"):
        epic.Annotations(tmp_path).verbs()


def test_missing_annotation_file_says_where_to_look(tmp_path):
    with pytest.raises(EkxError, match=r"EPIC_100_train.csv: annotation file not found.*ekx config"):
        epic.load_segments(epic.Annotations(tmp_path).split_path("train"))


def test_video_layouts_and_missing_report(tmp_path):
    (tmp_path / "P01_01.mp4").write_bytes(b"x")
    (tmp_path / "P02" / "videos").mkdir(parents=True)
    (tmp_path / "P02" / "videos" / "P02_101.MP4").write_bytes(b"x")
    segs = [
        epic.Segment(f"{v}_0", v.split("_")[0], v, 0.0, 1.0)
        for v in ("P01_01", "P02_101", "P03_01", "P03_02", "P04_01", "P05_01", "P06_01", "P07_01")
    ]
    found, missing = epic.locate_videos(segs, tmp_path)
    assert found == {"P01_01": tmp_path / "P01_01.mp4", "P02_101": tmp_path / "P02/videos/P02_101.MP4"}
    assert missing == ["P03_01", "P03_02", "P04_01", "P05_01", "P06_01", "P07_01"]
    msg = epic.missing_videos_message(missing, len(segs), tmp_path)
    assert msg.startswith(
        f"6 of 8 videos not found under {tmp_path} (e.g. P03_01, P03_02, P04_01, P05_01, P06_01, ...)"
    )
    assert "P07_01" not in msg


def _csv(tmp_path: Path, rows: list[str], name: str = "EPIC_100_train.csv") -> Path:
    header = ",".join(epic.LABELLED_COLUMNS)
    path = tmp_path / name
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def _row(nid: str = "P01_01_0", video: str = "P01_01", participant: str = "P01") -> str:
    return f"{nid},{participant},{video},00:00:00.00,00:00:01.00,00:00:02.00,60,120,take cup,take,0,cup,1,['cup'],[1]"


def test_excel_csv_with_bom_and_crlf_reads_the_same(tmp_path):
    plain = epic.load_segments(_csv(tmp_path, [_row(), _row("P01_01_1")]))
    path = tmp_path / "excel.csv"
    lf = (tmp_path / "EPIC_100_train.csv").read_bytes()
    for data in (b"\xef\xbb\xbf" + lf, lf.replace(b"\n", b"\r\n"), b"\xef\xbb\xbf" + lf.replace(b"\n", b"\r\n")):
        path.write_bytes(data)
        assert epic.load_segments(path) == plain


def test_duplicate_narration_id_names_both_lines(tmp_path):
    path = _csv(tmp_path, [_row(), _row("P01_01_1"), _row()])
    with pytest.raises(EkxError, match=r"EPIC_100_train\.csv:4: narration_id P01_01_0 repeats line 2"):
        epic.load_segments(path)


@pytest.mark.parametrize(
    "video,participant", [("../../x", "P01"), ("P01/01", "P01"), ("P01_01", ".."), ("P01\\01", "P01")]
)
def test_ids_that_are_paths_are_refused(tmp_path, video, participant):
    path = _csv(tmp_path, [_row(), _row("P01_01_1", video, participant)])
    with pytest.raises(EkxError, match=r"EPIC_100_train\.csv:3: (video|participant)_id .* is not a plain name"):
        epic.load_segments(path)


def test_latin1_byte_names_file_and_line(tmp_path):
    path = _csv(tmp_path, [_row(), _row("P01_01_1")])
    path.write_bytes(path.read_bytes().replace(b"take cup", b"take caf\xe9", 1))
    with pytest.raises(EkxError, match=r"EPIC_100_train\.csv:2: not UTF-8 \(byte 0xe9\)"):
        epic.load_segments(path)
