"""Decoded frames per delivered frame (fastavts/data/decode_cost.py): the model against
hand-worked clips, against what PyAV really decodes on a prepared set, and as every loader
reports it."""
from __future__ import annotations

import types

import numpy as np
import pytest

from fastavts.data.dataset import Dataset
from fastavts.data.decode_cost import clip_decoded_frames, keyframe_interval
from fastavts.data.loader import make_loader

from conftest import small_cfg

GEOMETRY = types.SimpleNamespace(clip_frames=16, frame_stride=2)


def test_hand_worked_clips():
    """16 frames every 2nd span 31 frames; the reader starts at the keyframe at or before the
    first (a grid of 16 from each segment's start)."""
    videos = [{"segments": [{"start_frame": 0}, {"start_frame": 96}]}]
    plan = dict(clip_video=[0, 0, 0, 0, 0], clip_segment=[0, 0, 0, 0, 1],
                clip_frame=[0, 5, 20, 47, 100])
    got = clip_decoded_frames(plan, videos, GEOMETRY, 16).tolist()
    assert got == [31, 36, 35, 46, 35]
    # starts spread evenly over the grid: 31 + 7.5 on average, 2.41 per frame delivered
    plan = dict(clip_video=[0] * 64, clip_segment=[0] * 64, clip_frame=list(range(64)))
    mean = clip_decoded_frames(plan, videos[:1], GEOMETRY, 16).mean()
    assert mean == 38.5 and round(mean / 16, 2) == 2.41


def test_the_model_is_what_pyav_decodes(prepared):
    """Every clip of two batches read through Dataset.frames (seek, then decode forward):
    the frames PyAV hands back equal the model's count, clip by clip."""
    cfg = small_cfg("data.clip_frames=8", "data.frame_stride=4", "data.crop=48",
                    "loader.batch_size=4", "sampler.clips_per_video=4")
    loader = make_loader(cfg, prepared, rank=0, world_size=1)
    ds = Dataset.open(prepared)
    K = keyframe_interval(prepared)
    assert K == cfg.prepare.keyframe_interval
    d = cfg.data
    checked = 0
    for b in range(2):
        plan = loader.sampler.plan(0, b)
        want = clip_decoded_frames(plan, loader.sampler.videos, d, K)
        for i, (vi, first) in enumerate(zip(plan["clip_video"], plan["clip_frame"])):
            v = loader.sampler.videos[int(vi)]
            before = ds.decoded_frames
            ds.frames(v["id"], int(first) + d.frame_stride * np.arange(d.clip_frames))
            assert ds.decoded_frames - before == want[i], (v["id"], int(first))
            checked += 1
    loader.close()
    assert checked == 8


@pytest.mark.parametrize("kind", ["pyav", "memory", "dali"])
def test_every_loader_reports_its_decoding(prepared, kind):
    cfg = small_cfg("data.clip_frames=8", "data.frame_stride=4", "data.crop=48",
                    "loader.batch_size=4", "sampler.clips_per_video=4", f"loader.kind={kind}",
                    "loader.workers=0", "loader.device=cpu")
    loader = make_loader(cfg, prepared, rank=0, world_size=1)
    n = 0
    for _ in loader.epoch(0):
        n += 1
        if n == 3:
            break
    loader.close()
    delivered = 3 * 4 * 8
    assert loader.decode_count.delivered == delivered
    if kind == "memory":   # each video decoded once, whole
        held = sum(v["num_frames"] for v in loader.sampler.videos)
        assert loader.decode_count.decoded == held
    else:                  # the seeking reader's count, clip by clip, worked out here
        K = keyframe_interval(prepared)
        total = 0
        for b in range(3):
            plan = loader.sampler.plan(0, b)
            for vi, s, f in zip(plan["clip_video"], plan["clip_segment"], plan["clip_frame"]):
                start = loader.sampler.videos[int(vi)]["segments"][int(s)]["start_frame"]
                total += (int(f) - start) % K + 7 * 4 + 1
        assert loader.decode_count.decoded == total
    assert loader.decode_count.ratio == round(loader.decode_count.decoded / delivered, 4)
