"""`ekx cache info|verify|merge`."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ekx import EkxError
from ekx.cache import checksum, identity, store
from ekx.cache.reader import open_cache

BLOCK = 2048  # rows per bulk read when scanning a whole file


def info(path: Path) -> dict:
    c = open_cache(path)
    return {"attrs": c.attrs, "counts": c.counts(), "shape": c.shape, "bytes": Path(path).stat().st_size}


F16_MAX = float(np.finfo(np.float16).max)  # 65504


def _scan(f: h5py.File, done: np.ndarray):
    """Bulk-read done rows block by block; yields float32 [n, V, K, D]."""
    feats = f["features"]
    for lo in range(0, feats.shape[0], BLOCK):
        block = feats[lo : lo + BLOCK]
        ok = done[lo : lo + BLOCK]
        if ok.any():
            yield block[ok].astype(np.float32)


def verify(path: Path, annotation_csv: Path | None = None, repair: bool = False) -> tuple[list[str], list[str]]:
    """(problems, warnings). Problems make `ekx cache verify` exit non-zero. With repair,
    rows whose features fail their checksum are marked pending (extract redoes them)."""
    c = open_cache(path)
    problems, warnings, corrupt = checksum.check(path, c.narration_id)
    if repair and len(corrupt):
        checksum.mark_pending(path, corrupt)
        # what is left to say is the pending rows' line below: re-run the extract command
        problems = [*problems[:-1], f"repaired: {len(corrupt)} corrupt segments marked pending"]
        c = open_cache(path)
    n, (N, V, K, D) = len(c.narration_id), c.shape
    a = c.attrs
    if (V, K, D) != (a.get("views"), a.get("frames_per_segment"), a.get("feature_dim")):
        problems.append(
            f"features shape {c.shape} disagrees with attributes V={a.get('views')}, "
            f"K={a.get('frames_per_segment')}, D={a.get('feature_dim')}"
        )
    with h5py.File(path, "r") as f:  # every dataset at the root holds one entry per row (store.py)
        lengths = {k: len(d) for k, d in f.items() if isinstance(d, h5py.Dataset)}
    if len({n, N, *lengths.values()}) != 1:
        odd = ", ".join(f"{k} {v}" for k, v in lengths.items() if v != n)
        problems.append(f"datasets have different row counts ({n} rows; {odd})")
    if not np.isin(c.status, list(store.STATUS_NAMES)).all():
        problems.append("status holds unknown values")
    counts = c.counts()
    if counts["pending"]:
        problems.append(f"{counts['pending']} of {n} segments still pending: re-run the extract command to finish")
    if counts["failed"]:
        warnings.append(f"{counts['failed']} segments failed (see `ekx cache info`)")
    done = c.done
    fi = c.frame_index[done]
    if len(fi) and (np.diff(fi, axis=1) < 0).any():
        problems.append("frame_index decreases within a segment")
    nonfinite = nan = zero = saturated = 0
    total = np.zeros(D)
    pooled: list[np.ndarray] = []
    with h5py.File(path, "r") as f, np.errstate(over="ignore", invalid="ignore"):
        for x in _scan(f, done):
            nan += int(np.isnan(x).any(axis=(1, 2, 3)).sum())
            nonfinite += int(np.isinf(x).any(axis=(1, 2, 3)).sum())
            # a backbone never maps a whole segment to exact zeros: a row marked done unwritten
            zero += int((x == 0).all(axis=(1, 2, 3)).sum())
            # float16's largest finite value: the true value overflowed and was clamped
            saturated += int((np.isfinite(x) & (np.abs(x) >= F16_MAX)).any(axis=(1, 2, 3)).sum())
            total += np.abs(x).sum(axis=(0, 1, 2))
            if sum(len(p) for p in pooled) < 4096:
                pooled.append(np.nan_to_num(x[:, 0].mean(axis=1)))
    if nan:
        problems.append(f"{nan} segments contain NaN features")
    if nonfinite:
        problems.append(f"{nonfinite} segments contain Inf features: values overflowed float16 (max 65504)")
    if saturated:
        problems.append(
            f"{saturated} segments hold values at the float16 limit (+-{F16_MAX:.0f}): they overflowed; "
            "extract with fp32 precision or a calibrated backbone"
        )
    if done.any() and not total.any():
        problems.append("all features are zero (degenerate backbone: random weights without calibration?)")
    elif zero:
        problems.append(
            f"{zero} of {int(done.sum())} done segments are all zeros (never written, or a broken decode); "
            "re-extract this cache"
        )
    elif done.sum() >= 2 and pooled:
        p = np.concatenate(pooled)
        with np.errstate(over="ignore", invalid="ignore"):
            spread = np.median(p.std(axis=0)) / (np.median(np.abs(p.mean(axis=0))) + 1e-12)
        if spread < 1e-3:
            problems.append(
                f"features are constant across segments (relative spread {spread:.1e}): a degenerate backbone"
            )
    if annotation_csv is not None:
        labels = check_labels(c, Path(annotation_csv))  # first: it names a missing or malformed file
        if store.sha256_file(annotation_csv) != a.get("annotation_sha256"):
            problems.append(
                f"{annotation_csv} is not the annotation file this cache was made from "
                f"({a.get('annotation_file')}, sha256 {str(a.get('annotation_sha256'))[:12]}...)"
            )
        problems += labels
    return problems, warnings


def check_labels(c, csv_path: Path) -> list[str]:
    """Every stored narration id, video id and label against the annotation file's row
    (the file's hash alone says nothing of what the cache holds). Read with the annotation
    loader, which names a missing file, column or bad line itself."""
    from ekx import epic

    truth = {seg.narration_id: (seg.video_id, seg.verb_class, seg.noun_class) for seg in epic.load_segments(csv_path)}
    seen: set[str] = set()
    wrong: list[str] = []
    for i, nid in enumerate(c.narration_id):
        stored = (c.video_id[i], int(c.verb_class[i]), int(c.noun_class[i]))
        if nid in seen:
            wrong.append(f"row {i}: narration id {nid} stored twice")
        elif nid not in truth:
            wrong.append(f"row {i}: narration id {nid!r} is not in {csv_path.name}")
        elif stored != truth[nid]:
            wrong.append(f"row {i} ({nid}): stored video/verb/noun {stored}, {csv_path.name} says {truth[nid]}")
        seen.add(nid)
    if not wrong:
        return []
    more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
    return [f"{len(wrong)} rows disagree with {csv_path}: {'; '.join(wrong[:3])}{more}"]


def _read(path: Path, key: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[key][...]


def _check_complete(caches: list) -> None:
    """A merge must be the whole plan: shards i/N for every i in 0..N-1, once each, and their
    plan_index rows 0..M-1 without a gap - else the result is silently smaller than the
    single-process cache and `cache verify` cannot tell."""
    parts: dict[int, Path] = {}
    counts = set()
    for c in caches:
        tag = str(c.attrs.get("shard", ""))
        try:
            i, n = (int(x) for x in tag.split("/"))
        except ValueError:
            raise EkxError(
                f"{c.path} is not a shard (its 'shard' attribute is {tag!r}); merge joins the files "
                "of `ekx extract --shard I/N`"
            ) from None
        if i in parts:
            raise EkxError(f"shard {i}/{n} given twice: {parts[i]} and {c.path}")
        parts[i] = c.path
        counts.add(n)
    if len(counts) != 1:
        raise EkxError(f"shards of different counts N ({', '.join(map(str, sorted(counts)))}): one extraction only")
    n = counts.pop()
    missing = [i for i in range(n) if i not in parts]
    if missing:
        first = Path(next(iter(parts.values())))
        raise EkxError(
            f"shard(s) {', '.join(f'{i}/{n}' for i in missing)} missing (e.g. "
            f"{first.name.split('.shard')[0]}.shard{missing[0]}of{n}.h5 next to {first.name}): run "
            f"`ekx extract --shard {missing[0]}/{n}` with the same options, then merge all {n}"
        )
    plan = np.sort(np.concatenate([_read(c.path, "plan_index") for c in caches]))
    gaps = np.setdiff1d(np.arange(len(plan)), plan)
    if len(gaps) or (len(plan) and plan[-1] != len(plan) - 1):
        raise EkxError(
            f"the shards' plan_index rows are not 0..{len(plan) - 1} (first missing plan row: "
            f"{int(gaps[0]) if len(gaps) else len(plan)}): a shard is incomplete or from another plan"
        )


def merge(out: Path, shards: list[Path]) -> dict:
    """Join shard files into one cache, rows in the order of the unsharded plan."""
    if not shards:
        raise EkxError("ekx cache merge: give at least one shard file")
    if Path(out).exists():
        raise EkxError(f"{out} exists; merge writes a new file (delete it or choose another name)")
    caches = [open_cache(p) for p in shards]
    ref, ref_name = caches[0].attrs, Path(caches[0].path).name
    for c in caches[1:]:
        mine, theirs = identity.extraction(c.attrs), identity.extraction(ref)
        # each shard reads other videos: their records must agree where they meet (mismatch),
        # their classes join below
        keys = (set(mine) | set(theirs)) - {identity.FRAMES}
        bad = identity.mismatch(mine, theirs, (Path(c.path).name, ref_name), keys)
        if bad:
            raise EkxError(
                f"{c.path} is not a shard of the same extraction as {caches[0].path} ({identity.describe(bad)}); "
                "merge only the shards of one `ekx extract --shard I/N` command"
            )
    _check_complete(caches)
    for c in caches:
        with h5py.File(c.path, "r") as f:
            if checksum.file_changed(f):
                raise EkxError(f"{c.path}: its backbone_state/ changed on disk; re-run that shard's extract command")
    seen: dict[str, Path] = {}
    for c in caches:
        for nid in c.narration_id:
            if nid in seen:
                raise EkxError(f"segment {nid} is in both {seen[nid]} and {c.path}: overlapping shards")
            seen[nid] = c.path
    plan = np.concatenate([_read(c.path, "plan_index") for c in caches])
    order = np.argsort(plan, kind="stable")
    src = np.concatenate([np.full(len(c.narration_id), i) for i, c in enumerate(caches)])
    names = [nid for c in caches for nid in c.narration_id]
    vids = [v for c in caches for v in c.video_id]
    rows = store.Rows(
        [names[i] for i in order],
        [vids[i] for i in order],
        np.concatenate([c.verb_class for c in caches])[order],
        np.concatenate([c.noun_class for c in caches])[order],
        plan[order],
    )
    # the merged file is of this ekx's format: whole-row checksums, computed for its own rows
    attrs = dict(ref, shard="", merged_from=[Path(c.path).name for c in caches], format_version=store.VERSION)
    parts = [c.attrs.get(identity.VIDEOS) for c in caches]
    if all(isinstance(p, list) for p in parts):  # the videos of every shard, and their classes
        attrs[identity.VIDEOS] = sorted({r for p in parts for r in (p or [])})
        attrs[identity.FRAMES] = sorted({k for c in caches for k in c.attrs.get(identity.FRAMES, [])})
    _, V, K, D = caches[0].shape
    times = None
    if caches[0].time is not None:  # a dense store's position times (planned, so merged like the ids)
        times = np.concatenate([c.time for c in caches])[order]
    store.create(Path(out), attrs, rows, V, K, D, store.read_backbone_state(caches[0].path), times)
    dest_of = np.empty(len(order), np.int64)
    dest_of[order] = np.arange(len(order))
    small = {
        key: np.concatenate([_read(c.path, key) for c in caches])[order] for key in ("frame_index", "failure", "status")
    }
    small["failure"][small["status"] == store.DONE] = b""  # a reason left from before a retry
    crcs = np.zeros(len(order), np.uint32)
    try:
        with h5py.File(out, "r+") as f:
            # everything a row owns but its features, then the features (bulk reads of source
            # blocks, one chunk write per row) sealed by the merged file's rule, status last
            f["frame_index"][...] = small["frame_index"]
            f["failure"][...] = small["failure"]
            meta = checksum.RowMeta.read(f)
            for i, c in enumerate(caches):
                _copy_rows(c.path, f["features"], dest_of[src == i], meta, crcs)
            f[checksum.DATASET][...] = crcs
            f.flush()
            f["status"][...] = small["status"]
    except BaseException:
        Path(out).unlink(missing_ok=True)  # never a merged file that hides a corrupt shard row
        raise
    return {"rows": len(order), "shards": len(caches)}


def _copy_rows(path: Path, features: h5py.Dataset, dest: np.ndarray, meta: checksum.RowMeta, crcs: np.ndarray) -> None:
    """Copy one shard's rows to their merged places, checking each done row against the
    shard's own checksum (a corrupt shard row is refused, not laundered into a fresh
    checksum) and computing the merged row's whole-row checksum."""
    with h5py.File(path, "r") as g:
        done = g["status"][...] == store.DONE
        have = g[checksum.DATASET][...] if checksum.DATASET in g else None
        own = checksum.RowMeta.read(g) if checksum.whole_row(g) else None
        bad: list[str] = []
        for lo in range(0, len(dest), BLOCK):
            block = g["features"][lo : lo + BLOCK]
            for j in range(len(block)):
                r = lo + j
                features[dest[r]] = block[j]
                if not done[r]:
                    continue
                if have is not None and checksum.row_crc(block[j], r, own) != have[r]:
                    bad.append(store.decode_strings([g["narration_id"][r]])[0])
                crcs[dest[r]] = checksum.row_crc(block[j], int(dest[r]), meta)
    if bad:
        raise EkxError(
            f"{path}: {len(bad)} rows do not match their checksums (e.g. {bad[0]}); run "
            f"`ekx cache verify {path} --repair`, re-run that shard's extract command, then merge again"
        )
