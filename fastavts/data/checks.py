"""Settings that are valid on their own but impossible for the prepared data at hand, found
before anything trains: a crop larger than the prepared frames, a clip longer than every
video, a sample rate or frame rate other than the one the set was prepared at, hard negatives
shifted further than any video allows. Each is a ConfigError naming the key, the data and
what to do (exit code 2); a setting that only some videos cannot honour is a warning.
"""
from __future__ import annotations

from pathlib import Path

from ..config import Config, ConfigError


def check_dataset(cfg: Config, root: str | Path, key: str = "train.data",
                  videos: list[dict] | None = None, sample_rate: int | None = None) -> list[str]:
    """Raise ConfigError for settings no video of the set can honour; return warnings."""
    if videos is None:
        from .dataset import Dataset
        try:
            ds = Dataset.open(root)
        except FileNotFoundError as e:
            raise ConfigError(f"{key}={root}: {e}") from None
        videos, sample_rate = ds.videos, ds.sample_rate
    if not videos:
        raise ConfigError(f"{key}={root} holds no usable videos (see its rejected.jsonl); "
                          f"prepare videos with sound into it")
    d, sm = cfg.data, cfg.sampler
    warnings: list[str] = []
    side = min(min(v["height"], v["width"]) for v in videos)
    if d.crop > side:
        raise ConfigError(
            f"data.crop={d.crop} is larger than the prepared frames of {key}={root} (the "
            f"smallest is {side} px on its short side, from prepare.short_side): use "
            f"data.crop<={side}, or prepare the videos again with prepare.short_side>={d.crop}")
    if sample_rate is not None and int(sample_rate) != d.sample_rate:
        raise ConfigError(
            f"data.sample_rate={d.sample_rate} but {key}={root} was prepared at {sample_rate} "
            f"Hz: use data.sample_rate={sample_rate}, or prepare again with this rate")
    rates = sorted({round(float(v["fps"]), 3) for v in videos})
    if all(abs(r - d.fps) > 1e-3 for r in rates):
        raise ConfigError(
            f"data.fps={d.fps} but {key}={root} was prepared at {', '.join(map(str, rates))} "
            f"fps: use data.fps={rates[0]:g}, or prepare again with data.fps={d.fps:g}")
    window = d.clip_frames * d.frame_stride / d.fps
    longest = max(v["duration"] for v in videos)
    if window > longest:
        raise ConfigError(
            f"a clip spans {window:.2f} s (data.clip_frames={d.clip_frames} x "
            f"data.frame_stride={d.frame_stride} at {d.fps:g} fps) but the longest video of "
            f"{key}={root} lasts {longest:.2f} s: lower data.clip_frames or data.frame_stride")
    if key != "train.data":
        return warnings
    hard_wanted = (max(s for _, s in sm.curriculum) > 0 if sm.curriculum else False) or (
        sm.pairs == "inbatch" and sm.k > 0 and sm.hard_share_as == "loss_weight")
    if hard_wanted:
        room = [_audio_room(v, window) for v in videos]
        able = sum(r >= sm.hard_min_shift for r in room)
        if able == 0:
            raise ConfigError(
                f"sampler.hard_min_shift={sm.hard_min_shift} s: no video of {key}={root} "
                f"leaves room for a hard negative that far from its clip (the most any allows "
                f"is {max(room):.2f} s with {window:.2f}-s windows), so every hard negative "
                f"would silently become an easy one: use sampler.hard_min_shift<="
                f"{max(room):.2f}, or a curriculum without hard negatives")
        if able < len(videos) / 2:
            warnings.append(
                f"sampler.hard_min_shift={sm.hard_min_shift} s: only {able} of {len(videos)} "
                f"videos of {key} leave room for it; hard negatives of the others become easy "
                f"ones (counted as fallback_easy)")
    return warnings


def _audio_room(v: dict, window: float) -> float:
    """How far apart two audio windows of a video can start (both inside video and sound)."""
    lo = max(0.0, v["audio_start"])
    hi = min(v["duration"], v["audio_start"] + v["audio_duration"]) - window
    if hi < lo:
        lo, hi = 0.0, max(0.0, v["duration"] - window)
    return hi - lo
