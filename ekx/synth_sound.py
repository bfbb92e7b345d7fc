"""The sound of `ekx.synth`'s videos: each segment's sound decided by its labels, over low
noise (`render_sound`), written as a sound track interleaved with the frames (`SoundTrack`)."""

from __future__ import annotations

import numpy as np

SOUND_RATE = 48000  # EPIC's rate; extraction resamples to each model's own
CODECS = {"pcm_s16le": "s16", "aac": "fltp"}  # codec -> the sample format its encoder takes

# pitch by colour, timbre by shape (the partials over the fundamental and their levels)
PITCH = {"red": 330.0, "green": 440.0, "blue": 587.0, "yellow": 784.0}
TIMBRE = {"circle": ((1, 1.0),), "square": ((1, 1.0), (3, 0.35)), "triangle": ((1, 1.0), (2, 0.5))}
LEVEL = 0.2  # a segment's peak amplitude
NOISE = 0.003  # the room between segments (and under them)


def segment_sound(verb: str, noun: str, p: np.ndarray, rate: int, rng: np.random.Generator) -> np.ndarray:
    """The sound of a segment at progress ``p`` (one value per sample, 0 -> 1): pitch and
    timbre from the noun, what happens over time from the verb (as `_state` draws it)."""
    shape, colour = noun.split(":")
    f0, amp = PITCH[colour], np.full_like(p, LEVEL)
    freq = np.full_like(p, f0)
    if verb in ("open", "close"):  # a pitch rising with the growing object, falling as it shrinks
        freq = f0 * (1 + (p if verb == "open" else 1 - p))
    elif verb in ("turn-on", "turn-off"):
        amp = LEVEL * (0.2 + 0.8 * (p if verb == "turn-on" else 1 - p))
    elif verb in ("put", "take"):  # one beep per object on screen
        k = np.minimum((3 * p).astype(int), 2)
        count = 1 + (k if verb == "put" else 2 - k)
        amp = LEVEL * ((3 * p * count) % 1 < 0.5)
    elif verb == "shake":
        amp = LEVEL * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * p))
    elif verb == "pour":  # running water: noise, whatever the noun
        return (LEVEL * 0.6 * rng.standard_normal(len(p))).astype(np.float32)
    elif verb == "stir":  # a spoon: a click every 1/8 s, each a decaying burst
        t = np.arange(len(p)) / rate
        return (LEVEL * np.exp(-((t * 8) % 1) * 40) * np.sin(2 * np.pi * 2500 * t)).astype(np.float32)
    phase = 2 * np.pi * np.cumsum(freq) / rate
    tone = sum(level * np.sin(h * phase) for h, level in TIMBRE[shape])
    return (amp * tone).astype(np.float32)


def render_sound(video, nouns: tuple[str, ...], rate: int = SOUND_RATE) -> np.ndarray:
    """The video's sound track, float32 mono: low noise, each segment's sound over it."""
    n = round(video.duration * rate)
    rng = np.random.default_rng([video.seed, 7])
    out = (NOISE * rng.standard_normal(n)).astype(np.float32)
    for s in video.segments:
        a, b = round(s.start * rate), min(round(s.stop * rate), n)
        if b > a:
            p = (np.arange(a, b) / rate - s.start) / (s.stop - s.start)
            out[a:b] += segment_sound(video.verbs[s.verb], nouns[s.noun], p, rate, rng)
    return out


class SoundTrack:
    """A sound stream of a container (`CODECS`), fed from a float32 mono array in frames of
    1024 samples. 16-bit PCM by default: AAC (EPIC's codec) costs ~0.5 s of encoding per 23 s
    of sound here - it doubled the tests' synthetic data time - and PCM in MP4 (ISO 23003-5)
    is read by PyAV, decord and torchcodec alike."""

    def __init__(self, container, sound: np.ndarray, codec: str = "pcm_s16le"):
        self.container, self.sound, self.at = container, np.asarray(sound, np.float32), 0
        self.format = CODECS[codec]
        self.stream = container.add_stream(codec, rate=SOUND_RATE, layout="mono")

    def write_until(self, seconds: float) -> None:
        import av

        stop = min(round(seconds * SOUND_RATE), len(self.sound))
        while self.at + 1024 <= stop or (stop == len(self.sound) and self.at < stop):
            chunk = self.sound[self.at : self.at + 1024]
            data = (np.clip(chunk, -1, 1) * 32767).astype(np.int16) if self.format == "s16" else chunk
            frame = av.AudioFrame.from_ndarray(data[None, :], format=self.format, layout="mono")
            frame.sample_rate, frame.pts = SOUND_RATE, self.at
            self.container.mux(self.stream.encode(frame))
            self.at += len(chunk)

    def finish(self) -> None:
        self.write_until(len(self.sound) / SOUND_RATE)
        self.container.mux(self.stream.encode(None))
