"""Head checkpoints: plain tensors and values only, so they load with weights_only=True;
each records the identity of the cache it was trained on."""

from __future__ import annotations

import inspect
from dataclasses import asdict
from pathlib import Path

import torch

from ekx import EkxError
from ekx.cache import identity
from ekx.heads import models
from ekx.heads.config import TrainConfig
from ekx.heads.data import Split
from ekx.runtime import seed_everything


def save_checkpoint(
    path: Path,
    parts: dict,
    opt,
    cfg: TrainConfig,
    epoch: int,
    best: float,
    gen: torch.Generator,
    resumable: bool = True,
) -> None:
    """``parts``: what the input source puts in (model, head_kwargs, norm, cache identity,
    classes, extractor; fine-tuning adds the backbone). ``resumable``: with the optimizer
    state and random streams a resume needs (last.pt); without, what evaluation, predict
    and warm starts need (best.pt: AdamW's two moments are twice the weights' size)."""
    state = {"format": "ekx-head", "version": 1, **parts, "epoch": epoch, "best": best, "config": asdict(cfg)}
    if resumable:
        state.update(optimizer=opt.state_dict(), rng=rng_state(gen))
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        tmp.replace(path)  # atomic: an interrupted save never leaves a half checkpoint
    except OSError as e:  # disk full: the previous checkpoint stays, loadable
        tmp.unlink(missing_ok=True)
        from ekx.heads.runlog import write_error

        raise write_error(path, e, f"the previous {path.name} is untouched and loadable") from None


def rng_state(gen: torch.Generator) -> dict:
    """Every random stream a resumed run must continue: the epoch generator, torch's CPU
    stream and, on a GPU, the current device's (dropout and drop path draw there)."""
    state = {"torch": torch.get_rng_state(), "gen": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict, gen: torch.Generator) -> None:
    gen.set_state(state["gen"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():  # a checkpoint from a CPU run has none
        torch.cuda.set_rng_state(state["cuda"])


def load_checkpoint(path: Path) -> dict:
    if not Path(path).is_file():
        raise EkxError(f"{path}: no checkpoint here")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's own message advises weights_only=False: running a stranger's pickle. Never repeat it.
        raise EkxError(
            f"{path}: not a safe tensor file ({type(e).__name__}): it holds Python objects other than "
            "tensors and plain values, or is no torch file at all, so ekx did not write it and will not "
            "load it. A run's checkpoints are runs/<name>/best.pt and last.pt, written by "
            "`ekx train-head` (or `ekx finetune`); train again to get one"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "ekx-head":
        raise EkxError(f"{path}: not an ekx head checkpoint")
    return ckpt


def check_compatible(ckpt: dict, split: Split, what: str) -> None:
    """Refuse features that mean something else than those the head was trained on: the whole
    identity (`ekx.cache.identity`), or the keys an older checkpoint recorded."""
    trained = ckpt["cache"]
    have = split.identity()
    keys = None if ckpt.get("identity") == "whole" else list(trained)
    bad = identity.mismatch(trained, have, ("checkpoint", "cache"), keys)
    if bad:
        fields = "".join(f"\n  {b}" for b in bad)  # one per line: a whole identity can differ
        raise EkxError(
            f"{split.path} is incompatible with {what}: evaluate on features extracted with the same options "
            f"as the run's training cache (`ekx cache info` shows them); these fields differ:{fields}"
        )


def head_kwargs_for(cfg: TrainConfig, dim: int, num_verbs: int, num_nouns: int, k: int, where: str) -> dict:
    if cfg.frames > k:
        raise EkxError(f"--frames {cfg.frames} exceeds the {k} frames per segment in {where}")
    from ekx.heads.context import EXTRA, reads_context

    kwargs = {
        # the context head also reads each token's time and the query interval (heads.context)
        "dim": dim + EXTRA if reads_context(cfg.head) else dim,
        "num_verbs": num_verbs,
        "num_nouns": num_nouns,
        "frames": cfg.frames or k,
        "dropout": cfg.dropout,
        "drop_path": cfg.drop_path,
    }
    # depth and width where the head has them (transformer, context) and the run sets them
    takes = inspect.signature(models.REGISTRY[cfg.head]).parameters if cfg.head in models.REGISTRY else {}
    for key, name in (("layers", "layers"), ("width", "d_model")):
        if getattr(cfg, key, 0) and name in takes:
            kwargs[name] = getattr(cfg, key)
    return kwargs


def build_model(cfg: TrainConfig, split: Split) -> tuple[torch.nn.Module, dict]:
    kwargs = head_kwargs_for(
        cfg,
        split.dim,
        int(split.attrs["num_verbs"]),
        int(split.attrs["num_nouns"]),
        split.k,
        str(split.path),
    )
    if split.streams and "streams" in inspect.signature(models.REGISTRY[cfg.head]).parameters:
        kwargs["streams"] = len(split.streams)  # dense stores joined with `+`: one token stream each
    seed_everything(cfg.seed)
    return models.create(cfg.head, **kwargs), kwargs


def features_note(cfg: TrainConfig, split: Split) -> str | None:
    """config.toml's line naming the features' own identity where ``backbone`` does not
    (imported or fused stores given by path: the key only names default cache paths)."""
    own = str(split.attrs.get("backbone", ""))
    if not own or own == cfg.backbone:
        return None
    return f"features: {own} (the caches' own backbone; the backbone key below only names default cache paths)"


def model_from_checkpoint(ckpt: dict) -> torch.nn.Module:
    kw = dict(ckpt["head_kwargs"])
    model = models.create(ckpt["config"]["head"], **kw)
    model.load_state_dict(ckpt["model"])
    return model.eval()
