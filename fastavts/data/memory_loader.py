"""The in-memory loader (`loader.kind=memory`): every video this rank needs is decoded once with
PyAV, up front on all the cores, and its uint8 frames stay in RAM; batches are then cut from
those frames in the training process, through the same `build_batch` as the PyAV loader (given
a plan the two give identical video, and the same log-mel to float rounding), the log-mel cut
from each video's whole-sound log-mel computed once (_LogMelCache).

Why: on a CPU-only machine the DALI CPU pipeline and the PyAV workers decode on the same cores
the model trains on, and a step next to them is much slower than alone (docs/data.md). For a
set that fits in memory (the demo's videos, decoded, are a fraction of a GiB) decoding once is
the better use of the cores. On a GPU, DALI decodes on NVDEC and keeps the cores free: use
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
from .features import AudioGeometry, LogMel, audio_window, window_start
from .pyav_loader import build_batch


class _FrameCache:
    """`frames(video_id, indices)` like Dataset.frames, served from whole decoded videos."""

    def __init__(self, ds: Dataset):
        self.ds, self.bank = ds, ds.bank
        self.videos: dict[str, np.ndarray] = {}
        self.broken: dict[str, str] = {}

    def frames(self, video, indices) -> np.ndarray:
        """`video`: its record or its id."""
        video_id = video if isinstance(video, str) else video["id"]
        arr = self.videos.get(video_id)
        if arr is None:
            if video_id in self.broken:
                raise RuntimeError(self.broken[video_id])
            v = self.ds._video(video)
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


class _LogMelCache:
    """The log-mel of the plan's windows, cut from each video's log-mel over its whole sound,
    computed once. A window whose start lies on that video's STFT frame grid is a slice of it:
    every clip's own window is (clips start on frames, and a 40-ms frame is 4 hops of 10 ms at
    the defaults), as are the windows of other clips. Those frames are the same samples through
    the same transform as window by window, computed in one batch (equal to float rounding, a
    few 1e-6 dB: the FFT and the mel product group the work differently). Any other window (a
    hard negative shifted off the grid) is computed on its own, as the PyAV loader does.

    Why: the windows of a video overlap: window by window, each of its samples would go
    through the STFT hundreds of times over training, a visible share of a CPU step."""

    def __init__(self, bank, videos: list[dict], geo: AudioGeometry, logmel: LogMel):
        self.bank, self.videos, self.geo, self.logmel = bank, videos, geo, logmel
        self.specs: dict[int, tuple] = {}    # video index -> (grid origin sample, (n_mels, J))
        self.sliced = self.computed = 0      # windows served each way (tests, profile)

    @staticmethod
    def frames_of(v: dict, geo: AudioGeometry) -> int:
        """STFT frames of a video's whole-sound log-mel: every window start from its first
        frame's time to its last one's, plus one window."""
        g0 = window_start(v, 0.0, geo)
        return (window_start(v, v["num_frames"] / v["fps"], geo) - g0) // geo.hop + geo.frames

    def _spec(self, vi: int) -> tuple:
        got = self.specs.get(vi)
        if got is None:
            import torch

            v, g = self.videos[vi], self.geo
            n = self.frames_of(v, g)
            x = audio_window(self.bank, v, 0.0, g, length=(n - 1) * g.hop + g.win)
            got = self.specs[vi] = (window_start(v, 0.0, g),
                                    self.logmel(torch.from_numpy(x)[None])[0, 0])
        return got

    def __call__(self, plan: dict):
        import torch

        g = self.geo
        vids, t0s = plan["audio_video"], plan["audio_t0"]
        out = torch.empty(len(vids), 1, g.n_mels, g.frames)
        off_grid = []
        for m, (vi, t0) in enumerate(zip(vids, t0s)):
            g0, spec = self._spec(int(vi))
            j, r = divmod(window_start(self.videos[int(vi)], float(t0), g) - g0, g.hop)
            if r == 0 and 0 <= j and j + g.frames <= spec.shape[1]:
                out[m, 0] = spec[:, j:j + g.frames]
            else:
                off_grid.append(m)
        if off_grid:
            w = np.stack([audio_window(self.bank, self.videos[int(vids[m])], float(t0s[m]), g)
                          for m in off_grid])
            out[off_grid] = self.logmel(torch.from_numpy(w))
        self.sliced += len(vids) - len(off_grid)
        self.computed += len(off_grid)
        return out


def decoded_bytes(videos: list[dict]) -> int:
    return sum(int(v["num_frames"]) * int(v["height"]) * int(v["width"]) * 3 for v in videos)


class MemoryLoader(BaseLoader):
    kind = "memory"

    def count_decoding(self, plan: dict) -> None:
        """Every video decoded once, whole: the frames held, counted."""
        self.decode_count.add(0, len(plan["clip_video"]) * self.cfg.data.clip_frames)
        self.decode_count.decoded = sum(a.shape[0] for a in self.cache.videos.values())

    def __init__(self, cfg, root, **kw):
        super().__init__(cfg, root, **kw)
        self._geo = AudioGeometry(cfg.data)
        # decoded frames, and each video's whole-sound log-mel (float32)
        need = decoded_bytes(self.sampler.videos) + sum(
            4 * self._geo.n_mels * _LogMelCache.frames_of(v, self._geo)
            for v in self.sampler.videos)
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
        self._logmel = LogMel(self._geo)
        self.audio = _LogMelCache(self.dataset.bank, self.sampler.videos, self._geo,
                                  self._logmel)

    def _batches(self, epoch: int, start: int) -> Iterator[dict]:
        # every video this rank will use, decoded up front on all the cores (the first epoch
        # decoded them one at a time, on one core, between its steps)
        with self.range("decode"):
            self.cache.load([v["id"] for v in self.sampler.videos], os.cpu_count() or 1)
        for b in range(start, len(self.sampler)):
            plan = self.sampler.plan(epoch, b)
            batch = build_batch(self.cache, self.sampler.videos, plan, self.cfg.data, self._geo,
                                self.range, audio_features=self.audio)
            if batch["fault_errors"]:
                self.record_faults(plan, batch["fault_errors"])
            yield batch
