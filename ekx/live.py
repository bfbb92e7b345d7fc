"""`ekx live`: the seed's real-time demo - a camera (or a file played as one) in, actions out.

    capture thread --(one-frame mailbox: newest wins)--> sampler --> backbone (once per frame)
        --> ring of the last K features --> head every stride --> overlay / printed line

Memory is bounded by construction: the mailbox holds one frame and the ring K features.
When inference falls behind, the sampler always takes the newest frame and counts the
grid samples it had to skip as dropped - the display stays live, latency stays flat.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ekx import EkxError
from ekx.predict import RunModel, top_actions


def cv2_module():
    try:
        import cv2
    except ImportError:
        raise EkxError(
            "ekx live needs OpenCV: pip install 'ekx[live]' (or opencv-python-headless for --headless)"
        ) from None
    return cv2


def rss_mb() -> float:
    """Resident memory of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass
class Frame:
    image: np.ndarray  # BGR, as OpenCV captures
    ts: float  # media time, seconds (a file's own clock; a camera's capture clock)
    read_at: float  # perf_counter() when captured: the start of the latency measure
    index: int


class Mailbox:
    """Holds at most one frame. ``drop=True`` (camera, --realtime): a new frame replaces one
    not yet taken; ``drop=False`` (a file as fast as possible): the producer waits."""

    def __init__(self, drop: bool):
        self.cond = threading.Condition()
        self.item: Frame | None = None
        self.closed = False
        self.drop = drop
        self.replaced = 0

    def put(self, item: Frame) -> None:
        with self.cond:
            while not self.drop and self.item is not None and not self.closed:
                self.cond.wait()
            if self.item is not None:
                self.replaced += 1
            self.item = item
            self.cond.notify_all()

    def take(self) -> Frame | None:
        """The newest frame; None once the source has ended and nothing is left."""
        with self.cond:
            while self.item is None and not self.closed:
                self.cond.wait()
            item, self.item = self.item, None
            self.cond.notify_all()
            return item

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


def open_source(camera: int | None, video: Path | None):
    cv2 = cv2_module()
    if (camera is None) == (video is None):
        raise EkxError("give exactly one of --camera N or --video FILE")
    if video is not None:
        if not Path(video).is_file():
            raise EkxError(f"--video {video}: no such file")
        cap = cv2.VideoCapture(str(video))
        if not cap.isOpened() or not cap.grab():
            raise EkxError(f"--video {video}: OpenCV cannot read this file")
        cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
    else:
        cap = cv2.VideoCapture(camera)
        if not cap.isOpened():
            raise EkxError(
                f"--camera {camera}: no camera there (none connected, or in use); "
                "try another index, or --video FILE --realtime"
            )
    return cap


def _capture(cap, box: Mailbox, is_file: bool, realtime: bool, stop: threading.Event, errors: list) -> None:
    try:
        cv2 = cv2_module()
        fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
        t0, i = time.perf_counter(), 0
        while not stop.is_set():
            ok, image = cap.read()
            if not ok:
                break
            if is_file:
                ts = i / fps
                if realtime:  # play at the native rate, as a camera would deliver it
                    wait = t0 + ts - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
            else:
                ts = time.perf_counter() - t0
            box.put(Frame(image, ts, time.perf_counter(), i))
            i += 1
    except Exception as e:
        errors.append(e)
    finally:
        cap.release()
        box.close()


@dataclass
class Report:
    """One head evaluation: what is shown on the frame / printed."""

    ts: float
    actions: list[tuple[str, str, float]]  # (verb, noun, probability), best first
    fps: float  # frames through the backbone per second, recent
    latency_ms: float  # capture -> prediction
    dropped: int  # grid samples skipped because inference was behind
    samples: int
    rss_mb: float

    def line(self) -> str:
        acts = "  ".join(f"{v} {n} {100 * p:.0f}%" for v, n, p in self.actions)
        return (
            f"{self.ts:7.2f}s  {acts}  | {self.fps:4.1f} fps  latency {self.latency_ms:4.0f} ms  dropped {self.dropped}"
        )


@dataclass
class Summary:
    samples: int = 0
    dropped: int = 0
    replaced: int = 0  # frames the capture overwrote before the sampler looked at them
    reports: int = 0
    seconds: float = 0.0
    backbone_ms: list[float] = field(default_factory=list)
    head_ms: list[float] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0


def _draw(cv2, image: np.ndarray, report: Report | None, width: int = 960) -> np.ndarray:
    h, w = image.shape[:2]
    if w > width:
        image = cv2.resize(image, (width, int(h * width / w)), interpolation=cv2.INTER_AREA)
    if report is None:
        return image
    lines = [f"{v} {n}  {100 * p:.0f}%" for v, n, p in report.actions]
    lines.append(f"{report.fps:.1f} fps  latency {report.latency_ms:.0f} ms  dropped {report.dropped}")
    for j, text in enumerate(lines):
        y = 30 + 28 * j
        cv2.putText(image, text, (12, y), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 0, 0), 4, cv2.LINE_AA)
        cv2.putText(image, text, (12, y), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255, 255, 255), 1, cv2.LINE_AA)
    return image


