"""Peak memory per path: `ekx extract` on the shared 1080p50 EPIC clip, and stage 2's
context-head data on two fused dense stores. Goal: <= 1.5 GiB on every path.

Each path runs as its own process - `ekx extract ... --weights none` at the default batch
size (16 on the CPU) and decode workers (2) - while a sampler reads /proc every 0.1 s over
the whole process tree (the main process, its DataLoader workers and their per-video
decoder children). Reported per path:

- tree PSS peak: the peak of the sum of the tree's proportional set sizes - a page shared
  by n processes (torch's libraries, a forked worker's copy-on-write pages) counts 1/n in
  each, so the sum is the memory the tree holds. The goal is checked on this figure.
- main/children/grandchildren: that peak split by depth (the main process; its DataLoader
  workers or calibration decoder; the workers' per-video decoders);
- largest process RSS: ru_maxrss from wait4 (what GNU time's %M prints, the measure of the
  earlier 1.05 / 4.6 GiB figures);
- CPU and wall seconds of the tree (a shared machine stretches wall time: compare old and
  new within one run, CPU first).

The extraction paths read SEGMENTS segments of 2 s (K=16), or, for `--dense every:1`, every
frame of the clip's first --seconds s (`--dense-span annotated` over one segment). The
context path imports two dense stores of random features (D 2048 and 1024, 4 per second,
--videos x 10 min, a segment per 5 s) and runs what `ekx train-head context` does with
their data: `load_split(a+b)`, the feature statistics, training batches and one
evaluation batch at the default sizes (24; 1024) and window (30 s).

`--compare DIR` runs every path a second time with DIR's ekx (PYTHONPATH=DIR: e.g. a
checkout of the previous version), alternating, so old and new are measured side by side.
Run: `python bench/memory_bench.py [--compare ../base]` (about 10 minutes with --compare
on 2 cores).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared"
CLIP = SHARED / "clips" / "epic55_wall_04x04_zoom2_h264_1080p50.mp4"
OUT = HERE / "out" / "memory"
SEGMENTS = 6
GOAL_MIB = 1536

EXTRACT = {  # path -> ekx extract arguments (besides the workspace and --weights none)
    "decoder resize": ["--backbone", "resnet50"],
    "torchvision resize": ["--backbone", "resnet50", "--resize", "torchvision"],
    "dense every:1, decoder resize": ["--backbone", "resnet50", "--dense", "every:1"],
    "dense every:1, torchvision resize": ["--backbone", "resnet50", "--dense", "every:1", "--resize", "torchvision"],
    "3 backbones, one pass": ["--backbone", "resnet50,efficientnet_b3,r2plus1d_18"],
    "timm ViT-S/16": ["--backbone", "timm:vit_small_patch16_224"],
    "OpenCLIP ViT-B/32": ["--backbone", "open_clip:ViT-B-32"],
    # decord's read-ahead (`video.AVForwardReader`) grows with the video: the clip remuxed
    # 10x end to end (140 s, no re-encoding), SEGMENTS segments spread over it
    "decoder resize, 140 s video": ["--backbone", "resnet50", "--split", "LONG"],
}
CONTEXT = "context head data, 2 fused dense stores"


# ---------------------------------------------------------------- measuring a process tree


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out += [int(c) for c in fh.read().split()]
    except OSError:  # gone meanwhile
        pass
    return out


def tree(pid: int) -> dict[int, int]:
    """pid -> depth below ``pid`` (0 itself, 1 its children: the DataLoader workers, ...)."""
    depth, todo = {pid: 0}, [pid]
    while todo:
        p = todo.pop()
        for c in children(p):
            depth[c] = depth[p] + 1
            todo.append(c)
    return depth


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd: list[str], env: dict[str, str], log: Path, period: float = 0.1) -> dict:
    """Run ``cmd``: its tree's PSS peak (MiB) and how it splits by depth at that moment
    (main process / its children / theirs), the largest process's RSS (MiB), CPU s of the
    tree (wait4: every process waited for), processes at most, wall s."""
    with open(log, "w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        peak, split, most = 0, [0, 0, 0], 0
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            depth = tree(proc.pid)
            pss = {p: pss_kib(p) for p in depth}
            if sum(pss.values()) > peak:
                peak = sum(pss.values())
                split = [sum(v for p, v in pss.items() if min(depth[p], 2) == d) for d in range(3)]
            most = max(most, len(depth))
            time.sleep(period)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:3])} ... failed (exit {proc.returncode}); its output: {log}")
    # ru_maxrss of a waited child (KiB on Linux): the largest of it and its own waited children
    return {"pss": peak / 1024, "split": "/".join(f"{v / 1024:.0f}" for v in split), "rss": ru.ru_maxrss / 1024,
            "cpu": ru.ru_utime + ru.ru_stime, "procs": most, "wall": wall}  # fmt: skip


# ---------------------------------------------------------------- workspaces


def clip_workspace(root: Path, seconds: float) -> tuple[Path, Path]:
    """The clip as P90_01; train: SEGMENTS segments of 2 s; test: one segment over the first
    ``seconds`` (the span a `--dense-span annotated` store covers)."""
    from ekx import epic

    videos, ann = root / "videos", root / "annotations"
    videos.mkdir(parents=True, exist_ok=True)
    ann.mkdir(exist_ok=True)
    if not (videos / "P90_01.mp4").exists():
        (videos / "P90_01.mp4").symlink_to(CLIP.resolve())
    for name in (epic.VERB_CLASSES, epic.NOUN_CLASSES):
        (ann / name).write_text("id,key,instances,category\n0,x,['x'],x\n")
    ts = epic.format_timestamp
    rows = []
    for j in range(SEGMENTS):
        t = 0.25 + 2.25 * j
        rows.append(
            [f"P90_01_{j}", "P90", "P90_01", ts(t), ts(t), ts(t + 2.0), 0, 0, "x", "x", 0, "x", 0, "['x']", "[0]"]
        )
    with open(ann / epic.SPLIT_FILES["train"], "w", newline="") as fh:
        csv.writer(fh).writerows([epic.LABELLED_COLUMNS, *rows])
    with open(ann / epic.SPLIT_FILES["test"], "w", newline="") as fh:
        csv.writer(fh).writerows([epic.TEST_COLUMNS, ["P90_01_0", "P90", "P90_01", ts(0), ts(0), ts(seconds), 0, 0]])
    remux(CLIP, videos / "P90_02.mp4", 10)
    rows = [[f"P90_02_{j}", "P90", "P90_02", ts(t), ts(t), ts(t + 2.0), 0, 0, "x", "x", 0, "x", 0, "['x']", "[0]"]
            for j, t in enumerate(5.0 + 22.0 * j for j in range(SEGMENTS))]  # fmt: skip
    with open(ann / "long.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([epic.LABELLED_COLUMNS, *rows])
    return videos, ann


def remux(src: Path, out: Path, times: int) -> None:
    """``src``'s video packets ``times`` times end to end, timestamps shifted (no re-encoding)."""
    import av

    if out.is_file():
        return
    with av.open(str(out), "w") as o:
        stream, offset = None, 0
        for _ in range(times):
            with av.open(str(src)) as i:
                s = i.streams.video[0]
                stream = stream or o.add_stream_from_template(s)
                step = round(1 / (float(s.average_rate) * float(s.time_base)))
                last = offset
                for packet in i.demux(s):
                    if packet.dts is None:
                        continue
                    packet.pts += offset
                    packet.dts += offset
                    packet.stream = stream
                    last = max(last, packet.pts)
                    o.mux(packet)
                offset = last + step


