"""The sound of one input, kept on the clock of its container: what sync correctness rests on.

The demuxer hands over audio frames in order. `AudioTrack` resamples them to mono int16 at the
bank's rate and keeps the time of the first sample it was given (`start`, in the container's
seconds), so that the manifest can say where the sound starts relative to the first video
frame (`audio_start = start - first video frame time`). The bookkeeping:

* first frame: `start` is its presentation time; a frame without one takes the stream's start
  time. Encoder priming (AAC's ~1024 samples) gives a first frame before 0: `start` < 0.
* every frame: `seen` counts input samples since `origin` (= `start` until the rate changes),
  so `origin + seen / rate` is where the next frame should begin.
* a frame that begins more than 50 ms later than that (a hole in the stream) gets the hole
  filled with silence first, so every later sample stays at its true time (`gaps` sums them).
* a frame at another sample rate: the resampler is flushed and started again, `origin` moves
  on to the time reached and `seen` restarts there at the new rate; `start` stays where the
  first sample is (the samples before the change are still at the front of the track).
"""
from __future__ import annotations

import numpy as np

GAP_S = 0.05   # a hole longer than this is filled with silence; shorter ones are jitter


class AudioTrack:
    def __init__(self, sample_rate: int, stream_start: float = 0.0):
        """`sample_rate`: the bank's; `stream_start`: the audio stream's start time in seconds
        (where a first frame without a timestamp begins)."""
        self.sr, self.stream_start = sample_rate, stream_start
        self.start: float | None = None   # time of the first input sample (s)
        self.origin: float | None = None  # time the current rate's samples count from (s)
        self.rate: int | None = None      # the input's sample rate (the latest)
        self.seen = 0                     # input samples since `origin`
        self.gaps = 0.0                   # seconds of holes filled with silence
        self.pcm: list[np.ndarray] = []
        self._resampler = self._new_resampler()

    def _new_resampler(self):
        import av
        return av.AudioResampler(format="s16", layout="mono", rate=self.sr)

    def _drain(self, frame) -> None:
        self.pcm.extend(r.to_ndarray().reshape(-1) for r in self._resampler.resample(frame))

    @property
    def expected(self) -> float:
        """Where the next input frame should begin (s)."""
        return self.origin + self.seen / self.rate

    def add(self, frame) -> None:
        """One decoded audio frame (an av.AudioFrame), in stream order."""
        if self.start is None:
            self.start = frame.time if frame.time is not None else self.stream_start
            self.origin, self.rate = self.start, frame.sample_rate
        elif frame.sample_rate != self.rate:   # the stream changed rate: restart the resampler
            self._drain(None)
            self._resampler = self._new_resampler()
            self.origin = self.expected
            self.seen, self.rate = 0, frame.sample_rate
        if frame.time is not None:   # a hole in the stream: keep time by filling zeros
            gap = frame.time - self.expected
            if gap > GAP_S:
                self.pcm.append(np.zeros(int(round(gap * self.sr)), np.int16))
                self.seen += int(round(gap * self.rate))
                self.gaps += gap
        self._drain(frame)
        self.seen += frame.samples

    def finish(self) -> np.ndarray:
        """Every sample, mono int16 at the bank's rate (the resampler's tail included)."""
        if self.start is not None:
            self._drain(None)
        return np.concatenate(self.pcm) if self.pcm else np.zeros(0, np.int16)
