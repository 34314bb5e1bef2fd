"""The sampler: which clip, which audio windows, which role each window plays (fastavts.pairs.Role), for every batch.

Host side and cheap (numpy only). A batch's plan is a pure function of
(seed, epoch, batch index, rank, world size), so any process (a DALI worker, a DataLoader
worker, a resumed run) rebuilds exactly the same plan from those numbers alone:

    plan = sampler.plan(epoch, batch)          # dict of small numpy arrays, see Plan below

Epoch: every usable video contributes `clips_per_video` items; the items are permuted with
rng(seed, epoch) and dealt to ranks round-robin (disjoint shards that together cover the epoch).
Train mode drops each rank's tail so all ranks run the same number of equal batches (the
dropped items are counted in `dropped_per_epoch`); eval mode keeps a partial last batch.

Pairs (docs/design.md section 1):
* paired: batch element i is (clip i, audio window i, label). round(B * positive_share)
  positives; each negative is super-hard with probability `superhard_share`, else hard with the
  curriculum's hard share at this step, else easy. With paired_windows=2 each clip brings two
  examples: its aligned window and one negative drawn the same way (M = 2B).
* inbatch: clip i brings its aligned window and `k` more (audio rows i*(1+k) .. i*(1+k)+k);
  every other clip's windows are its easy negatives, formed in the loss. With
  hard_share_as=sample (the paper's curriculum) each extra window is a hard one of its own
  video with the curriculum's share, else a window of another video; with loss_weight all are
  hard and the share travels with the plan for the loss to weigh the hard pairs.
A hard window is shifted by at least `hard_min_shift` and lies inside the video and its sound;
where the video is too short for that, an easy window (another video) takes its place and is
counted in `plan['fallback_easy']`.

Train mode draws random clip starts, crops and flips; eval mode uses fixed, evenly spaced clip
starts, centre crops and no flips.
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict
from operator import itemgetter

import numpy as np

from ..config import ConfigError, DataConfig, SamplerConfig
from ..pairs import ROLE_NAMES, Role, windows_per_clip  # noqa: F401 (re-exported)
from .video_table import VideoTable

# a sampled window's role (fastavts/pairs.py: Role), as plain ints for numpy
POSITIVE, EASY, HARD, SUPERHARD = (int(r) for r in Role)
PLAN_CACHE = 64   # plans kept per process (the prefetch depth of every pipeline fits)
KIND_NAMES = ROLE_NAMES   # the name before fastavts.pairs


class Curriculum:
    """Piecewise-constant hard-negative share: [[at, share], ...] sorted by `at`, in epochs,
    steps, or fractions of training (unit 'fraction' needs the total number of steps)."""

    def __init__(self, pieces: Sequence[Sequence[float]], unit: str,
                 total_steps: int | None = None):
        self.pieces = sorted((float(a), float(s)) for a, s in pieces)
        self.unit, self.total_steps = unit, total_steps
        if unit == "fraction" and not total_steps:
            raise ValueError("a curriculum in fractions of training needs the total number of "
                             "steps; pass total_epochs to the Sampler")

    def share(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        x = {"epoch": epoch, "step": step,
             "fraction": step / self.total_steps if self.total_steps else 0.0}[self.unit]
        out = 0.0  # before the first piece: easy negatives only
        for at, s in self.pieces:
            if at <= x + 1e-12:
                out = s
        return out


class Sampler:
    def __init__(self, videos: list[dict], data: DataConfig, cfg: SamplerConfig,
                 batch_size: int, *, mode: str = "train", rank: int = 0, world_size: int = 1,
                 total_epochs: int = 1, frame_size: tuple[int, int] | None = None):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.data, self.cfg, self.mode = data, cfg, mode
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.clip_span = data.clip_frames * data.frame_stride   # frames a clip's window covers
        self.window_s = self.clip_span / data.fps               # 1.28 s by default
        self.crop = data.crop
        # columns, not dicts: every worker process receives the sampler (video_table.py)
        self.videos, self.skipped = _usable_videos(videos, self.clip_span, self.window_s)
        if len(self.videos) < 2:
            raise ConfigError(f"the sampler needs at least 2 usable videos (easy negatives come "
                             f"from other videos), got {len(self.videos)} of {len(videos)}")
        self.items_per_epoch = len(self.videos) * cfg.clips_per_video
        per_rank = self.items_per_epoch // world_size
        if mode == "train" and cfg.group_clips:   # whole videos are dealt to the ranks
            per_rank = len(self.videos) // world_size * cfg.clips_per_video
        if mode == "train":
            self.batches_per_epoch = per_rank // batch_size
            self.dropped_per_epoch = self.items_per_epoch - self.batches_per_epoch * batch_size * world_size
            if self.batches_per_epoch == 0:
                raise ConfigError(f"{self.items_per_epoch} clips per epoch over {world_size} ranks "
                                 f"do not fill one batch of {batch_size}; lower the batch size "
                                 f"or raise sampler.clips_per_video")
        else:
            longest = -(-self.items_per_epoch // world_size)
            self.batches_per_epoch = -(-longest // batch_size)
            self.dropped_per_epoch = 0
        self.curriculum = Curriculum(cfg.curriculum, cfg.curriculum_unit,
                                     total_steps=total_epochs * self.batches_per_epoch)
        self.epoch, self.next_batch = 0, 0
        self.frame_size = frame_size
        # the epoch's permutation (~2 ms for 240k videos) is kept for the epoch in hand, and the
        # last few plans too: a loader asks for the same plan from its sources and for the
        # batch's bookkeeping. Both are pure functions of their keys, so caching is exact; the
        # lock covers DALI's source threads.
        self._lock = threading.Lock()
        self._shard_key = self._shard = None
        self._plans: OrderedDict = OrderedDict()

    # ---------------------------------------------------------------------------------------
    # per-video geometry

    def audio_range(self, v: dict) -> tuple[float, float]:
        """[lo, hi] of audio window starts inside both the video and its sound."""
        lo = max(0.0, v["audio_start"])
        hi = min(v["duration"], v["audio_start"] + v["audio_duration"]) - self.window_s
        if hi < lo:  # sound shorter than a window: anywhere in the video
            lo, hi = 0.0, max(0.0, v["duration"] - self.window_s)
        return lo, hi

    def _audio_range_of(self, vi: int) -> tuple[float, float]:
        """audio_range of video vi, from the columns where the videos are a VideoTable."""
        t = self.videos
        if not hasattr(t, "rng_ptr"):
            return self.audio_range(t[vi])
        start, dur = float(t.audio_start[vi]), float(t.duration[vi])
        lo = max(0.0, start)   # audio_range's arithmetic, on the columns' floats
        hi = min(dur, start + float(t.audio_duration[vi])) - self.window_s
        if hi < lo:
            lo, hi = 0.0, max(0.0, dur - self.window_s)
        return lo, hi

    # ---------------------------------------------------------------------------------------
    # epochs and shards

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.cfg.seed, *key]))

    @property
    def grouped(self) -> bool:
        return self.mode == "train" and self.cfg.group_clips and self.cfg.clips_per_video > 1

    def epoch_items(self, epoch: int) -> np.ndarray:
        """All items of the epoch in order (item = video_index * clips_per_video + clip);
        grouped (sampler.group_clips): the videos permuted, each video's clips together."""
        n = self.items_per_epoch
        if self.mode == "eval":
            return np.arange(n)
        if self.grouped:
            cpv = self.cfg.clips_per_video
            videos = self._rng(epoch, 0).permutation(n // cpv)
            return (videos[:, None] * cpv + np.arange(cpv)).reshape(-1)
        return self._rng(epoch, 0).permutation(n)

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's items of the epoch, in order (computed once per epoch); grouped, the
        ranks are dealt whole videos."""
        with self._lock:
            if self._shard_key != epoch:
                items = self.epoch_items(epoch)
                if self.grouped:
                    cpv = self.cfg.clips_per_video
                    shard = items.reshape(-1, cpv)[self.rank::self.world_size].reshape(-1)
                else:
                    shard = items[self.rank::self.world_size]
                self._shard_key, self._shard = epoch, shard
            return self._shard

    def __len__(self) -> int:
        return self.batches_per_epoch

    # ---------------------------------------------------------------------------------------
    # plans

    def hard_share(self, epoch: int, batch: int) -> float:
        return self.curriculum.share(epoch, epoch * self.batches_per_epoch + batch,
                                     self.batches_per_epoch)

    def plan(self, epoch: int, batch: int) -> dict:
        """The plan of batch `batch` of `epoch` on this rank (see the module docstring).

        Arrays: clip_video, clip_frame, clip_segment, clip_t0, crop_y, crop_x, flip (B,);
        audio_video, audio_t0, audio_owner, role, label (M,) with M = B (paired) or B(1+k)."""
        if not 0 <= batch < self.batches_per_epoch:
            raise IndexError(f"batch {batch} outside [0, {self.batches_per_epoch})")
        key = (int(epoch), int(batch))
        with self._lock:
            hit = self._plans.get(key)
            if hit is not None:
                self._plans.move_to_end(key)
                return hit
        plan = self._make_plan(*key)
        for v in plan.values():   # shared by every caller: nobody may change it in place
            if isinstance(v, np.ndarray):
                v.flags.writeable = False
        with self._lock:
            self._plans[key] = plan
            while len(self._plans) > PLAN_CACHE:
                self._plans.popitem(last=False)
        return plan

    def _make_plan(self, epoch: int, batch: int) -> dict:
        items = self.shard(epoch)[batch * self.batch_size:(batch + 1) * self.batch_size]
        B = len(items)
        gbatch = batch * self.world_size + self.rank  # unique id of this batch in the epoch
        rng = self._rng(epoch, 1, gbatch)
        share = self.hard_share(epoch, batch)
        cpv = self.cfg.clips_per_video

        clip_video = (items // cpv).astype(np.int64)
        clip_frame = np.empty(B, np.int64)
        clip_segment = np.empty(B, np.int64)
        crop_y = np.empty(B, np.int64)
        crop_x = np.empty(B, np.int64)
        flip = np.zeros(B, bool)
        tab = self.videos if hasattr(self.videos, "rng_ptr") else None   # a VideoTable
        if tab is not None:   # the batch's rows of the columns, as Python ints, at once
            r0, r1 = tab.rng_ptr[clip_video].tolist(), tab.rng_ptr[clip_video + 1].tolist()
            s0, s1 = tab.seg_ptr[clip_video].tolist(), tab.seg_ptr[clip_video + 1].tolist()
            hw = (np.stack([tab.height[clip_video], tab.width[clip_video]], 1).tolist()
                  if self.frame_size is None else [self.frame_size] * B)
        which = (items % cpv).tolist()
        for i, vi in enumerate(clip_video.tolist()):
            if tab is not None:   # the columns read directly (a plan in well under 1 ms)
                if r1[i] - r0[i] == 1:   # one range (most videos): _start_in, without arrays
                    lo, hi = int(tab.rng_lo[r0[i]]), int(tab.rng_hi[r0[i]])
                    n = hi - lo + 1
                    f = lo + (int(rng.integers(0, n)) if self.mode == "train"
                              else int((which[i] + 0.5) * n / cpv))
                else:
                    f = _start_in(tab.rng_lo[r0[i]:r1[i]], tab.rng_hi[r0[i]:r1[i]], which[i],
                                  cpv, self.mode, rng)
                clip_frame[i] = f
                clip_segment[i] = 0 if s1[i] - s0[i] == 1 else _segment_in(
                    tab.seg_start[s0[i]:s1[i]], tab.seg_frames[s0[i]:s1[i]], f, tab, vi)
                h, w = hw[i]
            else:
                v = self.videos[vi]
                clip_frame[i] = self._clip_start(v, which[i], rng)
                clip_segment[i] = _segment_of(v, clip_frame[i])
                h, w = self.frame_size or (v["height"], v["width"])
            if h < self.crop or w < self.crop:
                raise ValueError(f"video {self.videos[vi]['id']} is {w}x{h}, smaller than "
                                 f"data.crop={self.crop}; prepare with a larger short side")
            if self.mode == "train":
                crop_y[i], crop_x[i] = rng.integers(0, h - self.crop + 1), rng.integers(0, w - self.crop + 1)
                flip[i] = self.data.flip and rng.random() < 0.5
            else:
                crop_y[i], crop_x[i] = (h - self.crop) // 2, (w - self.crop) // 2
        fps = (tab.fps[clip_video] if tab is not None
               else np.array([self.videos[vi]["fps"] for vi in clip_video]))
        clip_t0 = clip_frame / fps

        fallback = 0
        a_video, a_t0, a_owner, role = [], [], [], []
        if self.cfg.pairs == "paired" and self.cfg.paired_windows == 2:
            # each clip: its aligned window, then one negative drawn as below
            u = rng.random(B)
            roles = np.where(u < self.cfg.superhard_share, SUPERHARD,
                             np.where(u < self.cfg.superhard_share
                                      + (1 - self.cfg.superhard_share) * share, HARD, EASY))
            for i in range(B):
                for want in (POSITIVE, int(roles[i])):
                    vid, t, k = self._window(int(clip_video[i]), float(clip_t0[i]), want, rng)
                    fallback += k != want
                    a_video.append(vid)
                    a_t0.append(t)
                    a_owner.append(i)
                    role.append(k)
        elif self.cfg.pairs == "paired":
            n_pos = int(round(B * self.cfg.positive_share))
            roles = np.zeros(B, np.int64)
            neg = rng.permutation(B)[n_pos:]
            u = rng.random(len(neg))
            roles[neg] = np.where(u < self.cfg.superhard_share, SUPERHARD,
                                  np.where(u < self.cfg.superhard_share + (1 - self.cfg.superhard_share) * share,
                                           HARD, EASY))
            for i in range(B):
                vid, t, k = self._window(int(clip_video[i]), float(clip_t0[i]), int(roles[i]), rng)
                fallback += k != roles[i]
                a_video.append(vid)
                a_t0.append(t)
                a_owner.append(i)
                role.append(k)
        else:
            # hard_share_as=sample: each extra window is hard with the curriculum's share, else
            # a window of another video; loss_weight: all hard (the loss weighs them)
            p_hard = share if self.cfg.hard_share_as == "sample" else 1.0
            for i in range(B):
                wants = [POSITIVE] + [HARD if p_hard >= 1 or (p_hard > 0 and rng.random() < p_hard)
                                      else EASY for _ in range(self.cfg.k)]
                for want in wants:
                    vid, t, k = self._window(int(clip_video[i]), float(clip_t0[i]), want, rng)
                    fallback += k != want
                    a_video.append(vid)
                    a_t0.append(t)
                    a_owner.append(i)
                    role.append(k)
        role = np.asarray(role, np.int8)
        return dict(
            epoch=epoch, batch=batch, rank=self.rank, hard_share=share, mode=self.mode,
            pairs=self.cfg.pairs, fallback_easy=int(fallback),
            clip_video=clip_video, clip_frame=clip_frame, clip_segment=clip_segment,
            clip_t0=clip_t0.astype(np.float64), crop_y=crop_y, crop_x=crop_x, flip=flip,
            audio_video=np.asarray(a_video, np.int64), audio_t0=np.asarray(a_t0, np.float64),
            audio_owner=np.asarray(a_owner, np.int64), role=role,
            label=(role == POSITIVE).astype(np.int64),
        )

    def _clip_start(self, v: dict, clip: int, rng) -> int:
        ranges = v["_ranges"]
        return _start_in(np.array([r[0] for r in ranges]), np.array([r[1] for r in ranges]),
                         clip, self.cfg.clips_per_video, self.mode, rng)

    def _window(self, vi: int, t0: float, want: int, rng) -> tuple[int, float, int]:
        """(video index, start time, role) of an audio window of role `want` for the clip of
        video vi starting at t0; hard roles fall back to easy where they cannot fit."""
        if want == POSITIVE:
            return vi, t0, POSITIVE
        if want in (HARD, SUPERHARD):
            lo, hi = self._audio_range_of(vi)
            if want == HARD:
                near, far = self.cfg.hard_min_shift, np.inf
            else:
                near, far = self.cfg.superhard_min_shift, self.cfg.hard_min_shift
            # starts t with near <= |t - t0| < far, inside [lo, hi]
            pieces = [(max(lo, t0 - far + 1e-9), min(hi, t0 - near)),
                      (max(lo, t0 + near), min(hi, t0 + far - 1e-9))]
            pieces = [(a, b) for a, b in pieces if b >= a]
            if pieces:
                lens = np.array([b - a for a, b in pieces]) + 1e-12
                a, b = pieces[int(rng.choice(len(pieces), p=lens / lens.sum()))]
                t = a + (b - a) * rng.random() if self.mode == "train" else (a + b) / 2
                t = round(t * self.data.sample_rate) / self.data.sample_rate  # on the sample grid
                if near <= abs(t - t0) < far:
                    return vi, t, want
        # easy: another video, a window inside it
        n = len(self.videos)
        other = int(rng.integers(0, n - 1))
        other += other >= vi
        lo, hi = self._audio_range_of(other)
        t = lo + (hi - lo) * rng.random() if self.mode == "train" else (lo + hi) / 2
        t = round(t * self.data.sample_rate) / self.data.sample_rate
        return other, t, EASY

    # ---------------------------------------------------------------------------------------
    # iteration and resume

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.next_batch = epoch, 0

    def __getstate__(self):  # pickled into DALI's and DataLoader's worker processes
        s = dict(self.__dict__)
        s["_lock"], s["_shard_key"], s["_shard"], s["_plans"] = None, None, None, OrderedDict()
        return s

    def __setstate__(self, s):
        self.__dict__.update(s)
        self._lock = threading.Lock()

    def __iter__(self):
        """Plans from the current position to the end of the epoch; the position advances as
        plans are taken, so state_dict() mid-epoch resumes at the next one."""
        while self.next_batch < self.batches_per_epoch:
            b = self.next_batch
            self.next_batch += 1
            yield self.plan(self.epoch, b)

    def fingerprint(self) -> str:
        """What must match for a saved position to mean the same batches."""
        key = dict(sampler=asdict(self.cfg), data=asdict(self.data), batch=self.batch_size,
                   mode=self.mode, world=self.world_size, rank=self.rank,
                   videos=[v["id"] for v in self.videos])
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def state_dict(self) -> dict:
        return dict(epoch=self.epoch, next_batch=self.next_batch, fingerprint=self.fingerprint())

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.fingerprint():
            raise ConfigError("the saved sampler position belongs to another dataset, config, batch "
                             "size or world size; resume with the same ones")
        self.epoch, self.next_batch = int(state["epoch"]), int(state["next_batch"])
        if self.next_batch >= self.batches_per_epoch:
            # saved right after an epoch's last batch: the next batch is the next epoch's first
            self.epoch, self.next_batch = self.epoch + 1, 0


def _usable_videos(videos: list[dict], clip_span: int, window_s: float
                   ) -> tuple[VideoTable, list[str]]:
    """The videos that hold a clip, as a VideoTable in id order (not manifest order: prepare
    appends rows as its workers finish, so the manifest order of the same inputs varies with
    the load; plans must not), with their clip ranges; and the ids of the others, in id order.

    A video's clip ranges are, per segment, the inclusive range of start frames whose
    `clip_span` frames stay in the segment, narrowed to the starts whose audio window of
    `window_s` seconds lies inside the recorded sound (flagged True); where no segment has
    such a start, the segments' whole ranges (flagged False: the window is padded). Computed
    for all segments at once (2M videos in well under a second)."""
    ids = list(map(itemgetter("id"), videos))
    t = VideoTable(list(map(videos.__getitem__, sorted(range(len(ids)), key=ids.__getitem__))))
    del ids
    n = len(t)
    owner = np.repeat(np.arange(n, dtype=np.int64), np.diff(t.seg_ptr))
    fps = t.fps[owner]
    a_lo = np.maximum(0.0, t.audio_start)[owner]
    a_hi = (np.minimum(t.duration, t.audio_start + t.audio_duration) - window_s)[owner]
    lo = t.seg_start
    hi = t.seg_start + t.seg_frames - clip_span
    fits = hi >= lo
    f_lo = np.maximum(lo, np.ceil(a_lo * fps - 1e-6).astype(np.int64))
    f_hi = np.minimum(hi, np.floor(a_hi * fps + 1e-6).astype(np.int64))
    sound = fits & (f_lo <= f_hi)
    any_sound = np.bincount(owner[sound], minlength=n) > 0
    keep = fits & (sound | ~any_sound[owner])
    per_video = np.bincount(owner[keep], minlength=n)
    t.set_ranges(np.where(sound, f_lo, lo)[keep], np.where(sound, f_hi, hi)[keep], sound[keep],
                 np.concatenate([[0], per_video.cumsum()]))
    usable = per_video > 0
    if usable.all():
        return t, []
    return t.take(np.flatnonzero(usable)), [t.ids[int(i)] for i in np.flatnonzero(~usable)]


def _start_in(lo: np.ndarray, hi: np.ndarray, clip: int, clips_per_video: int, mode: str,
              rng) -> int:
    """A clip's start frame among the ranges [lo, hi]: drawn in training, evenly spaced and
    centred in evaluation."""
    sizes = hi - lo + 1
    total = int(sizes.sum())
    if mode == "train":
        j = int(rng.integers(0, total))
    else:
        j = int((clip + 0.5) * total / clips_per_video)
    for a, n in zip(lo.tolist(), sizes.tolist()):
        if j < n:
            return a + j
        j -= n
    return int(hi[-1])


def _segment_in(starts: np.ndarray, frames: np.ndarray, frame: int, table, vi: int) -> int:
    for j, (a, n) in enumerate(zip(starts.tolist(), frames.tolist())):
        if a <= frame < a + n:
            return j
    raise ValueError(f"frame {frame} is outside video {table.ids[vi]}")


def _segment_of(v: dict, frame: int) -> int:
    for j, s in enumerate(v["segments"]):
        if s["start_frame"] <= frame < s["start_frame"] + s["num_frames"]:
            return j
    raise ValueError(f"frame {frame} is outside video {v['id']}")
