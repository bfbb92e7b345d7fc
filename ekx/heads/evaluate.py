"""`ekx evaluate`: official metrics of a trained run on a cache, and the challenge
submission JSON."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ekx import EkxError, epic
from ekx.heads import missing
from ekx.heads.checkpoint import (
    check_compatible,
    load_checkpoint,
    model_from_checkpoint,
)
from ekx.heads.config import TrainConfig
from ekx.heads.data import load_split
from ekx.heads.train import predict
from ekx.runtime import resolve_device, resolve_precision


def evaluate_run(
    run_dir: Path,
    features: Path,
    annotations: Path | None = None,
    device_name: str = "auto",
    checkpoint: str = "best.pt",
    allow_missing: bool = False,
) -> dict:
    """Metrics over every row of the cache: failed or pending rows are refused, or with
    ``allow_missing`` counted as wrong (see heads.missing); ``missing_ids`` lists them."""
    ckpt = load_checkpoint(Path(run_dir) / checkpoint)
    device = resolve_device(device_name)
    split = load_split(features, device)
    present = torch.zeros(len(split.narration_id), dtype=torch.bool)
    present[split.rows] = True
    missing_ids = [split.narration_id[i] for i in (~present).nonzero().flatten().tolist()]
    if split.labelled:  # an unlabelled (test) cache has no metrics; its submission refuses instead
        missing.refuse_unless_allowed(
            str(features),
            missing_ids,
            len(present),
            allow_missing,
            "Re-run `ekx extract` to retry failed and finish pending segments (`ekx cache info` lists them)",
        )
    check_compatible(ckpt, split, f"{run_dir}/{checkpoint}")
    cfg = TrainConfig.from_dict(ckpt["config"], str(run_dir / checkpoint))
    model = model_from_checkpoint(ckpt).to(device)
    norm = (ckpt["norm"]["mean"].to(device), ckpt["norm"]["std"].to(device))
    # float32 logits on the CPU (the head's classifier runs in fp32 under any autocast): the
    # metrics below rank exactly these numbers, as `submission` writes them and `ekx score` reads them
    verb, noun = predict(model, split, norm, cfg, device, resolve_precision(cfg.precision, device))
    result = {
        "run": str(run_dir),
        "features": str(features),
        "segments": len(present),
        "missing_ids": missing_ids,
        "split": split.attrs.get("split", ""),
        "epoch": ckpt["epoch"],
        "verb": verb,
        "noun": noun,
        "narration_ids": [split.narration_id[r] for r in split.rows.tolist()],
    }
    if split.labelled:
        tails, unseen = epic.subsets(annotations, split.attrs.get("split", ""))
        tail_verbs, tail_nouns = tails or (None, None)
        unseen_all = None if unseen is None else torch.tensor([v.split("_")[0] in unseen for v in split.video_id])
        result["metrics"] = missing.compute(
            verb, noun, present, split.verbs, split.nouns, tail_verbs, tail_nouns, unseen=unseen_all
        )
    return result


def check_complete(result: dict, annotations: Path | None = None) -> None:
    """A submission holds every segment of the split, or none is written: segments without
    scores, and (when the annotation CSVs are at hand) segments of the split the evaluated
    cache or video list lacks (e.g. extracted with --limit), are refused by count."""
    if result.get("missing_ids"):
        ids = result["missing_ids"]
        raise EkxError(
            f"{len(ids)} of {result['segments']} segments have no scores (e.g. {ids[0]}): a submission must "
            "hold every segment of the split - re-run `ekx extract` to retry them (a fine-tuned run: check "
            "the videos), then evaluate again; no submission written"
        )
    split_name = result.get("split", "")
    if annotations is None or not split_name or not Path(annotations).is_dir():
        return
    try:
        expected = {s.narration_id for s in epic.Annotations(Path(annotations)).segments(split_name)}
    except EkxError:  # no CSV of that split here: the cache's own rows are the split
        return
    lacking = sorted(expected - set(result["narration_ids"]))
    if lacking:
        raise EkxError(
            f"{len(lacking)} of {len(expected)} segments of the {split_name} split are not in "
            f"{result['features']} (e.g. {lacking[0]}; extracted with --limit or --shard?): a submission "
            "must hold every segment - extract the whole split; no submission written"
        )


def submission(result: dict) -> dict:
    """The official action-recognition challenge format, one entry per segment.

    It holds the raw logits, not probabilities: the official scoring softmaxes each
    segment's top-100 scores itself (metrics.action_correct), so probabilities would be
    softmaxed twice. Each value is a float32 logit written exactly (its float64 repr),
    as the official create_submission.py does: rounding could create ties.
    """
    verb, noun = result["verb"].float().cpu(), result["noun"].float().cpu()
    bad = ~(torch.isfinite(verb).all(1) & torch.isfinite(noun).all(1))
    if bad.any():  # json.dumps would write NaN, which is not JSON and no server can rank
        raise EkxError(
            f"{int(bad.sum())} segment(s) have non-finite logits (e.g. "
            f"{result['narration_ids'][int(bad.nonzero()[0])]}); no submission written - "
            "retrain or evaluate another checkpoint (--checkpoint last.pt)"
        )
    out = {}
    for i, nid in enumerate(result["narration_ids"]):
        out[nid] = {
            "verb": {str(c): s for c, s in enumerate(verb[i].tolist())},
            "noun": {str(c): s for c, s in enumerate(noun[i].tolist())},
        }
    return {
        "version": "0.2",
        "challenge": "action_recognition",
        "sls_pt": 2,
        "sls_tl": 3,
        "sls_td": 4,
        "results": out,
    }


def write_json(path: Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
