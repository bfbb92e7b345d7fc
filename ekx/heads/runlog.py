"""A run directory's plain files: config.toml, metrics.jsonl (one JSON row per epoch) and
curves.png."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ekx.heads.config import TrainConfig


def write_config(run_dir: Path, cfg: TrainConfig) -> None:
    lines = ["# resolved configuration of this run (usable as --config)"]
    for k, v in asdict(cfg).items():
        lines.append(f"{k} = {json.dumps(v)}")
    (run_dir / "config.toml").write_text("\n".join(lines) + "\n")


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


def plot_curves(run_dir: Path, rows: list[dict]) -> Path | None:
    """curves.png: losses and validation accuracies per epoch (needs matplotlib, the plot extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not rows:
        return None
    ep = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [r["train_loss"] for r in rows], label="train")
    a.plot(ep, [r["val_loss"] for r in rows], label="validation")
    a.set(xlabel="epoch", ylabel="loss", title="loss")
    a.legend()
    for key in ("verb", "noun", "action"):
        b.plot(ep, [r[f"val_{key}_top1"] for r in rows], label=f"val {key} top-1")
    b.plot(ep, [r["train_action_top1"] for r in rows], "--", label="train action top-1")
    b.set(xlabel="epoch", ylabel="%", title="accuracy")
    b.legend()
    fig.tight_layout()
    out = Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
