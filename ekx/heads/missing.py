"""One policy for segments without scores (failed or pending in a cache, undecodable video),
shared by `ekx evaluate` on a cache and on decoded video: refused, unless the user allows
them - then every metric is over the whole split and each missing segment counts as wrong.
(Leaving them out would shrink the denominator: one corrupt video would raise the score.)"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ekx import EkxError
from ekx.heads import metrics

FIX_CACHE = "Re-run `ekx extract` to retry failed and finish pending segments (`ekx cache info` lists them)"


def refuse_unless_allowed(
    where: str, missing_ids: list[str], total: int, allow: bool, how_to_fix: str, what: str = "scores"
) -> None:
    if missing_ids and not allow:
        raise EkxError(
            f"{where}: {len(missing_ids)} of {total} segments have no {what} (e.g. {missing_ids[0]}); metrics "
            f"over the rest would be over a smaller split. {how_to_fix}, or pass --allow-missing to count "
            "them as wrong"
        )


def check_validation(path: Path | str, narration_ids: Sequence[str], done: Sequence[bool], allow: bool) -> str | None:
    """Stage 2's validation cache under the same policy: failed or pending rows are refused
    before training, unless allowed; then the line to log (None: every row is done). Training
    then scores every row, the missing ones wrong (train.cached_task), so the figures that
    pick best.pt, fill `ekx compare` and drive a search are `ekx evaluate --allow-missing`'s."""
    ids = [nid for nid, ok in zip(narration_ids, done, strict=True) if not ok]
    where = f"{path} (validation cache)"
    refuse_unless_allowed(where, ids, len(done), allow, FIX_CACHE, "features")
    if not ids:
        return None
    return (
        f"{where}: {len(ids)} of {len(done)} validation segments have no features and count as wrong "
        "in every validation metric (--allow-missing)"
    )


def check_validation_file(path: Path | str, allow: bool) -> str | None:
    """`check_validation` from a cache's status column alone (no features read): a sweep or
    search checks its validation caches before its first run. A missing or unreadable file
    is left to the loader, which names it (and fails only the runs that need it)."""
    from ekx.cache.reader import open_cache

    try:
        cache = open_cache(Path(path))
    except EkxError:
        return None
    if cache.dense:  # its rows are runs of positions: which segments lack features, the loader says
        return None
    return check_validation(path, cache.narration_id, cache.done.tolist(), allow)


def compute(
    verb: torch.Tensor,
    noun: torch.Tensor,
    present: torch.Tensor,
    verbs: torch.Tensor,
    nouns: torch.Tensor,
    tail_verbs: set[int] | None = None,
    tail_nouns: set[int] | None = None,
    unseen: torch.Tensor | None = None,
) -> dict[str, float]:
    """`metrics.compute` over all N segments of a split, of which only ``present`` [N] bool
    have logits (``verb``/``noun`` hold those rows, in order); the others count as wrong.

    Each figure is the present rows' figure times the present fraction of its subset. That
    fraction comes from metrics.compute itself on stand-in logits that are right exactly on
    present rows, so the subsets (tail, unseen) stay defined in one place."""
    present = present.bool()
    sub_unseen = unseen[present] if unseen is not None else None
    scored = metrics.compute(verb, noun, verbs[present], nouns[present], tail_verbs, tail_nouns, unseen=sub_unseen)
    if bool(present.all()):
        return scored
    sign = present.float() * 2 - 1  # +1: right at top-1, -1: wrong (the true class is the lowest)
    stand_v = torch.zeros(len(present), verb.shape[1])
    stand_n = torch.zeros(len(present), noun.shape[1])
    stand_v[torch.arange(len(present)), verbs] = sign
    stand_n[torch.arange(len(present)), nouns] = sign
    fraction = metrics.compute(stand_v, stand_n, verbs, nouns, tail_verbs, tail_nouns, unseen=unseen)
    # fraction's keys are compute's (top-1 over the split and each subset, top-5 over the
    # split); a top-5 figure takes its top-1 key's fraction (the same rows)
    return {k: scored.get(k, 0.0) * fraction[k.replace("top5", "top1")] / 100 for k in fraction}
