"""The PyTorch log-mel against a float64 NumPy computation written from the formulas."""
import math

import numpy as np
import pytest
import torch

from fastavts.config import build_config
from fastavts.data.features import (
    AudioFeatures,
    AudioGeometry,
    LogMel,
    ModelInputs,
    audio_pcm_window,
    audio_window,
    mel_filterbank,
    normalise_clips,
    video_batch_transform,
    video_transform,
)


def reference_logmel(x, sr, win, hop, n_fft, n_mels, fmin, fmax, floor_db):
    """Frame by frame, float64: periodic Hann, DFT power, Slaney-mel triangles with area
    normalisation built bin by bin, 10 log10 with a floor."""
    def to_mel(f):  # Slaney: 3 mels per 200 Hz below 1 kHz, then 27 mels per factor 6.4
        return f * 3 / 200 if f < 1000 else 15 + 27 * math.log(f / 1000) / math.log(6.4)

    def to_hz(m):
        return m * 200 / 3 if m < 15 else 1000 * 6.4 ** ((m - 15) / 27)

    centres = [to_hz(to_mel(fmin) + (to_mel(fmax) - to_mel(fmin)) * i / (n_mels + 1))
               for i in range(n_mels + 2)]
    n_bins = n_fft // 2 + 1
    fb = np.zeros((n_mels, n_bins))
    for m in range(n_mels):
        lo, c, hi = centres[m], centres[m + 1], centres[m + 2]
        for k in range(n_bins):
            f = k * sr / n_fft
            if lo < f <= c:
                fb[m, k] = (f - lo) / (c - lo)
            elif c < f < hi:
                fb[m, k] = (hi - f) / (hi - c)
        fb[m] *= 2 / (hi - lo)
    window = np.array([0.5 - 0.5 * math.cos(2 * math.pi * n / win) for n in range(win)])
    n_frames = 1 + (len(x) - win) // hop
    dft = np.exp(-2j * np.pi * np.outer(np.arange(n_bins), np.arange(win)) / n_fft)
    out = np.zeros((n_mels, n_frames))
    for t in range(n_frames):
        frame = x[t * hop:t * hop + win].astype(np.float64) * window
        power = np.abs(dft @ frame) ** 2
        out[:, t] = 10 * np.log10(np.maximum(fb @ power, 10 ** (floor_db / 10)))
    return out


@pytest.mark.parametrize("sr,win_ms,hop_ms,n_fft,n_mels,fmin,fmax", [
    (16000, 25, 10, 512, 64, 0, 0),        # the default
    (16000, 25, 10, 400, 40, 60, 7600),    # n_fft equal to the window, band-limited
    (22050, 23, 7, 1024, 80, 0, 0),        # odd sizes: 507-sample window, 154-sample hop
    (8000, 32, 16, 256, 23, 100, 3900),
])
def test_logmel_matches_the_formulas(sr, win_ms, hop_ms, n_fft, n_mels, fmin, fmax):
    cfg = build_config(overrides=[f"data.sample_rate={sr}", f"data.win_ms={win_ms}",
                                  f"data.hop_ms={hop_ms}", f"data.n_fft={n_fft}",
                                  f"data.n_mels={n_mels}", f"data.fmin={fmin}",
                                  f"data.fmax={fmax}"])
    geo = AudioGeometry(cfg.data)
    rng = np.random.default_rng(0)
    t = np.arange(geo.length) / sr
    x = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(geo.length)
         + 0.5 * (np.abs(t - 0.6) < 0.01)).astype(np.float32)   # tone, noise, a click
    x2 = np.zeros_like(x)  # silence: every value at the floor
    got = LogMel(geo)(torch.from_numpy(np.stack([x, x2]))).numpy()
    assert got.shape == (2, 1, n_mels, geo.frames)
    ref = reference_logmel(x, sr, geo.win, geo.hop, n_fft, n_mels, fmin, fmax or sr / 2,
                           geo.floor_db)
    err = np.abs(got[0, 0] - ref)
    # float32 power in dB: 1e-3 dB where there is energy; near the floor relative errors grow
    big = ref > geo.floor_db + 40
    print(f"max dB error {err[big].max():.2e} over {big.sum()} values, everywhere {err.max():.2e}")
    assert big.mean() > 0.5
    assert err[big].max() < 2e-3
    assert np.allclose(got[1, 0], geo.floor_db)


