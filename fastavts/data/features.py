"""What a model sees, defined once: audio windows, log-mel features and the video transform.

The PyTorch functions here are the reference twins of the DALI pipeline (dali_loader.py): the
PyAV loader uses them, the tests compare DALI's output with them, and both read windows through
`audio_window`, so that the two loaders agree sample for sample.

Log-mel of one window (docs/design.md section 1; the defaults give 128 frames of 64 bands for a
1.28 s clip, 4 audio frames per video frame at 25 fps):
    frame k is centred at t0 + k * hop and spans win samples (periodic Hann), read from the
    bank with win/2 samples of real context before t0 and after the window's end (no padding)
    power spectrum |rfft(frame, n_fft)|^2 -> Slaney mel filters with area normalisation
    (librosa's default, DALI's mel_filter_bank default) -> 10 log10(max(x, 10^(floor/10)))
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from ..config import DataConfig


class AudioGeometry:
    """Sample counts of a clip's audio window with its STFT context."""

    def __init__(self, d: DataConfig):
        self.sr = d.sample_rate
        self.win = int(round(d.win_ms * d.sample_rate / 1000))
        self.hop = int(round(d.hop_ms * d.sample_rate / 1000))
        self.n_fft = d.n_fft
        window_s = d.clip_frames * d.frame_stride / d.fps
        self.frames = int(round(window_s * 1000 / d.hop_ms))    # 128 for 1.28 s / 10 ms
        self.context = self.win // 2                            # samples before t0
        self.length = (self.frames - 1) * self.hop + self.win   # samples read per window
        self.n_mels, self.fmin = d.n_mels, d.fmin
        self.fmax = d.fmax or d.sample_rate / 2
        self.floor_db = d.log_floor_db


def window_start(record: dict, t0: float, geo: AudioGeometry) -> int:
    """Bank sample (from the video's first sample) where the window for video time t0 starts,
    its STFT context included; may lie before 0 or past the end (zeros are read there)."""
    return int(round((t0 - record["audio_start"]) * geo.sr)) - geo.context


def _window_span(bank, record: dict, t0: float, geo: AudioGeometry, length: int | None):
    """(window length, the bank's recorded samples that fall inside the window or None, where
    in the window they start)."""
    first = window_start(record, t0, geo)
    length = geo.length if length is None else length
    lo, hi = max(first, 0), min(first + length, record["audio_samples"])
    off = record["audio_offset"]
    return length, (bank.pcm[off + lo:off + hi] if hi > lo else None), lo - first


def audio_window(bank, record: dict, t0: float, geo: AudioGeometry,
                 length: int | None = None) -> np.ndarray:
    """float32 (geo.length,) samples for the window starting at video time t0 (context
    included); zeros outside the recorded sound. `bank` is an AudioBank. `length`: read that
    many samples instead (the memory loader reads a whole video's sound this way)."""
    length, pcm, at = _window_span(bank, record, t0, geo, length)
    out = np.zeros(length, np.float32)
    if pcm is not None:
        out[at:at + len(pcm)] = pcm * np.float32(1 / 32768)
    return out


def audio_pcm_window(bank, record: dict, t0: float, geo: AudioGeometry) -> np.ndarray:
    """audio_window as the bank's int16 samples (x 2^-15 is audio_window, exactly): what the
    PyAV, SPDL and decord loaders hand over, half the bytes of float32, turned into log-mel on
    the step's device (AudioFeatures)."""
    length, pcm, at = _window_span(bank, record, t0, geo, None)
    out = np.zeros(length, np.int16)
    if pcm is not None:
        out[at:at + len(pcm)] = pcm
    return out


def hz_to_mel(f):
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, np.float64)
    lin = f / (200.0 / 3)
    log = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (math.log(6.4) / 27)
    return np.where(f >= 1000.0, log, lin)


def mel_to_hz(m):
    m = np.asarray(m, np.float64)
    lin = m * (200.0 / 3)
    log = 1000.0 * np.exp((math.log(6.4) / 27) * (m - 15.0))
    return np.where(m >= 15.0, log, lin)


@lru_cache(maxsize=8)
def mel_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters on the Slaney mel scale, each divided by
    its bandwidth in Hz / 2 (area normalisation)."""
    bins = np.arange(n_fft // 2 + 1) * sr / n_fft
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    fb = np.zeros((n_mels, len(bins)))
    for m in range(n_mels):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        up = (bins - lo) / (mid - lo)
        down = (hi - bins) / (hi - mid)
        fb[m] = np.maximum(0, np.minimum(up, down)) * (2.0 / (hi - lo))
    return fb


def hann(n: int) -> np.ndarray:
    """Periodic Hann window (the STFT convention), float32."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float32)


class LogMel:
    """(M, geo.length) float32 windows -> (M, 1, n_mels, frames) log-mel, in PyTorch."""

    def __init__(self, geo: AudioGeometry, device="cpu"):
        import torch

        self.geo = geo
        self.window = torch.from_numpy(hann(geo.win)).to(device)
        fb = mel_filterbank(geo.sr, geo.n_fft, geo.n_mels, geo.fmin, geo.fmax)
        self.fb = torch.from_numpy(fb.astype(np.float32)).to(device)   # (n_mels, bins)
        self.floor = 10.0 ** (geo.floor_db / 10)

    def __call__(self, x):
        import torch

        g = self.geo
        frames = x.unfold(-1, g.win, g.hop) * self.window               # (M, F, win)
        z = torch.view_as_real(torch.fft.rfft(frames, n=g.n_fft))       # (M, F, bins, 2)
        re, im = z.unbind(-1)
        spec = re * re + im * im   # |z|^2; abs() would take a hypot per bin: 3x slower
        mel = spec @ self.fb.T                                          # (M, F, n_mels)
        logmel = 10 * torch.log10(mel.clamp_min(self.floor))
        return logmel.transpose(1, 2).unsqueeze(1).contiguous()         # (M, 1, n_mels, F)


