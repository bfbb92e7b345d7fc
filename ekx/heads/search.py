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

Resume: a trial whose worker died (no live owner.json, see heads.runlock) is taken over by
the next worker and continues from its last.pt, so a kill -9 loses at most the epoch that
was running; workers keep asking for new trials until `trials` are finished.

Checked before the first trial: the base configuration, the space (heads.config.check_space),
the objective, and the validation caches (failed or pending rows: heads.missing). A trial's
best.pt is its best epoch by the objective, the epoch the study records. A search ends with
an error when no trial completed, and says how many failed (they count toward `trials`).

The journal: a record torn by a kill or a full disk mid-append is the last line, which
Optuna's reader ignores; the next append cuts it off first, so nothing is ever written after
a torn line (an append that fails is cut back too). A damaged line in the middle stops the
study with the file and line named.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ekx import EkxError
from ekx.config import load_toml
from ekx.heads import runlock
from ekx.heads.config import TrainConfig, check_space
from ekx.heads.runlog import best_row, minimised
from ekx.heads.sweep import SEARCH, with_caches
from ekx.options import check_values, opt

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


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


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
    TrainConfig.from_dict({**search.base, **search.overrides}, f"{where} [base] with --set")
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


def journal_path(sweep_dir: Path) -> Path:
    return Path(sweep_dir).parent / f"{Path(sweep_dir).name}.journal"


def trial_dir(sweep_dir: Path, number: int) -> Path:
    return Path(sweep_dir) / f"trial-{number:04d}"


# ---------------------------------------------------------------- the journal


def _is_record(line: bytes) -> bool:
    try:
        json.loads(line)
        return line.endswith(b"\n")
    except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
        return False


def cut_torn_tail(path: Path) -> int | None:
    """Drop the journal's last line if a kill or a full disk cut it short (no newline, or not
    JSON); returns its line number, None when the file ends with a whole record. Called under
    the journal's lock, where no live writer is mid-append."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        block = min(size, 1 << 16)
        while True:  # the last line: back from the end to the newline before it
            f.seek(size - block)
            tail = f.read(block)
            cut = tail.rfind(b"\n", 0, len(tail) - 1)
            if cut >= 0 or block == size:
                break
            block = min(size, block * 4)
        if not tail or _is_record(tail[cut + 1 :]):
            return None
        start = size - block + cut + 1
        f.seek(0)
        line = f.read(start).count(b"\n") + 1
        f.truncate(start)
        return line


def _backend(path: Path, warn: Callable[[str], None]):
    """Optuna's journal file, whose appends first cut a torn last record (see the module
    docstring) and cut a failed append back, so no record is ever written after a torn one."""
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    lock = JournalFileSymlinkLock(str(path))

    class Journal(JournalFileBackend):
        def append_logs(self, logs: list[dict[str, Any]]) -> None:
            lock.acquire()
            try:
                line = cut_torn_tail(path)
                if line is not None:
                    warn(
                        f"{path}: line {line}, its last record, was cut short (a kill or a full disk "
                        "mid-write); dropped it, as Optuna's reader does, before appending"
                    )
                size = path.stat().st_size
                data = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs).encode()
                try:
                    with open(path, "ab") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                except OSError as e:
                    with contextlib.suppress(OSError):
                        os.truncate(path, size)  # a half-written record never stays
                    raise EkxError(
                        f"{path}: cannot append to the study's journal ({e.strerror or e}); its records so far "
                        "are intact. Free space (or fix the disk) and run the same command again"
                    ) from None
            finally:
                lock.release()

    return Journal(str(path), lock)


def _damaged_line(path: Path) -> int | None:
    """The first line before the last that is not a whole record (Optuna cannot read past it)."""
    with open(path, "rb") as f:
        lines = f.readlines()
    return next((i + 1 for i, line in enumerate(lines[:-1]) if not _is_record(line)), None)


def open_study(
    sweep_dir: Path, search: Search | None = None, worker: int = 0, create: bool = True, warn: Callable = _warn
):
    """The study of a sweep directory (created on first use); `worker` offsets the sampler's
    seed so that parallel workers do not propose the same parameters in lockstep."""
    import optuna
    from optuna.storages import JournalStorage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = journal_path(sweep_dir)
    if not create and not path.is_file():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        storage = JournalStorage(_backend(path, warn))
        if search is None:
            return optuna.load_study(study_name=Path(sweep_dir).name, storage=storage)
        return _create(storage, sweep_dir, search, worker, path)
    except ValueError:  # Optuna's reader stops at a line it cannot parse
        line = _damaged_line(path)
        if line is None:
            raise
        raise EkxError(
            f"{path} line {line} is not a whole record (torn by a kill or a full disk, then written after); "
            f"Optuna cannot read the study past it. Keep lines 1-{line - 1} (head -n {line - 1}) to continue "
            "from there, or start the search afresh with another --name"
        ) from None


def _create(storage, sweep_dir: Path, search: Search, worker: int, path: Path):
    import optuna

    seed = search.seed + 1000 * worker
    sampler: optuna.samplers.BaseSampler = (
        optuna.samplers.TPESampler(seed=seed) if search.sampler == "tpe" else optuna.samplers.RandomSampler(seed=seed)
    )
    epochs = int({**search.base, **search.overrides}.get("epochs", TrainConfig().epochs))
    pruner: optuna.pruners.BasePruner
    if search.pruner == "successive-halving":
        pruner = optuna.pruners.SuccessiveHalvingPruner(
            min_resource=search.min_epochs, reduction_factor=search.reduction_factor
        )
    elif search.pruner == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(
            min_resource=search.min_epochs, max_resource=epochs, reduction_factor=search.reduction_factor
        )
    else:
        pruner = optuna.pruners.NopPruner()
    study = optuna.create_study(
        study_name=Path(sweep_dir).name,
        storage=storage,
        sampler=sampler,
        pruner=pruner,
        direction=search.direction,
        load_if_exists=True,
    )
    if study.user_attrs.get("objective", search.objective) != search.objective:
        raise EkxError(
            f"{path} holds a study of {study.user_attrs['objective']}, not {search.objective}: "
            "choose another --name for a search with another objective"
        )
    study.set_user_attr("objective", search.objective)
    return study


def suggest(trial, space: dict[str, dict]) -> dict[str, Any]:
    out = {}
    for key, spec in space.items():
        kind, args = next(iter(spec.items()))
        if kind == "choice":
            out[key] = trial.suggest_categorical(key, list(args))
        elif kind == "int_uniform":
            out[key] = trial.suggest_int(key, int(args[0]), int(args[1]))
        else:
            out[key] = trial.suggest_float(key, float(args[0]), float(args[1]), log=kind == "log_uniform")
    return out


def trial_config(search: Search, number: int, params: dict, features_root: Path) -> TrainConfig:
    values = {**search.base, **params, **search.overrides, "name": f"trial-{number:04d}"}
    return with_caches(TrainConfig.from_dict(values, f"trial {number}"), features_root)


class Pruned(Exception):
    """Raised from a run's on_epoch callback: the pruner stopped this trial after an epoch."""


