"""The PyAV loader: threads, or torch DataLoader worker processes, decode each planned batch
with PyAV (or SPDL, decord: a frame_reader), cut the crops and read the sound windows; the step
normalises the video and computes the log-mel on its device (features.ModelInputs). From the
same plans, its batches are the DALI loader's as the model takes them."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import nullcontext

import numpy as np

from .base_loader import BaseLoader, plan_meta, substitute
from .features import AudioGeometry, audio_pcm_window


class _PlannedBatches:
    """torch Dataset over the rest of training: item i is batch `start + i` counted from the
    first batch of `epoch0`, so one DataLoader (and its workers) serves every epoch. Each
    process, and each thread of the threaded pool, opens its own reader."""

    def __init__(self, loader: PyAVLoader, epoch0: int, start: int, epochs: int):
        self.root, self.cfg = loader.root, loader.cfg
        self.sampler, self.epoch0, self.start, self.epochs = loader.sampler, epoch0, start, epochs
        self.frame_reader = loader.frame_reader
        self._local = threading.local()

    def __getstate__(self):   # pickled into DataLoader workers: no thread-local state
        s = dict(self.__dict__)
        del s["_local"]
        return s

    def __setstate__(self, s):
        self.__dict__.update(s)
        self._local = threading.local()

    def __len__(self) -> int:
        return self.epochs * len(self.sampler) - self.start

    def __getitem__(self, i: int) -> dict:
        import torch

        from .dataset import Dataset

        r = self._local
        if getattr(r, "ds", None) is None:  # this worker's (or thread's) memmap and files
            # (no manifest rows: the sampler's shared columns describe the videos)
            ds = Dataset.for_worker(self.root)
            ds.codec_threads = False
            if self.frame_reader is not None:   # another decoder (decord, SPDL)
                ds = self.frame_reader(ds)
            if torch.utils.data.get_worker_info() is not None:
                # one core per DataLoader worker: parallelism is across workers (with
                # loader.workers=0 or threads this runs in the training process: its
                # threads stay)
                torch.set_num_threads(1)
            r.geo = AudioGeometry(self.cfg.data)
            r.ds = ds
        epoch, batch = divmod(self.start + i, len(self.sampler))
        plan = self.sampler.plan(self.epoch0 + epoch, batch)
        return build_batch(r.ds, self.sampler.videos, plan, self.cfg.data, r.geo)


class _ThreadedBatches:
    """The items of a _PlannedBatches in order, made by `threads` threads of this process
    (loader.pool=threads), `depth` of them in flight: no process, no hand-over of the
    batches. PyAV and SPDL decode, and torch and numpy copy, without holding the GIL."""

    def __init__(self, data: _PlannedBatches, threads: int, depth: int):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self.data, self.depth = data, max(1, depth)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="fastavts-loader")
        self.pending: deque = deque()
        self.next_item = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while len(self.pending) < self.depth and self.next_item < len(self.data):
            self.pending.append(self.pool.submit(self.data.__getitem__, self.next_item))
            self.next_item += 1
        if not self.pending:
            raise StopIteration
        return self.pending.popleft().result()

    def close(self) -> None:
        """Drop the batches not yet started and wait for those being made (a batch at most
        per thread)."""
        for f in self.pending:
            f.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()


def build_batch(ds, videos: list[dict], plan: dict, d, geo: AudioGeometry,
                rng=None, audio_features=None) -> dict:
    """Decode one planned batch (the reference path): the video as uint8 crops
    (B, 3, T, crop, crop), flipped where planned, and the sound as the plan's int16
    (M, geo.length) windows, which the step turns into the model's inputs on its device
    (features.ModelInputs: normalised video, log-mel). `rng(name)`: an optional named-range
    context (profiler / NVTX) around decoding and the audio. `audio_features(plan)`: the
    (M, 1, n_mels, frames) float32 log-mel of the plan's windows from somewhere else (the
    memory loader's per-video cache) instead of the windows."""
    import torch

    rng = rng or (lambda name: nullcontext())
    T, s, c = d.clip_frames, d.frame_stride, d.crop
    # cut channels-first: the layout the model takes, so one copy makes it (features.py)
    shape = (len(plan["clip_video"]), 3, T, c, c)
    if torch.utils.data.get_worker_info() is not None:
        # a DataLoader worker's: cut straight into shared memory (its queue would copy it)
        video = torch.empty(shape, dtype=torch.uint8).share_memory_()
        crops = video.numpy()
    else:
        crops = np.empty(shape, np.uint8)
        video = torch.from_numpy(crops)
    bad = {}
    with rng("decode"):
        for vi, clips in _clips_by_video(plan, shared=getattr(ds, "shares_spans", False)):
            v = videos[vi]
            idx = [plan["clip_frame"][i] + s * np.arange(T) for i in clips]
            try:
                frames = ds.frames(v, np.concatenate(idx))
            except Exception as e:
                if len(clips) == 1:   # a damaged file: replaced below, counted by the parent
                    bad[clips[0]] = f"{type(e).__name__}: {e}"
                    continue
                # read together, one damaged clip fails them all: each alone says which
                frames = None
            for j, i in enumerate(clips):
                try:
                    f = ds.frames(v, idx[j]) if frames is None else \
                        frames[j * T:(j + 1) * T]
                    y, x = int(plan["crop_y"][i]), int(plan["crop_x"][i])
                    cut = f[:, y:y + c, x:x + c]
                    if cut.shape[1:3] != (c, c):
                        raise ValueError(f"frames of {v['id']} are {f.shape[2]}x"
                                         f"{f.shape[1]}, too small for a {c}-px crop at "
                                         f"({x}, {y})")
                    crops[i] = (cut[:, :, ::-1] if plan["flip"][i] else cut).transpose(3, 0, 1, 2)
                except Exception as e:
                    bad[i] = f"{type(e).__name__}: {e}"
        if bad:
            plan = substitute(plan, set(bad))
            for i, j in plan["donor"].items():
                crops[i] = crops[j]
        # `video` (the crops) stays uint8: the step normalises it on the device
        # (features.VideoNorm)
    with rng("audio_features"):
        if audio_features is not None:
            audio = audio_features(plan)
        else:
            audio = torch.from_numpy(np.stack([
                audio_pcm_window(ds.bank, videos[vi], t, geo)
                for vi, t in zip(plan["audio_video"], plan["audio_t0"])]))
    out = dict(video=video, audio=audio, **plan_meta(plan))
    out["fault_errors"] = {int(i): e for i, e in bad.items()}
    return out