def extract_cmd(name: str, videos: Path, ann: Path, out: Path) -> list[str]:
    args = EXTRACT[name]
    cmd = [str(Path(sys.executable).with_name("ekx")), "extract", *args, "--weights", "none",
           "--annotations", str(ann), "--videos", str(videos)]  # fmt: skip
    if "LONG" in args:
        cmd[cmd.index("LONG")] = str(ann / "long.csv")
    if "--dense" in args:
        cmd += ["--split", "test", "--dense-span", "annotated", "--dense-margin", "0"]
    return cmd + (["--features", str(out)] if "," in args[1] else ["--out", str(out / "cache.h5")])


def dense_stores(root: Path, videos: int) -> str:
    """Two imported dense stores over ``videos`` synthetic 10-minute videos at 4 per second
    (D 2048 and 1024, random), and their annotation file (a segment of 1-6 s per 5 s)."""
    import numpy as np

    from ekx import epic
    from ekx.cache.imports import import_features

    stores = [root / "a.dense.h5", root / "b.dense.h5"]
    if all(s.is_file() for s in stores):
        return "+".join(map(str, stores))
    ann = root / "annotations"
    ann.mkdir(parents=True, exist_ok=True)
    for name in (epic.VERB_CLASSES, epic.NOUN_CLASSES):
        (ann / name).write_text("id,key,instances,category\n0,x,['x'],x\n")
    rng = np.random.default_rng(0)
    rows, ts = [], epic.format_timestamp
    for v in range(videos):
        vid = f"P90_{v + 10:02d}"
        for j, t in enumerate(np.arange(1.0, 590.0, 5.0)):
            d = float(rng.uniform(1, 6))
            rows.append([f"{vid}_{j}", "P90", vid, ts(t), ts(t), ts(t + d), 0, 0, "x", "x", 0, "x", 0, "['x']", "[0]"])
    with open(ann / epic.SPLIT_FILES["train"], "w", newline="") as fh:
        csv.writer(fh).writerows([epic.LABELLED_COLUMNS, *rows])
    for store, dim in zip(stores, (2048, 1024), strict=True):
        src = root / f"src-{store.stem}"
        src.mkdir(exist_ok=True)
        for v in range(videos):
            feats = rng.standard_normal((4 * 600, dim), dtype=np.float32)
            np.save(src / f"P90_{v + 10:02d}.npy", feats)
        import_features("npy-dir", src, ann, "train", store, f"random-{dim}", rate=4.0)
        shutil.rmtree(src)  # the float32 sources: only the float16 store is read
    return "+".join(map(str, stores))


