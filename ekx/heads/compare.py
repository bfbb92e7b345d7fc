"""`ekx compare`: the architecture document's model-comparison table over run directories."""

from __future__ import annotations

import csv
import io
import json
import shlex
from pathlib import Path

from ekx import EkxError
from ekx.heads import runlock

COLUMNS = [
    ("run", "run"),
    ("head", "head"),
    ("backbone", "backbone"),
    ("state", "state"),
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


def is_run(path: Path) -> bool:
    """A run directory: what train-head, a sweep or finetune writes into one (a run that failed
    before its first line of metrics holds only failed.json)."""
    return (path / "metrics.jsonl").is_file() or (path / runlock.FAILED).is_file()


def run_dirs(paths: list[Path], skipped: list[Path] | None = None) -> list[Path]:
    """Run directories among the paths; a sweep directory stands for the runs inside it. What
    is neither (a glob's runs/comparison.csv) goes to ``skipped``, said by the caller."""
    out = []
    for p in map(Path, paths):
        if is_run(p):
            out.append(p)
        elif p.is_dir() and (inside := sorted(d for d in p.iterdir() if is_run(d))):
            out += inside
        elif p.exists() and skipped is not None:
            skipped.append(p)
        else:
            raise EkxError(f"{p}: not a run directory (no metrics.jsonl) nor a directory of runs")
    if not out:
        raise EkxError(f"no runs found in {', '.join(map(str, paths))}")
    return out


def _best_pt(run_dir: Path) -> tuple[int, int | None, str | None]:
    """(parameters, epoch, features) of the run's best.pt; (0, None, None) without one.
    features: the identity's backbone of the cache it trained on (imported:..., a+b fused)."""
    if not (run_dir / "best.pt").is_file():
        return 0, None, None
    import torch

    ckpt = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    # a fine-tuned run trains its backbone too: count it
    tensors = [*ckpt["model"].values(), *ckpt.get("backbone", {}).values()]
    epoch = ckpt.get("epoch")  # every ekx checkpoint has it; a hand-made file may not
    cache = ckpt.get("cache") or {}
    features = cache.get("fusion") or cache.get("backbone")
    params = sum(t.numel() for t in tensors if t.is_floating_point())
    return params, None if epoch is None else int(epoch), None if features is None else str(features)


def state(run_dir: Path, metrics: list[dict], epochs: int | None) -> str:
    """What the run directory says of its run: running (a live trainer holds it), pruned,
    failed (failed.json: the error it stopped on), empty (no epoch logged), done (every epoch,
    or a sweep's done.json) or interrupted (fewer epochs: killed or stopped; --resume goes on)."""
    if runlock.alive(runlock.read(run_dir)):
        return "running"
    if (run_dir / "pruned.json").is_file():
        return "pruned"
    if (run_dir / runlock.FAILED).is_file():
        return "failed"
    done = [r for r in metrics if r["epoch"] > 0]
    if not done:
        return "empty"
    if (run_dir / "done.json").is_file() or (epochs is not None and done[-1]["epoch"] >= epochs):
        return "done"
    return "interrupted"


def collect(paths: list[Path], skipped: list[Path] | None = None) -> list[dict]:
    """A row per run: its best epoch's figures (an empty run: its name, state and config only),
    best first, empty runs last."""
    from ekx.config import load_toml
    from ekx.heads.runlog import best_row, read_metrics

    rows = []
    for d in run_dirs(paths, skipped):
        metrics = read_metrics(d)
        # read as plain TOML: a fine-tuned run's config has keys TrainConfig does not know
        cfg = load_toml(d / "config.toml", "run configuration") if (d / "config.toml").is_file() else {}
        # the epoch best.pt holds (chosen by the run's objective: a search may select on
        # val_loss), so the row, the checkpoint and the search's best trial agree
        params, epoch, features = _best_pt(d)
        at_best: dict = next((r for r in metrics if r["epoch"] == epoch), {})
        best = (at_best or best_row(metrics)) if metrics else {}
        rows.append(
            {
                "run": d.name,
                "run_dir": str(d),
                "head": cfg.get("head", "?"),
                "backbone": features or cfg.get("backbone", "?"),
                "state": state(d, metrics, cfg.get("epochs")),
                "command": "finetune" if "freeze_blocks" in cfg else "train-head",
                "params": params if best else "",
                **best,
                "best_epoch": best.get("epoch"),
                "epochs": len(metrics),
                "seconds": sum(r["seconds"] for r in metrics) if metrics else "",
                "curve": [r["val_action_top1"] for r in metrics],
            }
        )
    return sorted(rows, key=lambda r: (-r["val_action_top1"]) if "val_action_top1" in r else float("inf"))


def _fmt(key: str, value) -> str:
    if value == "" or value is None:  # an empty run has no figures
        return ""
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
    """A plain `ekx train-head` (or `ekx finetune`) run of a run's resolved config, shell-quoted
    (paths with spaces)."""
    config = Path(row["run_dir"]) / "config.toml"
    cmd = row.get("command", "train-head")
    return shlex.join(["ekx", cmd, row["head"], "--config", str(config), "--name", f"{row['run']}-again"])


# ---------------------------------------------------------------- an [optuna] search


def search_report(sweep_dir: Path) -> dict | None:
    """For a search's sweep directory: importance.json (importance of each parameter for the
    objective, by Optuna's default evaluator PED-ANOVA - its fANOVA would need scikit-learn),
    objective.png (objective against each parameter; pruned trials at their last reported
    value) and the best trial. None where the directory is no search."""
    from ekx.heads import search as se

    study = se.open_study(Path(sweep_dir), create=False)
    if study is None:
        return None
    import optuna

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED and t.intermediate_values]
    out: dict = {"objective": study.user_attrs.get("objective", "value"), "complete": len(done), "pruned": len(pruned)}
    if not done:
        return out
    best = study.best_trial
    out["best"] = {"run": f"trial-{best.number:04d}", "value": best.value, "params": best.params}
    try:  # needs two or more finished trials whose parameters vary
        importance = optuna.importance.get_param_importances(study)
        out["importance"] = dict(importance)
        (Path(sweep_dir) / "importance.json").write_text(json.dumps(out["importance"], indent=1) + "\n")
    except (RuntimeError, ValueError) as e:
        out["importance_error"] = str(e)
    out["plot"] = _plot_search(done, pruned, out["objective"], Path(sweep_dir) / "objective.png")
    return out


def _plot_search(done, pruned, objective: str, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = sorted({k for t in done + pruned for k in t.params})
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4 * max(len(names), 1), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        dist = next(t.distributions[name] for t in done + pruned if name in t.distributions)
        choices = getattr(dist, "choices", None)

        def x(t, name=name, choices=choices):
            return choices.index(t.params[name]) if choices is not None else t.params[name]

        for trials, value, style in (
            (done, lambda t: t.value, {"label": "complete"}),
            (pruned, lambda t: t.intermediate_values[max(t.intermediate_values)], {"marker": "x", "label": "pruned"}),
        ):
            pts = [(x(t), value(t)) for t in trials if name in t.params]
            if pts:
                ax.scatter(*zip(*pts, strict=True), **style)
        if choices is not None:
            ax.set_xticks(range(len(choices)), [str(c) for c in choices], rotation=30)
        elif getattr(dist, "log", False):
            ax.set_xscale("log")
        ax.set(xlabel=name, ylabel=objective)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


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
