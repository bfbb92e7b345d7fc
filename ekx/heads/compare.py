"""`ekx compare`: the seed's model-comparison table over run directories."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ekx import EkxError

COLUMNS = [
    ("run", "run"),
    ("head", "head"),
    ("params", "params"),
    ("train acc", "train_action_top1"),
    ("val acc", "val_action_top1"),
    ("gap", "gap"),
    ("verb top-1", "val_verb_top1"),
    ("verb top-5", "val_verb_top5"),
    ("noun top-1", "val_noun_top1"),
    ("noun top-5", "val_noun_top5"),
    ("action top-1", "val_action_top1"),
    ("action top-5", "val_action_top5"),
    ("epochs", "epochs"),
    ("seconds", "seconds"),
]


def run_dirs(paths: list[Path]) -> list[Path]:
    """Run directories among the paths; a sweep directory stands for the runs inside it."""
    out = []
    for p in map(Path, paths):
        if (p / "metrics.jsonl").is_file():
            out.append(p)
        elif p.is_dir():
            out += sorted(d for d in p.iterdir() if (d / "metrics.jsonl").is_file())
        else:
            raise EkxError(f"{p}: not a run directory (no metrics.jsonl) nor a directory of runs")
    if not out:
        raise EkxError(f"no runs found in {', '.join(map(str, paths))}")
    return out


def _params(run_dir: Path) -> int:
    import torch

    ckpt = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    # a fine-tuned run trains its backbone too: count it
    tensors = [*ckpt["model"].values(), *ckpt.get("backbone", {}).values()]
    return sum(t.numel() for t in tensors if t.is_floating_point())


def collect(paths: list[Path]) -> list[dict]:
    from ekx.config import load_toml
    from ekx.heads.runlog import read_metrics

    rows = []
    for d in run_dirs(paths):
        metrics = read_metrics(d)
        if not metrics:
            continue
        best = max(metrics, key=lambda r: r["val_action_top1"])
        # read as plain TOML: a fine-tuned run's config has keys TrainConfig does not know
        cfg = load_toml(d / "config.toml", "run configuration") if (d / "config.toml").is_file() else {}
        rows.append(
            {
                "run": d.name,
                "run_dir": str(d),
                "head": cfg.get("head", "?"),
                "command": "finetune" if "freeze_blocks" in cfg else "train-head",
                "params": _params(d) if (d / "best.pt").is_file() else 0,
                **best,
                "best_epoch": best["epoch"],
                "epochs": len(metrics),
                "seconds": sum(r["seconds"] for r in metrics),
                "curve": [r["val_action_top1"] for r in metrics],
            }
        )
    return sorted(rows, key=lambda r: -r["val_action_top1"])


def _fmt(key: str, value) -> str:
    if key == "params":
        return f"{value / 1e6:.2f}M"
    if key == "gap":
        return f"{value:+.1f}"
    if isinstance(value, float):
        return f"{value:.1f}" if key != "seconds" else f"{value:.0f}"
    return str(value)


def table_rows(rows: list[dict]) -> list[list[str]]:
    return [[_fmt(k, r.get(k, "")) for _, k in COLUMNS] for r in rows]


def markdown(rows: list[dict]) -> str:
    head = "| " + " | ".join(c for c, _ in COLUMNS) + " |"
    sep = "|" + "---|" * len(COLUMNS)
    return "\n".join([head, sep] + ["| " + " | ".join(r) + " |" for r in table_rows(rows)]) + "\n"


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([k for _, k in COLUMNS])
    for r in rows:
        w.writerow([r.get(k, "") for _, k in COLUMNS])
    return buf.getvalue()


def reproduce_command(row: dict) -> str:
    cmd = row.get("command", "train-head")
    return f"ekx {cmd} {row['head']} --config {Path(row['run_dir']) / 'config.toml'} --name {row['run']}-again"


def plot(rows: list[dict], out: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EkxError("--plot needs matplotlib: pip install 'ekx[plot]'") from None
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        a.plot(range(1, len(r["curve"]) + 1), r["curve"], label=r["run"])
    a.set(xlabel="epoch", ylabel="val action top-1 (%)", title="validation curves")
    a.legend(fontsize=7)
    b.bar([r["run"] for r in rows], [r["gap"] for r in rows])
    b.set(ylabel="train - val action top-1 (pp)", title="overfitting gap")
    b.tick_params(axis="x", rotation=60, labelsize=7)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return Path(out)
