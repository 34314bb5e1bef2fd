"""Decoded frames per delivered frame (fastavts/data/decode_cost.py): the model against
hand-worked clips, against what PyAV really decodes on a prepared set, and as every loader
reports it."""
from __future__ import annotations

import types

import numpy as np
import pytest

from fastavts.data.dataset import Dataset
from fastavts.data.decode_cost import (
    clip_decoded_frames,
    decode_runs,
    keyframe_interval,
    plan_decoded_frames,
    runs_decoded_frames,
)
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
    elif kind == "pyav":   # what PyAV really decoded (workers=0: the Dataset is in reach)
        assert loader.decode_count.decoded == loader._dl.dataset._local.ds.decoded_frames
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


def test_hand_worked_shared_passes():
    """A video's clips read together: one pass where decoding on is cheaper than a seek that
    skips fewer than 4 frames, a new pass (from its keyframe) where the seek skips more."""
    def clip(first, n=16, stride=2):
        return set(range(first, first + n * stride, stride))

    def cost(frames, start=0, k=16):
        runs = decode_runs(sorted(frames), start, k)
        return [r[0] for r in runs], runs_decoded_frames(runs, start, k)

    assert cost(clip(0) | clip(20)) == ([0], 51)        # overlapping spans: their union
    assert cost(clip(0) | clip(80)) == ([0, 80], 62)    # far apart: 31 + 31
    assert cost(clip(0) | clip(52)) == ([0, 52], 66)    # keyframe 48 is 17 past 31: 31 + 35
    assert cost(clip(0) | clip(37)) == ([0], 68)        # keyframe 32 is 1 past 31: decode on
    assert cost(clip(100), start=96) == ([100], 35)     # the grid counts from the segment
    assert cost(clip(3, 8, 4)) == ([3], 32)             # one clip of stride 4 is one pass
    assert cost(clip(0, 4, 8)) == ([0, 16], 9 + 9)      # stride 8 seeks at keyframe 16
    # the GPU preset's geometry: 16 frames, stride 1, a keyframe every 4: 17.5 a clip
    mean = np.mean([cost(clip(f, 16, 1), k=4)[1] for f in range(64)])
    assert mean == 17.5 and mean / 16 <= 1.15


def _reference_frames(ds, video_id):
    """Every frame of a video, decoded from the start without a seek (plain PyAV)."""
    import av

    v = ds._video(video_id)
    out = []
    for seg in v["segments"]:
        with av.open(str(ds.root / seg["path"])) as c:
            out += [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(out) == v["num_frames"]
    return np.stack(out)


def test_clips_cut_from_one_pass_equal_clips_decoded_alone(prepared):
    """The PyAV loader reads a batch's clips of one video in shared passes: the clips cut from
    them equal each clip decoded alone and a plain decode of the whole video, pixel for pixel;
    PyAV decodes what plan_decoded_frames(shared=True) says, less than clip by clip."""
    from fastavts.data.features import AudioGeometry
    from fastavts.data.pyav_loader import _clips_by_video, build_batch

    cfg = small_cfg("data.clip_frames=8", "data.frame_stride=4", "data.crop=48",
                    "loader.batch_size=8", "sampler.clips_per_video=4",
                    "sampler.group_clips=true")
    loader = make_loader(cfg, prepared, rank=0, world_size=1)
    videos, d = loader.sampler.videos, cfg.data
    ds, alone = Dataset.open(prepared), Dataset.open(prepared)
    K = keyframe_interval(prepared)
    shared_total = clip_total = groups_of_many = 0
    refs = {}
    for b in range(3):
        plan = loader.sampler.plan(0, b)
        before = ds.decoded_frames
        for vi, clips in _clips_by_video(plan, shared=True):
            vid = videos[vi]["id"]
            idx = [int(plan["clip_frame"][i]) + d.frame_stride * np.arange(d.clip_frames)
                   for i in clips]
            together = ds.frames(vid, np.concatenate(idx))
            ref = refs.setdefault(vid, _reference_frames(ds, vid))
            groups_of_many += len(clips) > 1
            for j in range(len(clips)):
                one = alone.frames(vid, idx[j])
                np.testing.assert_array_equal(together[j * d.clip_frames:(j + 1) * d.clip_frames], one)
                np.testing.assert_array_equal(one, ref[idx[j]])
        assert ds.decoded_frames - before == plan_decoded_frames(plan, videos, d, K, shared=True)
        shared_total += ds.decoded_frames - before
        clip_total += plan_decoded_frames(plan, videos, d, K, shared=False)
    assert groups_of_many >= 3 and shared_total < clip_total
    assert alone.decoded_frames == clip_total

    # and the whole batch: the same tensors from a reader that reads each clip alone
    class OneByOne:
        def __init__(self, ds):
            self.bank, self._ds = ds.bank, ds

        def frames(self, vid, idx):
            return self._ds.frames(vid, idx)

    geo = AudioGeometry(d)
    plan = loader.sampler.plan(0, 1)
    a = build_batch(ds, videos, plan, d, geo)
    b = build_batch(OneByOne(alone), videos, plan, d, geo)
    assert a["video"].shape[0] == 8
    np.testing.assert_array_equal(a["video"].numpy(), b["video"].numpy())
    loader.close()
