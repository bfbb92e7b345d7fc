"""The official EPIC-KITCHENS-100 action-recognition metrics, plus the seed's overfitting gap.

- verb / noun top-1 and top-5 accuracy (micro-averaged over segments);
- action = the (verb, noun) pair, scored as the official evaluation does (``action_correct``):
  each segment's 100 best verb and 100 best noun scores, softmax over those 100, product;
  action top-k is the top-k of those products;
- top-1 on the tail subsets (tail verbs; tail nouns; tail action = segments whose verb
  or noun is a tail class) and on unseen participants, when those lists are given.

Ranks are the official scorer's own (epic-kitchens/C1-Action-Recognition, utils/scoring.py):
``np.argsort(scores)[:, ::-1]`` on the scores as the JSON holds them (float64; a float32 logit
is exact in it). Two classes with the same score are ordered by that call and nothing else -
not torch.topk, whose choice among equal scores differs - so `ekx evaluate`, `ekx score` and the
official evaluation count the same segments right when a head's scores tie.
"""

from __future__ import annotations

import numpy as np
import torch

# The official rule (utils/scoring.py compute_action_scores, called by evaluate.py with
# top_n=100): keep each segment's TOP_N best verb and noun scores, softmax them, rank
# (verb, noun) pairs by the product. `ekx evaluate` (via compute) and `ekx score` both rank
# here, so a submission file scores as the run reported. (The official softmax is scipy's
# with axis=None, one normaliser over all segments: that scales a segment's products by one
# constant, so its ranking of pairs is the same as per segment here, up to float rounding -
# and without its underflow to all-zero products for a segment ~745 below the best logit.)
TOP_N = 100


def _array(scores) -> np.ndarray:
    """float64 numpy: the values `ekx score` reads back from the JSON, bit for bit."""
    if isinstance(scores, torch.Tensor):
        return scores.detach().cpu().double().numpy()
    return np.asarray(scores, dtype=np.float64)


def ranks(scores) -> np.ndarray:
    """[N, C] class ids, best first: the official ``scores.argsort(axis=-1)[:, ::-1]``."""
    return np.argsort(_array(scores), axis=-1)[:, ::-1]


def topk_correct(scores, labels: torch.Tensor, k: int, order: np.ndarray | None = None) -> torch.Tensor:
    """[N] bool: label among the first k of the official ranking (``order``: ranks(scores))."""
    order = ranks(scores) if order is None else order
    return torch.from_numpy((order[:, :k] == labels.cpu().numpy()[:, None]).any(axis=1))


def _top_probs(scores: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The TOP_N best classes (the official top_scores) and their softmax over those TOP_N."""
    top = np.ascontiguousarray(order[:, :TOP_N])
    s = np.take_along_axis(scores, top, axis=1)
    p = np.exp(s - s[:, :1])  # s[:, 0] is the row's max: the official order is descending
    return top, p / p.sum(axis=1, keepdims=True)


CHUNK = 256  # segments whose full [TOP_N x TOP_N] products are sorted at once (20 MB of float64)


def _position(order: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[N] where each label stands in the official order (TOP_N or more: not among the kept)."""
    at = order == labels[:, None]
    return np.where(at.any(axis=1), at.argmax(axis=1), order.shape[1])


def action_correct(
    verb_scores, noun_scores, verbs, nouns, ks=(1, 5), orders: tuple[np.ndarray, np.ndarray] | None = None
) -> dict[int, np.ndarray]:
    """{k: [N] bool}: the true (verb, noun) pair among the first k of the official ``argsort``
    over each segment's TOP_N x TOP_N products (compute_action_scores).

    Both factors are positive and non-increasing along the official class order and a
    rounded product is monotonic in each factor, so the k+1 largest products b_1 >= ... >=
    b_k+1 all lie in the (k+1) x (k+1) corner. The truth's product p is then in the top k if
    p > b_k+1 and out of it if p < b_k, however the sort orders equal values; only a segment
    where p == b_k == b_k+1 (rare, unless the scores tie) is sorted in full by the official
    call, so equal products fall as they fall there."""
    v, n = _array(verb_scores), _array(noun_scores)
    yv, yn = np.asarray(verbs).reshape(-1), np.asarray(nouns).reshape(-1)
    order_v, order_n = orders or (ranks(v), ranks(n))
    (tv, pv), (tn, pn) = _top_probs(v, order_v), _top_probs(n, order_n)
    kmax = max(ks)
    corner = (pv[:, : kmax + 1, None] * pn[:, None, : kmax + 1]).reshape(len(v), -1)
    best = -np.sort(-corner, axis=1)[:, : kmax + 1]
    best = np.pad(best, ((0, 0), (0, kmax + 1 - best.shape[1])), constant_values=-np.inf)
    iv, in_ = _position(order_v, yv), _position(order_n, yn)
    kept = (iv < pv.shape[1]) & (in_ < pn.shape[1])  # a class past the TOP_N is never ranked
    rows = np.arange(len(v))
    p = np.where(kept, pv[rows, np.minimum(iv, pv.shape[1] - 1)] * pn[rows, np.minimum(in_, pn.shape[1] - 1)], -np.inf)
    out, tied = {}, {}
    for k in ks:
        out[k] = kept & (p > best[:, k])
        tied[k] = kept & (p == best[:, k - 1]) & (p == best[:, k])
    redo = np.flatnonzero(np.any(list(tied.values()), axis=0))
    for i in range(0, len(redo), CHUNK):
        r = redo[i : i + CHUNK]
        full = (pv[r, :, None] * pn[r, None, :]).reshape(len(r), -1)
        top = full.argsort(axis=-1)[:, ::-1][:, :kmax]  # the official call, ties and all
        hit = (tv[r[:, None], top // pn.shape[1]] == yv[r, None]) & (tn[r[:, None], top % pn.shape[1]] == yn[r, None])
        for k in ks:
            out[k][r] = hit[:, :k].any(axis=1)
    return out


def action_topk_correct(verb_logits, noun_logits, verbs: torch.Tensor, nouns: torch.Tensor, k: int) -> torch.Tensor:
    return torch.from_numpy(action_correct(verb_logits, noun_logits, verbs.cpu().numpy(), nouns.cpu().numpy(), (k,))[k])


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
    v, n = _array(verb_logits), _array(noun_logits)  # exactly the scores a submission holds
    orders = ranks(v), ranks(n)
    action = action_correct(v, n, verbs.cpu().numpy(), nouns.cpu().numpy(), (1, 5), orders)
    for k in (1, 5):
        correct[("verb", k)] = topk_correct(v, verbs, k, orders[0])
        correct[("noun", k)] = topk_correct(n, nouns, k, orders[1])
        correct[("action", k)] = torch.from_numpy(action[k])
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
