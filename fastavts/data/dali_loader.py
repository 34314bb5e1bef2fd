"""The DALI loader: the sampler's plans through two DALI pipelines per rank.

    video pipeline (batch B):  parallel external_source (Python workers read the planned
        segment files and frame indices) -> fn.decoders.video (`mixed`: NVDEC on the GPU;
        `cpu`: FFmpeg, VP8/VP9/MJPEG) -> fn.slice (the planned crop) ->
        fn.crop_mirror_normalize (planned flip, mean/std, layout CFHW)  =>  (B, 3, T, c, c)
    audio pipeline (batch M):  external_source (windows sliced from the memory-mapped bank,
        with STFT context) -> fn.spectrogram -> fn.mel_filter_bank -> fn.to_decibels
        (on the GPU when the video is)                                =>  (M, 1, n_mels, F)

DALI's spectrogram takes one 1-D signal per sample, so the audio windows (M = B in paired
mode, B(1+k) in inbatch mode) run as their own pipeline, in lockstep with the video one.
Both hand torch tensors over through DALIGenericIterator (on the GPU, without host copies).
The plan's bookkeeping (labels, kinds, ids, times) comes from the same plan in this process.

A batch DALI cannot decode is checked clip by clip with PyAV; the clips that fail are
excluded from then on (replaced by another clip of their batch, sampler.substitute), counted,
and the pipelines are rebuilt to start again at that batch.
"""
from __future__ import annotations

import os
from typing import Iterator, Optional

import numpy as np

from .features import AudioGeometry, audio_window, hann
from .loader import BaseLoader, plan_meta, substitute


def planned(sampler, epoch: int, batch: int, exclude: frozenset) -> dict:
    """The plan with excluded videos' clips replaced (same in every process)."""
    plan = sampler.plan(epoch, batch)
    bad = {i for i, v in enumerate(plan["clip_video"]) if int(v) in exclude}
    return substitute(plan, bad) if bad else plan


class _Source:
    """Base of the two external-source callables: maps DALI's (epoch_idx, iteration) to
    (epoch, batch) and caches the current plan. Picklable (parallel workers get a copy)."""

    def __init__(self, root: str, sampler, epoch: int, start: int, exclude: frozenset,
                 batch_size: int):
        self.root, self.sampler = root, sampler
        self.epoch0, self.start, self.exclude, self.batch_size = epoch, start, exclude, batch_size
        self._key = self._plan = None

    def plan_for(self, epoch_idx: int, iteration: int) -> dict:
        epoch = self.epoch0 + epoch_idx
        batch = (self.start if epoch_idx == 0 else 0) + iteration
        if batch >= len(self.sampler):
            raise StopIteration
        if self._key != (epoch, batch):
            self._key, self._plan = (epoch, batch), planned(self.sampler, epoch, batch,
                                                            self.exclude)
        return self._plan


class ClipSource(_Source):
    """Per sample: encoded segment bytes, frame indices in the segment, crop anchor, flip."""

    def __call__(self, info):
        plan = self.plan_for(info.epoch_idx, info.iteration)
        B = len(plan["clip_video"])
        i = info.idx_in_batch % B  # eval's partial last batch: repeat, trimmed later
        v = self.sampler.videos[int(plan["clip_video"][i])]
        seg = v["segments"][int(plan["clip_segment"][i])]
        d = self.sampler.data
        data = np.fromfile(os.path.join(self.root, seg["path"]), dtype=np.uint8)
        first = int(plan["clip_frame"][i]) - seg["start_frame"]
        frames = (first + d.frame_stride * np.arange(d.clip_frames)).astype(np.int32)
        anchor = np.array([plan["crop_y"][i], plan["crop_x"][i]], np.int32)
        return data, frames, anchor, np.array(int(plan["flip"][i]), np.int32)


class AudioSource(_Source):
    """Per batch: the M audio windows (float32, with STFT context) of the plan."""

    def __call__(self, info):
        from .audio_bank import AudioBank

        if not hasattr(self, "_bank"):
            self._bank = AudioBank(self.root)
            self._geo = AudioGeometry(self.sampler.data)
        plan = self.plan_for(info.epoch_idx, info.iteration)
        wins = [audio_window(self._bank, self.sampler.videos[int(v)], float(t), self._geo)
                for v, t in zip(plan["audio_video"], plan["audio_t0"])]
        return wins + [wins[-1]] * (self.batch_size - len(wins))  # pad a partial last batch


