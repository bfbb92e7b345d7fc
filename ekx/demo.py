"""`ekx demo`: the whole pipeline on built-in synthetic data, in a fresh workspace:
synthesise -> extract resnet50 features (random weights), per segment and dense -> train
every head (the context head on the dense stores) -> the model-comparison table, with the
two pairs that need order (reversed verbs) and context (rinse/wipe, told apart only by the
second before the segment)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from ekx import epic, tables
from ekx.extract.pipeline import ExtractConfig, extract
from ekx.heads import checkpoint as ck
from ekx.heads import config as hc
from ekx.heads import models
from ekx.heads import train as tr
from ekx.heads.context import reads_context
from ekx.heads.evaluate import evaluate_run
from ekx.runtime import precision_note, resolve_precision
from ekx.synth import CONTEXT_PAIR, REVERSED_PAIRS, SynthConfig, synthesize

# Sized for a 2-core CPU, where ResNet-50 runs ~13 frames/s: ~6 minutes end to end.
DEMO_FRAMES = 8
DEMO_EPOCHS = 20
DEMO_DENSE = "4"  # positions per second of the dense stores the context head reads
# the context head's window: the synthetic cue lies in the second before a segment, and
# 8 s keeps a CPU demo short (the default, TIM's 30 s, is for real kitchens)
DEMO_WINDOW = 8.0


def head_config(head: str, run_name: str, seed: int = 0, precision: str = "auto") -> hc.TrainConfig:
    """Settings that learn the small synthetic set in seconds (the phase-2 values
    are for 67k real segments: see configs/sweeps/phase2.toml)."""
    return hc.TrainConfig(
        head=head,
        name=run_name,
        epochs=DEMO_EPOCHS,
        batch_size=16,
        lr=5e-4,
        dropout=0.2,
        drop_path=0.05,
        label_smoothing=0.1,
        warmup_epochs=2.0,
        restart_epochs=DEMO_EPOCHS,
        seed=seed,
        window=DEMO_WINDOW,
        precision=precision,
    )


def reversal_scores(verb_logits: torch.Tensor, verbs: torch.Tensor, verb_keys: list[str]) -> dict[str, float]:
    """On validation segments of the time-reversed verbs (open/close, turn-on/turn-off,
    put/take): verb top-1 accuracy, and direction accuracy - the true verb scores above
    its reverse. An order-blind head is at chance (50%) on direction."""
    index = {k: i for i, k in enumerate(verb_keys)}
    reverse = {}
    for a, b in REVERSED_PAIRS:
        reverse[index[a]], reverse[index[b]] = index[b], index[a]
    sel = torch.tensor([int(v) in reverse for v in verbs.tolist()], dtype=torch.bool)
    if not sel.any():
        return {"reversal_top1": float("nan"), "direction": float("nan")}
    v, logits = verbs[sel], verb_logits[sel]
    other = torch.tensor([reverse[int(x)] for x in v.tolist()])
    rows = torch.arange(len(v))
    return {
        "reversal_top1": 100 * float((logits.argmax(1) == v).float().mean()),
        "direction": 100 * float((logits[rows, v] > logits[rows, other]).float().mean()),
    }


def pair_scores(verb_logits: torch.Tensor, verbs: torch.Tensor, verb_keys: list[str]) -> dict[str, float]:
    """On validation segments of the context pair (rinse/wipe): the true verb scores above
    its partner (`cue`, chance 50%); and verb top-1 on every other segment (`others`)."""
    index = {k: i for i, k in enumerate(verb_keys)}
    if not all(v in index for v in CONTEXT_PAIR):
        return {"cue": float("nan"), "others": 100 * float((verb_logits.argmax(1) == verbs).float().mean())}
    a, b = (index[v] for v in CONTEXT_PAIR)
    sel = (verbs == a) | (verbs == b)
    other = torch.where(verbs == a, b, a)
    rows = torch.arange(len(verbs))
    right = verb_logits[rows, verbs] > verb_logits[rows, other]
    return {
        "cue": 100 * float(right[sel].float().mean()) if sel.any() else float("nan"),
        "others": 100 * float((verb_logits.argmax(1) == verbs)[~sel].float().mean()),
    }


COLUMNS = ["head", "params", "train", "val", "gap", "verb", "noun", "action", "order", "cue", "others", "ep"]
CAPTION = (
    "train/val = action top-1; verb/noun/action = val top-1; order = direction right on time-reversed verbs; "
    "cue = rinse/wipe right (chance 50%: only the second before the segment tells them apart); "
    "others = verb top-1 on every other segment"
)


def comparison_rows(rows: list[dict]) -> list[list[str]]:
    """The demo's table, best validation action top-1 first (columns: COLUMNS)."""
    return [
        [
            r["head"],
            f"{r['params'] / 1e6:.2f}M",
            f"{r['train_action_top1']:.1f}",
            f"{r['val_action_top1']:.1f}",
            f"{r['gap']:+.1f}",
            f"{r['val_verb_top1']:.1f}",
            f"{r['val_noun_top1']:.1f}",
            f"{r['val_action_top1']:.1f}",
            f"{r['direction']:.0f}%",
            f"{r['cue']:.0f}%",
            f"{r['others']:.1f}",
            str(r["epoch"]),
        ]
        for r in sorted(rows, key=lambda r: -r["val_action_top1"])
    ]


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (decode workers): on a loaded or
    smaller machine the wall time grows, this much less."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _bar(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def _sizes(workdir: Path, *parts: Path) -> str:
    """What the demo left on disk, per folder (the runs' checkpoints are most of it)."""

    def size(p: Path) -> int:
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())

    mib = {p.name: size(p) / 2**20 for p in parts}
    parts_text = ", ".join(f"{k} {v:,.0f} MiB" for k, v in mib.items())
    return f"{parts_text} (in all {sum(mib.values()):,.0f} MiB in {workdir})"


