"""A run directory's plain files: config.toml, metrics.jsonl (one JSON row per epoch) and
curves.png.

Disk full (or any write error) never leaves a run file half-written in place: whole files
go to a temporary file renamed over the old one (`write_atomic`), so the previous version
stays. metrics.jsonl is appended to, a line per epoch (rewriting it each epoch would cost
O(epochs)); a line torn by a full disk or a kill is harmless: readers skip a line that is
not JSON (`row_of`), and --resume rewrites the log atomically with only complete lines.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict
from pathlib import Path

from ekx import EkxError
from ekx.heads.config import TrainConfig


def write_error(path: Path, e: OSError, what: str = "the previous version is untouched") -> EkxError:
    """One line: which file, why, and what is safe."""
    return EkxError(
        f"{path}: cannot write ({e.strerror or e}); {what}. Free space (or fix the disk) and run the same "
        "command with --resume"
    )


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a whole file via a temporary file and a rename: readers see old or new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from None


def append_line(path: Path, line: str) -> None:
    try:
        with Path(path).open("a") as fh:
            fh.write(line + "\n")
    except OSError as e:
        raise write_error(path, e, "its complete lines stay readable (a torn last line is skipped)") from None


def resume_log(log: Path, start: int, saved_row: str | None) -> None:
    """metrics.jsonl of a run resumed from its epoch-``start`` checkpoint: only complete rows up
    to that epoch (a process killed after logging a later one), and epoch ``start``'s own row
    from the checkpoint (``saved_row``) when the kill came between last.pt and its row."""
    lines = [
        line
        for line in (log.read_text().splitlines() if log.exists() else [])
        if (r := row_of(line)) is not None and r["epoch"] <= start
    ]
    logged = {r["epoch"] for line in lines if (r := row_of(line)) is not None}
    if start > 0 and start not in logged and saved_row:
        lines.append(saved_row)
    write_atomic(log, "".join(line + "\n" for line in lines))


def write_config(run_dir: Path, cfg: TrainConfig, notes: tuple[str, ...] = ()) -> None:
    """config.toml; ``notes`` become comments (what the run's figures mean, e.g. validation
    segments counted as wrong), so the file stays usable as --config."""
    lines = ["# resolved configuration of this run (usable as --config)", *(f"# {n}" for n in notes)]
    for k, v in asdict(cfg).items():
        lines.append(f"{k} = {json.dumps(v)}")
    write_atomic(run_dir / "config.toml", "\n".join(lines) + "\n")


# ---------------------------------------------------------------- the objective: which epoch is best

OBJECTIVE = "val_action_top1"  # what train-head and grid sweeps select on; a search may choose another


def minimised(objective: str) -> bool:
    """Losses are minimised, accuracies maximised."""
    return objective.endswith("loss")


def improves(objective: str, value: float, best: float | None) -> bool:
    """Strictly better than ``best`` (None: nothing yet), so ties keep the earlier epoch."""
    if best is None:
        return True
    return value < best if minimised(objective) else value > best


def best_row(rows: list[dict], objective: str = OBJECTIVE) -> dict:
    """The row of the best epoch by ``objective`` (the first of equals), as best.pt holds it;
    {} when no row has the column."""
    best: dict = {}
    for r in rows:
        if objective in r and improves(objective, float(r[objective]), best.get(objective)):
            best = r
    return best


def row_of(line: str) -> dict | None:
    """A metrics.jsonl line; None for a line cut short by a kill mid-write."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    rows = [row_of(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if r]


def plot_curves(run_dir: Path, rows: list[dict], title: str = "", best: int | None = None) -> Path | None:
    """curves.png: losses and validation accuracies per epoch (needs matplotlib, the plot
    extra), titled (a copied-out picture still says which run it is), ``best`` (best.pt's
    epoch) marked, whole epochs on the axis."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    if not rows:
        return None
    ep = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.4))
    a.plot(ep, [r["train_loss"] for r in rows], label="train")
    a.plot(ep, [r["val_loss"] for r in rows], label="validation")
    a.set(xlabel="epoch", ylabel="loss", title="loss")
    for key in ("verb", "noun", "action"):
        b.plot(ep, [r[f"val_{key}_top1"] for r in rows], label=f"val {key} top-1")
    b.plot(ep, [r["train_action_top1"] for r in rows], "--", label="train action top-1")
    b.set(xlabel="epoch", ylabel="%", title="accuracy")
    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if best is not None:
            ax.axvline(best, color="grey", linestyle=":", label=f"best.pt (epoch {best})")
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(run_dir) / "curves.png"
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    write_atomic(out, buf.getvalue())
    return out


def curves_title(cfg, run_dir: Path) -> str:
    """Run name, head and what it was trained on (the cache, or the fine-tuned backbone)."""
    on = cfg.train_features or f"fine-tuned {getattr(cfg, 'backbone', '')}"  # fine-tuning reads no cache
    return f"{Path(run_dir).name}: {cfg.head} head on {on}"
