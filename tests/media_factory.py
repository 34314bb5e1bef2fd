"""Media files made by the tests, written with PyAV independently of fastavts' own encoders.

`make_media` writes a video whose frames flash white at known times and whose audio clicks at
the same known times, optionally with the audio stream starting later than the video, with
variable frame timing, in many codec/container combinations.
"""
from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

FLASH_TIMES = (0.4, 1.2, 2.2)


def make_media(path: Path, *, vcodec: str | None = "libx264", acodec: str | None = "aac",
               fmt: str | None = None, fps: float = 25, duration: float = 3.0,
               size=(96, 64), pix_fmt: str = "yuv420p", rate: int = 44100, channels: int = 1,
               audio_delay: float = 0.0, flashes: Sequence[float] = FLASH_TIMES,
               vfr: bool = False, silent: bool = False, video_options=None,
               audio_options=None) -> Path:
    """Write `path`. Video: dark frames, white at the frames nearest each flash time. Audio: low
    noise with a 5 ms click at each flash time, the stream's first sample at `audio_delay`
    seconds after the first video frame (so the clicks stay in sync with the flashes)."""
    rng = np.random.default_rng(0)
    c = av.open(str(path), "w", format=fmt)
    vs = as_ = None
    if vcodec:
        r = Fraction(fps).limit_denominator(1000)
        vs = c.add_stream(vcodec, rate=r, options=video_options or {})
        vs.width, vs.height, vs.pix_fmt = size[0], size[1], pix_fmt
        if vfr:  # ms timestamps with irregular steps
            vs.codec_context.time_base = Fraction(1, 1000)
    if acodec:
        as_ = c.add_stream(acodec, rate=rate, layout="mono" if channels == 1 else "stereo",
                           options=audio_options or {})

    if vs is not None:
        n = int(round(duration * fps))
        if vfr:  # steps of 30 to 50 ms, total about `duration`
            steps = rng.uniform(0.03, 0.05, size=4 * n)
            times = np.concatenate([[0], np.cumsum(steps)])
            times = times[times < duration]
        else:
            times = np.arange(n) / fps
        flash_frames = {int(np.argmin(np.abs(times - t))) for t in flashes}
        for i, t in enumerate(times):
            a = np.full((size[1], size[0], 3), 30, np.uint8)
            a[:, : size[0] // 4] = (i * 7) % 200  # some motion
            if i in flash_frames:
                a[:] = 255
            f = av.VideoFrame.from_ndarray(a, format="rgb24")
            if vfr:
                f.pts, f.time_base = int(round(t * 1000)), Fraction(1, 1000)
            else:
                f.pts, f.time_base = i, 1 / vs.codec_context.framerate
            for p in vs.encode(f):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)

    if as_ is not None:
        n = int(round((duration - audio_delay) * rate))
        x = np.zeros(n) if silent else rng.standard_normal(n) * 0.003
        if not silent:
            for t in flashes:
                i = int(round((t - audio_delay) * rate))
                if 0 <= i < n:
                    k = min(n - i, int(0.005 * rate))
                    x[i:i + k] += 0.8 * np.sign(np.sin(2 * np.pi * 1000 * np.arange(k) / rate))
        x = np.repeat(x[None, :], channels, 0).astype(np.float32)
        fsz = as_.codec_context.frame_size or 1024
        start = int(round(audio_delay * rate))
        for i in range(0, n, fsz):
            chunk = np.ascontiguousarray(x[:, i:i + fsz])
            if chunk.shape[1] < fsz and as_.codec_context.frame_size:
                chunk = np.pad(chunk, ((0, 0), (0, fsz - chunk.shape[1])))
            fmt_ = "flt" if channels == 1 else "fltp"
            fr = av.AudioFrame.from_ndarray(chunk if channels == 1 else chunk, format=fmt_,
                                            layout="mono" if channels == 1 else "stereo")
            fr.sample_rate = rate
            fr.pts, fr.time_base = start + i, Fraction(1, rate)
            for p in as_.encode(fr):
                c.mux(p)
        for p in as_.encode():
            c.mux(p)
    c.close()
    return path


def click_times(x: np.ndarray, sr: int, thresh: float = 0.3) -> list[float]:
    """Onsets of the clicks in `x`: first sample above `thresh` after 50 ms of quiet."""
    above = np.flatnonzero(np.abs(x) > thresh)
    out, last = [], -10**9
    for i in above:
        if i - last > 0.05 * sr:
            out.append(i / sr)
        last = i
    return out


def flash_frames(frames: np.ndarray) -> list[int]:
    """Indices of frames that are almost entirely white."""
    return [int(i) for i in np.flatnonzero(frames.reshape(len(frames), -1).mean(1) > 200)]
