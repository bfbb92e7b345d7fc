"""`[optuna]` sweep files: a model-based search with pruning, on Optuna.

    [base]                                    # shared by every trial, as in other sweep files
    head = "transformer"
    epochs = 20

    [optuna]
    trials = 40                               # finished trials (complete, pruned or failed)
    seed = 0
    sampler = "tpe"                           # tpe | random
    pruner = "successive-halving"             # successive-halving | hyperband | none
    objective = "val_action_top1"             # a validation column of metrics.jsonl; val_loss is minimised
    min_epochs = 1                            # pruner: epochs before the first decision
    reduction_factor = 3                      # pruner: keep 1/reduction_factor at each rung
    lr = { log_uniform = [1e-5, 1e-3] }       # the space, in the [random] style
    backbone = { choice = ["resnet50", "efficientnet_b3"] }

Each trial is a normal run directory `runs/<sweep>/trial-0007/`. The study lives in a
journal file next to the sweep directory (`runs/<sweep>.journal`), which any number of
processes - `--jobs N` here, `ekx slurm sweep --workers N` on a cluster - append to without
a database server. Intermediate values are reported once per epoch (after the epoch's
checkpoint and metrics row are written); the pruner decides between epochs, so a pruned
trial keeps its partial curve and checkpoints and is marked by `pruned.json`.

Checked before the first trial: the base configuration, the space (heads.config.check_space),
the objective, and the validation caches (failed or pending rows: heads.missing). A trial's
best.pt is its best epoch by the objective, the epoch the study records. A search ends with
an error when no trial completed, and says how many failed (they count toward `trials`).

The study is split three ways: this module (the search file, its checks, the run and its
verdict), `heads.journal` (the study's journal file and how it survives kills) and
`heads.pool` (workers taking trials, in this process or several)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ekx import EkxError
from ekx.config import load_toml
from ekx.heads.config import TrainConfig, check_space
from ekx.heads.journal import journal_path, open_study, summary, trial_dir, warn_stderr
from ekx.heads.pool import run_processes, run_worker
from ekx.heads.runlog import minimised
from ekx.heads.sweep import SEARCH, with_caches
from ekx.options import check_values, opt
from ekx.track import require

# what callers of a search reach through this module
__all__ = ["Search", "check", "journal_path", "load", "open_study", "parse", "run_search", "summary", "trial_dir"]

SAMPLERS = ("tpe", "random")
PRUNERS = ("successive-halving", "hyperband", "none")
OPTIONS = ("trials", "seed", "sampler", "pruner", "objective", "min_epochs", "reduction_factor")
_TASKS = ("verb", "noun", "action")
# the validation columns of metrics.jsonl (train.score; a test keeps them equal): what a search
# may select on. Tail and unseen figures exist only with the annotation files.
OBJECTIVES = (
    "val_loss",
    *(f"val_{t}_top{k}" for k in (1, 5) for t in _TASKS),
    *(f"val_tail_{t}_top1" for t in _TASKS),
    *(f"val_unseen_{t}_top1" for t in _TASKS),
)


@dataclass
class Search:
    base: dict[str, Any]
    space: dict[str, dict]
    trials: int = opt(MISSING, "finished trials (complete, pruned or failed)", ge=1)
    seed: int = opt(0, "the sampler's random seed", ge=0)
    sampler: str = opt("tpe", "how parameters are proposed", choices=SAMPLERS)
    pruner: str = opt("successive-halving", "how trials are stopped early", choices=PRUNERS)
    objective: str = opt("val_action_top1", "a metrics.jsonl column; *_loss is minimised")
    min_epochs: int = opt(1, "pruner: epochs before the first decision", ge=1)
    reduction_factor: int = opt(3, "pruner: keep 1/reduction_factor at each rung", ge=2)
    overrides: dict[str, Any] = field(default_factory=dict)  # --set, applied last

    @property
    def direction(self) -> Literal["minimize", "maximize"]:
        return "minimize" if minimised(self.objective) else "maximize"


def check_objective(objective: str, where: str, tails: bool = True, unseen: bool = True) -> None:
    """A column every trial's metrics.jsonl will have; ``tails``/``unseen``: those figures will
    be computed (they need the annotation files; False: refuse them before a trial runs)."""
    if objective not in OBJECTIVES:
        raise EkxError(
            f"{where}: objective {objective!r} is not a validation metric; use one of {', '.join(OBJECTIVES)}"
        )
    if (not tails and objective.startswith("val_tail_")) or (not unseen and objective.startswith("val_unseen_")):
        raise EkxError(
            f"{where}: objective {objective!r} needs the annotation files (tail classes, unseen participants): "
            "pass --annotations, or select on val_action_top1"
        )


def check(search: Search, where: str = "search", tails: bool = True, unseen: bool = True) -> None:
    """The whole search before its first trial, as run (after --set and --select): what every
    trial shares, the space, the objective. A search whose every trial fails on its settings
    is refused here instead."""
    base = TrainConfig.from_dict({**search.base, **search.overrides}, f"{where} [base] with --set")
    require(base.track, f"{where}: track")  # a tracker asked for and not installed
    check_space(search.space, f"{where} [{SEARCH}]")
    check_objective(search.objective, where, tails, unseen)


def parse(data: dict, where: str = "sweep file") -> Search:
    unknown = sorted(set(data) - {"base", SEARCH})
    if unknown:
        raise EkxError(f"{where}: an [{SEARCH}] search takes only [base] and [{SEARCH}]; found {', '.join(unknown)}")
    base = dict(data.get("base", {}))
    TrainConfig.from_dict(base, f"{where} [base]")  # unknown keys and wrong types, named
    section = dict(data[SEARCH])
    opts = {k: section.pop(k) for k in OPTIONS if k in section}
    search = Search(base, section, **{"trials": None, **opts})  # no trials: said below, not a TypeError
    if not isinstance(search.trials, int) or search.trials < 1:
        raise EkxError(f"{where} [{SEARCH}]: 'trials' must be a positive integer")
    if search.sampler not in SAMPLERS:
        raise EkxError(f"{where} [{SEARCH}]: sampler {search.sampler!r}; use one of {', '.join(SAMPLERS)}")
    if search.pruner not in PRUNERS:
        raise EkxError(f"{where} [{SEARCH}]: pruner {search.pruner!r}; use one of {', '.join(PRUNERS)}")
    check_values(Search, opts, f"{where} [{SEARCH}]")
    check_objective(search.objective, f"{where} [{SEARCH}]")
    unknown = sorted(set(section) - set(TrainConfig.keys()))
    if unknown:
        raise EkxError(
            f"{where} [{SEARCH}]: unknown key(s) {', '.join(unknown)}; options: {', '.join(OPTIONS)}; "
            f"searchable: {', '.join(TrainConfig.keys())}"
        )
    check_space(section, f"{where} [{SEARCH}]")
    return search


def load(path: Path) -> Search:
    return parse(load_toml(path, "sweep file"), str(path))


def run_search(
    search: Search,
    sweep_dir: Path,
    features_root: Path,
    device: str,
    jobs: int = 1,
    tails=None,
    unseen=None,
    worker: int = 0,
    on_event: Callable[[str, str, dict], None] | None = None,
    allow_missing: bool = False,
    warn: Callable[[str], None] = warn_stderr,
) -> dict[str, dict]:
    """`jobs` workers on the study (jobs == 1: this process); returns {trial: result}.

    Before the first trial: the search itself (`check`) and every validation cache a trial
    may use (failed or pending rows refused unless ``allow_missing``). After: an error when
    no trial of the study completed, a warning saying how many failed."""
    check(search, tails=tails is not None, unseen=unseen is not None)
    from ekx.heads import missing  # torch: only once the search holds

    for val in sorted(_val_caches(search, features_root)):
        note = missing.check_validation_file(val, allow_missing)
        if note:
            warn(note)
    if jobs <= 1:
        results = run_worker(
            search, sweep_dir, features_root, device, tails, unseen, worker, on_event, allow_missing, warn
        )
    else:
        results = run_processes(
            search, sweep_dir, features_root, device, jobs, tails, unseen, worker, on_event, allow_missing
        )
    _judge(sweep_dir, search, warn)
    return results


def _val_caches(search: Search, features_root: Path) -> set[str]:
    """The validation caches trials may read: the base's, or one per choice of backbone and
    val_features when the space holds them (strings: only a choice can, see check_space)."""
    keys = [k for k in ("backbone", "val_features") if k in search.space]
    options = [search.space[k]["choice"] for k in keys]
    out = set()
    for combo in itertools.product(*options):
        values = {**search.base, **dict(zip(keys, combo, strict=True)), **search.overrides}
        out.add(with_caches(TrainConfig.from_dict(values, "search"), features_root).val_features)
    return out


def _judge(sweep_dir: Path, search: Search, warn: Callable[[str], None]) -> None:
    """Failed trials count toward `trials` (a setting that fails every time must not run
    forever), so they are said: how many, and the first error; none completed is an error."""
    import optuna

    study = open_study(sweep_dir, create=False)
    trials = study.get_trials(deepcopy=False) if study else []
    states = [t.state for t in trials]
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    example = f"e.g. trial-{failed[0].number:04d}: {failed[0].user_attrs.get('error', '?')}" if failed else ""
    if optuna.trial.TrialState.RUNNING in states or optuna.trial.TrialState.COMPLETE in states:
        if failed:
            warn(
                f"{len(failed)} of {len(trials)} trials of {journal_path(sweep_dir)} failed ({example}); "
                f"they count toward trials = {search.trials}"
            )
        return
    raise EkxError(
        f"{journal_path(sweep_dir)}: no trial completed ({len(failed)} failed, "
        f"{states.count(optuna.trial.TrialState.PRUNED)} pruned of {len(trials)}; {example or 'none failed'}): "
        "fix what fails and run the search again with another --name (or a higher trials =)"
    )
