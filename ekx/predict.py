"""`ekx predict`: a trained run (backbone + head) slid over a whole video.

Frames are sampled on one global grid with the spacing the head was trained with
(window / K, K the frames per segment of its cache); every grid frame goes through
the backbone exactly once, and each window is a slice of those features - so
overlapping windows cost only their head pass:

    grid:     |0|1|2|3|4|5|6|7|8|9|...       backbone once per grid frame
    window 0: [0 ........ K-1]
    window 1:     [s ........ s+K-1]         s = stride / spacing grid steps
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from ekx import EkxError
from ekx.cache.dense import Rate
from ekx.extract import backbones, sources
from ekx.extract.video import CLIP_RATE, clip_times, display_end, frame_at
from ekx.heads.checkpoint import load_checkpoint, model_from_checkpoint
from ekx.heads.context import Timeline, reads_context, windows
from ekx.heads.data import positions, sound_parts
from ekx.runtime import autocast, resolve_device, resolve_precision


@dataclass
class RunModel:
    """Everything inference needs from a run directory."""

    backbone: nn.Module  # fused, eval, on the device
    preprocess: backbones.Preprocess
    clip_len: int
    dim: int
    head: nn.Module
    mean: torch.Tensor
    std: torch.Tensor
    k: int  # frames per window (the cache's frames per segment)
    head_pos: torch.Tensor  # [T] which of the K frames the head reads
    verbs: list[str]
    nouns: list[str]
    device: torch.device
    precision: str
    size_fn: Callable[[int, int], tuple[int, int]] | None = None  # the decoder's scaler, as the cache's
    source: str = "decord"  # the frame source its cache was read with (a video source)
    # the context head: its window W (s) and the rate of the dense store it was trained on
    context: float = 0.0
    dense_rate: str = ""

    @torch.inference_mode()
    def features(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [N * clip_len, 3, H, W] (any size: resized here) -> float32 [N, D]."""
        x = self.preprocess(frames.to(self.device))
        if self.clip_len > 1:
            x = x.reshape(-1, self.clip_len, *x.shape[1:]).transpose(1, 2)
            x = x.contiguous(memory_format=torch.channels_last_3d)
        else:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            return self.backbone(x).float()

    @torch.inference_mode()
    def classify(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[W, K, D] backbone features -> verb and noun probabilities [W, V], [W, N]."""
        x = (windows[:, self.head_pos].to(self.device) - self.mean) / self.std
        with autocast(self.device, self.precision):
            out = self.head(x)
        return out["verb"].float().softmax(1).cpu(), out["noun"].float().softmax(1).cpu()


def resolve_run(run: str, runs_root: Path) -> Path:
    """A run directory: the path as given, or a name under the workspace's runs/."""
    for path in (Path(run), Path(runs_root) / run):
        if (path / "best.pt").is_file() or (path.suffix == ".pt" and path.is_file()):
            return path
    raise EkxError(
        f"--run {run}: no run here (looked for {run}/best.pt and {Path(runs_root) / run}/best.pt); "
        "train one with `ekx train-head` or `ekx finetune`"
    )


def load_run(run: Path, device_name: str = "auto", checkpoint: str = "best.pt") -> RunModel:
    path = run if run.suffix == ".pt" else run / checkpoint
    ckpt = load_checkpoint(path)
    classes = ckpt.get("classes", {})
    if not classes.get("verb") or not classes.get("noun"):
        raise EkxError(
            f"{path}: the run holds no class lists (its cache was made without them); "
            "re-extract the features with this ekx and retrain the head"
        )
    spec = ckpt.get("extractor")
    if not spec:
        raise EkxError(
            f"{path}: the run does not say which backbone made its features "
            "(trained by an older ekx); retrain the head on a cache made by this ekx"
        )
    sound = sound_parts(ckpt.get("cache", {}))
    if sound:
        raise EkxError(
            f"{path}: trained on features of sound ({', '.join(sound)}); ekx predict and ekx live compute a "
            "run's features from the video's frames only, never its sound track: for them, train a head on "
            "visual features alone (--backbone without the audio part)"
        )
    if "fused" in spec:
        raise EkxError(f"{path}: a fused run (features of several backbones joined); ekx predict runs one backbone")
    if str(spec.get("backbone", "")).startswith("imported:"):
        raise EkxError(
            f"{path}: trained on imported features ({spec['backbone']}); ekx predict runs the backbone that "
            "made a run's features, and imported ones came from elsewhere"
        )
    bb = backbones.with_weights(backbones.get(spec["backbone"]), spec.get("preprocess_weights", spec["weights"]))
    backbone = backbones.run_backbone(ckpt)
    device = resolve_device(device_name)
    precision = resolve_precision(ckpt["config"].get("precision", "auto"), device)
    fmt = torch.channels_last if bb.clip_len == 1 else torch.channels_last_3d
    backbone = backbones.fuse_for_inference(backbone.eval()).to(device).to(memory_format=fmt)
    head = model_from_checkpoint(ckpt).to(device)
    k, t = int(spec["frames"]), int(ckpt["head_kwargs"]["frames"])
    return RunModel(
        backbone,
        bb.preprocess,
        bb.clip_len,
        bb.dim,
        head,
        ckpt["norm"]["mean"].to(device),
        ckpt["norm"]["std"].to(device),
        k,
        positions(k, t, 1, False, None)[0],
        classes["verb"],
        classes["noun"],
        device,
        precision,
        bb.preprocess.decode_size if spec.get("resize", "decoder") == "decoder" else None,
        spec["source"] if spec.get("source") in ("decord", "torchcodec") else "decord",
        float(ckpt["config"].get("window", 0.0)) if reads_context(ckpt["config"]["head"]) else 0.0,
        str(ckpt["cache"].get("dense_rate", "")),
    )


def top_actions(pv: torch.Tensor, pn: torch.Tensor, top: int) -> list[tuple[int, int, float]]:
    """The ``top`` most probable (verb, noun) pairs of one window, p = p(verb) * p(noun)."""
    kv, kn = min(top, len(pv)), min(top, len(pn))
    v_p, v_i = pv.topk(kv)
    n_p, n_i = pn.topk(kn)  # the top pairs are always among the top-k of each
    joint = (v_p[:, None] * n_p[None, :]).flatten()
    p, flat = joint.topk(min(top, len(joint)))
    return [(int(v_i[f // kn]), int(n_i[f % kn]), float(q)) for f, q in zip(flat.tolist(), p.tolist(), strict=False)]


@dataclass
class Window:
    start: float
    end: float
    actions: list[tuple[int, int, float]]  # (verb id, noun id, probability), best first

    def named(self, verbs: list[str], nouns: list[str]) -> dict:
        return {
            "start": round(self.start, 3),
            "end": round(self.end, 3),
            "top": [
                {"verb": verbs[v], "noun": nouns[n], "verb_class": v, "noun_class": n, "probability": round(p, 5)}
                for v, n, p in self.actions
            ],
        }


@dataclass
class Prediction:
    video: Path
    fps: float
    duration: float
    spacing: float
    grid_frames: int  # frames that went through the backbone (each once)
    windows: list[Window]


def plan_windows(duration: float, window: float, stride: float, k: int) -> tuple[float, int, list[int]]:
    """(grid spacing, grid length, first grid index of each window). Windows start at
    multiples of ``stride`` snapped to the grid (exact when stride is a multiple of window/K)."""
    if window <= 0 or stride <= 0:
        raise EkxError("--window and --stride must be > 0 seconds")
    spacing = window / k
    if stride < spacing / 2:
        raise EkxError(
            f"--stride {stride:g} s is below half the frame spacing ({spacing:g} s = window / K): "
            "windows would repeat; use a larger --stride"
        )
    n = math.floor(duration / spacing + 1e-9)
    if n < k:
        raise EkxError(
            f"the video is {duration:.2f} s long, shorter than one --window {window:g} s; pass a smaller --window"
        )
    starts: list[int] = []
    i = 0
    while True:
        g = round(i * stride / spacing)
        if g + k > n:
            break
        if not starts or g != starts[-1]:
            starts.append(g)
        i += 1
    return spacing, n, starts


def _decode_frames(reader, index: np.ndarray, out: queue.Queue, stop: threading.Event, chunk: int) -> None:
    """Decoder thread: (n, frames [n, H, W, 3]) chunks of ``index`` (increasing, unique)
    through the source's reader, which only ever decodes forward (seeking past keyframes)."""
    try:
        for lo in range(0, len(index), chunk):
            if stop.is_set():
                return
            frames = reader.get(index[lo : lo + chunk])
            out.put((len(frames), frames))
        out.put(None)
    except Exception as e:
        out.put(e)


def grid_features(
    model: RunModel,
    path: Path,
    reader,
    clips: np.ndarray,
    batch: int = 16,
    on_progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """[G, D] features of the grid's clips (frame indices [G, clip_len]); decoding (a
    thread) overlaps the backbone. Each needed frame is decoded once, in order - clips of a
    3D backbone may overlap - and kept only until the last clip that uses it has gone
    through the backbone."""
    wanted = np.unique(clips)
    q: queue.Queue = queue.Queue(maxsize=4)
    stop = threading.Event()
    worker = threading.Thread(
        target=_decode_frames,
        daemon=True,
        args=(reader, wanted, q, stop, batch * model.clip_len),
    )
    worker.start()
    later_min = np.minimum.accumulate(clips.min(1)[::-1])[::-1]  # first frame any clip from j on needs
    feats, kept, next_wanted = [], {}, 0

    def pull():
        nonlocal next_wanted
        item = q.get()
        if isinstance(item, Exception):
            raise EkxError(
                f"{path.name}: decoding failed ({type(item).__name__}: "
                f"{str(item).splitlines()[0][:160] if str(item) else ''})"
            )
        if item is None:
            raise EkxError(f"{path.name}: the decoder stopped early")
        n, frames = item
        for j in range(n):
            kept[int(wanted[next_wanted + j])] = frames[j]
        next_wanted += n

    try:
        for lo in range(0, len(clips), batch):
            need = clips[lo : lo + batch]
            while int(need.max()) not in kept:
                pull()
            x = sources.to_tensor([kept[int(i)] for i in need.reshape(-1)]).permute(0, 3, 1, 2)
            feats.append(model.features(x).cpu())
            if lo + batch < len(clips):  # later clips never look back past this frame
                first = int(later_min[lo + batch])
                for i in [i for i in kept if i < first]:
                    del kept[i]
            if on_progress:
                on_progress(len(need))
    finally:
        stop.set()
        while worker.is_alive():  # unblock a decoder waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                worker.join(0.05)
    return torch.cat(feats)


def predict_video(
    model: RunModel,
    path: Path,
    window: float = 2.0,
    stride: float = 0.5,
    top: int = 5,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> Prediction:
    path = Path(path)
    if not path.is_file():
        raise EkxError(f"{path}: no such video")
    src = sources.get(model.source)
    if src.reads != "videos":
        raise EkxError(f"ekx predict reads a video file; its run's frames came from --source {src.name}")
    try:  # one open: decord scans the whole file each time
        reader = src.open(path, model.size_fn, "cpu")
        times = reader.timestamps()
    except Exception as e:
        raise EkxError(f"{path}: cannot read this video ({sources.first_line(e)})") from None
    try:
        # the grid on the file's timeline, each time's displayed frame (variable rate included)
        duration = display_end(times)
        k = model.k
        if model.context:  # the dense store's grid: K positions per query window at its rate
            k = max(1, round(window * Rate.parse(model.dense_rate or "4").of(float(reader.fps))))
        spacing, n_grid, starts = plan_windows(duration, window, stride, k)
        grid_t = (np.arange(n_grid) + 0.5) * spacing
        clips = frame_at(times, clip_times(grid_t, model.clip_len, CLIP_RATE)).reshape(n_grid, model.clip_len)
        if on_start:
            on_start(n_grid)
        feats = grid_features(model, path, reader, clips, on_progress=on_progress)
    finally:
        reader.close()
    fps = float(reader.fps)
    out = []
    for lo in range(0, len(starts), 256):  # windows are built a block at a time: views of one grid
        block = starts[lo : lo + 256]
        if model.context:
            pv, pn = context_classify(model, feats, spacing, block, k)
        else:
            pv, pn = model.classify(torch.stack([feats[g : g + k] for g in block]))
        for j in range(len(pv)):
            g = block[j]
            out.append(Window(g * spacing, (g + k) * spacing, top_actions(pv[j], pn[j], top)))
    return Prediction(path, fps, duration, spacing, n_grid, out)


@torch.inference_mode()
def context_classify(model: RunModel, feats: torch.Tensor, spacing: float, starts: list[int], k: int):
    """The context head over a video's grid: each window [g, g + k) a query, in the W seconds
    of grid features around it, built as `heads.context` builds a dense store's windows."""
    n = len(feats)
    grid = (torch.arange(n, dtype=torch.float64) + 0.5) * spacing
    start = torch.tensor(starts, dtype=torch.float64) * spacing
    one = torch.tensor([spacing], dtype=torch.float64)
    tl = Timeline(grid, torch.arange(n), one, torch.zeros(len(starts), dtype=torch.long), start, start + k * spacing)
    grid_split = SimpleNamespace(feats=feats[:, None, :], timeline=tl)
    view = torch.zeros(len(starts), 1, dtype=torch.long)
    x = windows(grid_split, torch.arange(len(starts)), model.context, None, view, model.mean, model.std, model.device)
    with autocast(model.device, model.precision):
        out = model.head(x)
    return out["verb"].float().softmax(1).cpu(), out["noun"].float().softmax(1).cpu()


def iter_rows(pred: Prediction, verbs: list[str], nouns: list[str]) -> Iterator[dict]:
    """Flat rows (one per window and rank) for CSV."""
    for w in pred.windows:
        for rank, (v, n, p) in enumerate(w.actions, 1):
            yield {
                "start": f"{w.start:.3f}",
                "end": f"{w.end:.3f}",
                "rank": rank,
                "verb": verbs[v],
                "noun": nouns[n],
                "verb_class": v,
                "noun_class": n,
                "probability": f"{p:.5f}",
            }


def timeline(pred: Prediction, verbs: list[str], nouns: list[str], out: Path) -> Path:
    """A picture of the top-1 verb and noun along the video's time axis (the plot extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EkxError("--timeline needs matplotlib: pip install 'ekx[plot]'") from None
    fig, ax = plt.subplots(figsize=(max(8, min(24, pred.duration / 3)), 2.6))
    cmap = plt.get_cmap("tab20")
    step = pred.windows[1].start - pred.windows[0].start if len(pred.windows) > 1 else pred.spacing
    for row, (pick, names) in enumerate(((0, verbs), (1, nouns))):
        last = None
        for w in pred.windows:
            cls, p = int(w.actions[0][pick]), w.actions[0][2]
            centre = (w.start + w.end) / 2
            ax.broken_barh(
                [(centre - step / 2, step)],
                (1 - row + 0.05, 0.9),
                color=cmap(cls % 20),
                alpha=0.35 + 0.65 * min(1.0, p**0.5),
            )
            if cls != last:
                ax.text(centre - step / 2, 1.5 - row, names[cls], fontsize=7, va="center", clip_on=True)
            last = cls
    ax.set(
        xlim=(0, pred.duration),
        ylim=(0, 2),
        yticks=[0.5, 1.5],
        yticklabels=["noun", "verb"],
        xlabel="time (s)",
        title=f"{pred.video.name}: top-1 per window (opacity: action probability)",
    )
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