def run_live(
    model: RunModel,
    camera: int | None = None,
    video: Path | None = None,
    realtime: bool = False,
    window: float = 2.0,
    stride: float = 0.5,
    top: int = 3,
    headless: bool = False,
    delay_ms: float = 0.0,
    seconds: float | None = None,
    on_report: Callable[[Report], None] | None = None,
) -> Summary:
    """The live loop; returns counts and timings. ``delay_ms`` makes the backbone
    artificially slow (to see frames dropped); ``seconds`` stops after that media time."""
    cv2 = cv2_module()
    if window <= 0 or stride <= 0:
        raise EkxError("--window and --stride must be > 0 seconds")
    if model.clip_len > 1:
        raise EkxError(
            "ekx live runs per-frame backbones (resnet50, efficientnet_b3); for a clip backbone "
            "use `ekx predict` on a recorded video"
        )
    if model.context:
        raise EkxError("ekx live runs segment heads; a context head reads the video around a window: use `ekx predict`")
    cap = open_source(camera, video)
    spacing = window / model.k  # the head was trained on K frames spread over a segment
    stride_samples = max(1, round(stride / spacing))
    box = Mailbox(drop=video is None or realtime)
    stop = threading.Event()
    errors: list[Exception] = []
    thread = threading.Thread(target=_capture, args=(cap, box, video is not None, realtime, stop, errors), daemon=True)
    ring: collections.deque = collections.deque(maxlen=model.k)
    recent: collections.deque = collections.deque(maxlen=32)  # times of recent samples, for fps
    out = Summary()
    report, next_t, since = None, None, 0
    if not headless:
        try:
            cv2.namedWindow("ekx live", cv2.WINDOW_NORMAL)
        except cv2.error:
            cap.release()
            raise EkxError(
                "this OpenCV has no display support (opencv-python-headless): pass --headless, "
                "or pip install 'ekx[live]'"
            ) from None
    t_start = time.perf_counter()
    thread.start()
    try:
        while (frame := box.take()) is not None:
            if seconds is not None and frame.ts > seconds:
                break
            if next_t is None:
                next_t = frame.ts
            if frame.ts < next_t - 1e-6:
                continue  # between grid samples: not a frame the head uses
            missed = int((frame.ts - next_t) / spacing + 1e-6)  # samples that passed while we were busy
            out.dropped += missed
            next_t += (missed + 1) * spacing
            t0 = time.perf_counter()
            ring.append(model.features(_to_tensor(cv2, frame.image, model))[0])
            if delay_ms:
                time.sleep(delay_ms / 1000)
            out.backbone_ms.append(1000 * (time.perf_counter() - t0))
            out.samples += 1
            since += 1
            recent.append(time.perf_counter())
            if len(ring) == model.k and since >= stride_samples:
                since = 0
                t1 = time.perf_counter()
                pv, pn = model.classify(torch.stack(tuple(ring))[None])
                acts = [(model.verbs[v], model.nouns[n], p) for v, n, p in top_actions(pv[0], pn[0], top)]
                now = time.perf_counter()
                out.head_ms.append(1000 * (now - t1))
                fps = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 else 0.0
                report = Report(frame.ts, acts, fps, 1000 * (now - frame.read_at), out.dropped, out.samples, rss_mb())
                out.reports += 1
                out.latency_ms.append(report.latency_ms)
                out.rss_mb.append(report.rss_mb)
                if on_report:
                    on_report(report)
            if not headless:
                cv2.imshow("ekx live", _draw(cv2, frame.image, report))
                if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                    break
    finally:
        stop.set()
        box.close()  # frees a producer waiting on the mailbox
        thread.join(timeout=5)
        if not headless:
            cv2.destroyAllWindows()
    if errors:
        raise EkxError(f"capture failed: {type(errors[0]).__name__}: {errors[0]}")
    out.seconds = time.perf_counter() - t_start
    out.replaced = box.replaced
    return out


def _to_tensor(cv2, image: np.ndarray, model: RunModel | None = None) -> torch.Tensor:
    """BGR frame -> uint8 [1, 3, H, W] RGB at full size: `RunModel.features` resizes it with
    the weights' own torchvision resize (a cv2.INTER_AREA resize here gave inputs 0.97
    cosine from the recorded preprocessing, bench/preprocess_bench.py)."""
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return torch.from_numpy(rgb).permute(2, 0, 1)[None]


def resize_note(model: RunModel) -> str | None:
    """A line where live's input is not resized as the run's features were."""
    if model.size_fn is None:
        return None
    return (
        "note: this run's features were resized by the decoder's scaler at extraction (--resize decoder); "
        "live frames get torchvision's resize (the weights' own), so inputs differ slightly (random-weight "
        "feature cosine ~0.98, README); extract with --resize torchvision for identical preprocessing"
    )
