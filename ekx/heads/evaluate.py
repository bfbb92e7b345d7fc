"""`ekx evaluate`: official metrics of a trained run on a cache, and the challenge
submission JSON."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ekx import EkxError, epic
from ekx.heads import metrics
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
) -> dict:
    ckpt = load_checkpoint(Path(run_dir) / checkpoint)
    device = resolve_device(device_name)
    split = load_split(features, device)
    check_compatible(ckpt, split, f"{run_dir}/{checkpoint}")
    cfg = TrainConfig.from_dict(ckpt["config"], str(run_dir / checkpoint))
    model = model_from_checkpoint(ckpt).to(device)
    norm = (ckpt["norm"]["mean"].to(device), ckpt["norm"]["std"].to(device))
    verb, noun = predict(model, split, norm, cfg, device, resolve_precision(cfg.precision, device))
    result = {
        "run": str(run_dir),
        "features": str(features),
        "segments": len(split.rows),
        "epoch": ckpt["epoch"],
        "verb": verb,
        "noun": noun,
        "narration_ids": [split.narration_id[r] for r in split.rows.tolist()],
    }
    if split.labelled:
        tails, unseen = epic.subsets(annotations, split.attrs.get("split", ""))
        tail_verbs, tail_nouns = tails or (None, None)
        result["metrics"] = metrics.compute(
            verb,
            noun,
            split.verbs[split.rows],
            split.nouns[split.rows],
            tail_verbs,
            tail_nouns,
            unseen=split.from_participants(unseen),
        )
    return result


def submission(result: dict) -> dict:
    """The official action-recognition challenge format, one entry per segment.

    It holds the raw logits, not probabilities: the official scoring softmaxes each
    segment's top-100 scores itself (metrics.action_scores), so probabilities would be
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