def test_mel_filterbank_shape_and_area():
    fb = mel_filterbank(16000, 512, 64, 0.0, 8000.0)
    assert fb.shape == (64, 257) and (fb >= 0).all()
    # area normalisation: each triangle's integral over Hz is 1 (up to bin sampling)
    area = fb.sum(1) * 16000 / 512
    print(np.round(area, 3))
    # narrow low bands are sampled by 31 Hz bins (up to 11 % off); the wide high ones are not
    assert np.allclose(area, 1, atol=0.12) and abs(area.mean() - 1) < 0.01
    assert np.allclose(area[40:], 1, atol=0.01)


def test_geometry_gives_four_audio_frames_per_video_frame():
    geo = AudioGeometry(build_config().data)
    assert (geo.frames, geo.win, geo.hop, geo.length) == (128, 400, 160, 127 * 160 + 400)


def test_video_transform_against_numpy():
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, size=(5, 37, 53, 3), dtype=np.uint8)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    got = video_transform(frames, 3, 11, 29, True, mean, std).numpy()
    ref = frames[:, 3:32, 11:40][:, :, ::-1].astype(np.float64) / 255
    ref = ((ref - mean) / std).transpose(3, 0, 1, 2)
    assert got.shape == (3, 5, 29, 29)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_video_batch_transform_against_float32_and_float64_numpy():
    """The batch path (build_batch; video_transform is one clip of it) against NumPy: the same
    operations in float32 give the same values to the bit (IEEE rounding of each step), and
    float64 agrees to rounding; flips and crops at odd offsets; the one-clip path equal to
    the batch's clip."""
    rng = np.random.default_rng(2)
    mean, std = [0.43, 0.51, 0.62], [0.21, 0.26, 0.29]
    videos = [rng.integers(0, 256, size=(7, 41, 45, 3), dtype=np.uint8) for _ in range(5)]
    cuts = [(0, 0, False), (3, 11, True), (12, 16, True), (5, 2, False), (12, 0, True)]
    c = 29
    crops = np.stack([v[:, y:y + c, x:x + c][:, :, ::-1] if f else v[:, y:y + c, x:x + c]
                      for v, (y, x, f) in zip(videos, cuts)])
    got = video_batch_transform(crops, mean, std)
    assert got.shape == (5, 3, 7, c, c) and got.dtype == torch.float32 and got.is_contiguous()
    m32, s32 = np.float32(mean), np.float32(std)
    ref32 = (crops.astype(np.float32) / np.float32(255) - m32) / s32
    np.testing.assert_array_equal(got.numpy(), ref32.transpose(0, 4, 1, 2, 3))
    ref = ((crops.astype(np.float64) / 255 - mean) / std).transpose(0, 4, 1, 2, 3)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-5)
    for v, (y, x, f), g in zip(videos, cuts, got):
        assert torch.equal(video_transform(v, y, x, c, f, mean, std), g)
    # a training batch's size (16 clips of 3 x 16 x 112 x 112: 38 MB of float32, an array
    # numpy places on huge pages), written into a fresh array and into a given one
    big = rng.integers(0, 256, size=(16, 3, 16, 112, 112), dtype=np.uint8)
    ref = (big.astype(np.float32) / np.float32(255) - m32.reshape(1, 3, 1, 1, 1)) \
        / s32.reshape(1, 3, 1, 1, 1)
    np.testing.assert_array_equal(normalise_clips(big, mean, std).numpy(), ref)
    out = torch.full(big.shape, float("nan"))
    assert normalise_clips(big, mean, std, out=out) is out
    np.testing.assert_array_equal(out.numpy(), ref)


class _Bank:
    def __init__(self, pcm):
        self.pcm = pcm


