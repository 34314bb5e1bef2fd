"""prepare's audio bookkeeping (fastavts/data/prepare/audio_track.py): every sample of the
bank stands at its true time. Real PyAV frames with chosen timestamps; the expected sample
positions are worked out by hand from those timestamps."""
from fractions import Fraction

import av
import numpy as np
import pytest

from fastavts.data.prepare.audio_track import AudioTrack

SR = 16000   # the bank's rate


def frame(samples: np.ndarray, rate: int, t: float | None):
    """A mono s16 frame of `samples` at `rate` Hz starting at `t` seconds (None: no pts)."""
    f = av.AudioFrame.from_ndarray(samples.astype(np.int16).reshape(1, -1), format="s16",
                                   layout="mono")
    f.sample_rate = rate
    if t is not None:
        f.time_base = Fraction(1, rate)
        f.pts = int(round(t * rate))
    return f


def click_at(n: int, i: int, value: int = 20000) -> np.ndarray:
    x = np.zeros(n, np.int16)
    x[i] = value
    return x


def ramp(n: int, first: int) -> np.ndarray:
    return (np.arange(first, first + n) % 30000).astype(np.int16)


@pytest.mark.parametrize("t0", [0.0, -0.064, 0.5], ids=["at_zero", "priming", "late_start"])
def test_contiguous_frames_at_the_bank_rate_pass_through_sample_for_sample(t0):
    """Frames that follow each other: the track is their samples, unchanged, starting at the
    first frame's time (encoder priming puts it before 0; a late sound after it)."""
    track = AudioTrack(SR)
    n = 1024
    for k in range(5):
        track.add(frame(ramp(n, k * n), SR, t0 + k * n / SR))
    out = track.finish()
    np.testing.assert_array_equal(out, ramp(5 * n, 0))
    assert track.start == pytest.approx(t0) and track.gaps == 0 and track.rate == SR


def test_a_hole_is_filled_with_silence_so_later_samples_keep_their_time():
    """0.1 s of sound, nothing until 0.3 s, then a click at 0.3125 s: the click lands at
    sample 0.3125 * 16000 = 5000 (not at 1600 + 200, where it would without the fill)."""
    track = AudioTrack(SR)
    track.add(frame(ramp(1600, 1), SR, 0.0))
    track.add(frame(click_at(1600, 200), SR, 0.3))
    out = track.finish()
    assert len(out) == 1600 + 3200 + 1600
    assert np.flatnonzero(out[1600:]).tolist() == [5000 - 1600]
    assert (out[1600:4800] == 0).all()
    assert track.gaps == pytest.approx(0.2)


def test_jitter_below_50_ms_is_not_a_hole():
    track = AudioTrack(SR)
    track.add(frame(ramp(1600, 1), SR, 0.0))
    track.add(frame(ramp(1600, 1601), SR, 0.1 + 0.03))   # 30 ms late: timestamps jitter
    out = track.finish()
    np.testing.assert_array_equal(out, ramp(3200, 1))
    assert track.gaps == 0


def test_a_first_frame_without_a_timestamp_starts_at_the_streams_start():
    track = AudioTrack(SR, stream_start=0.25)
    track.add(frame(ramp(800, 1), SR, None))
    track.add(frame(ramp(800, 801), SR, None))
    np.testing.assert_array_equal(track.finish(), ramp(1600, 1))
    assert track.start == 0.25


def _peak(x: np.ndarray) -> int:
    return int(np.argmax(np.abs(x.astype(np.int32))))


def test_a_48_khz_click_lands_at_its_time_after_resampling():
    """A click at 0.25 s of a 48 kHz stream starting at -0.021 s (AAC-style priming): in the
    16 kHz track it sits (0.25 + 0.021) s after the track's first sample, within the
    resampler's filter (+-2 samples = 0.125 ms)."""
    rate, t0 = 48000, -0.021
    n = 1024
    x = np.zeros(20 * n, np.int16)
    i = int(round((0.25 - t0) * rate))
    x[i] = 30000
    track = AudioTrack(SR)
    for k in range(20):
        track.add(frame(x[k * n:(k + 1) * n], rate, t0 + k * n / rate))
    out = track.finish()
    assert abs(len(out) - 20 * n / 3) <= 2
    assert abs(_peak(out) - (0.25 - t0) * SR) <= 2
    assert track.start == pytest.approx(t0) and track.rate == rate


def test_a_change_of_sample_rate_keeps_the_start_and_the_time_of_later_samples():
    """16 kHz for 0.2 s, then 8 kHz: the track still starts where its first sample is (the
    samples before the change are at its front), and a click at 0.3 s in the 8 kHz part lands
    at 0.3 * 16000 = 4800 (within the resampler's filter)."""
    track = AudioTrack(SR)
    track.add(frame(ramp(1600, 1), SR, 0.0))
    track.add(frame(ramp(1600, 1601), SR, 0.1))
    part = np.zeros(1600, np.int16)
    part[int(0.1 * 8000)] = 30000            # 0.2 s + 0.1 s
    track.add(frame(part, 8000, 0.2))
    out = track.finish()
    assert track.start == 0.0 and track.rate == 8000 and track.gaps == 0
    np.testing.assert_array_equal(out[:3200], ramp(3200, 1))
    assert abs(_peak(out[3200:]) + 3200 - 4800) <= 2
