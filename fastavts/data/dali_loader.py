"""The DALI loader: the sampler's plans through DALI pipelines, several per rank.

    video pipelines (batch B, `loader.video_pipelines` of them, taking batches in turn):
        parallel external_source (Python workers read the planned segment files and frame
        indices) -> fn.decoders.video (`mixed`: NVDEC on the GPU; `cpu`: FFmpeg, VP8/VP9/MJPEG;
        pad_mode="none": a frame index past the end of the file is an error, never a black
        frame) -> fn.crop_mirror_normalize (the planned crop and flip, mean/std, layout CFHW,
        in one pass)                                        =>  (B, 3, T, c, c)
    audio pipeline (batch M, one):  parallel external_source (windows sliced from the
        memory-mapped bank, with STFT context) -> fn.spectrogram -> fn.mel_filter_bank ->
        fn.to_decibels (on the GPU when the video is)                 =>  (M, 1, n_mels, F)

Why several video pipelines: one DALI pipeline drives one NVDEC engine (NVIDIA/DALI issue
6387: one pipeline used ~14 % of a GH200's decoders, seven ~100 %); an H100/H200 has seven.

The pipelines run over the rest of training as one flat sequence of batches, not epoch by epoch:
batch `g` counted from the start (g = epoch * batches_per_epoch + batch) is made by video
pipeline `(g - first) % K` and by the audio pipeline, and every source computes its plan from g
alone. Nothing is reset at an epoch's end, so a run resumed at any batch, epoch ends included,
decodes exactly the batches an uninterrupted run would; each pipeline also hands back the
(epoch, batch) it made, and the loader checks it against the plan it attaches (a mismatch is
an internal error, never a silently mislabelled batch). DALI's spectrogram takes one 1-D signal
per sample, so the audio windows (M = B in paired mode, B(1+k) in inbatch mode) run in a
pipeline of their own. Outputs reach torch through DALIGenericIterator (on the GPU, without
host copies); the plan's bookkeeping (labels, roles, ids, times) comes from the same plan in
this process.

Errors: a decode error of `fn.decoders.video` is checked clip by clip with PyAV; the clips
that fail are excluded from then on (replaced by another clip of their batch), counted, and the
pipelines restart at that batch. Out-of-memory, a missing NVDEC library and every other error
stop with a message that says what to do; they are not blamed on the data.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import numpy as np

from ..config import ConfigError
from ..runtime import (  # noqa: F401 (the DALI defaults, resolved in fastavts/runtime.py)
    NVDEC_ENGINES,
    Machine,
    default_threads,
    default_video_pipelines,
    die_with_parent,
    resolve_loader,
)
from .base_loader import BaseLoader, plan_meta, substitute
from .features import AudioGeometry, audio_window, hann
from .sampler import windows_per_clip


def planned(sampler, epoch: int, batch: int, exclude: frozenset) -> dict:
    """The plan with excluded videos' clips replaced (same in every process)."""
    plan = sampler.plan(epoch, batch)
    bad = {i for i, v in enumerate(plan["clip_video"]) if int(v) in exclude}
    return substitute(plan, bad) if bad else plan


class _Source:
    """Base of the external-source callables: iteration i of a pipeline makes flat batch
    `first + offset + i * stride` of the run (g = epoch * batches_per_epoch + batch), up to
    `end` (exclusive). Stateless apart from a plan cache; picklable (parallel workers get a
    copy, and DALI may call them a few iterations past the end: they keep raising
    StopIteration there)."""

    def __init__(self, root: str, sampler, first: int, end: int, offset: int, stride: int,
                 exclude: frozenset, batch_size: int):
        self.root, self.sampler, self.exclude, self.batch_size = root, sampler, exclude, batch_size
        self.first, self.end, self.offset, self.stride = first, end, offset, stride
        self._key = self._plan = None
        self._parent = os.getpid()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if os.getpid() != self._parent:   # a copy in a DALI worker: it ends with its parent
            die_with_parent(self._parent)

    def plan_for(self, iteration: int) -> dict:
        g = self.first + self.offset + iteration * self.stride
        if g >= self.end:
            raise StopIteration
        key = divmod(g, len(self.sampler))
        if self._key != key:
            self._key, self._plan = key, planned(self.sampler, *key, self.exclude)
        return self._plan

    @staticmethod
    def key_of(plan) -> np.ndarray:
        return np.array([plan["epoch"], plan["batch"]], np.int64)


