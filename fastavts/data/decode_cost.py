"""Decoded frames per delivered frame: what a loader's video decoding costs beyond the frames a
clip needs (issue 25's "count it").

A clip is `data.clip_frames` frames every `data.frame_stride`-th from its first frame. A reader
that seeks (PyAV, DALI's decoder, decord) starts at the keyframe at or before that frame (the
prepared set has one every `prepare.keyframe_interval` frames, counted from each segment's
first frame) and decodes every frame up to the clip's last:

    decoded = (first - keyframe) + (clip_frames - 1) * frame_stride + 1,
    keyframe = first - (first - segment start) mod keyframe_interval

so a clip of 16 frames every 2nd on a 16-frame grid costs 31 + 7.5 = 38.5 frames on average,
2.4 per frame delivered. A set prepared at the rate training samples (12.5 fps, stride 1, a
keyframe every 4 frames: the GPU preset) costs 16 + 1.5 = 17.5 frames a clip, 1.09 per frame.

The PyAV reader decodes a batch's clips of one video together (`decode_runs`): their frames
are read in order in one pass, and it seeks again only where the keyframe before the next
wanted frame lies beyond the frames already decoded, so clips whose spans overlap or nearly
touch cost their union (`plan_decoded_frames(shared=True)`).

The in-memory loader decodes each video once, whole: its cost is the frames it holds,
counted. Every loader keeps a DecodeCount; training reports the ratio in its metrics and
bench/bench_data.py in its rows.
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


SEEK_SAVES = 4   # a new pass only where its seek skips at least this many frames


def decode_runs(frames, seg_start: int, interval: int) -> list[list[int]]:
    """The passes a seeking reader makes for the wanted `frames` of one segment (sorted, no
    repeats): a pass starts at the keyframe at or before its first frame and decodes forward.
    A frame starts a new pass where a seek to its keyframe skips at least SEEK_SAVES frames
    that decoding on from the last wanted frame would go through (a seek and the decoder's
    restart are not free); else it is reached by decoding on. One clip of stride <= 4 is
    always one pass."""
    runs: list[list[int]] = []
    for f in frames:
        key = f - (f - seg_start) % interval
        if runs and key - (runs[-1][-1] + 1) < SEEK_SAVES:
            runs[-1].append(f)
        else:
            runs.append([f])
    return runs


def runs_decoded_frames(runs: list[list[int]], seg_start: int, interval: int) -> int:
    """Frames decoded by the passes of decode_runs: each from its keyframe to its last frame."""
    return sum(r[-1] - (r[0] - (r[0] - seg_start) % interval) + 1 for r in runs)


def plan_decoded_frames(plan: dict, videos, data, interval: int, shared: bool) -> int:
    """Frames a seeking reader decodes for the clips of `plan`: clip by clip
    (clip_decoded_frames), or with `shared` the clips of one video's segment read together in
    the passes of decode_runs (the PyAV reader's way)."""
    if not shared:
        return int(clip_decoded_frames(plan, videos, data, interval).sum())
    table = hasattr(videos, "seg_ptr")
    groups: dict[tuple[int, int], set] = {}
    for vi, si, first in zip(plan["clip_video"], plan["clip_segment"], plan["clip_frame"]):
        groups.setdefault((int(vi), int(si)), set()).update(
            range(int(first), int(first) + data.clip_frames * data.frame_stride,
                  data.frame_stride))
    total = 0
    for (vi, si), frames in groups.items():
        start = int(videos.seg_start[videos.seg_ptr[vi] + si]) if table else \
            int(videos[vi]["segments"][si]["start_frame"])
        total += runs_decoded_frames(decode_runs(sorted(frames), start, interval), start,
                                     interval)
    return total


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
