"""Synthetic audio-visual set: bouncing objects that sound when they hit the floor.

Why it is built this way (the set must make sync learnable *and* need timing):

* Every sounding object has a kind (shape + colour on screen, timbre in the sound). It bounces
  on the floor along parabolic arcs; each floor contact is an impact whose sound starts at
  exactly that instant (sample-accurate onset), so audio events and visual contacts coincide.
* Impact times are random (intervals drawn in [min_interval, max_interval]), not periodic, so
  audio shifted by 0.5 s does not line up with the contacts again.
* Every sounding object is on screen for the whole video and hits the floor at least once every
  `max_interval` seconds (<= one 1.28 s clip by default), so any window, shifted or not, holds
  the same objects and the same timbres: one frame, or the window's overall spectrum, does not
  tell a shifted window from an aligned one. Only *when* the sounds happen does.
* Distractors (grey shapes) move and bounce off the walls without a sound; side-wall bounces
  of sounding objects are silent too. Background noise (level drawn per video) and a steady
  hum sit under the events.

Video i depends only on (seed, i): the same seed gives the same files, and a larger --videos
only adds videos. Each video has a sidecar `<id>.json` with its label (the sorted sounding
kinds joined by '+', e.g. "bell+drum"), its kinds, and every impact (time, object, kind).
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..config import Config, SynthConfig, save_config

# kind -> (shape, RGB colour). Colours are saturated and far apart so a small net, and the
# tests, can tell the objects apart; distractors are grey.
KINDS = {
    "ball": ("circle", (230, 60, 50)),
    "bell": ("triangle", (240, 210, 40)),
    "block": ("square", (50, 110, 240)),
    "glass": ("diamond", (60, 230, 230)),
    "drum": ("ring", (220, 60, 220)),
    "spring": ("cross", (70, 220, 70)),
}
DISTRACTOR_COLOURS = [(150, 150, 150), (200, 200, 200), (110, 110, 110)]


@dataclass
class Impact:
    t: float        # seconds from the first frame
    obj: int        # index into the video's sounding objects
    kind: str
    gain: float


# --------------------------------------------------------------------------------------------
# Sounds. Each returns float32 mono starting at its onset (attack of 1 ms, no pre-roll).


def _env(n, sr, decay_s, attack_s=0.001):
    t = np.arange(n) / sr
    env = np.exp(-t / decay_s)
    a = max(1, int(attack_s * sr))
    env[:a] *= np.linspace(0, 1, a, endpoint=False)
    return env, t


def impact_sound(kind: str, sr: int, rng: np.random.Generator) -> np.ndarray:
    """One impact of `kind`, with a little per-hit variation (pitch +-3 %, brightness)."""
    p = rng.uniform(0.97, 1.03)
    if kind == "ball":      # dull thud: pitch falling from 180 to 70 Hz, plus a soft click
        n = int(0.18 * sr)
        env, t = _env(n, sr, 0.05)
        f = 70 * p + 110 * p * np.exp(-t / 0.02)
        s = np.sin(2 * np.pi * np.cumsum(f) / sr) + 0.3 * rng.standard_normal(n) * np.exp(-t / 0.004)
    elif kind == "bell":    # inharmonic partials, long ring
        n = int(0.45 * sr)
        env, t = _env(n, sr, 0.15)
        s = sum(a * np.sin(2 * np.pi * f * p * t) for f, a in ((880, 1), (2420, .6), (4760, .35)))
    elif kind == "block":   # wood knock: short resonance at 700 Hz + band of noise
        n = int(0.08 * sr)
        env, t = _env(n, sr, 0.015)
        noise = np.convolve(rng.standard_normal(n), np.hanning(9), "same")
        s = np.sin(2 * np.pi * 700 * p * t) + 0.6 * noise
    elif kind == "glass":   # bright, high partials
        n = int(0.3 * sr)
        env, t = _env(n, sr, 0.07)
        s = sum(a * np.sin(2 * np.pi * min(f * p, 0.45 * sr) * t)
                for f, a in ((2650, 1), (3710, .7), (5230, .5)))
    elif kind == "drum":    # membrane: 200 Hz with a pitch drop, plus noise burst
        n = int(0.2 * sr)
        env, t = _env(n, sr, 0.06)
        f = 160 * p + 120 * np.exp(-t / 0.01)
        s = np.sin(2 * np.pi * np.cumsum(f) / sr) + 0.5 * rng.standard_normal(n) * np.exp(-t / 0.02)
    elif kind == "spring":  # upward chirp 350 -> 1400 Hz
        n = int(0.14 * sr)
        env, t = _env(n, sr, 0.06)
        f = 350 * p + 1050 * p * t / t[-1]
        s = np.sin(2 * np.pi * np.cumsum(f) / sr)
    else:
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
    s = s * env
    return (s / (np.abs(s).max() + 1e-9)).astype(np.float32)


@lru_cache(maxsize=4)
def _red_kernel_spectrum(taps: int, size: int) -> np.ndarray:
    """rfft of the one-pole low-pass's first `taps` taps (pole 0.995), zero-padded to `size`
    (a power of two: the few sizes the videos need, each computed once)."""
    out = np.fft.rfft(0.995 ** np.arange(taps), size)
    out.flags.writeable = False
    return out


def background(n: int, sr: int, level_db: float, rng: np.random.Generator) -> np.ndarray:
    """Stationary noise (white + brown-ish) and a hum: level only, no timing information."""
    white = rng.standard_normal(n)
    # Red noise: white noise through a one-pole low-pass (pole 0.995, ~13 Hz at 16 kHz), run
    # causally with a warm-up that is thrown away, so it is stationary to the last sample
    # (a "same"-mode moving average leaves bursts at both ends that sound like events).
    # (The 2000-tap convolution runs through the FFT: np.convolve took a third of the demo's
    # synthesis time.)
    warm = 2000
    size = 1 << (n + 2 * warm - 2).bit_length()     # >= the full convolution's length
    red = np.fft.irfft(np.fft.rfft(rng.standard_normal(n + warm), size) *
                       _red_kernel_spectrum(warm, size), size)[warm:warm + n]
    red /= red.std() + 1e-9
    t = np.arange(n) / sr
    hum = np.sin(2 * np.pi * rng.uniform(50, 120) * t + rng.uniform(0, 6.28))
    x = 0.6 * white + 0.6 * red + 0.3 * hum
    return (x / (x.std() + 1e-9) * 10 ** (level_db / 20)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Motion


def _impact_times(rng, duration, cfg: SynthConfig, taken: list[float]) -> list[float]:
    """Random impact times covering [0, duration) with gaps in [min_interval, max_interval],
    kept `min_event_gap` away from the impacts of objects drawn before."""
    def ok(t):
        return all(abs(t - u) >= cfg.min_event_gap for u in taken)

    times: list[float] = []
    t = rng.uniform(0.1, cfg.max_interval)
    while t < duration + cfg.max_interval:
        for _ in range(50):  # redraw a colliding time; give up gracefully after 50 tries
            if ok(t):
                break
            t = times[-1] + rng.uniform(cfg.min_interval, cfg.max_interval) if times else \
                rng.uniform(0.1, cfg.max_interval)
        times.append(float(t))
        t = t + rng.uniform(cfg.min_interval, cfg.max_interval)
    return times


def _bounce_path(times, rng, floor_y, top_y):
    """Vertical position (object bottom) as a function of time: parabolic arcs between
    consecutive impacts, touching `floor_y` exactly at every impact."""
    # A virtual impact before the video starts (t < 0, so it makes no sound in the video):
    # every frame then lies on an arc between two impacts.
    t_prev = -rng.uniform(0.05, 0.5)
    knots = np.array([t_prev] + list(times))
    heights = rng.uniform(0.35, 0.95, size=len(knots)) * (floor_y - top_y)

    def y_at(t):
        k = np.clip(np.searchsorted(knots, t, side="right") - 1, 0, len(knots) - 2)
        t0, t1 = knots[k], knots[k + 1]
        u = (t - t0) / (t1 - t0)
        return floor_y - heights[k] * 4 * u * (1 - u)
    return y_at


def _triangle(x0, v, lo, hi, t):
    """Position moving at speed v reflected between lo and hi (a silent wall bounce)."""
    span = hi - lo
    p = np.mod(x0 - lo + v * t, 2 * span)
    return lo + np.where(p > span, 2 * span - p, p)


def _shape_mask(shape, yy, xx, cy, cx, r):
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    if shape == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= r
    if shape == "triangle":  # apex up, base on the bottom
        return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "ring":
        d2 = dy * dy + dx * dx
        return (d2 <= r * r) & (d2 >= (0.5 * r) ** 2)
    if shape == "cross":
        return ((np.abs(dy) <= r) & (np.abs(dx) <= r * 0.35)) | \
               ((np.abs(dx) <= r) & (np.abs(dy) <= r * 0.35))
    raise ValueError(shape)


# --------------------------------------------------------------------------------------------
# One video


def generate_video(index: int, cfg: SynthConfig):
    """Render video `index`: returns (frames uint8 (N, H, W, 3), audio float32 (S,), meta)."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, index]))
    W, H, fps, sr = cfg.width, cfg.height, cfg.fps, cfg.sample_rate
    n_frames = max(1, int(round(rng.uniform(cfg.min_duration, cfg.max_duration) * fps)))
    duration = n_frames / fps
    # The floor and the sounding objects stay inside the central part of the frame, so that
    # a training crop (up to 12.5 % off each side) never hides the impacts the audio holds:
    # with objects anywhere in a 160x128 frame, a 48-px crop of the 56-px prepared video left
    # a third of them out of view and sync did not learn.
    floor_y = H * 0.80          # the floor line; objects' bottoms touch it at impacts
    top_y = H * 0.12
    x_lo, x_hi = 0.12 * W, 0.88 * W

    kinds = list(rng.choice(list(KINDS), size=int(rng.integers(cfg.min_objects,
                                                                 cfg.max_objects + 1)),
                            replace=False))
    objects, impacts, taken = [], [], []
    for j, kind in enumerate(kinds):
        r = rng.uniform(0.08, 0.11) * H
        times = _impact_times(rng, duration, cfg, taken)
        taken += times
        x0 = rng.uniform(x_lo + r, x_hi - r)
        vx = rng.choice([-1, 1]) * rng.uniform(0.05, 0.25) * W
        objects.append(dict(kind=kind, shape=KINDS[kind][0], colour=KINDS[kind][1], r=r,
                            y=_bounce_path(times, rng, floor_y, top_y + r), x0=x0, vx=vx))
        impacts += [Impact(t, j, kind, float(rng.uniform(0.6, 1.0))) for t in times if t < duration]
    impacts.sort(key=lambda e: e.t)

    distractors = []
    for _ in range(int(rng.integers(0, cfg.max_distractors + 1))):
        r = rng.uniform(0.05, 0.09) * H
        distractors.append(dict(shape=str(rng.choice(list(s for s, _ in KINDS.values()))),
                                colour=DISTRACTOR_COLOURS[int(rng.integers(len(DISTRACTOR_COLOURS)))],
                                r=r, x0=rng.uniform(r, W - r), y0=rng.uniform(top_y + r, floor_y * 0.7),
                                vx=rng.uniform(-0.3, 0.3) * W, vy=rng.uniform(-0.3, 0.3) * H))

    # Background: a vertical gradient in a random dark tone, a static texture, the floor band.
    base = rng.uniform(20, 70, size=3)
    grad = np.linspace(0.7, 1.2, H)[:, None, None] * base[None, None, :]
    bg = np.broadcast_to(grad, (H, W, 3)) + rng.normal(0, 4, size=(H, W, 3))
    bg[int(round(floor_y)):] = rng.uniform(80, 120, size=3)
    bg = np.clip(bg, 0, 255)

    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32) + 0.5

    def draw(img, shape, cy, cx, r, colour):
        # every shape lies within r of its centre: test only the pixels of that box (the
        # same comparisons on the same pixel centres as over the whole frame, ~15x fewer)
        y0, y1 = max(0, int(np.floor(cy - r)) - 1), min(H, int(np.ceil(cy + r)) + 1)
        x0, x1 = max(0, int(np.floor(cx - r)) - 1), min(W, int(np.ceil(cx + r)) + 1)
        if y1 > y0 and x1 > x0:
            box = img[y0:y1, x0:x1]
            box[_shape_mask(shape, yy[y0:y1, x0:x1], xx[y0:y1, x0:x1], cy, cx, r)] = colour

    frames = np.empty((n_frames, H, W, 3), np.uint8)
    for k in range(n_frames):
        t = k / fps
        img = bg.copy()
        for d in distractors:  # drawn first: sounding objects pass in front of them
            cx = _triangle(d["x0"], d["vx"], d["r"], W - d["r"], t)
            cy = _triangle(d["y0"], d["vy"], top_y + d["r"], floor_y * 0.75, t)
            draw(img, d["shape"], cy, cx, d["r"], d["colour"])
        for o in objects:
            cx = _triangle(o["x0"], o["vx"], x_lo + o["r"], x_hi - o["r"], t)
            cy = float(o["y"](t)) - o["r"]  # bottom on the floor at an impact
            draw(img, o["shape"], cy, cx, o["r"], o["colour"])
        frames[k] = img.astype(np.uint8)

    n_samples = int(round(duration * sr))
    level = rng.uniform(*cfg.noise_db)
    audio = background(n_samples, sr, level, rng)
    for e in impacts:
        s = impact_sound(e.kind, sr, rng) * e.gain * 0.8
        i0 = int(round(e.t * sr))
        i1 = min(n_samples, i0 + len(s))
        audio[i0:i1] += s[: i1 - i0]
    peak = np.abs(audio).max()
    if peak > 0.95:
        audio *= 0.95 / peak

    label = "+".join(sorted(kinds))
    meta = dict(
        index=index, seed=cfg.seed, label=label, kinds=sorted(kinds), fps=fps,
        num_frames=n_frames, duration=duration, sample_rate=sr, noise_db=round(level, 2),
        width=W, height=H, floor_y=floor_y,
        objects=[dict(kind=o["kind"], shape=o["shape"], colour=list(o["colour"]),
                      radius=round(o["r"], 2)) for o in objects],
        distractors=[dict(shape=d["shape"], colour=list(d["colour"])) for d in distractors],
        events=[dict(t=round(e.t, 6), object=e.obj, kind=e.kind, frame=int(round(e.t * fps)))
                for e in impacts],
    )
    return frames, audio, meta