def _clips_by_video(plan: dict, shared: bool) -> list[tuple[int, list[int]]]:
    """(video index, clip positions) in the plan's order: a video's clips together where the
    reader decodes them in shared passes (Dataset.frames), else each clip alone."""
    if not shared:
        return [(int(vi), [i]) for i, vi in enumerate(plan["clip_video"])]
    groups: dict[int, list[int]] = {}
    for i, vi in enumerate(plan["clip_video"]):
        groups.setdefault(int(vi), []).append(i)
    return list(groups.items())


class PyAVLoader(BaseLoader):
    kind = "pyav"
    shares_spans = True   # Dataset.frames reads a video's clips in shared passes
    # a class whose instances wrap a Dataset and give .frames(id, indices) and .bank; None =
    # the Dataset's own PyAV decoding
    frame_reader = None
    _it = None
    _next = None  # (epoch, batch) the running DataLoader yields next

    _pool = None   # a subclass's own choice where loader.pool=auto

    @property
    def pool(self) -> str:
        """loader.pool, "auto" resolved (runtime.loader_choice)."""
        import torch

        from ..runtime import loader_choice
        return self._pool or loader_choice(self.cfg.loader, torch.cuda.is_available())[1]

    def _start(self, epoch: int, start: int) -> None:
        import torch

        self.close()
        lc = self.cfg.loader
        epochs = max(1, self.total_epochs - epoch)
        data = _PlannedBatches(self, epoch, start, epochs)
        self._next = (epoch, start)
        if self.pool == "threads" and lc.workers:
            self._it = _ThreadedBatches(data, lc.workers, lc.workers * lc.prefetch)
            return
        self._dl = torch.utils.data.DataLoader(
            data, batch_size=None, shuffle=False, num_workers=lc.workers,
            prefetch_factor=lc.prefetch if lc.workers else None,
            multiprocessing_context="spawn" if lc.workers else None)
        self._it = iter(self._dl)

    def _batches(self, epoch: int, start: int) -> Iterator[dict]:
        if self._it is None or self._next != (epoch, start):
            self._start(epoch, start)
        for b in range(start, len(self.sampler)):
            try:
                batch = next(self._it)
            except StopIteration:  # ran past total_epochs: go on with a new DataLoader
                self._start(epoch, b)
                batch = next(self._it)
            self._next = (epoch, b + 1) if b + 1 < len(self.sampler) else (epoch + 1, 0)
            if batch["fault_errors"]:
                self.record_faults(self.sampler.plan(epoch, batch["batch"]),
                                   batch["fault_errors"])
            yield batch

    def close(self) -> None:
        """Stop the worker processes (also done when the loader is garbage collected).

        Stopping workers before their DataLoader is exhausted (a benchmark window, an
        interrupted run) makes a worker abort on exit inside PyTorch in about 3 of 4 tries
        here (torch 2.13 CPU, spawn or fork, any dataset returning large tensors: it prints
        'terminate called without an active exception'), and PyTorch then raises in this
        thread. A normal end of iteration does not. Nothing is lost: the worker was leaving."""
        it, self._it, self._next = self._it, None, None
        if isinstance(it, _ThreadedBatches):
            it.close()
            return
        if it is None or not hasattr(it, "_shutdown_workers"):
            return
        try:
            it._shutdown_workers()
        except RuntimeError as e:
            if "DataLoader worker" not in str(e):
                raise
