"""The official EPIC-KITCHENS-100 annotation files, read unchanged.

- train / validation CSVs: 15 columns, labelled;
- test timestamps: 8 columns, no labels (verb/noun class = -1);
- class lists: ``id,key,instances,category``;
- tail-class lists (one ``verb`` or ``noun`` column) and unseen-participant lists.

Segments are located by their ``HH:MM:SS.ff`` timestamps, never by start/stop_frame:
those count frames at 60 or 50 fps depending on the video generation, whatever the
mp4 says (see shared/epic100/SOURCES.md). Errors name the file and line.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import io
import re
from dataclasses import dataclass
from pathlib import Path

from ekx import EkxError

LABELLED_COLUMNS = (
    "narration_id",
    "participant_id",
    "video_id",
    "narration_timestamp",
    "start_timestamp",
    "stop_timestamp",
    "start_frame",
    "stop_frame",
    "narration",
    "verb",
    "verb_class",
    "noun",
    "noun_class",
    "all_nouns",
    "all_noun_classes",
)
TEST_COLUMNS = LABELLED_COLUMNS[:8]
CLASS_COLUMNS = ("id", "key", "instances", "category")

# Official file names inside an annotations directory.
SPLIT_FILES = {
    "train": "EPIC_100_train.csv",
    "validation": "EPIC_100_validation.csv",
    "test": "EPIC_100_test_timestamps.csv",
}
VERB_CLASSES = "EPIC_100_verb_classes.csv"
NOUN_CLASSES = "EPIC_100_noun_classes.csv"
TAIL_VERBS = "EPIC_100_tail_verbs.csv"
TAIL_NOUNS = "EPIC_100_tail_nouns.csv"
UNSEEN = "EPIC_100_unseen_participant_ids_{split}.csv"
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".mpg", ".mpeg", ".ts", ".m2ts", ".mts")

_TIMESTAMP = re.compile(r"^(\d+):([0-5]?\d):([0-5]?\d(?:\.\d+)?)$")


@dataclass(frozen=True)
class Segment:
    narration_id: str
    participant_id: str
    video_id: str
    start: float  # seconds
    stop: float
    verb_class: int = -1  # -1: unlabelled (test split)
    noun_class: int = -1
    # the CSV's frame numbers (1-based, inclusive): they name the official RGB-frame JPEGs;
    # -1 where the file has none. Video sources never use them (see the module docstring).
    start_frame: int = -1
    stop_frame: int = -1

    @property
    def duration(self) -> float:
        return self.stop - self.start


@dataclass(frozen=True)
class ClassList:
    keys: tuple[str, ...]
    categories: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.keys)


def parse_timestamp(text: str) -> float:
    """``HH:MM:SS.ff`` (any number of fraction digits) -> seconds."""
    m = _TIMESTAMP.match(text.strip())
    if not m:
        raise ValueError(f"unparsable timestamp {text!r} (expected HH:MM:SS.ff)")
    return int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])


def format_timestamp(seconds: float) -> str:
    """Seconds -> ``HH:MM:SS.ff``, the official start/stop format."""
    cs = round(seconds * 100)
    h, cs = divmod(cs, 360000)
    m, cs = divmod(cs, 6000)
    return f"{h:02d}:{m:02d}:{cs // 100:02d}.{cs % 100:02d}"


def _open_csv(path: Path, required, what: str):
    """Open a CSV and check its header; ``required`` may depend on the header (a callable)."""
    path = Path(path)
    if not path.is_file():
        raise EkxError(f"{path}: {what} not found; check the annotations directory (ekx config)")
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):  # Excel's "CSV UTF-8" starts with a byte-order mark
        data = data[len(codecs.BOM_UTF8) :]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise EkxError(
            f"{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x}); save the {what} as UTF-8 (in Excel: CSV UTF-8)"
        ) from None
    fh = io.StringIO(text, newline="")  # csv reads CRLF and LF line ends alike
    reader = csv.DictReader(fh)
    header = reader.fieldnames or []
    required = required(header) if callable(required) else required
    missing = [c for c in required if c not in header]
    if missing:
        fh.close()
        raise EkxError(
            f"{path}:1: missing column(s) {', '.join(missing)} in the header of this "
            f"{what}; expected the official columns {','.join(required)}"
        )
    return fh, reader


def load_classes(path: Path) -> ClassList:
    """A verb or noun class list; ids must run 0..n-1 in order."""
    fh, reader = _open_csv(path, CLASS_COLUMNS, "class list")
    keys: list[str] = []
    cats: list[str] = []
    with fh:
        for row in reader:
            if row["id"] is None or not row["id"].strip().isdigit() or int(row["id"]) != len(keys):
                raise EkxError(
                    f"{path}:{reader.line_num}: class id {row['id']!r} should be {len(keys)} (ids run 0..n-1 in order)"
                )
            keys.append(row["key"])
            cats.append(row["category"])
    if not keys:
        raise EkxError(f"{path}: class list has no rows")
    return ClassList(tuple(keys), tuple(cats))


def _class_id(row: dict, column: str, classes: ClassList | None, where: str) -> int:
    text = (row.get(column) or "").strip()
    try:
        value = int(text)
    except ValueError:
        raise EkxError(f"{where}: {column} {text!r} is not an integer") from None
    if classes is not None and not 0 <= value < len(classes):
        raise EkxError(
            f"{where}: {column} {value} is outside the class list (0..{len(classes) - 1}); "
            "are the annotation and class-list files from the same release?"
        )
    return value


def _annotation_columns(header: list[str]) -> tuple[str, ...]:
    """A file with any label column must have all 15; otherwise the 8 test columns."""
    labelled = any(c in header for c in LABELLED_COLUMNS[8:])
    return LABELLED_COLUMNS if labelled else TEST_COLUMNS


def _frame_number(row: dict, column: str) -> int:
    # tolerant: only the frames source needs them, and it names the segment when one is absent
    text = (row.get(column) or "").strip()
    return int(text) if text.isdigit() else -1


def load_segments(path: Path, verbs: ClassList | None = None, nouns: ClassList | None = None) -> list[Segment]:
    """Read a train/validation (labelled) or test-timestamps (unlabelled) CSV."""
    fh, reader = _open_csv(path, _annotation_columns, "annotation file")
    labelled = _annotation_columns(reader.fieldnames) is LABELLED_COLUMNS
    segments = []
    first_line: dict[str, int] = {}
    with fh:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            _check_ids(row, where)
            seen = first_line.setdefault(row["narration_id"], reader.line_num)
            if seen != reader.line_num:
                raise EkxError(
                    f"{where}: narration_id {row['narration_id']} repeats line {seen}; each segment "
                    "must appear once (a duplicate would train twice and break the submission)"
                )
            try:
                start = parse_timestamp(row["start_timestamp"] or "")
                stop = parse_timestamp(row["stop_timestamp"] or "")
            except ValueError as e:
                raise EkxError(f"{where}: {e}") from None
            if stop < start:
                raise EkxError(
                    f"{where}: stop_timestamp {row['stop_timestamp']} is before "
                    f"start_timestamp {row['start_timestamp']} (narration {row['narration_id']})"
                )
            verb = _class_id(row, "verb_class", verbs, where) if labelled else -1
            noun = _class_id(row, "noun_class", nouns, where) if labelled else -1
            first, last = _frame_number(row, "start_frame"), _frame_number(row, "stop_frame")
            segments.append(
                Segment(
                    row["narration_id"], row["participant_id"], row["video_id"], start, stop, verb, noun, first, last
                )
            )
    return segments


def _check_ids(row: dict, where: str) -> None:
    """Ids become file names (videos, prepared copies, frame sources): no path tricks."""
    for column in ("participant_id", "video_id"):
        value = row.get(column) or ""
        if not value or ".." in value or any(c in value for c in "/\\\0"):
            raise EkxError(
                f"{where}: {column} {value!r} is not a plain name (empty, '..' or a path separator); "
                "ids name files, so they must be like P01 / P01_11"
            )


def load_id_list(path: Path, column: str) -> list[str]:
    """A one-column list (tail classes, unseen participants)."""
    fh, reader = _open_csv(path, (column,), f"{column} list")
    with fh:
        return [row[column].strip() for row in reader if row[column] and row[column].strip()]


def check_split(split: str, label: str = "split") -> str:
    """A split name ('train', 'validation', 'test') or a path to a CSV; else EkxError naming
    ``label`` (the CLI's ``--split``) and the closest name."""
    if split in SPLIT_FILES or split.endswith(".csv"):
        return split
    close = difflib.get_close_matches(split, list(SPLIT_FILES), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise EkxError(f"{label}: unknown split {split!r}{hint} (use train, validation, test or a path to a CSV)")


@dataclass
class Annotations:
    """The annotation directory of a workspace, with official file names."""

    root: Path

    def split_path(self, split: str) -> Path:
        """'train', 'validation', 'test', or a path to any CSV in the official format."""
        check_split(split)
        return self.root / SPLIT_FILES[split] if split in SPLIT_FILES else Path(split)

    def verbs(self) -> ClassList:
        return load_classes(self.root / VERB_CLASSES)

    def nouns(self) -> ClassList:
        return load_classes(self.root / NOUN_CLASSES)

    def segments(self, split: str) -> list[Segment]:
        return load_segments(self.split_path(split), self.verbs(), self.nouns())

    def tail_classes(self) -> tuple[set[int], set[int]] | None:
        """(tail verbs, tail nouns), or None when the lists are absent."""
        v, n = self.root / TAIL_VERBS, self.root / TAIL_NOUNS
        if not (v.is_file() and n.is_file()):
            return None
        return {int(x) for x in load_id_list(v, "verb")}, {int(x) for x in load_id_list(n, "noun")}

    def unseen_participants(self, split: str) -> set[str] | None:
        p = self.root / UNSEEN.format(split=split)
        return set(load_id_list(p, "participant_id")) if p.is_file() else None


def subsets(annotations: Path | None, split_name: str) -> tuple[tuple[set[int], set[int]] | None, set[str] | None]:
    """(tail verbs, tail nouns) and the unseen participants of a split, where the official
    lists exist (the metrics' subsets)."""
    if annotations is None or not Path(annotations).is_dir():
        return None, None
    ann = Annotations(Path(annotations))
    return ann.tail_classes(), ann.unseen_participants(split_name)


def index_videos(root: Path) -> dict[str, Path]:
    """Map video_id -> file for both layouts: ``<root>/<video_id>.mp4`` and the official
    ``<root>/<participant_id>/videos/<video_id>.MP4`` (extensions case-insensitive).

    One directory scan instead of a stat per segment: 67k segments share 700 videos.
    """
    root = Path(root)
    found: dict[str, Path] = {}
    if not root.is_dir():
        return found
    dirs = [root] + [d / "videos" for d in sorted(root.iterdir()) if (d / "videos").is_dir()]
    for d in dirs:
        for f in sorted(d.iterdir()):
            if f.is_file() and f.suffix.lower() in VIDEO_EXTENSIONS:
                found.setdefault(f.stem, f)
    return found


def locate_videos(segments: list[Segment], root: Path) -> tuple[dict[str, Path], list[str]]:
    """Videos needed by the segments: (found, missing video ids)."""
    index = index_videos(root)
    needed = sorted({s.video_id for s in segments})
    return {v: index[v] for v in needed if v in index}, [v for v in needed if v not in index]


def missing_videos_message(missing: list[str], total: int, root: Path) -> str:
    """One message for all missing videos: a count and a few examples, never one line each."""
    examples = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
    return (
        f"{len(missing)} of {total} videos not found under {root} (e.g. {examples}); expected "
        f"{root}/<video_id>.mp4 or {root}/<participant_id>/videos/<video_id>.MP4 - "
        "set the videos path (ekx config) or download the missing files"
    )