def encode(path: Path, frames: np.ndarray, audio: np.ndarray, fps: float, sr: int, codec: str):
    """Write a real media file: webm VP9 + Opus, mp4 H.264 + AAC, or mkv MJPEG + 16-bit PCM.
    Single-threaded codecs, so that the same input gives the same bytes.

    mjpeg is a source for `prepare` rather than a training format: JPEG at a fine quantiser (as
    close to the rendering as the VP9 files: tested) and the exact samples, several times
    cheaper to write and to read than VP9 + Opus; the CPU demo's sets are made this way and
    prepared to VP9."""
    import av

    rate = Fraction(fps).limit_denominator(100000)
    with av.open(str(path), "w", options={"fflags": "+bitexact"}) as c:
        if codec == "vp9":
            vs = c.add_stream("libvpx-vp9", rate=rate, options={
                "deadline": "realtime", "cpu-used": "8", "crf": "30", "b": "0",
                "lag-in-frames": "0", "threads": "1"})
            as_ = c.add_stream("libopus", rate=48000 if sr not in (8000, 12000, 16000, 24000) else sr,
                               layout="mono", options={"b": "96000"})
        elif codec == "mjpeg":
            vs = c.add_stream("mjpeg", rate=rate, options={"threads": "1"})
            # quantiser 3: 33.4 -> 32.7 dB against the rendering (4:2:0 chroma is most of the
            # error either way), half the encoding time of quantiser 1
            vs.codec_context.qmin = vs.codec_context.qmax = 3
            as_ = c.add_stream("pcm_s16le", rate=sr, layout="mono")
        elif codec == "h264":
            vs = c.add_stream("libx264", rate=rate, options={
                "preset": "veryfast", "crf": "18", "threads": "1", "bf": "0"})
            as_ = c.add_stream("aac", rate=sr, layout="mono", options={"b": "128000"})
        else:
            raise ValueError(f"synth: unknown codec {codec!r}; use vp9, h264 or mjpeg")
        vs.width, vs.height = frames.shape[2], frames.shape[1]
        vs.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        vs.codec_context.gop_size = 25
        vs.codec_context.flags |= av.codec.context.Flags.bitexact
        if codec == "mjpeg":
            # converted through one scaler context (the encoder would set one up per frame):
            # a quarter of the encoding time
            from .dataset import reformatter
            rf = reformatter()
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            if codec == "mjpeg":
                vf = rf.reformat(vf, format="yuvj420p")
            vf.pts = i
            vf.time_base = 1 / rate
            for p in vs.encode(vf):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)

        if as_.rate != sr:  # Opus only takes 48 kHz and a few divisors of it
            resampler = av.AudioResampler(format="flt", layout="mono", rate=as_.rate)
        else:
            resampler = None
        chunk = 960 if codec == "vp9" else 1024
        if codec == "mjpeg":   # PCM: the samples themselves, rounded to 16 bits
            pcm = np.round(np.clip(audio, -1.0, 32767 / 32768) * 32768).astype(np.int16)
            for i in range(0, len(pcm), chunk):
                fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[None, i:i + chunk]),
                                                format="s16", layout="mono")
                fr.sample_rate = sr
                fr.pts = i
                fr.time_base = Fraction(1, sr)
                for p in as_.encode(fr):
                    c.mux(p)
            for p in as_.encode():
                c.mux(p)
            return
        if resampler is not None:
            frame = av.AudioFrame.from_ndarray(audio[None, :], format="flt", layout="mono")
            frame.sample_rate = sr
            frame.pts = 0
            data = np.concatenate([f.to_ndarray()[0] for f in resampler.resample(frame)] +
                                  [f.to_ndarray()[0] for f in resampler.resample(None)])
        else:
            data = audio
        for i in range(0, len(data), chunk):
            fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(data[None, i:i + chunk]),
                                            format="flt", layout="mono")
            fr.sample_rate = as_.rate
            fr.pts = i
            fr.time_base = Fraction(1, as_.rate)
            for p in as_.encode(fr):
                c.mux(p)
        for p in as_.encode():
            c.mux(p)


