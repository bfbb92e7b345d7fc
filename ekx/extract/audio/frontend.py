"""Auditory SlowFast's front end in torch: the log-mel spectrogram of their audio loader
(epic-sounds-annotations src/slowfast/datasets/audio_loader_epicsounds.py `_log_specgram`,
TIM's audio_loader_epic.py the same), which runs librosa:

    spec = librosa.stft(audio, n_fft=2048, window="hann", hop_length=round(5 ms * sr),
                        win_length=round(10 ms * sr), pad_mode="constant")   # center=True
    mel = librosa.filters.mel(sr=sr, n_fft=2048, n_mels=128, htk=True, norm=None)
    log_mel = np.log(mel @ np.abs(spec) + 1e-6).T                            # [T, 128]

`torch.stft` with the same arguments frames and windows the signal as librosa does (the
periodic Hann window of win_length centred in n_fft, the signal zero-padded by n_fft // 2
on each side); the mel matrix is librosa's HTK formula, unnormalised (`mel_filters`). Batched
on the model's device, in float32 whatever the autocast of the model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch


def _hz_to_mel_htk(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def _mel_to_hz_htk(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filters(sr: int, n_fft: int, n_mels: int) -> np.ndarray:
    """librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, htk=True, norm=None), float32
    [n_mels, 1 + n_fft // 2]: triangles between HTK-mel-spaced points from 0 to sr / 2."""
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)
    points = _mel_to_hz_htk(np.linspace(_hz_to_mel_htk(0.0), _hz_to_mel_htk(sr / 2.0), n_mels + 2))
    diff = np.diff(points)
    ramps = np.subtract.outer(points, freqs)
    weights = np.zeros((n_mels, len(freqs)), dtype=np.float32)
    for i in range(n_mels):
        lower = -ramps[i] / diff[i]
        upper = ramps[i + 2] / diff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    return weights


@dataclass(frozen=True)
class LogMel:
    """Waveforms [B, n] (mono, at ``rate``) -> log-mel spectrograms [B, 1, T, mels]."""

    rate: int = 24000
    window_ms: float = 10.0
    hop_ms: float = 5.0
    n_fft: int = 2048
    mels: int = 128
    eps: float = 1e-6

    @property
    def win_length(self) -> int:
        return round(self.window_ms * self.rate / 1e3)

    @property
    def hop(self) -> int:
        return round(self.hop_ms * self.rate / 1e3)

    def frames(self, samples: int) -> int:
        return 1 + samples // self.hop  # a centred transform

    def __call__(self, wave: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        window, basis = _tensors(self, torch.device(device))
        x = wave.to(device, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            spec = torch.stft(
                x,
                n_fft=self.n_fft,
                hop_length=self.hop,
                win_length=self.win_length,
                window=window,
                center=True,
                pad_mode="constant",
                return_complex=True,
            ).abs()
            mel = torch.matmul(basis, spec)  # [B, mels, T]
            return torch.log(mel + self.eps).transpose(1, 2).unsqueeze(1)

    def attrs(self) -> dict:
        return {
            "audio_frontend": "log-mel (librosa recipe of Auditory SlowFast, torch.stft)",
            "audio_stft": f"n_fft {self.n_fft}, hann window {self.win_length}, hop {self.hop}, centred, zero-padded",
            "audio_mel": f"{self.mels} bins, HTK scale, unnormalised, 0-{self.rate // 2} Hz; log(x + {self.eps:g})",
        }


@functools.lru_cache(maxsize=8)
def _tensors(spec: LogMel, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    window = torch.hann_window(spec.win_length, periodic=True, dtype=torch.float32, device=device)
    basis = torch.from_numpy(mel_filters(spec.rate, spec.n_fft, spec.mels)).to(device)
    return window, basis