class ClipSource(_Source):
    """Per sample: encoded segment bytes, frame indices in the segment, crop position (y, x
    as shares of the room around the crop), flip, and the (epoch, batch) of the sample."""

    def __call__(self, info):
        plan = self.plan_for(info.iteration)
        B = len(plan["clip_video"])
        i = info.idx_in_batch % B  # eval's partial last batch: repeat, trimmed later
        v = self.sampler.videos[int(plan["clip_video"][i])]
        seg = v["segments"][int(plan["clip_segment"][i])]
        d = self.sampler.data
        data = np.fromfile(os.path.join(self.root, seg["path"]), dtype=np.uint8)
        first = int(plan["clip_frame"][i]) - seg["start_frame"]
        frames = (first + d.frame_stride * np.arange(d.clip_frames)).astype(np.int32)
        # crop_mirror_normalize places its window at round(pos * (size - crop)): the planned
        # pixel as a share of the room (exact after rounding: |error| < 1e-4 px)
        c = d.crop
        pos_y = int(plan["crop_y"][i]) / max(1, int(v["height"]) - c)
        pos_x = int(plan["crop_x"][i]) / max(1, int(v["width"]) - c)
        return (data, frames, np.array(pos_y, np.float32), np.array(pos_x, np.float32),
                np.array(int(plan["flip"][i]), np.int32), self.key_of(plan))


class AudioSource(_Source):
    """Per batch: the M audio windows (float32, with STFT context) of the plan, and the
    (epoch, batch) of each."""

    def __call__(self, info):
        from .audio_bank import AudioBank

        if not hasattr(self, "_bank"):
            self._bank = AudioBank(self.root)
            self._geo = AudioGeometry(self.sampler.data)
        plan = self.plan_for(info.iteration)
        wins = [audio_window(self._bank, self.sampler.videos[int(v)], float(t), self._geo)
                for v, t in zip(plan["audio_video"], plan["audio_t0"])]
        wins += [wins[-1]] * (self.batch_size - len(wins))  # pad a partial last batch
        return wins, [self.key_of(plan)] * len(wins)


def build_pipelines(loader: DALILoader, first: int, end: int, exclude: frozenset):
    """(video pipelines, audio pipeline) making flat batches [first, end) of the run."""
    from nvidia.dali import fn, pipeline_def, types

    cfg, d, lc = loader.cfg, loader.cfg.data, loader.cfg.loader
    gpu = loader.device == "gpu"
    device_id = loader.device_id if gpu else None
    B = lc.batch_size
    M = B * windows_per_clip(cfg)
    K = loader.video_pipelines
    geo = AudioGeometry(d)
    root = str(loader.root)
    plan = loader.plan
    parallel = plan.workers > 0
    common = dict(device_id=device_id, prefetch_queue_depth=lc.prefetch, exec_dynamic=True,
                  py_num_workers=max(1, plan.workers), py_start_method="spawn")

    def video_pipeline(j):
        @pipeline_def(batch_size=B, num_threads=plan.threads, **common)
        def pipe():
            src = ClipSource(root, loader.sampler, first, end, j, K, exclude, B)
            enc, frames, pos_y, pos_x, flip, key = fn.external_source(
                source=src, num_outputs=6, batch=False, parallel=parallel,
                dtype=[types.UINT8, types.INT32, types.FLOAT, types.FLOAT, types.INT32,
                       types.INT64])
            # pad_mode="none": an index past the file's last frame (a manifest that does not
            # match the file) raises, and the fault path sees it; the default pads black frames
            video = fn.decoders.video(enc, device="mixed" if gpu else "cpu", frames=frames,
                                      pad_mode="none")
            # crop, flip, normalise and CFHW in one pass over the frames (a separate fn.slice
            # copied every clip once more: ~8 % of the CPU loader's rate)
            video = fn.crop_mirror_normalize(
                video, crop=(d.crop, d.crop), crop_pos_y=pos_y, crop_pos_x=pos_x,
                rounding="round", out_of_bounds_policy="error", mirror=flip,
                dtype=types.FLOAT, output_layout="CFHW",
                mean=[m * 255 for m in d.mean], std=[s * 255 for s in d.std])
            return video, key
        return pipe()

    @pipeline_def(batch_size=M, num_threads=plan.audio_threads, **common)
    def audio_pipeline():
        src = AudioSource(root, loader.sampler, first, end, 0, 1, exclude, M)
        wave, key = fn.external_source(source=src, num_outputs=2, batch=True, batch_info=True,
                                       parallel=parallel, dtype=[types.FLOAT, types.INT64])
        if gpu:
            wave = wave.gpu()
        spec = fn.spectrogram(wave, nfft=geo.n_fft, window_length=geo.win,
                              window_step=geo.hop, window_fn=hann(geo.win).tolist(),
                              center_windows=False, power=2, layout="ft")
        mel = fn.mel_filter_bank(spec, sample_rate=geo.sr, nfilter=geo.n_mels,
                                 freq_low=geo.fmin, freq_high=geo.fmax, normalize=True,
                                 mel_formula="slaney")
        return fn.to_decibels(mel, multiplier=10.0, reference=1.0, cutoff_db=geo.floor_db), key

    return [video_pipeline(j) for j in range(K)], audio_pipeline()