def build_pipelines(loader: "DALILoader", epoch: int, start: int, exclude: frozenset):
    from nvidia.dali import fn, pipeline_def, types

    cfg, d, lc = loader.cfg, loader.cfg.data, loader.cfg.loader
    gpu = loader.device == "gpu"
    device_id = loader.device_id if gpu else None
    B = lc.batch_size
    M = B * (1 + cfg.sampler.k) if cfg.sampler.pairs == "inbatch" else B
    geo = AudioGeometry(d)
    root = str(loader.root)
    parallel = lc.workers > 0

    @pipeline_def(batch_size=B, num_threads=lc.threads, device_id=device_id,
                  prefetch_queue_depth=lc.prefetch, py_num_workers=max(1, lc.workers),
                  py_start_method="spawn", exec_dynamic=True)
    def video_pipeline():
        src = ClipSource(root, loader.sampler, epoch, start, exclude, B)
        enc, frames, anchor, flip = fn.external_source(
            source=src, num_outputs=4, batch=False, parallel=parallel,
            dtype=[types.UINT8, types.INT32, types.INT32, types.INT32])
        video = fn.decoders.video(enc, device="mixed" if gpu else "cpu", frames=frames)
        video = fn.slice(video, anchor, np.array([d.crop, d.crop], np.int32), axes=[1, 2],
                         out_of_bounds_policy="error")
        return fn.crop_mirror_normalize(
            video, mirror=flip, dtype=types.FLOAT, output_layout="CFHW",
            mean=[m * 255 for m in d.mean], std=[s * 255 for s in d.std])

    @pipeline_def(batch_size=M, num_threads=lc.threads, device_id=device_id,
                  prefetch_queue_depth=lc.prefetch, exec_dynamic=True)
    def audio_pipeline():
        src = AudioSource(root, loader.sampler, epoch, start, exclude, M)
        wave = fn.external_source(source=src, batch=True, batch_info=True, dtype=types.FLOAT)
        if gpu:
            wave = wave.gpu()
        spec = fn.spectrogram(wave, nfft=geo.n_fft, window_length=geo.win,
                              window_step=geo.hop, window_fn=hann(geo.win).tolist(),
                              center_windows=False, power=2, layout="ft")
        mel = fn.mel_filter_bank(spec, sample_rate=geo.sr, nfilter=geo.n_mels,
                                 freq_low=geo.fmin, freq_high=geo.fmax, normalize=True,
                                 mel_formula="slaney")
        return fn.to_decibels(mel, multiplier=10.0, reference=1.0, cutoff_db=geo.floor_db)

    return video_pipeline(), audio_pipeline()


class DALILoader(BaseLoader):
    kind = "dali"

    def __init__(self, cfg, root, *, device: Optional[str] = None, **kw):
        super().__init__(cfg, root, **kw)
        want = device or cfg.loader.device
        if want == "auto":
            import torch
            want = "gpu" if torch.cuda.is_available() else "cpu"
        self.device = want
        self.device_id = int(os.environ.get("LOCAL_RANK", 0))
        if self.device == "cpu":
            codecs = {v.get("codec") for v in self.sampler.videos}
            if codecs - {"vp9", "vp8", "mjpeg"}:
                raise ValueError(f"DALI's CPU video decoder reads VP8/VP9/MJPEG, but {self.root} "
                                 f"holds {sorted(codecs)}: prepare with --codec vp9 for CPU "
                                 f"runs, or use loader.kind=pyav")
        self.exclude: frozenset = frozenset()
        self._its = None
        self._next = None  # (epoch, batch) the running pipelines will produce next

    def _start(self, epoch: int, start: int) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self._stop()
        vp, ap = build_pipelines(self, epoch, start, self.exclude)
        kw = dict(last_batch_policy=LastBatchPolicy.FILL, auto_reset=False,
                  prepare_first_batch=False)
        self._its = (DALIGenericIterator([vp], ["video"], **kw),
                     DALIGenericIterator([ap], ["audio"], **kw))
        self._next = (epoch, start)

    def _stop(self) -> None:
        self._its = None  # pipelines and their workers go with the iterators

    def close(self) -> None:
        self._stop()
        self._next = None

    def _batches(self, epoch: int, start: int) -> Iterator[dict]:
        if self._its is None or self._next != (epoch, start):
            self._start(epoch, start)
        b = start
        while b < len(self.sampler):
            try:
                with self.range("decode"):          # the video pipeline's batch
                    (vout,) = next(self._its[0])
                with self.range("audio_features"):  # the log-mel pipeline's batch
                    (aout,) = next(self._its[1])
            except StopIteration:
                break
            except RuntimeError as e:  # a clip DALI cannot decode: find it, exclude, restart
                self._on_decode_error(epoch, b, e)
                self._start(epoch, b)
                continue
            plan = planned(self.sampler, epoch, b, self.exclude)
            B, M = len(plan["clip_video"]), len(plan["kind"])
            out = dict(video=vout["video"][:B], audio=aout["audio"][:M].unsqueeze(1),
                       **plan_meta(plan))
            b += 1
            self._next = (epoch, b)
            yield out
        # the epoch is over: the pipelines go on with the next epoch from its first batch
        for it in self._its:
            it.reset()
        self._next = (epoch + 1, 0)

    def _on_decode_error(self, epoch: int, batch: int, err: Exception) -> None:
        plan = planned(self.sampler, epoch, batch, self.exclude)
        ds = self.dataset  # the PyAV reader of the same prepared set
        d = self.cfg.data
        bad = {}
        for i, vi in enumerate(plan["clip_video"]):
            v = self.sampler.videos[int(vi)]
            try:
                ds.frames(v["id"], int(plan["clip_frame"][i]) + d.frame_stride * np.arange(d.clip_frames))
            except Exception as e2:
                bad[i] = f"{type(e2).__name__}: {e2}"
        if not bad:  # PyAV reads them all: the DALI error is not about one clip
            raise RuntimeError(f"DALI failed on batch {batch} of epoch {epoch} and every clip "
                               f"of it decodes with PyAV; not a damaged file: {err}") from err
        self.record_faults(plan, bad)
        self.exclude = self.exclude | {int(plan["clip_video"][i]) for i in bad}
