"""The study's journal: Optuna's JournalStorage on one append-only file beside the sweep
directory (`runs/<sweep>.journal`), shared by every worker without a database server.

A record torn by a kill or a full disk mid-append is the last line, which
Optuna's reader ignores; the next append cuts it off first, so nothing is ever written after
a torn line (an append that fails is cut back too). A damaged line in the middle stops the
study with the file and line named.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ekx import EkxError
from ekx.heads.config import TrainConfig

if TYPE_CHECKING:
    from ekx.heads.search import Search


def warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def journal_path(sweep_dir: Path) -> Path:
    return Path(sweep_dir).parent / f"{Path(sweep_dir).name}.journal"


def trial_dir(sweep_dir: Path, number: int) -> Path:
    return Path(sweep_dir) / f"trial-{number:04d}"


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
    sweep_dir: Path, search: Search | None = None, worker: int = 0, create: bool = True, warn: Callable = warn_stderr
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


def summary(sweep_dir: Path) -> dict[str, int]:
    """Trials of the study by state (COMPLETE, PRUNED, FAIL, RUNNING)."""
    study = open_study(sweep_dir, create=False)
    counts: dict[str, int] = {}
    for ft in study.get_trials(deepcopy=False) if study else []:
        counts[ft.state.name] = counts.get(ft.state.name, 0) + 1
    return counts
