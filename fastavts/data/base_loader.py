"""What every loader shares: the base class (an epoch of planned batches, exact resume by the
sampler's position, fault bookkeeping), the batch metadata of a plan, the substitution of
clips that cannot be decoded, and this process's rank. The loaders (dali_loader.py,
pyav_loader.py, memory_loader.py, decord_loader.py) build on it; `loader.make_loader` picks
one. Nothing here imports a loader, so nothing imports in a circle.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from ..config import Config
from .dataset import Dataset
from .decode_cost import DecodeCount, keyframe_interval, plan_decoded_frames
from .sampler import Sampler


def substitute(plan: dict, bad: set[int]) -> dict:
    """A copy of `plan` where each clip position in `bad` is replaced by the nearest good
    clip of the batch, with that clip's audio windows (the batch keeps its shape, its pair
    roles stay true). Raises if no clip of the batch is good."""
    B = len(plan["clip_video"])
    good = [i for i in range(B) if i not in bad]
    if not good:
        raise RuntimeError(f"every clip of batch {plan['batch']} (epoch {plan['epoch']}) failed "
                           f"to decode; see the loader's fault report")
    out = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in plan.items()}
    owner = plan["audio_owner"]
    donor = {}
    for i in sorted(bad):
        j = min(good, key=lambda g: ((g - i) % B))
        donor[i] = j
        for key in ("clip_video", "clip_frame", "clip_segment", "clip_t0", "crop_y", "crop_x",
                    "flip"):
            out[key][i] = plan[key][j]
        rows_i, rows_j = np.flatnonzero(owner == i), np.flatnonzero(owner == j)
        for key in ("audio_video", "audio_t0", "role", "label"):
            out[key][rows_i] = plan[key][rows_j]
    out["substituted"] = sorted(bad)
    out["donor"] = donor  # bad position -> the good position copied into it
    return out


def plan_meta(plan: dict) -> dict:
    """The plan's bookkeeping as torch tensors (what the loss and the metrics need)."""
    import torch

    def t(a, dtype):  # a copy: plans are shared, read-only arrays (Sampler.plan caches them)
        return torch.from_numpy(np.array(a, dtype=dtype))

    return dict(
        label=t(plan["label"], np.int64), role=t(plan["role"], np.int64),
        clip_video=t(plan["clip_video"], np.int64), clip_t0=t(plan["clip_t0"], np.float32),
        audio_video=t(plan["audio_video"], np.int64), audio_t0=t(plan["audio_t0"], np.float32),
        audio_owner=t(plan["audio_owner"], np.int64),
        hard_share=float(plan["hard_share"]), epoch=plan["epoch"], batch=plan["batch"],
        fallback_easy=plan["fallback_easy"], faults=len(plan.get("substituted", ())),
    )


META_KEYS = ("label", "role", "clip_video", "clip_t0", "audio_video", "audio_t0", "audio_owner")


def pin_meta(batch: dict) -> dict:
    """The batch's host tensors (bookkeeping; video and audio too where a loader makes them on
    the host) in page-locked memory, so that the trainer's
    `.to(cuda, non_blocking=True)` is an asynchronous copy (a pageable one waits for the host).
    PyTorch's caching host allocator makes this cheap after the first batches."""
    for k, t in batch.items():
        if hasattr(t, "is_pinned") and t.device.type == "cpu" and not t.is_pinned():
            batch[k] = t.pin_memory()
    return batch