@pytest.mark.parametrize("overrides", [[], ["data.sample_rate=22050", "data.win_ms=23",
                                             "data.hop_ms=7", "data.n_fft=1024",
                                             "data.n_mels=80"]])
def test_int16_windows_become_the_log_mel_on_the_device(overrides):
    """What the PyAV/SPDL/decord loaders hand over (int16 windows, zeros outside the sound)
    made into log-mel by the step (AudioFeatures): against the float64 formulas on windows cut
    by NumPy from the samples, and bit for bit the float path (audio_window -> LogMel) the
    loaders took before; also inside autocast (float32 all the same); a float log-mel passes."""
    d = build_config(overrides=overrides).data
    geo = AudioGeometry(d)
    rng = np.random.default_rng(5)
    n, off = 3 * geo.sr + 17, 1234        # a video's sound, after another's in the bank
    t = np.arange(n) / geo.sr
    sound = 0.4 * np.sin(2 * np.pi * 660 * t) + 0.1 * rng.standard_normal(n)
    pcm = np.concatenate([rng.integers(-3000, 3000, off), np.round(sound * 20000),
                          rng.integers(-3000, 3000, 99)]).astype(np.int16)
    bank = _Bank(pcm)
    rec = dict(audio_start=0.0, audio_offset=off, audio_samples=n)
    t0s = [0.0, 0.5, 1.234, -0.2, n / geo.sr - 0.6, n / geo.sr + 0.1]   # in, before, past
    wins = np.stack([audio_pcm_window(bank, rec, t0, geo) for t0 in t0s])
    assert wins.dtype == np.int16 and wins.shape == (len(t0s), geo.length)
    floats = np.stack([audio_window(bank, rec, t0, geo) for t0 in t0s])
    feats = AudioFeatures(geo)
    got = feats(torch.from_numpy(wins))
    assert got.dtype == torch.float32 and got.shape == (len(t0s), 1, geo.n_mels, geo.frames)
    assert torch.equal(got, LogMel(geo)(torch.from_numpy(floats)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(feats(torch.from_numpy(wins)), got)
    samples = pcm[off:off + n].astype(np.float64) / 32768
    for k, t0 in enumerate(t0s):
        first = int(round(t0 * geo.sr)) - geo.win // 2
        idx = np.arange(first, first + geo.length)
        x = np.where((idx >= 0) & (idx < n), samples[np.clip(idx, 0, n - 1)], 0.0)
        ref = reference_logmel(x, geo.sr, geo.win, geo.hop, geo.n_fft, geo.n_mels, geo.fmin,
                               geo.fmax, geo.floor_db)
        big = ref > geo.floor_db + 40
        if k < 3:
            assert big.mean() > 0.5
        np.testing.assert_allclose(got[k, 0].numpy()[big], ref[big], atol=2e-3)
        np.testing.assert_allclose(got[k, 0].numpy()[~big], ref[~big], atol=0.5)
    assert feats(got) is got


def test_model_inputs_make_what_the_model_takes():
    """A CPU loader's batch (uint8 video, int16 sound) and DALI's (float video and log-mel):
    the model's inputs, the other keys as they were."""
    d = build_config().data
    geo = AudioGeometry(d)
    rng = np.random.default_rng(6)
    video = torch.from_numpy(rng.integers(0, 256, (2, 3, 4, 9, 9), dtype=np.uint8))
    audio = torch.from_numpy(rng.integers(-9000, 9000, (3, geo.length)).astype(np.int16))
    inputs = ModelInputs(d)
    inputs.prepare("cpu")
    got = inputs(dict(video=video, audio=audio, role=torch.arange(3)))
    m = torch.tensor(d.mean).view(1, 3, 1, 1, 1)
    s = torch.tensor(d.std).view(1, 3, 1, 1, 1)
    assert torch.equal(got["video"], (video.float() / 255 - m) / s)
    assert torch.equal(got["audio"], LogMel(geo)(audio.float() / 32768))
    assert torch.equal(got["role"], torch.arange(3))
    again = inputs(got)
    assert again["video"] is got["video"] and again["audio"] is got["audio"]
