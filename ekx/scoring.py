"""`ekx score`: any action-recognition challenge submission (ekx's or another tool's)
scored against a labelled annotation CSV, the way the official evaluation scores it.

The file is checked first (header, one entry per segment of the split, every class of
both tasks, finite numbers, no key twice), then scored by ``metrics.compute``: the same code that
gives `ekx evaluate`'s figures: the official ranks (np.argsort, reversed, so equal scores are
ordered as the official evaluation orders them) and the official top-100 softmax product
(``metrics.action_correct``). A zip holding one JSON (the official
create_submission.py output) is read too. Neither may expand past `MAX_BYTES`: a zip's
member is refused on its declared size and inflated in bounded chunks, counted.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import zipfile
from pathlib import Path

from ekx import EkxError, epic

VERSION = "0.2"
CHALLENGE = "action_recognition"
SLS_FIELDS = ("sls_pt", "sls_tl", "sls_td")  # supervision levels, 0..5 (github.com/epic-kitchens/sls)
REMAKE = "write it again with `ekx evaluate RUN --features CACHE --submission FILE`"


# What a submission may expand to. The official file is ~140 MB (13,092 test segments x 397
# scores at ~27 characters); indenting it and writing 17-digit floats can bring it to ~2.5x,
# and 1 GiB leaves about 3x on top of that. It bounds the text held before parsing: a 3 MB zip
# inflating to 3 GiB (7 GB of memory as text and str) is refused instead.
MAX_BYTES = 1 << 30
CHUNK = 1 << 24  # zip members are inflated 16 MiB at a time, counted as they come


def _too_big(path: Path, what: str, size: int) -> EkxError:
    return EkxError(
        f"{path}: {what} {size / 2**20:.1f} MiB, more than the {MAX_BYTES / 2**20:g} MiB a submission "
        f"may be (the official one is ~140 MB): not a challenge submission; {REMAKE}"
    )


def _read_member(path: Path, z: zipfile.ZipFile, name: str) -> bytearray:
    """The member's bytes, never more than MAX_BYTES inflated, whatever its header says."""
    declared = z.getinfo(name).file_size
    if declared > MAX_BYTES:
        raise _too_big(path, f"{name} expands to", declared)
    data = bytearray()
    with z.open(name) as fh:
        while chunk := fh.read(CHUNK):
            data += chunk
            if len(data) > MAX_BYTES:  # the header understated it
                raise _too_big(path, f"{name} expands to over", len(data))
    if len(data) != declared:
        raise EkxError(
            f"{path}: {name} declares {declared} bytes but holds {len(data)}: a damaged zip - zip the JSON again"
        )
    return data


class _Duplicate(Exception):
    pass