def _settled(state) -> bool:
    import optuna

    return state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


def _next_trial(study, search: Search, sweep_dir: Path):
    """Under the sweep's mutex: a dead worker's trial to take over, else a new one, else None."""
    import optuna

    trials = study.get_trials(deepcopy=False)
    for ft in trials:
        if ft.state == optuna.trial.TrialState.RUNNING:
            lock = runlock.take(trial_dir(sweep_dir, ft.number))
            if lock is not None:
                return optuna.Trial(study, ft._trial_id), lock, True
    settled = sum(_settled(ft.state) for ft in trials)
    running = sum(ft.state == optuna.trial.TrialState.RUNNING for ft in trials)
    if settled + running >= search.trials:
        return None
    trial = study.ask()
    suggest(trial, search.space)  # sampled now, inside the mutex: the next ask sees it running
    lock = runlock.take(trial_dir(sweep_dir, trial.number))
    assert lock is not None  # a new number: nobody else can hold its directory
    return trial, lock, False


def run_worker(
    search: Search,
    sweep_dir: Path,
    features_root: Path,
    device: str,
    tails=None,
    unseen=None,
    worker: int = 0,
    on_event: Callable[[str, str, dict], None] | None = None,
    allow_missing: bool = False,
    warn: Callable[[str], None] = _warn,
) -> dict[str, dict]:
    """Take trials from the study until `trials` are settled; returns {trial: result} of this
    worker. ``worker`` is the number asked for: one another live process holds is not shared
    (runlock.slot) - the next free one is taken, with its own sampler seed."""
    from ekx.heads import train as tr

    with runlock.slot(Path(sweep_dir) / ".worker", worker) as me:
        if me != worker:
            warn(f"worker {worker} of {sweep_dir} is held by another live process: this one is worker {me}")
        study = open_study(sweep_dir, search, me, warn=warn)
        loaded: dict[tuple[str, str], Any] = {}  # each cache loaded once per worker
        results: dict[str, dict] = {}
        emit = on_event or (lambda kind, name, row: None)
        while True:
            with runlock.mutex(Path(sweep_dir) / ".claim.lock"):
                nxt = _next_trial(study, search, sweep_dir)
            if nxt is None:
                return results
            trial, lock, resumed = nxt
            run_dir = trial_dir(sweep_dir, trial.number)
            with lock:
                results[run_dir.name] = _run_trial(
                    search,
                    study,
                    trial,
                    run_dir,
                    features_root,
                    device,
                    (tails, unseen, allow_missing),
                    tr,
                    loaded,
                    emit,
                    resumed,
                )


