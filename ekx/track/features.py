"""What a run trained on, as trackers' tags: the features' identity (backbone, weights, store
path, a fingerprint of the whole identity) and a summary of the stores' checksums, so runs on
the same features can be found and runs on re-extracted ones told apart."""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import Any


def fingerprint(identity: dict[str, Any]) -> str:
    """12 hex digits of the sha256 of an identity (ekx.cache.identity): equal meaning, equal tag."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]


def checksums(path: str) -> str:
    """Per store (fused ``a+b``: each; a dense split ``store@segments.csv``: its store): the crc32
    of its per-row checksums and the row count, and its file checksum - one bulk read each."""
    import h5py

    out = []
    for part in str(path).split("+"):
        store = Path(part.split("@")[0])
        with h5py.File(store, "r") as f:
            rows = f["checksum"][:] if "checksum" in f else None
            file_crc = f.attrs.get("file_checksum")
        rows_crc = (
            f"rows crc32 {zlib.crc32(rows.tobytes()):08x} over {len(rows)}" if rows is not None else "no row checksums"
        )
        out.append(rows_crc + (f", file crc32 {int(file_crc):08x}" if file_crc is not None else ""))
    return " + ".join(out)


def tags(split: Any) -> dict[str, str]:
    """A loaded train split's (heads.data.Split) identity as tags."""
    parts = split.parts or [split.attrs]
    out = {
        "features.backbone": "+".join(str(p.get("backbone", "?")) for p in parts),
        "features.weights": "+".join(str(p.get("weights", "?")) for p in parts),
        "features.store": str(split.path),
        "features.identity": fingerprint(split.identity()),
    }
    try:
        out["features.checksums"] = checksums(str(split.path))
    except (OSError, KeyError, ValueError) as e:  # a tag is not worth failing a run for
        out["features.checksums"] = f"unread ({e})"
    return out