# --------------------------------------------------------------------------------------------
# Which errors are the data's fault

OOM_MARKERS = ("out of memory", "cuda_error_out_of_memory", "cudaerrormemoryallocation",
               "bad_alloc", "can't allocate", "cannot allocate", "allocation failed")
NO_DECODER_MARKERS = ("nvcuvid", "cuda_error_no_device", "no cuda-capable device",
                      "nvdec is not available", "video capability")
DECODER_OPS = ("decoders.video", "decoders__video")


def classify_error(err: BaseException) -> str:
    """'oom', 'no_decoder', 'decode' (the video decoder failed on some input: a candidate
    fault, checked with PyAV) or 'other'."""
    msg = str(err).lower()
    if any(m in msg for m in OOM_MARKERS):
        return "oom"
    if any(m in msg for m in NO_DECODER_MARKERS):
        return "no_decoder"
    if any(m in msg for m in DECODER_OPS):
        return "decode"
    return "other"


class LoaderError(RuntimeError):
    """The DALI pipelines stopped for a reason that is not a damaged input."""


def explain(kind: str, err: BaseException, device: str) -> LoaderError:
    first = str(err).strip().splitlines()
    head = " ".join(first[:12])[:1500]
    if kind == "oom":
        return LoaderError(
            f"the DALI pipelines ran out of memory (loader.device={device}): lower "
            f"loader.batch_size, loader.video_pipelines or loader.prefetch, or leave the "
            f"model more room. DALI said: {head}")
    if kind == "no_decoder":
        return LoaderError(
            "DALI's `mixed` video decoder needs NVDEC (libnvcuvid.so from the NVIDIA driver, "
            "and in a container the 'video' driver capability: NVIDIA_DRIVER_CAPABILITIES="
            "compute,video,utility); it is not available here. Use loader.device=cpu on a set "
            "prepared with prepare.codec=vp9, or loader.kind=pyav. DALI said: " + head)
    return LoaderError(f"the DALI pipelines failed (not a decoding error of one input, so no "
                       f"clip was skipped): {head}")


# --------------------------------------------------------------------------------------------


