"""Decoded frames per delivered frame: what a loader's video decoding costs beyond the frames a
clip needs (issue 25's "count it").

A clip is `data.clip_frames` frames every `data.frame_stride`-th from its first frame. A reader
that seeks (PyAV, DALI's decoder, decord) starts at the keyframe at or before that frame (the
prepared set has one every `prepare.keyframe_interval` frames, counted from each segment's
first frame) and decodes every frame up to the clip's last:

    decoded = (first - keyframe) + (clip_frames - 1) * frame_stride + 1,
    keyframe = first - (first - segment start) mod keyframe_interval

so a clip of 16 frames every 2nd on a 16-frame grid costs 31 + 7.5 = 38.5 frames on average,
2.4 per frame delivered. The in-memory loader decodes each video once, whole: its cost is the
frames it holds, counted. Every loader keeps a DecodeCount; training reports the ratio in its
metrics and bench/bench_data.py in its rows.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

DEFAULT_KEYFRAME_INTERVAL = 16


def keyframe_interval(root: str | Path) -> int:
    """prepare.keyframe_interval of a prepared set (from its config.yaml; the default where a
    set does not say)."""
    import yaml

    try:
        cfg = yaml.safe_load((Path(root) / "config.yaml").read_text()) or {}
        return int(cfg.get("prepare", {}).get("keyframe_interval", DEFAULT_KEYFRAME_INTERVAL))
    except (OSError, ValueError, TypeError, AttributeError):
        return DEFAULT_KEYFRAME_INTERVAL


def clip_decoded_frames(plan: dict, videos: list[dict], data, interval: int) -> np.ndarray:
    """(B,) frames a seeking reader decodes for each clip of `plan` (module docstring)."""
    first = np.asarray(plan["clip_frame"], np.int64)
    if hasattr(videos, "seg_ptr"):   # a VideoTable: the columns, without a record per clip
        rows = videos.seg_ptr[np.asarray(plan["clip_video"], np.int64)] + \
            np.asarray(plan["clip_segment"], np.int64)
        seg_start = videos.seg_start[rows]
    else:
        seg_start = np.array([videos[int(v)]["segments"][int(s)]["start_frame"]
                              for v, s in zip(plan["clip_video"], plan["clip_segment"])],
                             np.int64)
    lead = (first - seg_start) % interval
    return lead + (data.clip_frames - 1) * data.frame_stride + 1


class DecodeCount:
    """Decoded and delivered frames so far."""

    def __init__(self):
        self.decoded = 0
        self.delivered = 0

    def add(self, decoded: int, delivered: int) -> None:
        self.decoded += int(decoded)
        self.delivered += int(delivered)

    @property
    def ratio(self) -> float | None:
        """Decoded frames per delivered frame (None before any delivery)."""
        return round(self.decoded / self.delivered, 4) if self.delivered else None
