"""The in-memory loader (`loader.kind=memory`): every video this rank needs is decoded once with
PyAV, the first time a clip of it is asked for, and its uint8 frames stay in RAM; batches are
then cut from those frames in the training process, through the same `build_batch` as the
PyAV loader (so given a plan the two give identical batches), with the log-mel in PyTorch.

Why: on a CPU-only machine the DALI CPU pipeline and the PyAV workers decode on the same cores
the model trains on. Measured for the demo (tiny towers, 8 x 48 x 48 clips, batch 32, 2-core dev
machine): forward + backward took ~390 ms a step next to the DALI CPU pipeline and ~230 ms
alone. For a set that fits in memory (the demo's 160 videos at 52 px: 0.24 GiB) decoding once
is the better use of the cores. On a GPU, DALI decodes on NVDEC and keeps the cores free: use
`loader.kind=dali` there and for large sets. The size of the decoded set is checked before
anything is decoded (`loader.memory_gb`).

A video that cannot be decoded is a fault like in the other loaders: its clips are replaced by
other clips of their batch and counted, and it is not tried again.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from ..config import ConfigError
from .base_loader import BaseLoader
from .dataset import Dataset
from .features import AudioGeometry, LogMel
from .pyav_loader import build_batch


class _FrameCache:
    """`frames(video_id, indices)` like Dataset.frames, served from whole decoded videos."""

    def __init__(self, ds: Dataset):
        self.ds, self.bank = ds, ds.bank
        self.videos: dict[str, np.ndarray] = {}
        self.broken: dict[str, str] = {}

    def frames(self, video_id: str, indices) -> np.ndarray:
        arr = self.videos.get(video_id)
        if arr is None:
            if video_id in self.broken:
                raise RuntimeError(self.broken[video_id])
            v = self.ds._video(video_id)
            try:
                arr = self.ds.frames(video_id, np.arange(v["num_frames"]))
            except Exception as e:
                self.broken[video_id] = f"{type(e).__name__}: {e}"
                raise
            self.videos[video_id] = arr
        return arr[np.asarray(indices, dtype=np.int64)]

    def load(self, video_ids, threads: int) -> None:
        """Decode the given videos now, `threads` at a time (PyAV decodes and converts without
        the GIL; one FFmpeg thread per video: frame threads on tiny frames only add handoffs).
        A video that fails is remembered; asking for its frames raises its error."""
        from concurrent.futures import ThreadPoolExecutor

        todo = [i for i in dict.fromkeys(video_ids)
                if i not in self.videos and i not in self.broken]
        if not todo:
            return
        self.ds.codec_threads = False

        def one(video_id):
            try:
                self.frames(video_id, [0])
            except Exception:
                pass   # kept in self.broken: the batch that needs it reports the fault
        with ThreadPoolExecutor(max(1, threads)) as pool:
            list(pool.map(one, todo))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.videos.values())


def decoded_bytes(videos: list[dict]) -> int:
    return sum(int(v["num_frames"]) * int(v["height"]) * int(v["width"]) * 3 for v in videos)


class MemoryLoader(BaseLoader):
    kind = "memory"

    def __init__(self, cfg, root, **kw):
        super().__init__(cfg, root, **kw)
        need = decoded_bytes(self.sampler.videos)
        limit = cfg.loader.memory_gb * 2**30
        if need > limit:
            raise ConfigError(
                f"loader.kind=memory: the {len(self.sampler.videos)} videos of {root} would take "
                f"{need / 2**30:.1f} GiB decoded, more than loader.memory_gb="
                f"{cfg.loader.memory_gb:g}; raise loader.memory_gb if the machine has the RAM, "
                f"or use loader.kind=dali (or pyav), which decode each clip as it is needed")
        print(f"fastavts: loader.kind=memory: {len(self.sampler.videos)} videos, "
              f"{need / 2**30:.2f} GiB once decoded (limit loader.memory_gb="
              f"{cfg.loader.memory_gb:g})", flush=True)
        self.cache = _FrameCache(self.dataset)
        self._geo = AudioGeometry(cfg.data)
        self._logmel = LogMel(self._geo)

    def _batches(self, epoch: int, start: int) -> Iterator[dict]:
        # every video this rank will use, decoded up front on all the cores (the first epoch
        # decoded them one at a time, on one core, between its steps)
        with self.range("decode"):
            self.cache.load([v["id"] for v in self.sampler.videos], os.cpu_count() or 1)
        for b in range(start, len(self.sampler)):
            plan = self.sampler.plan(epoch, b)
            batch = build_batch(self.cache, self.sampler.videos, plan, self.cfg.data, self._geo,
                                self._logmel, self.range)
            if batch["fault_errors"]:
                self.record_faults(plan, batch["fault_errors"])
            yield batch
