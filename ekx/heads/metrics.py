"""The official EPIC-KITCHENS-100 action-recognition metrics, plus the seed's overfitting gap.

- verb / noun top-1 and top-5 accuracy (micro-averaged over segments);
- action = the (verb, noun) pair, scored as the official evaluation does (``action_scores``):
  each segment's 100 best verb and 100 best noun scores, softmax over those 100, product;
  action top-k is the top-k of those products. Because both factors are positive, the
  k best pairs always lie among the k best verbs x k best nouns, so only a k x k block
  is formed (exact, and no [N, 97 x 300] tensor);
- top-1 on the tail subsets (tail verbs; tail nouns; tail action = segments whose verb
  or noun is a tail class) and on unseen participants, when those lists are given.
"""

from __future__ import annotations

import torch


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """[N] bool: label among the k highest scores."""
    k = min(k, scores.shape[1])
    return (scores.topk(k, dim=1).indices == labels[:, None]).any(dim=1)


# The official rule (epic-kitchens/C1-Action-Recognition, utils/scoring.py
# compute_action_scores, called by evaluate.py with top_n=100): keep each segment's
# TOP_N best verb and noun scores, softmax them, rank (verb, noun) pairs by the product.
# `ekx evaluate` (via compute) and `ekx score` both rank actions here, so a submission
# file scores as the run reported. Computed in float64, as the official numpy code does
# on the JSON's numbers: a float32 logit is exact in float64, so both paths see the same values.
# (The official softmax is scipy's with axis=None, one normalisation over all segments; like
# the choice of top-100, that scales a segment's products by one constant, so its ranking of
# pairs is the same as here - and the same as softmax over all classes - up to float rounding.)
TOP_N = 100


def action_scores(
    verb_scores: torch.Tensor, noun_scores: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k best actions per segment: (verb ids, noun ids, scores), each [N, k], best first."""
    sv, iv = verb_scores.double().topk(min(TOP_N, verb_scores.shape[1]), dim=1)
    sn, in_ = noun_scores.double().topk(min(TOP_N, noun_scores.shape[1]), dim=1)
    pv, pn = sv.softmax(1), sn.softmax(1)  # normalised over the top-N only, as the official code
    kv, kn = min(k, pv.shape[1]), min(k, pn.shape[1])
    pair = (pv[:, :kv, None] * pn[:, None, :kn]).flatten(1)  # [N, kv*kn]
    score, top = pair.topk(min(k, pair.shape[1]), dim=1)
    return iv.gather(1, top // kn), in_.gather(1, top % kn), score


def action_topk_correct(
    verb_logits: torch.Tensor, noun_logits: torch.Tensor, verbs: torch.Tensor, nouns: torch.Tensor, k: int
) -> torch.Tensor:
    top_v, top_n, _ = action_scores(verb_logits, noun_logits, k)
    return ((top_v == verbs[:, None]) & (top_n == nouns[:, None])).any(dim=1)


def _mean(mask: torch.Tensor, subset: torch.Tensor | None = None) -> float | None:
    if subset is not None:
        if not subset.any():
            return None
        mask = mask[subset]
    return float(mask.float().mean()) * 100 if len(mask) else None


def compute(
    verb_logits: torch.Tensor,
    noun_logits: torch.Tensor,
    verbs: torch.Tensor,
    nouns: torch.Tensor,
    tail_verbs: set[int] | None = None,
    tail_nouns: set[int] | None = None,
    unseen: torch.Tensor | None = None,
) -> dict[str, float]:
    """All metrics in percent. ``unseen``: [N] bool, segment from an unseen participant."""
    out: dict[str, float | None] = {}
    correct = {}
    for k in (1, 5):
        correct[("verb", k)] = topk_correct(verb_logits, verbs, k)
        correct[("noun", k)] = topk_correct(noun_logits, nouns, k)
        correct[("action", k)] = action_topk_correct(verb_logits, noun_logits, verbs, nouns, k)
        for task in ("verb", "noun", "action"):
            out[f"{task}_top{k}"] = _mean(correct[(task, k)])
    if tail_verbs is not None and tail_nouns is not None:
        tv = torch.tensor([int(v) in tail_verbs for v in verbs.tolist()], dtype=torch.bool)
        tn = torch.tensor([int(n) in tail_nouns for n in nouns.tolist()], dtype=torch.bool)
        out["tail_verb_top1"] = _mean(correct[("verb", 1)], tv)
        out["tail_noun_top1"] = _mean(correct[("noun", 1)], tn)
        out["tail_action_top1"] = _mean(correct[("action", 1)], tv | tn)
    if unseen is not None:
        for task in ("verb", "noun", "action"):
            out[f"unseen_{task}_top1"] = _mean(correct[(task, 1)], unseen)
    return {k: v for k, v in out.items() if v is not None}


def overfitting_gap(train_accuracy: float, val_accuracy: float) -> float:
    """The seed's gap: train minus validation accuracy (percentage points)."""
    return train_accuracy - val_accuracy
