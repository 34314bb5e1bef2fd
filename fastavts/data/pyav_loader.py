"""The PyAV baseline loader: torch DataLoader workers decode each planned batch with PyAV and
compute the log-mel in PyTorch (features.py). It is the comparison row of the benchmarks and
the debugging path; it produces the same batches as the DALI loader from the same plans."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from .features import AudioGeometry, LogMel, audio_window, video_transform
from .loader import BaseLoader, plan_meta, substitute


class _PlannedBatches:
    """torch Dataset of one epoch's batches: item i = the batch `start + i`."""

    def __init__(self, loader: "PyAVLoader", epoch: int, start: int):
        self.root, self.cfg = loader.root, loader.cfg
        self.sampler, self.epoch, self.start = loader.sampler, epoch, start
        self._ds = None

    def __len__(self) -> int:
        return len(self.sampler) - self.start

    def __getitem__(self, i: int) -> dict:
        from .dataset import Dataset

        if self._ds is None:  # opened in the worker process: its own memmap and files
            self._ds = Dataset.open(self.root)
            self._geo = AudioGeometry(self.cfg.data)
            self._logmel = LogMel(self._geo)
        plan = self.sampler.plan(self.epoch, self.start + i)
        return build_batch(self._ds, self.sampler.videos, plan, self.cfg.data, self._geo,
                           self._logmel)


def build_batch(ds, videos: list[dict], plan: dict, d, geo: AudioGeometry, logmel) -> dict:
    """Decode and transform one planned batch (the reference path)."""
    import torch

    T, s = d.clip_frames, d.frame_stride
    clips, bad = {}, {}
    for i, vi in enumerate(plan["clip_video"]):
        v = videos[vi]
        idx = plan["clip_frame"][i] + s * np.arange(T)
        try:
            frames = ds.frames(v["id"], idx)
            clips[i] = video_transform(frames, int(plan["crop_y"][i]), int(plan["crop_x"][i]),
                                       d.crop, bool(plan["flip"][i]), d.mean, d.std)
        except Exception as e:  # a damaged file: replaced below, counted by the parent
            bad[i] = f"{type(e).__name__}: {e}"
    if bad:
        plan = substitute(plan, set(bad))
        for i, j in plan["donor"].items():
            clips[i] = clips[j]
    video = torch.stack([clips[i] for i in range(len(clips))])
    windows = np.stack([audio_window(ds.bank, videos[vi], t, geo)
                        for vi, t in zip(plan["audio_video"], plan["audio_t0"])])
    audio = logmel(torch.from_numpy(windows))
    out = dict(video=video, audio=audio, **plan_meta(plan))
    out["fault_errors"] = {int(i): e for i, e in bad.items()}
    return out


class PyAVLoader(BaseLoader):
    kind = "pyav"

    def _batches(self, epoch: int, start: int) -> Iterator[dict]:
        import torch

        lc = self.cfg.loader
        data = _PlannedBatches(self, epoch, start)
        dl = torch.utils.data.DataLoader(
            data, batch_size=None, shuffle=False, num_workers=lc.workers,
            prefetch_factor=lc.prefetch if lc.workers else None,
            persistent_workers=False, multiprocessing_context="spawn" if lc.workers else None)
        for batch in dl:
            if batch["fault_errors"]:
                plan = self.sampler.plan(epoch, batch["batch"])
                self.record_faults(plan, batch["fault_errors"])
            yield batch