EXTENSION = {"vp9": "webm", "h264": "mp4", "mjpeg": "mkv"}


def video_name(index: int) -> str:
    return f"synth_{index:06d}"


def _make_one(args):
    index, cfg_dict, out = args
    cfg = SynthConfig(**cfg_dict)
    ext = EXTENSION[cfg.codec]
    name = video_name(index)
    final = Path(out) / f"{name}.{ext}"
    sidecar = Path(out) / f"{name}.json"
    if final.exists() and sidecar.exists():
        return name, "skipped"
    frames, audio, meta = generate_video(index, cfg)
    meta["id"] = name
    meta["file"] = final.name
    tmp = final.with_name(f".{final.name}.part{os.getpid()}{final.suffix}")
    encode(tmp, frames, audio, cfg.fps, cfg.sample_rate, cfg.codec)
    os.replace(tmp, final)  # a file under its final name is complete
    tmp_json = sidecar.with_name(f".{sidecar.name}.part")
    tmp_json.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_json, sidecar)
    return name, "made"


def synthesize(out: str | os.PathLike, cfg: Config, progress: bool = True) -> dict:
    """Generate cfg.synth.videos videos into `out` (resumes: complete files are kept)."""
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml", header=f"# resolved config of: fastavts synth {out}")
    for stale in out.glob(".synth_*.part*"):  # left by an interrupted run
        stale.unlink()
    s = cfg.synth
    workers = s.workers or os.cpu_count() or 1
    jobs = [(i, asdict(s), str(out)) for i in range(s.videos)]
    t0 = time.time()
    made = skipped = 0
    bar = tqdm(total=len(jobs), desc="synth", unit="video", disable=not progress)
    if workers == 1:
        results = map(_make_one, jobs)
        for _, status in results:
            made += status == "made"
            skipped += status == "skipped"
            bar.update()
    else:
        import multiprocessing as mp

        from ..runtime import die_with_parent
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                 initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
            for _, status in pool.map(_make_one, jobs, chunksize=1):
                made += status == "made"
                skipped += status == "skipped"
                bar.update()
    bar.close()
    return dict(out=str(out), videos=s.videos, made=made, skipped=skipped,
                wall_s=round(time.time() - t0, 2), codec=s.codec)