def _unique_keys(pairs: list) -> dict:
    """json's object_pairs_hook: a key twice in one object is refused (json keeps the last silently)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        counts = collections.Counter(k for k, _ in pairs)
        key, value = next((k, v) for k, v in pairs if counts[k] > 1)
        if isinstance(value, dict) and ("verb" in value or "noun" in value):  # a segment's entry
            what = f"narration id {key!r} appears twice in results"
        else:
            what = f"key {key!r} appears twice in one object"
        raise _Duplicate(f"{what} (JSON would keep only the last); write each segment and class once")
    return obj


def load_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise EkxError(f"{path}: submission file not found")
    raw: bytes | bytearray
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.endswith(".json")]
                if len(names) != 1:
                    raise EkxError(
                        f"{path}: a submission zip must hold exactly one .json file, found "
                        f"{len(names)} ({', '.join(names) or 'none'})"
                    )
                raw = _read_member(path, z, names[0])
        else:
            if (size := path.stat().st_size) > MAX_BYTES:
                raise _too_big(path, "the file is", size)
            raw = path.read_bytes()
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EkxError(f"{path}: not a JSON file ({e}); a submission is the challenge JSON - {REMAKE}") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as e:
        raise EkxError(f"{path}: a damaged zip ({e}); zip the JSON again") from None
    except _Duplicate as e:
        raise EkxError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise EkxError(
            f"{path}: the top level is a JSON {type(data).__name__}, expected an object with "
            f"version, challenge, {', '.join(SLS_FIELDS)} and results; {REMAKE}"
        )
    return data


def check_header(data: dict, path: Path) -> None:
    for key, want in (("version", VERSION), ("challenge", CHALLENGE)):
        if data.get(key) != want:
            got = f"is {data[key]!r}" if key in data else "is missing"
            raise EkxError(
                f"{path}: header field {key!r} {got}, expected {want!r} (the EPIC-KITCHENS-100 "
                f"action-recognition format); set it, or {REMAKE}"
            )
    for key in SLS_FIELDS:
        value = data.get(key)
        if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 5):
            got = f"is {value!r}" if key in data else "is missing"
            raise EkxError(
                f"{path}: header field {key!r} {got}, expected a supervision level 0..5 "
                "(see github.com/epic-kitchens/sls); set it in the file"
            )


def _examples(ids) -> str:
    ids = list(ids)
    return ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")


def _task_scores(entry, task: str, keys: list[str], nid: str, path: Path, class_file: Path) -> list:
    scores = entry.get(task) if isinstance(entry, dict) else None
    if not isinstance(scores, dict):
        raise EkxError(
            f"{path}: segment {nid}: no {task!r} object of class scores; each entry of results "
            f'is {{"verb": {{"0": score, ...}}, "noun": {{...}}}}'
        )
    if list(scores) != keys:  # the common case (every class, in order) costs one comparison
        if set(scores) != set(keys):
            extra = sorted(set(scores) - set(keys))
            raise EkxError(
                f"{path}: segment {nid}: {len(scores)} {task} scores, expected {len(keys)} with "
                f'keys "0".."{len(keys) - 1}" (one per class of {class_file})'
                + (f"; unexpected keys {_examples(extra)}" if extra else "")
                + " - was it made for another class list?"
            )
        return [scores[k] for k in keys]
    return list(scores.values())


def _finite(v: float) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer beyond float64
        return False


def _bad_number(rows: list[list], ids: list[str], task: str, path: Path) -> EkxError:
    """The first value that is not a finite number, named (only called once the bulk check failed)."""
    for nid, row in zip(ids, rows, strict=True):
        for c, v in enumerate(row):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v):
                return EkxError(
                    f"{path}: segment {nid}: {task} score for class {c} is {v!r}, not a finite "
                    "number; the official scoring cannot rank it - check the model's outputs "
                    "for NaN/inf and write the file again"
                )
    return EkxError(f"{path}: {task} scores are not all finite numbers")


def read_submission(path: Path, annotations: Path, split: str = "validation"):
    """Check a submission against a split: (segments of the split, verb [N, V], noun [N, C]),
    rows in the split's order, float64 (a float32 logit is exact in it)."""
    import numpy as np
    import torch

    path = Path(path)
    if not path.is_file():  # the file the user named, before the class lists it is checked against
        raise EkxError(f"{path}: submission file not found")
    ann = epic.Annotations(Path(annotations))
    csv_path = ann.split_path(split)
    segments = ann.segments(split)
    if any(s.verb_class < 0 for s in segments):
        raise EkxError(
            f"{csv_path} has no labels (the test split): only the challenge server scores it; "
            "score a validation submission (--split validation) here"
        )
    data = load_json(path)
    check_header(data, path)
    results = data.get("results")
    if not isinstance(results, dict):
        raise EkxError(f'{path}: no "results" object keyed by narration_id; {REMAKE}')
    wanted = [s.narration_id for s in segments]
    known = set(wanted)
    unknown = [nid for nid in results if nid not in known]
    if unknown:
        raise EkxError(
            f"{path}: {len(unknown)} narration id(s) are not segments of {csv_path} "
            f"(e.g. {_examples(unknown)}); was it written for another split (--split)?"
        )
    missing = [nid for nid in wanted if nid not in results]
    if missing:
        raise EkxError(
            f"{path}: {len(missing)} of the {len(wanted)} segments of {csv_path} are missing "
            f"(e.g. {_examples(missing)}); the official scoring needs every segment - evaluate "
            "on the whole split's cache and write the file again"
        )
    out = []
    for task, classes, class_file in (
        ("verb", ann.verbs(), ann.root / epic.VERB_CLASSES),
        ("noun", ann.nouns(), ann.root / epic.NOUN_CLASSES),
    ):
        keys = [str(c) for c in range(len(classes))]
        rows = [_task_scores(results[nid], task, keys, nid, path, class_file) for nid in wanted]
        # by type first: numpy would take JSON true for 1.0 among floats (and strings, null...)
        if not set(map(type, itertools.chain.from_iterable(rows))) <= {float, int}:
            raise _bad_number(rows, wanted, task, path)
        try:
            arr = np.array(rows, dtype=np.float64)
        except OverflowError:  # an integer beyond float64
            raise _bad_number(rows, wanted, task, path) from None
        if not np.isfinite(arr).all():  # NaN, Infinity
            raise _bad_number(rows, wanted, task, path)
        out.append(torch.from_numpy(arr))
    return segments, out[0], out[1]


def score(path: Path, annotations: Path, split: str = "validation") -> dict:
    """The official figures of a submission file, with the same names as `ekx evaluate`'s."""
    import torch

    from ekx.heads import metrics

    segments, verb, noun = read_submission(path, annotations, split)
    ann = epic.Annotations(Path(annotations))
    tails = ann.tail_classes()
    unseen = ann.unseen_participants(split)
    mask = None if unseen is None else torch.tensor([s.participant_id in unseen for s in segments])
    tail_verbs, tail_nouns = tails or (None, None)
    m = metrics.compute(
        verb,
        noun,
        torch.tensor([s.verb_class for s in segments]),
        torch.tensor([s.noun_class for s in segments]),
        tail_verbs,
        tail_nouns,
        unseen=mask,
    )
    return {"submission": str(path), "annotations": str(ann.split_path(split)), "segments": len(segments), "metrics": m}