def _objective(rows: list[dict], search: Search) -> float:
    """The trial's value: its best epoch's (the epoch of its best.pt, runlog.best_row)."""
    best = best_row([r for r in rows if r["epoch"] > 0], search.objective)
    if not best:
        raise EkxError(f"objective {search.objective!r} is not a metrics column; e.g. val_action_top1, val_loss")
    return float(best[search.objective])


def _run_trial(search, study, trial, run_dir, features_root, device, data_args, tr, loaded, emit, resumed) -> dict:
    import optuna

    from ekx.heads.runlog import read_metrics

    name = run_dir.name
    if (run_dir / "pruned.json").is_file():  # pruned, then killed before the study heard of it
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return {"status": "pruned", **json.loads((run_dir / "pruned.json").read_text())}
    cfg = trial_config(search, trial.number, suggest(trial, search.space), features_root)
    key = (cfg.train_features, cfg.val_features)
    if key not in loaded:  # a missing cache stops the worker, not the trial: it stays resumable
        loaded[key] = tr.load_data(Path(key[0]), Path(key[1]), device, *data_args)
    try:
        resume = (run_dir / "last.pt").is_file()
        reported = set(trial.storage.get_trial(trial._trial_id).intermediate_values)
        for row in read_metrics(run_dir) if resume else []:  # epochs the dead worker logged but never reported
            if row["epoch"] > 0 and row["epoch"] not in reported and search.objective in row:
                trial.report(float(row[search.objective]), row["epoch"])
        emit("resume" if resumed else "start", name, {"params": trial.params, "epochs": cfg.epochs})

        def on_epoch(row: dict) -> None:
            emit("epoch", name, row)
            if row["epoch"] < 1 or search.objective not in row:
                return
            trial.report(float(row[search.objective]), row["epoch"])
            if row["epoch"] < cfg.epochs and trial.should_prune():
                raise Pruned(row["epoch"])

        best = tr.run(cfg, run_dir, loaded[key], resume=resume, on_epoch=on_epoch, objective=search.objective)
        value = _objective(read_metrics(run_dir), search)
        (run_dir / "done.json").write_text(json.dumps({"epochs": cfg.epochs, "best": best, "value": value}))
        study.tell(trial, value)
        emit("done", name, {"value": value})
        return {"status": "done", "value": value}
    except Pruned as p:
        rows = read_metrics(run_dir)
        mark = {"epoch": int(p.args[0]), "value": _objective(rows, search)}
        (run_dir / "pruned.json").write_text(json.dumps(mark))  # the run stays: curve and checkpoints
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        emit("pruned", name, mark)
        return {"status": "pruned", **mark}
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        trial.set_user_attr("error", error[:500])
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        emit("failed", name, {"error": error})
        return {"status": "failed", "error": error}


# ---------------------------------------------------------------- several workers on this machine


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
    warn: Callable[[str], None] = _warn,
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
        results = _run_processes(
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


def _run_processes(search, sweep_dir, features_root, device, jobs, tails, unseen, worker, on_event, allow_missing):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    me = os.getpid()
    procs = [
        ctx.Process(
            target=_process,
            args=(
                search,
                str(sweep_dir),
                str(features_root),
                device,
                tails,
                unseen,
                worker * jobs + j,
                jobs,
                events,
                me,
                allow_missing,
            ),
        )
        for j in range(jobs)
    ]
    for p in procs:
        p.start()
    results: dict[str, dict] = {}
    while any(p.is_alive() for p in procs) or not events.empty():
        try:
            kind, name, row = events.get(timeout=0.2)
        except Exception:  # queue.Empty
            continue
        if kind == "result":
            results[name] = row
        elif on_event:
            on_event(kind, name, row)
    for p in procs:
        p.join()
    bad = [p.exitcode for p in procs if p.exitcode]
    if bad:
        raise EkxError(f"{len(bad)} of {jobs} search workers exited with {bad}; re-run the same command to continue")
    return results


def _process(search, sweep_dir, features_root, device, tails, unseen, worker, jobs, events, parent, allow) -> None:
    from ekx.heads.sweep import die_with_parent

    die_with_parent(parent)
    import torch

    torch.set_num_threads(max(1, (torch.get_num_threads() or 1) // jobs))
    results = run_worker(
        search,
        Path(sweep_dir),
        Path(features_root),
        device,
        tails,
        unseen,
        worker,
        lambda kind, name, row: events.put((kind, name, row)),
        allow,
    )
    for name, res in results.items():
        events.put(("result", name, res))


def summary(sweep_dir: Path) -> dict[str, int]:
    """Trials of the study by state (COMPLETE, PRUNED, FAIL, RUNNING)."""
    study = open_study(sweep_dir, create=False)
    counts: dict[str, int] = {}
    for ft in study.get_trials(deepcopy=False) if study else []:
        counts[ft.state.name] = counts.get(ft.state.name, 0) + 1
    return counts