def run(
    workdir: Path, videos: int = 12, segments: int = 16, console: Console | None = None, precision: str = "auto"
) -> dict:
    console = console or Console()
    cpu = torch.device("cpu")
    chosen = resolve_precision(precision, cpu)  # a bad --precision is refused before anything is written
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data, features, runs = workdir / "data", workdir / "features", workdir / "runs"
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    console.rule(f"[bold]ekx demo[/bold] in {workdir}")
    console.print("1/3 synthesising an EPIC-format dataset ...")
    if not (data / "annotations" / epic.SPLIT_FILES["validation"]).exists():
        synthesize(data, SynthConfig(videos=videos, segments=segments, context=True))
    console.print(f"    done ({time.perf_counter() - t0:.0f} s)")
    console.print(
        f"2/3 extracting resnet50 features, K={DEMO_FRAMES} (random weights: the demo cannot download any) ..."
    )
    if note := precision_note(precision, cpu, chosen):
        console.print(f"    {note}", style="dim", highlight=False)
    for split in ("train", "validation"):
        for what, dense in (("", ""), (f" dense {DEMO_DENSE}/s", DEMO_DENSE)):
            with _bar(console) as bar:
                task = bar.add_task(f"    {split}{what}", total=None)
                s = extract(
                    ExtractConfig(
                        split=split,
                        weights="none",
                        frames=16 if dense else DEMO_FRAMES,
                        workers=1,
                        dense=dense,
                        precision=precision,
                    ),
                    data / "annotations",
                    data / "videos",
                    features,
                    warn=lambda m: None,
                    info=lambda m: None,  # said once above
                    on_start=lambda total, done: bar.update(task, total=total, completed=done),  # noqa: B023 - called in this iteration only
                    on_progress=lambda n, _: bar.advance(task, n),  # noqa: B023
                )
            unit = "runs of 16 positions" if dense else "segments"
            console.print(f"    {split}{what}: {s.done} {unit}, {s.frames} frames this run ({s.seconds:.0f} s)")
    console.print(f"3/3 training every head, {DEMO_EPOCHS} epochs each (context: on the dense stores) ...")
    cached = tr.load_data(features / "resnet50" / "train.h5", features / "resnet50" / "validation.h5", "auto")
    dense_name = f"dense-{DEMO_DENSE}fps"
    stores = tr.load_data(
        features / "resnet50" / f"train.{dense_name}.h5", features / "resnet50" / f"validation.{dense_name}.h5", "auto"
    )
    rows = []
    # every head on its input, and the transformer also on the dense stores: the segment
    # head the context head is compared with on the same features
    plan = [(h, f"{h}-demo", h, stores if reads_context(h) else cached) for h in sorted(models.REGISTRY)]
    plan.append(("transformer", "transformer-dense-demo", f"transformer (dense {DEMO_DENSE}/s)", stores))
    for head, name, label, loaded in plan:
        cfg = head_config(head, name, precision=precision)
        cfg.train_features, cfg.val_features = str(loaded.train.path), str(loaded.val.path)
        run_dir = runs / cfg.name
        with _bar(console) as bar:
            task = bar.add_task(f"    {label}", total=cfg.epochs)
            best = tr.run(
                cfg,
                run_dir,
                loaded,
                resume=(run_dir / "last.pt").is_file(),
                on_epoch=lambda row: bar.update(task, completed=row["epoch"]),  # noqa: B023 - called in this iteration only
            )
        result = evaluate_run(run_dir, loaded.val.path)
        truth, keys = loaded.val.verbs[loaded.val.rows], loaded.val.attrs["verb_classes"]
        rev = reversal_scores(result["verb"], truth, keys)
        pair = pair_scores(result["verb"], truth, keys)
        params = sum(p.numel() for p in ck.build_model(cfg, loaded.train)[0].parameters())
        rows.append({"head": label, "params": params, **best, **rev, **pair, "run_dir": run_dir})
        console.print(
            f"    {label}: val verb {best['val_verb_top1']:.1f}, action {best['val_action_top1']:.1f}, "
            f"reversed-verb direction {rev['direction']:.0f}%, rinse/wipe {pair['cue']:.0f}% -> {run_dir}"
        )
    tables.show(console, COLUMNS, comparison_rows(rows), "model comparison (validation, best epoch)", CAPTION)
    wall, cpu_s = time.perf_counter() - t0, cpu_seconds() - cpu0
    console.print(f"run directories: {runs}   total {wall:.0f} s wall, {cpu_s:.0f} CPU-seconds (ekx and its workers)")
    console.print(f"files: {_sizes(workdir, data, features, runs)} - delete {workdir} when done")
    return {"workdir": workdir, "rows": rows}