def _device(device):
    """`device` as a key: "cuda" is the current GPU's index."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


class VideoNorm:
    """The model's video input from a batch's video: uint8 (B, 3, T, crop, crop), as the
    PyAV, SPDL, decord and in-memory loaders hand it over (a quarter of the bytes of float32
    to copy to the device), -> float32 (x/255 - mean) / std on the tensor's device; a float
    video (DALI's, normalised in its pipeline) is returned as it is. The constants are made
    once per device, so a step makes no host-to-device copy for them."""

    def __init__(self, mean, std):
        self.mean, self.std = tuple(mean), tuple(std)
        self._consts: dict = {}

    def consts(self, device):
        """(mean, std) as float32 (1, 3, 1, 1, 1) tensors on `device`, made once (a trainer
        makes them before its first step: the copy to a GPU waits for the host)."""
        import torch

        dev = _device(device)
        if dev not in self._consts:
            self._consts[dev] = tuple(
                torch.tensor(c, dtype=torch.float32).view(1, 3, 1, 1, 1).to(dev)
                for c in (self.mean, self.std))
        return self._consts[dev]

    def __call__(self, video, out=None):
        import torch

        if video.is_floating_point():
            return video
        dev = video.device
        m, s = self.consts(dev)
        if out is None and dev.type == "cpu":   # numpy's allocator: it asks the kernel for
            # huge pages where the array is large, so the first touch of a fresh batch
            # faults 512x fewer pages than torch's
            out = torch.from_numpy(np.empty(tuple(video.shape), np.float32))
        x = video.float() if out is None else out.copy_(video)
        return x.div_(255).sub_(m).div_(s)


class AudioFeatures:
    """The model's audio input from a batch's audio: int16 (M, geo.length) sound windows, as
    the PyAV, SPDL and decord loaders hand them over (audio_pcm_window), -> float32
    (M, 1, n_mels, frames) log-mel (LogMel) on the tensor's device, the values LogMel gives
    for audio_window's floats; a float log-mel (DALI's, the memory loader's) is returned as it
    is. The window and the filters are made once per device."""

    def __init__(self, geo: AudioGeometry):
        self.geo = geo
        self._logmel: dict = {}

    def logmel(self, device) -> LogMel:
        """The LogMel on `device`, made once (before a trainer's first step: the copy of its
        window and filters to a GPU waits for the host)."""
        dev = _device(device)
        if dev not in self._logmel:
            self._logmel[dev] = LogMel(self.geo, dev)
        return self._logmel[dev]

    def __call__(self, audio):
        import torch

        if audio.is_floating_point():
            return audio
        # float32 throughout, also where called inside autocast (its matmul would be half)
        with torch.autocast(audio.device.type, enabled=False):
            # int16 -> float32 and the power of two are exact: audio_window's floats
            return self.logmel(audio.device)(audio.float().mul_(1 / 32768))


class ModelInputs:
    """A loader's batch as the model takes it, on the device its tensors are on: uint8 video
    normalised (VideoNorm), int16 sound windows turned into log-mel (AudioFeatures); DALI's
    batches, normalised and transformed in its pipelines, pass as they are. The step, the
    evaluation and fine-tuning call it once their batch is on the device, where the work is
    free beside a GPU and the copy is smaller."""

    def __init__(self, d: DataConfig):
        self.video = VideoNorm(d.mean, d.std)
        self.audio = AudioFeatures(AudioGeometry(d))

    def prepare(self, device) -> None:
        """Make the constants on `device` now (a trainer does, before its first step)."""
        self.video.consts(device)
        self.audio.logmel(device)

    def __call__(self, batch: dict) -> dict:
        out = dict(batch)
        if "video" in out:
            out["video"] = self.video(out["video"])
        if "audio" in out:
            out["audio"] = self.audio(out["audio"])
        return out


def normalise_clips(clips: np.ndarray, mean, std, out=None):
    """uint8 (B, 3, T, crop, crop) -> float32, (x/255 - mean) / std (VideoNorm on the host).
    `out`: a float32 tensor of that shape to write into, the same values."""
    import torch

    return VideoNorm(mean, std)(torch.from_numpy(clips), out=out)


def video_batch_transform(crops: np.ndarray, mean, std):
    """uint8 (B, T, crop, crop, 3), already cut and flipped -> float32 (B, 3, T, crop, crop),
    (x/255 - mean) / std: the whole batch at once (clip by clip it took twice as long for the
    CPU demo's batch: bench/bench_demo_step.py). build_batch cuts its crops channels-first and
    hands them over as uint8; the step normalises them with VideoNorm: the same values."""
    return normalise_clips(np.ascontiguousarray(crops.transpose(0, 4, 1, 2, 3)), mean, std)


def video_transform(frames: np.ndarray, y: int, x: int, crop: int, flip: bool, mean, std):
    """uint8 (T, H, W, 3) -> float32 (3, T, crop, crop): crop, flip, (x/255 - mean) / std (one
    clip of video_batch_transform)."""
    cut = frames[:, y:y + crop, x:x + crop]
    return video_batch_transform(np.ascontiguousarray(cut[:, :, ::-1] if flip else cut)[None],
                                 mean, std)[0]
