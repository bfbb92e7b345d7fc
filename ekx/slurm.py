"""`ekx slurm extract|sweep`: submit the job files in slurm/ with their dependencies.

Everything goes to sbatch as an argument list (never through a shell). The submitting
environment is exported to the jobs (sbatch's default), with this interpreter's bin
directory first on PATH so the jobs run the same ekx; workspace paths are passed to
them resolved and absolute.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ekx import EkxError

SCRIPTS = Path(__file__).resolve().parents[1] / "slurm"


@dataclass
class Resources:
    partition: str | None = None
    gpus: int | None = None
    time: str | None = None
    mem: str | None = None
    cpus: int | None = None

    def options(self, gpus: bool = True) -> list[str]:
        opts = []
        if self.partition:
            opts.append(f"--partition={self.partition}")
        if self.gpus and gpus:
            opts.append(f"--gres=gpu:{self.gpus}")
        if self.time:
            opts.append(f"--time={self.time}")
        if self.mem:
            opts.append(f"--mem={self.mem}")
        if self.cpus:
            opts.append(f"--cpus-per-task={self.cpus}")
        return opts


def _script(name: str, scripts: Path | None) -> Path:
    path = Path(scripts or SCRIPTS) / name
    if not path.is_file():
        raise EkxError(f"{path}: job file not found; pass --scripts DIR (the repository's slurm/ folder)")
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def sbatch(argv: list[str], dry_run: bool, name: str) -> str:
    """Submit; returns the job id (dry: a placeholder such as $EXTRACT_JOB)."""
    if dry_run:
        return f"${name.upper()}_JOB"
    if shutil.which("sbatch") is None:
        raise EkxError("sbatch not found: run this on a SLURM login node (or use --dry-run to see the commands)")
    res = subprocess.run(argv, capture_output=True, text=True, env=_env())
    if res.returncode != 0:
        raise EkxError(f"sbatch failed ({res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout.strip().split(";")[0]


def _flag(extra: list[str], flag: str, default: str) -> str:
    """The value of ``flag`` among the extra `ekx extract` flags (``--flag V`` or ``--flag=V``;
    the last one wins, as in typer): a dense extraction's files are named by its rate."""
    value = default
    for i, arg in enumerate(extra):
        if arg == flag and i + 1 < len(extra):
            value = extra[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def submit_extract(
    backbone: str,
    split: str,
    shards: int,
    extra: list[str],
    annotations: Path,
    videos: Path,
    features: Path,
    res: Resources,
    dry_run: bool = False,
    scripts: Path | None = None,
    log_dir: Path | None = None,
) -> dict:
    """An array of N shard extractions, then `ekx cache merge` after all succeed."""
    from ekx.extract.pipeline import ExtractConfig, backbone_names, default_out

    if shards < 1:
        raise EkxError("--shards must be >= 1")
    features = Path(features).resolve()
    names = backbone_names(backbone)  # several: one array decodes once, one merge per backbone
    logs = _logs(log_dir)
    array = [
        "sbatch",
        "--parsable",
        f"--array=0-{shards - 1}",
        *logs("ekx-extract-%A_%a.out"),
        *res.options(),
        str(_script("extract.sbatch", scripts)),
        backbone,
        split,
        str(shards),
        "--annotations",
        str(Path(annotations).resolve()),
        "--videos",
        str(Path(videos).resolve()),
        "--features",
        str(features),
        *extra,
    ]
    array_id = sbatch(array, dry_run, "extract")
    commands, merge_ids, merged_paths = [array], [], []
    dense, span = _flag(extra, "--dense", ""), _flag(extra, "--dense-span", "video")
    for name in names:
        outs = [
            default_out(
                ExtractConfig(backbone=name, split=split, shard=(i, shards), dense=dense, dense_span=span), features
            )
            for i in range(shards)
        ]
        merged = default_out(ExtractConfig(backbone=name, split=split, dense=dense, dense_span=span), features)
        merge = [
            "sbatch",
            "--parsable",
            f"--dependency=afterok:{array_id}",
            "--kill-on-invalid-dep=yes",
            *logs("ekx-merge-%j.out"),
            *res.options(gpus=False),
            str(_script("merge.sbatch", scripts)),
            str(merged),
            *map(str, outs),
        ]
        commands.append(merge)
        merge_ids.append(sbatch(merge, dry_run, "merge"))
        merged_paths.append(merged)
    return {
        "array": array_id,
        "merge": ",".join(merge_ids),
        "merges": merge_ids,
        "commands": commands,
        "out": merged_paths[0],
        "outs": merged_paths,
    }


def submit_sweep(
    file: Path,
    extra: list[str],
    res: Resources,
    dry_run: bool = False,
    scripts: Path | None = None,
    runs: Path | None = None,
    log_dir: Path | None = None,
    workers: int | None = None,
) -> dict:
    """Grid/random/explicit files: an array with one task per configuration (at most `workers`
    running at once); [optuna] files: an array of `workers` tasks sharing the study. Then
    `ekx compare` after all end."""
    from ekx.heads import sweep as sw

    file = Path(file).resolve()
    if workers is not None and workers < 1:
        raise EkxError("--workers must be >= 1")
    search = sw.is_search(file)
    if search:
        n, tasks, script = workers or 1, f"0-{(workers or 1) - 1}", "search.sbatch"
    else:
        n = len(sw.load(file))
        tasks, script = f"0-{n - 1}" + (f"%{workers}" if workers else ""), "sweep.sbatch"
    logs = _logs(log_dir)
    runs_args = ["--runs", str(Path(runs).resolve())] if runs else []
    array = [
        "sbatch",
        "--parsable",
        f"--array={tasks}",
        *logs("ekx-sweep-%A_%a.out"),
        *res.options(),
        str(_script(script, scripts)),
        str(file),
        *runs_args,
        *extra,
    ]
    array_id = sbatch(array, dry_run, "sweep")
    sweep_dir = (Path(runs).resolve() if runs else Path("runs").resolve()) / file.stem
    compare = [
        "sbatch",
        "--parsable",
        f"--dependency=afterany:{array_id}",
        *logs("ekx-compare-%j.out"),
        *res.options(gpus=False),
        str(_script("compare.sbatch", scripts)),
        str(sweep_dir),
    ]
    compare_id = sbatch(compare, dry_run, "compare")
    out = {"array": array_id, "compare": compare_id, "commands": [array, compare], "sweep_dir": sweep_dir}
    return out | ({"workers": n} if search else {"configurations": n})


def _logs(log_dir: Path | None):
    def opts(pattern: str) -> list[str]:
        if log_dir is None:
            return []
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        return [f"--output={Path(log_dir).resolve() / pattern}"]

    return opts


def show(argv: list[str]) -> str:
    return shlex.join(argv)


def submit_prepare(
    src: Path,
    dst: Path,
    shards: int,
    extra: list[str],
    res: Resources,
    dry_run: bool = False,
    scripts: Path | None = None,
    log_dir: Path | None = None,
) -> dict:
    """An array of N `ekx prepare --shard I/N` tasks (each every N-th video)."""
    if shards < 1:
        raise EkxError("--shards must be >= 1")
    array = [
        "sbatch",
        "--parsable",
        f"--array=0-{shards - 1}",
        *_logs(log_dir)("ekx-prepare-%A_%a.out"),
        *res.options(gpus=False),
        str(_script("prepare.sbatch", scripts)),
        str(Path(src).resolve()),
        str(Path(dst).resolve()),
        str(shards),
        *extra,
    ]
    return {"array": sbatch(array, dry_run, "prepare"), "commands": [array]}


def submit_finetune(
    head: str,
    name: str,
    nodes: int,
    nproc_per_node: int,
    extra: list[str],
    annotations: Path,
    videos: Path,
    runs: Path,
    res: Resources,
    dry_run: bool = False,
    scripts: Path | None = None,
    log_dir: Path | None = None,
) -> dict:
    """One job of ``nodes`` nodes, torchrun with ``nproc_per_node`` processes on each (one per
    GPU), resumable under its fixed run name (requeue or resubmit continues from last.pt)."""
    if nodes < 1 or nproc_per_node < 1:
        raise EkxError("--nodes and --nproc-per-node must be >= 1")
    if not name or "/" in name or name.startswith("."):
        raise EkxError(f"--name {name!r}: a plain run name is needed (the job resumes under it)")
    argv = [
        "sbatch",
        "--parsable",
        f"--nodes={nodes}",
        *_logs(log_dir)("ekx-finetune-%j.out"),
        *res.options(),
        str(_script("finetune.sbatch", scripts)),
        str(Path(runs).resolve()),
        name,
        str(nproc_per_node),
        head,
        "--annotations",
        str(Path(annotations).resolve()),
        "--videos",
        str(Path(videos).resolve()),
        *extra,
    ]
    return {"job": sbatch(argv, dry_run, "finetune"), "commands": [argv], "run": Path(runs).resolve() / name}