class BaseLoader(ABC):
    """Position, fault accounting and the sampler; subclasses decode."""
    kind = "base"
    # the reader decodes a batch's clips of one video in shared passes (decode_cost.py)
    shares_spans = False

    def __init__(self, cfg: Config, root: str | Path, *, mode: str = "train", rank: int = 0,
                 world_size: int = 1, total_epochs: int = 1,
                 videos: Sequence[str] | None = None):
        self.cfg, self.root, self.mode = cfg, Path(root), mode
        self.total_epochs = total_epochs
        self.dataset = Dataset.open(root)
        records = self.dataset.videos
        if videos is not None:   # a subset (a split of a labelled set)
            missing = [v for v in videos if v not in self.dataset.by_id]
            if missing:
                raise KeyError(f"{len(missing)} videos are not in {root}, e.g. {missing[:3]}")
            records = [self.dataset.by_id[v] for v in videos]
        self.sampler = Sampler(records, cfg.data, cfg.sampler, cfg.loader.batch_size,
                               mode=mode, rank=rank, world_size=world_size,
                               total_epochs=total_epochs)
        self.video_ids = [v["id"] for v in self.sampler.videos]
        self.faults = Counter()          # video id -> undecodable clips, this run
        # named ranges around decoding and the audio features, for the profiler / Nsight
        # (the trainer sets this with train.profile or train.nvtx); PyAV workers have none
        self.range = lambda name: nullcontext()
        self.fault_log: list[dict] = []  # (epoch, batch, video, error)
        # decoded frames per delivered frame (data/decode_cost.py)
        self.decode_count = DecodeCount()
        self.keyframe_interval = keyframe_interval(root)
        import torch
        self.pin_memory = torch.cuda.is_available()

    def __len__(self) -> int:
        return len(self.sampler)

    def unreadable_clips(self, plan: dict, skip: set | frozenset = frozenset()
                         ) -> dict[int, str]:
        """{clip position: error} of the plan's clips PyAV cannot read (the loaders' own
        decoders aside: which file is damaged). Clips of videos in `skip` are not tried."""
        d, bad = self.cfg.data, {}
        for i, (vi, first) in enumerate(zip(plan["clip_video"], plan["clip_frame"])):
            vid = self.video_ids[int(vi)]
            if vid in skip:
                continue
            try:
                self.dataset.frames(vid, int(first) + d.frame_stride * np.arange(d.clip_frames))
            except Exception as e:
                bad[i] = f"{type(e).__name__}: {e}"
        return bad

    def record_faults(self, plan: dict, bad: dict[int, str]) -> None:
        for i, err in bad.items():
            vid = self.video_ids[int(plan["clip_video"][i])]
            self.faults[vid] += 1
            self.fault_log.append(dict(epoch=plan["epoch"], batch=plan["batch"], video=vid,
                                       error=err[:300]))
        epoch_faults = sum(1 for f in self.fault_log if f["epoch"] == plan["epoch"])
        if epoch_faults > self.cfg.loader.max_faults:
            raise RuntimeError(
                f"{epoch_faults} clips failed to decode in epoch {plan['epoch']} (more than "
                f"loader.max_faults={self.cfg.loader.max_faults}); the dataset looks damaged. "
                f"First ones: {self.fault_log[:3]}")

    def epoch(self, epoch: int) -> Iterator[dict]:
        """Batches of `epoch` from the saved position on (0 unless resumed mid-epoch). On a
        CUDA machine the host-side tensors come in page-locked memory (see pin_meta)."""
        if self.sampler.epoch != epoch:
            self.sampler.set_epoch(epoch)
        start = self.sampler.next_batch
        for batch in self._batches(epoch, start):
            if batch["epoch"] != epoch or batch["batch"] != self.sampler.next_batch:
                raise RuntimeError(  # a bug of ours: the data would not be the plan's
                    f"internal error: the {self.kind} loader produced batch {batch['batch']} of "
                    f"epoch {batch['epoch']} where batch {self.sampler.next_batch} of epoch "
                    f"{epoch} was due; please report it")
            self.sampler.next_batch = batch["batch"] + 1
            self.count_decoding(self.sampler.plan(epoch, batch["batch"]))
            yield pin_meta(batch) if self.pin_memory else batch

    def count_decoding(self, plan: dict) -> None:
        """A delivered batch's decoding (a seeking reader; data/decode_cost.py)."""
        d = self.cfg.data
        self.decode_count.add(
            plan_decoded_frames(plan, self.sampler.videos, d, self.keyframe_interval,
                                shared=self.shares_spans),
            len(plan["clip_video"]) * d.clip_frames)

    @abstractmethod
    def _batches(self, epoch: int, start: int) -> Iterator[dict]:
        """Decoded batches of `epoch` from batch `start` on (each loader its own way)."""

    def close(self) -> None:  # noqa: B027 (loaders without workers have nothing to release)
        """Release worker processes and pipelines; a later epoch() starts them again."""

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def state_dict(self) -> dict:
        return dict(sampler=self.sampler.state_dict(), faults=dict(self.faults))

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.faults.update(state.get("faults", {}))


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed if initialised, else torchrun's
    RANK / WORLD_SIZE variables, else (0, 1)."""
    import os

    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