class DALILoader(BaseLoader):
    kind = "dali"

    def __init__(self, cfg, root, *, device: str | None = None, **kw):
        super().__init__(cfg, root, **kw)
        lc = cfg.loader if device is None else dataclasses.replace(cfg.loader, device=device)
        self.plan = resolve_loader(lc, Machine.here())
        self.device, self.video_pipelines = self.plan.device, self.plan.video_pipelines
        self.threads = self.plan.threads
        self.device_id = int(os.environ.get("LOCAL_RANK", 0))
        if self.device == "cpu":
            codecs = {v.get("codec") for v in self.sampler.videos}
            if codecs - {"vp9", "vp8", "mjpeg"}:
                raise ConfigError(f"DALI's CPU video decoder reads VP8/VP9/MJPEG, but {self.root} "
                                 f"holds {sorted(codecs)}: prepare with --codec vp9 for CPU "
                                 f"runs, or use loader.kind=pyav")
        self.exclude: frozenset = frozenset()
        self._its = None
        self._first = self._next = 0   # flat index the pipelines started at / will make next

    # flat batch indices: g = epoch * n + batch
    def _flat(self, epoch: int, batch: int) -> int:
        return epoch * len(self.sampler) + batch

    def _start(self, epoch: int, start: int) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self._stop()
        n = len(self.sampler)
        first = self._flat(epoch, start)
        # to the end of training, and at least to the end of this epoch (a caller may run
        # past total_epochs: a benchmark, an evaluation)
        end = max(self.total_epochs * n, (epoch + 1) * n)
        videos, audio = build_pipelines(self, first, end, self.exclude)
        # the sources end every pipeline's data with StopIteration on a whole batch, so the
        # policy never applies; PARTIAL says so (no padding, no dropping)
        kw = dict(last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False,
                  prepare_first_batch=False)
        self._its = ([DALIGenericIterator([p], ["video", "key"], **kw) for p in videos],
                     DALIGenericIterator([audio], ["audio", "key"], **kw))
        # every pipeline starts filling its prefetch queue now, side by side (left to the first
        # request, pipeline j would start only when batch j is due: K cold starts in a row;
        # prepare_first_batch=True would wait for each one's first batch in turn)
        for it in [*self._its[0], self._its[1]]:
            schedule = getattr(it, "_schedule_runs", None)
            if schedule is not None and not getattr(it, "_ever_scheduled", True):
                schedule(False)
        self._first, self._next = first, first

    def _stop(self) -> None:
        """Shut the pipelines and their source processes down now (left to the garbage
        collector, a restart after an evaluation or a decode fault would hold two sets)."""
        its, self._its = self._its, None
        if its is None:
            return
        for it in [*its[0], its[1]]:
            for pipe in getattr(it, "_pipes", []):
                pool = getattr(pipe, "_py_pool", None)
                try:
                    pipe._shutdown()
                    if pool is not None:
                        pool.close()
                except Exception:   # a private API that moved: DALI's finalizers still free it
                    pass
        del its

    def close(self) -> None:
        self._stop()

    def _next_outputs(self, g: int):
        vits, ait = self._its
        with self.range("decode"):          # the video pipeline's batch
            (vout,) = next(vits[(g - self._first) % len(vits)])
        with self.range("audio_features"):  # the log-mel pipeline's batch
            (aout,) = next(ait)
        return vout, aout

    def _batches(self, epoch: int, start: int) -> Iterator[dict]:
        n = len(self.sampler)
        if self._its is None or self._next != self._flat(epoch, start):
            self._start(epoch, start)
        b = start
        while b < n:
            g = self._flat(epoch, b)
            try:
                vout, aout = self._next_outputs(g)
            except StopIteration:   # past the end the pipelines were built for
                if self._next == self._first:
                    raise RuntimeError(f"internal error: the DALI pipelines made no batch from "
                                       f"batch {b} of epoch {epoch} on") from None
                self._start(epoch, b)
                continue
            except Exception as e:
                kind = classify_error(e)
                if kind != "decode":
                    self._stop()
                    raise explain(kind, e, self.device) from e
                self._on_decode_error(epoch, b, e)   # raises where PyAV reads every clip
                self._start(epoch, b)
                continue
            plan = planned(self.sampler, epoch, b, self.exclude)
            for name, out in (("video", vout), ("audio", aout)):
                got = tuple(int(x) for x in out["key"][0].tolist())
                if got != (epoch, b):
                    self._stop()
                    raise RuntimeError(f"internal error: the DALI {name} pipeline made batch "
                                       f"{got[1]} of epoch {got[0]} where batch {b} of epoch "
                                       f"{epoch} was due; please report it")
            B, M = len(plan["clip_video"]), len(plan["role"])
            out = dict(video=vout["video"][:B], audio=aout["audio"][:M].unsqueeze(1),
                       **plan_meta(plan))
            b += 1
            self._next = g + 1
            yield out

    def _on_decode_error(self, epoch: int, batch: int, err: Exception) -> None:
        plan = planned(self.sampler, epoch, batch, self.exclude)
        bad = self.unreadable_clips(plan)   # read with PyAV, clip by clip
        if not bad:  # PyAV reads them all: the DALI error is not about one clip
            self._stop()
            raise LoaderError(f"DALI failed on batch {batch} of epoch {epoch} and every clip "
                              f"of it decodes with PyAV; not a damaged file: {err}") from err
        self.record_faults(plan, bad)
        self.exclude = self.exclude | {int(plan["clip_video"][i]) for i in bad}