def context_child(spec: str) -> None:
    """What `ekx train-head context` does with the data, at the default sizes; RSS per phase."""
    import torch

    from ekx.heads import context
    from ekx.heads.config import TrainConfig
    from ekx.heads.data import feature_stats, load_split

    def say(phase: str) -> None:
        rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        print(f"{phase}: RSS {rss:.0f} MiB", flush=True)

    cfg, cpu = TrainConfig(head="context"), torch.device("cpu")
    say("start")
    split = load_split(Path(spec), cpu)
    say(f"load_split ({len(split.rows)} segments, feats {tuple(split.feats.shape)})")
    norm = feature_stats(split)
    say("feature statistics")
    _, batches = context.batches(split, norm, cfg, torch.Generator().manual_seed(0), cpu)
    shapes = [tuple(x.shape) for _, (x, _, _) in zip(range(20), batches, strict=False)]
    say(f"20 training batches ({shapes[-1]})")
    x = next(context.eval_inputs(split, norm, cfg, cpu))
    say(f"an evaluation batch ({tuple(x.shape)})")


# ---------------------------------------------------------------- the run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", type=Path, help="also run every path with this checkout's ekx (PYTHONPATH)")
    ap.add_argument("--seconds", type=float, default=4.0, help="dense paths: every frame of the first S seconds")
    ap.add_argument("--videos", type=int, default=30, help="context path: 10-minute videos per store")
    ap.add_argument("--only", nargs="*", help="paths to run (default: all)")
    ap.add_argument("--context-child", help=argparse.SUPPRESS)
    ap.add_argument("--stores-child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.context_child:
        return context_child(args.context_child)
    if args.stores_child:
        return print(dense_stores(args.stores_child, args.videos))
    if not CLIP.is_file():
        sys.exit(f"{CLIP} is absent: this bench reads the shared 1080p50 EPIC clip")
    OUT.mkdir(parents=True, exist_ok=True)
    videos, ann = clip_workspace(OUT / "ws", args.seconds)
    names = [n for n in [*EXTRACT, CONTEXT] if not args.only or any(o in n for o in args.only)]
    codes = {"new": None} | ({"old": args.compare.resolve()} if args.compare else {})
    envs = {c: dict(os.environ, **({"PYTHONPATH": str(d)} if d else {})) for c, d in codes.items()}
    specs = {}  # each code's own stores (the store format may differ between versions)
    if CONTEXT in names:
        for code in codes:
            make = [sys.executable, str(Path(__file__).resolve()), "--videos", str(args.videos), "--stores-child"]
            done = subprocess.run([*make, str(OUT / f"stores-{code}")], env=envs[code], capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"making the dense stores failed ({code}):\n{done.stderr[-2000:]}")
            specs[code] = done.stdout.split()[-1]
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"{CLIP.name}; CPU {cpu}, {os.cpu_count()} cores; paths: {', '.join(names)}", flush=True)
    results: dict[tuple[str, str], dict] = {}
    for i, name in enumerate(names):
        for code in list(codes)[:: 1 if i % 2 == 0 else -1]:  # alternating which goes first
            work = OUT / "run"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            if name == CONTEXT:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--context-child", specs[code]]
            else:
                cmd = extract_cmd(name, videos, ann, work)
            r = measure(cmd, envs[code], OUT / f"{code}-{i}.log")
            results[name, code] = r
            print(f"{name} [{code}]: tree PSS peak {r['pss']:.0f} MiB (main/children/grandchildren {r['split']}), "
                  f"largest process RSS {r['rss']:.0f} MiB, {r['procs']} processes, CPU {r['cpu']:.1f} s, "
                  f"wall {r['wall']:.1f} s", flush=True)  # fmt: skip
    print()
    head = ("| path | tree PSS peak MiB | main/children/grandchildren at the peak | largest process RSS MiB "
            "| CPU s | wall s |")  # fmt: skip
    if args.compare:
        head = ("| path | tree PSS peak MiB (old -> new) | main/children/grandchildren at the peak (new) "
                "| largest process RSS MiB (old -> new) | CPU s (old -> new) | wall s (old -> new) |")  # fmt: skip
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for name in names:
        n = results[name, "new"]
        mark = "" if n["pss"] <= GOAL_MIB else " (over 1.5 GiB)"
        if args.compare:
            o = results[name, "old"]
            print(f"| {name} | {o['pss']:.0f} -> **{n['pss']:.0f}**{mark} | {n['split']} | "
                  f"{o['rss']:.0f} -> {n['rss']:.0f} | {o['cpu']:.0f} -> {n['cpu']:.0f} | "
                  f"{o['wall']:.0f} -> {n['wall']:.0f} |")  # fmt: skip
        else:
            print(f"| {name} | **{n['pss']:.0f}**{mark} | {n['split']} | {n['rss']:.0f} | {n['cpu']:.0f} | "
                  f"{n['wall']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
