"""`fastavts prepare SRC OUT`: turn any pile of videos into a dataset built for fast random access.

    SRC (folder, recursive; or CSV list)
      |  one worker process per input (PyAV): pick the video and audio streams, decode both
      |  in one demux pass, resample the picture to constant fps (nearest frame in time),
      |  rotate by the display matrix, resize to the short side, re-encode with a short
      |  keyframe interval (optionally in segments); downmix + resample the sound to mono
      |  int16 at data.sample_rate, measuring where it starts relative to the first frame
      v
    OUT/videos/<id>.mp4|webm   OUT/audio_bank.s16 (+ .json)   OUT/manifest.jsonl
    OUT/rejected.jsonl         OUT/config.yaml                 OUT/summary.json

Only the parent process writes the bank and the lists, in this order for each video: move the
encoded files into place, append the audio (fsync), append the manifest row (fsync). An
interrupted run therefore loses nothing it had finished, and a rerun on the same OUT skips
every input already in manifest.jsonl or rejected.jsonl. Every input ends up in exactly one of
the two lists; a worker that dies inside FFmpeg is retried alone, then rejected.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..config import Config, ConfigError, load_yaml, save_config
from .audio_bank import AudioBankWriter
from .manifest import MANIFEST, REJECTED, JsonlWriter, read_jsonl

WORK = ".work"
SUMMARY = "summary.json"
# Settings that change what is written: a rerun into an existing OUT must use the same ones.
FROZEN = {"data": ("fps", "sample_rate"),
          "prepare": ("codec", "short_side", "keyframe_interval", "crf", "segment_seconds")}
DEFAULT_CRF = {"h264": 20, "vp9": 32}


class Reject(Exception):
    """An input that cannot be used; the message is the reason written to rejected.jsonl."""


# --------------------------------------------------------------------------------------------
# Inputs


SHARD = "shard.json"


def assign_ids(inputs: list[dict]) -> None:
    """Give every input its video id from the whole listing (sorted folder walk, or the CSV's
    rows): the slug of its path, `-2`, `-3`... for repeats. A pure function of the input list,
    so a share of a sharded prepare gives its videos the ids a single prepare would."""
    used: set[str] = set()
    for inp in inputs:
        base = vid = _slug(inp["rel"])
        n = 1
        while vid in used:
            n += 1
            vid = f"{base}-{n}"
        used.add(vid)
        inp["id"] = vid


def shard_of(rel: str, n: int) -> int:
    """The share (0..n-1) an input belongs to: a hash of its path relative to SRC (or of its
    CSV path), the same on every machine whatever the file order or the worker count."""
    return int(hashlib.sha1(rel.encode()).hexdigest()[:12], 16) % n


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N), 0 <= K < N."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: give K/N, e.g. 0/4 for the first of 4 shares") from None
    if not (n >= 1 and 0 <= k < n):
        raise ConfigError(f"--shard {text!r}: K/N needs N >= 1 and 0 <= K < N (the shares are "
                          f"numbered 0 to N-1)")
    return k, n


def inputs_fingerprint(inputs: list[dict]) -> str:
    """What every share of one sharded prepare must agree on: the whole input listing."""
    h = hashlib.sha256()
    for inp in inputs:
        h.update(inp["rel"].encode() + b"\0")
    return h.hexdigest()[:16]


def _slug(rel: str) -> str:
    stem = rel.rsplit(".", 1)[0] if "." in Path(rel).name else rel
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem.replace("/", "__")).strip("._") or "video"


def _sidecar(path: Path) -> dict | None:
    side = path.with_suffix(".json")
    if not side.is_file():
        return None
    try:
        return json.loads(side.read_text())
    except (OSError, ValueError):
        return None


def list_inputs(src: Path, cfg: Config, out: Path) -> tuple[list[dict], list[str]]:
    """Inputs as dicts {source, rel, label, meta, missing} and the files a folder scan left out
    (no video extension)."""
    p = cfg.prepare
    exts = {e.lower() for e in p.extensions}
    inputs, ignored = [], []
    if src.is_dir():
        out_res = out.resolve()
        if out_res == src.resolve():
            raise ConfigError(f"OUT '{out}' is the source folder itself; prepare into another "
                              f"folder (inside SRC is fine: it is skipped)")
        for dirpath, dirnames, filenames in os.walk(src):
            d = Path(dirpath)
            dirnames[:] = sorted(x for x in dirnames if not x.startswith(".")
                                 and (d / x).resolve() != out_res)
            for name in sorted(filenames):
                f = d / name
                rel = f.relative_to(src).as_posix()
                if name.startswith("."):  # hidden: partial downloads, '._x.mp4' forks
                    ignored.append(rel)
                    continue
                if f.suffix.lower() not in exts:
                    sidecar_of_video = f.suffix == ".json" and any(
                        f.with_suffix(e).exists() for e in exts)
                    if not sidecar_of_video:
                        ignored.append(rel)
                    continue
                meta = _sidecar(f) if p.label_from in ("auto", "sidecar") else None
                label = None
                if meta is not None:
                    label = meta.get("label")
                elif p.label_from == "folder":
                    label = Path(rel).parent.name or None
                inputs.append(dict(source=str(f.resolve()), rel=rel, label=label,
                                   meta=_trim_meta(meta), missing=False))
    elif src.is_file() and src.suffix.lower() == ".csv":
        inputs = _read_csv(src, cfg)
    elif src.is_file():
        raise ConfigError(f"SRC '{src}' is a file but not a .csv list; give a folder of videos "
                          f"or a CSV with a 'path' column (optionally 'label').")
    else:
        raise ConfigError(f"SRC '{src}' does not exist; give a folder of videos or a CSV list.")
    return inputs, ignored


def _trim_meta(meta: dict | None) -> dict | None:
    if meta is None:
        return None
    return {k: v for k, v in meta.items() if k not in ("id", "file", "label")}


_PATH_COLUMNS = ("path", "video", "file", "filename", "source")


def _read_csv(path: Path, cfg: Config) -> list[dict]:
    """A CSV list: a column naming the files (path/video/file/filename/source) and an optional
    label column; or Kinetics' columns (label, youtube_id, time_start, time_end), whose files
    are found as <youtube_id>_<start:06d>_<end:06d>.<ext> anywhere under the video root."""
    root = Path(cfg.prepare.video_root) if cfg.prepare.video_root else path.parent
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.reader(fh))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise ConfigError(f"CSV list '{path}' is empty.")
    header = [c.strip().lower() for c in rows[0]]
    exts = tuple(e.lower() for e in cfg.prepare.extensions)
    if header[0].endswith(exts):  # no header: path[,label]
        header, body = ["path", "label"][:len(rows[0])], rows
    else:
        body = rows[1:]
    col = {name: i for i, name in enumerate(header)}
    path_col = next((c for c in _PATH_COLUMNS if c in col), None)
    kinetics = path_col is None and {"youtube_id", "time_start", "time_end"} <= col.keys()
    if path_col is None and not kinetics:
        raise ConfigError(f"CSV list '{path}' has no column naming the videos: expected one of "
                          f"{', '.join(_PATH_COLUMNS)}, or Kinetics' youtube_id, time_start, "
                          f"time_end; found columns {', '.join(header)}.")
    by_stem = {}
    if kinetics:
        for dirpath, _, files in os.walk(root):
            for name in files:
                if name.lower().endswith(exts):
                    by_stem.setdefault(Path(name).stem, Path(dirpath) / name)
    use_labels = cfg.prepare.label_from in ("auto", "csv")
    inputs, seen = [], set()
    for n, row in enumerate(body, start=2 if body is not rows else 1):
        get = lambda k: row[col[k]].strip() if k in col and col[k] < len(row) else ""  # noqa
        if kinetics:
            try:
                stem = f"{get('youtube_id')}_{int(float(get('time_start'))):06d}_" \
                       f"{int(float(get('time_end'))):06d}"
            except ValueError:
                stem = f"{get('youtube_id')}_{get('time_start')}_{get('time_end')}"
            f = by_stem.get(stem, root / stem)
        else:
            f = Path(get(path_col))
            f = f if f.is_absolute() else root / f
        src = str(f.resolve())
        if src in seen:
            continue
        seen.add(src)
        label = get("label") or None if use_labels else None
        missing = not f.is_file()
        try:
            rel = f.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            rel = f.name
        inputs.append(dict(source=src, rel=rel, label=label, meta=None, missing=missing,
                           csv_row=n))
    return inputs


# --------------------------------------------------------------------------------------------
# One input, in a worker process


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def _open_encoder(path: str, codec: str, fps: Fraction, width: int, height: int, gop: int,
                  crf: int):
    import av

    c = av.open(path, "w")
    if codec == "h264":
        s = c.add_stream("libx264", rate=fps, options={
            "preset": "veryfast", "crf": str(crf), "threads": "1",
            # bframes=0: frames leave the decoder in order, one per packet; scenecut=0 keeps
            # the keyframe grid fixed so a clip costs at most `gop` frames of decoding.
            "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0"})
    else:
        # realtime/cpu-used 8: 6x faster than good/5 at the same PSNR (33.9 dB on 160x128
        # synthetic video, +20 % bytes), measured on the 2-core dev machine.
        s = c.add_stream("libvpx-vp9", rate=fps, options={
            "deadline": "realtime", "cpu-used": "8", "row-mt": "1", "threads": "1", "crf": str(crf),
            "b": "0", "lag-in-frames": "0", "auto-alt-ref": "0", "keyint_min": str(gop)})
    s.width, s.height, s.pix_fmt = width, height, "yuv420p"
    s.codec_context.gop_size = gop
    return c, s


class _CfrWriter:
    """Receives decoded frames in presentation order and writes a constant-frame-rate video:
    output frame k shows the source frame nearest to time first_t + k / fps."""

    def __init__(self, work: Path, vid: str, ext: str, codec: str, fps: float, short_side: int,
                 gop: int, crf: int, seg_frames: int):
        self.work, self.vid, self.ext, self.codec = work, vid, ext, codec
        self.fps, self.rate = fps, Fraction(fps).limit_denominator(100000)
        self.short_side, self.gop, self.crf, self.seg_frames = short_side, gop, crf, seg_frames
        self.k = 0                      # output frames written
        self.local = 0                  # ... of them in the current segment file
        self.first_t = None
        self.prev = None                # (frame, time) waiting to be written
        self.prev_conv = None
        self.intervals: list[float] = []
        self.files: list[dict] = []
        self.out = self.stream = None
        self.rotation = 0
        from av.video.frame import PictureType
        self.no_pict_type = PictureType.NONE

    def _setup(self, f, sar):
        self.source_rotation = int(getattr(f, "rotation", 0) or 0)  # display matrix, CCW deg
        self.rotation = int(round(self.source_rotation / 90)) % 4
        w = f.width * (float(sar) if sar else 1.0)
        h = f.height
        dw, dh = (h, w) if self.rotation % 2 else (w, h)
        scale = self.short_side / min(dw, dh)
        self.width, self.height = _even(dw * scale), _even(dh * scale)
        self.src_size = (f.width, f.height)

    def _convert(self, f):
        import av

        from .dataset import reformatter

        rf = reformatter()   # one scaler context, not one per frame (same pixels)
        if self.rotation == 0:
            return rf.reformat(f, width=self.width, height=self.height, format="yuv420p",
                               interpolation="AREA")
        pw, ph = (self.height, self.width) if self.rotation % 2 else (self.width, self.height)
        a = rf.reformat(f, width=pw, height=ph, format="rgb24", interpolation="AREA").to_ndarray()
        # np.rot90 turns counter-clockwise, like the display matrix's angle.
        return av.VideoFrame.from_ndarray(np.ascontiguousarray(np.rot90(a, self.rotation)),
                                          format="rgb24")

    def _emit(self):
        if self.prev_conv is None:
            self.prev_conv = self._convert(self.prev[0])
        if self.out is None or (self.seg_frames and self.local >= self.seg_frames):
            self._close_file()
            n = len(self.files)
            name = f"{self.vid}_s{n:04d}.{self.ext}" if self.seg_frames else f"{self.vid}.{self.ext}"
            self.out, self.stream = _open_encoder(str(self.work / name), self.codec, self.rate,
                                                  self.width, self.height, self.gop, self.crf)
            self.files.append(dict(path=name, start_frame=self.k, num_frames=0))
            self.local = 0
        fr = self.prev_conv
        # A decoded keyframe keeps pict_type I, and encoders obey it: reset it so that the
        # keyframe grid is ours (every `gop` frames), not the source's.
        fr.pict_type = self.no_pict_type
        fr.pts = self.local
        fr.time_base = 1 / self.rate
        for p in self.stream.encode(fr):
            self.out.mux(p)
        self.files[-1]["num_frames"] += 1
        self.k += 1
        self.local += 1

    def _close_file(self):
        if self.out is not None:
            for p in self.stream.encode():
                self.out.mux(p)
            self.out.close()
            self.out = None

    def add(self, f, t: float, sar=None):
        if self.prev is None:
            self._setup(f, sar)
            self.first_t, self.prev = t, (f, t)
            return
        pt = self.prev[1]
        self.intervals.append(t - pt)
        mid = (pt + t) / 2
        while self.first_t + self.k / self.fps <= mid + 1e-9:
            self._emit()
        self.prev, self.prev_conv = (f, t), None

    def finish(self, last_duration: float | None) -> float:
        """Write the last frame for its duration; returns the source video's duration."""
        if self.prev is None:
            return 0.0
        if not last_duration or last_duration <= 0:
            last_duration = float(np.median(self.intervals)) if self.intervals else 1 / self.fps
        span = self.prev[1] + last_duration - self.first_t
        total = max(1, int(round(span * self.fps)))
        while self.k < total:
            self._emit()
        self._close_file()
        return span

    def abort(self):
        try:
            self._close_file()
        except Exception:
            pass


def _fmt_s(x: float) -> str:
    return f"{x:.2f} s"


def process_one(job: dict) -> dict:
    """Prepare one input. Never raises: returns {'status': 'ok', 'record', 'files', 'audio'}
    or {'status': 'rejected', 'reason'}; leaves nothing behind in the work folder on reject."""
    import av.error

    work = Path(job["work"])
    internal = None
    try:
        return _process(job)
    except Reject as r:
        reason = str(r)
    except (av.error.FFmpegError, OSError, UnicodeError, ValueError, EOFError, OverflowError,
            MemoryError) as e:  # what bad media makes FFmpeg, PyAV or numpy raise
        reason = f"could not be read: {type(e).__name__}: {e}"
    except Exception as e:  # a bug of ours, not the input's fault: say so, retry next run
        import traceback
        reason = f"internal error (a fastavts bug; please report): {type(e).__name__}: {e}"
        internal = traceback.format_exc()
    for f in work.glob(f"{job['id']}.*"):
        f.unlink(missing_ok=True)
    for f in work.glob(f"{job['id']}_s*"):
        f.unlink(missing_ok=True)
    out = dict(status="rejected", reason=reason)
    if internal:
        out["internal"] = internal
    return out


def _process(job: dict) -> dict:
    import av
    import av.error

    _simulate_failure(job["source"])

    t_start = time.monotonic()
    src, vid, work = job["source"], job["id"], Path(job["work"])
    d, p = job["data"], job["prepare"]
    if job.get("missing"):
        row = f" (row {job['csv_row']} of the CSV list)" if job.get("csv_row") else ""
        raise Reject(f"file not found: {src}{row}")
    size = os.path.getsize(src)
    if size == 0:
        raise Reject("empty file (0 bytes)")
    try:
        container = av.open(src, metadata_errors="ignore")
    except av.error.FFmpegError as e:
        raise Reject(f"not a readable media file ({e.strerror or e})") from None
    with container:
        vstreams = [s for s in container.streams.video if not _is_cover_art(s)]
        if not vstreams:
            raise Reject("no video stream (an audio-only or non-video file)")
        if not container.streams.audio and p["require_audio"]:
            raise Reject("no audio stream: sync learning needs the sound track (set "
                         "prepare.require_audio=false to keep video-only files for fine-tuning)")
        vs = container.streams.best("video")
        if vs is None or vs not in vstreams:
            vs = max(vstreams, key=lambda s: (s.codec_context.width or 0) * (s.codec_context.height or 0))
        as_ = container.streams.best("audio") if container.streams.audio else None
        for s in (vs, as_):
            if s is not None:
                s.codec_context.thread_count = 1
        codec = p["codec"]
        ext = "mp4" if codec == "h264" else "webm"
        crf = p["crf"] if p["crf"] >= 0 else DEFAULT_CRF[codec]
        seg_frames = int(round(p["segment_seconds"] * d["fps"])) if p["segment_seconds"] else 0
        writer = _CfrWriter(work, vid, ext, codec, d["fps"], p["short_side"],
                            p["keyframe_interval"], crf, seg_frames)
        sr = d["sample_rate"]
        resampler = av.AudioResampler(format="s16", layout="mono", rate=sr)
        pcm: list[np.ndarray] = []
        a0 = None                    # time of the first decoded audio sample (s)
        a_in = 0                     # input samples seen since a0
        a_rate = None
        a_gaps = 0.0
        last_t = None
        last_dur = None
        dropped = 0
        warnings: list[str] = []
        errors = Counter()
        sar = vs.codec_context.sample_aspect_ratio
        sar = sar if sar and sar.numerator and sar != 1 else None
        tb = vs.time_base

        def on_video(f):
            nonlocal last_t, last_dur, dropped
            t = f.time
            if t is None:  # no timestamp: continue the rate we know
                rate = float(vs.average_rate or vs.guessed_rate or d["fps"])
                t = 0.0 if last_t is None else last_t + 1 / rate
            if last_t is not None and t <= last_t + 1e-6:
                dropped += 1  # duplicate or backwards timestamp
                return
            writer.add(f, t, sar)
            last_t = t
            last_dur = float(f.duration * tb) if f.duration and tb else None

        def on_audio(f):
            nonlocal a0, a_in, a_rate, a_gaps, resampler
            if a0 is None:
                a0 = f.time if f.time is not None else float(
                    (as_.start_time or 0) * as_.time_base) if as_.time_base else 0.0
                a_rate = f.sample_rate
            elif f.sample_rate != a_rate:  # the stream changed rate: restart the resampler
                pcm.extend(r.to_ndarray().reshape(-1) for r in resampler.resample(None))
                resampler = av.AudioResampler(format="s16", layout="mono", rate=sr)
                a0 = a0 + a_in / a_rate
                a_in, a_rate = 0, f.sample_rate
            if f.time is not None:  # a hole in the stream (> 50 ms): keep time by filling zeros
                gap = f.time - (a0 + a_in / a_rate)
                if gap > 0.05:
                    pcm.append(np.zeros(int(round(gap * sr)), np.int16))
                    a_in += int(round(gap * a_rate))
                    a_gaps += gap
            pcm.extend(r.to_ndarray().reshape(-1) for r in resampler.resample(f))
            a_in += f.samples

        packets = container.demux(*(x for x in (vs, as_) if x is not None))
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.error.FFmpegError as e:
                warnings.append(f"demuxing stopped early: {e.strerror or e}")
                break
            if time.monotonic() - t_start > p["timeout_s"]:
                writer.abort()
                raise Reject(f"took longer than prepare.timeout_s={p['timeout_s']} s")
            try:
                frames = packet.decode()
            except av.error.FFmpegError as e:
                errors[packet.stream.type] += 1
                if sum(errors.values()) > 100:
                    warnings.append(f"stopped after 100 undecodable packets ({e.strerror or e})")
                    break
                continue
            handle = on_video if packet.stream.index == vs.index else on_audio
            for f in frames:
                handle(f)
        if a0 is not None:
            pcm.extend(r.to_ndarray().reshape(-1) for r in resampler.resample(None))

        if writer.prev is None:
            writer.abort()
            raise Reject("the video stream has no decodable frame")
        duration_src = writer.finish(last_dur)
        first_t = writer.first_t
        # What the file says the picture lasts: the stream's own duration where the container
        # keeps one (mp4), else the container's (Matroska), which may be the audio's.
        declared = (float(vs.duration * tb) if vs.duration and tb else
                    container.duration / 1e6 if container.duration else None)
        src_rate = vs.average_rate or vs.guessed_rate
        info = dict(  # read now: stream objects are not valid once the container is closed
            video_stream=vs.index, audio_stream=as_.index if as_ else None,
            video_codec=vs.codec_context.name,
            audio_codec=as_.codec_context.name if as_ else None, width=writer.src_size[0],
            height=writer.src_size[1], rotation=writer.source_rotation,
            fps=round(float(src_rate), 4) if src_rate else None,
            audio_channels=len(as_.codec_context.layout.channels) if as_ else 0)

    if declared and duration_src < declared - max(0.5, 0.1 * declared):
        warnings.append(f"decoded {duration_src:.2f} s of the {declared:.2f} s the container "
                        f"declares: the file is probably truncated")
    for kind, n in errors.items():
        warnings.append(f"{n} undecodable {kind} packet(s) skipped")
    if dropped:
        warnings.append(f"{dropped} video frame(s) with repeated or backwards timestamps dropped")
    if a_gaps:
        warnings.append(f"audio holes of {a_gaps:.3f} s in total filled with silence")

    fps = d["fps"]
    num_frames = writer.k
    duration = num_frames / fps
    clip_s = d["clip_frames"] * d["frame_stride"] / fps

    def reject(reason):
        for f in writer.files:
            (work / f["path"]).unlink(missing_ok=True)
        raise Reject(reason)

    if duration < clip_s - 1e-9:
        reject(f"too short: {_fmt_s(duration)} of video, one clip needs {_fmt_s(clip_s)} "
               f"({d['clip_frames']} frames x stride {d['frame_stride']} at {fps:g} fps)")
    audio = np.concatenate(pcm) if pcm else np.zeros(0, np.int16)
    peak = int(np.abs(audio.astype(np.int32)).max()) if len(audio) else 0
    peak_db = 20 * math.log10(peak / 32768) if peak else -math.inf
    audio_start = (a0 - first_t) if a0 is not None else 0.0  # from the first frame to the sound
    if p["require_audio"]:
        if len(audio) == 0:
            reject("the audio stream has no decodable sound")
        if peak_db < p["min_audio_peak_db"]:
            reject(f"silent audio track (peak {peak_db:.1f} dBFS, below "
                   f"prepare.min_audio_peak_db={p['min_audio_peak_db']:g})")
        audio_end = audio_start + len(audio) / sr
        overlap = min(audio_end, duration) - max(audio_start, 0.0)
        if overlap < clip_s - 1e-9:
            reject(f"audio overlaps only {_fmt_s(max(overlap, 0))} of the {_fmt_s(duration)} "
                   f"video; one clip needs {_fmt_s(clip_s)}")
    elif len(audio) == 0:
        warnings.append("no sound (kept: prepare.require_audio=false); its clips have silent "
                        "audio windows")

    audio_path = work / f"{vid}.pcm"
    audio.astype("<i2").tofile(audio_path)
    record = dict(
        id=vid, source=src, label=job.get("label"),
        fps=fps, num_frames=num_frames, duration=round(duration, 6),
        width=writer.width, height=writer.height, codec=codec,
        segments=[dict(path=f"videos/{f['path']}", start_frame=f["start_frame"],
                       num_frames=f["num_frames"]) for f in writer.files],
        audio_start=round(audio_start, 6), audio_samples=int(len(audio)),
        audio_duration=round(len(audio) / sr, 6), sample_rate=sr,
        source_info=dict(
            info, vfr=_is_vfr(writer.intervals), duration=round(duration_src, 4),
            first_video_time=round(first_t, 6),
            first_audio_time=round(a0, 6) if a0 is not None else None, audio_rate=a_rate,
            audio_peak_db=round(peak_db, 2) if peak else None, bytes=size),
        warnings=warnings,
    )
    if job.get("meta"):
        record["meta"] = job["meta"]
    return dict(status="ok", record=record, files=[f["path"] for f in writer.files],
                audio=str(audio_path))


def _is_cover_art(stream) -> bool:
    """An attached picture (album art) is a 'video stream' of one frame, not a video."""
    disposition = getattr(stream, "disposition", None)  # PyAV >= 14.1
    if disposition is not None:
        import av.stream
        return bool(disposition & av.stream.Disposition.attached_pic)
    return (stream.frames or 0) == 1 and stream.codec_context.name in ("mjpeg", "png", "bmp")


def _simulate_failure(source: str) -> None:
    """Tests only: FASTAVTS_TEST_HANG / FASTAVTS_TEST_CRASH name a file whose worker then hangs
    or dies the way a stuck or crashing FFmpeg call would (no Python exception);
    FASTAVTS_TEST_BUG names a file (or '*') on which our code raises as a bug would."""
    name = os.path.basename(source)
    if name and os.environ.get("FASTAVTS_TEST_BUG") in (name, "*"):
        raise AttributeError("simulated bug")
    if name and name == os.environ.get("FASTAVTS_TEST_HANG"):
        while True:
            time.sleep(3600)
    if name and name == os.environ.get("FASTAVTS_TEST_CRASH"):
        os._exit(139)


def _is_vfr(intervals: list[float]) -> bool:
    if len(intervals) < 3:
        return False
    a = np.asarray(intervals)
    med = np.median(a)
    # > 2 ms beyond the median catches real VFR but not 1 ms timestamp rounding (24 fps webm)
    return bool(np.percentile(np.abs(a - med), 90) > max(0.002, 0.05 * med))


def _worker_init():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    os.environ.setdefault("OMP_NUM_THREADS", "1")


# --------------------------------------------------------------------------------------------
# The parent: schedule, commit, resume


def resolve_codec(codec: str) -> str:
    if codec != "auto":
        return codec
    try:
        import torch
        return "h264" if torch.cuda.is_available() else "vp9"
    except ImportError:
        return "vp9"


def _check_frozen(out: Path, cfg: Config) -> None:
    path = out / "config.yaml"
    if not path.exists() or not (out / MANIFEST).exists():
        return
    old = load_yaml(path)
    for section, keys in FROZEN.items():
        for k in keys:
            was = old.get(section, {}).get(k)
            now = getattr(getattr(cfg, section), k)
            if was is not None and was != now:
                raise ConfigError(
                    f"'{out}' was prepared with {section}.{k}={was!r}, this run asks for {now!r}. "
                    f"Rerun with the same settings to resume, or prepare into a new folder.")


def _run_pool(jobs: list[dict], workers: int, on_result: Callable,
              hang_s: float) -> tuple[list, list]:
    """Run jobs in a process pool, calling on_result(job, result) as they finish. If a worker
    dies (a crash inside FFmpeg) or a job runs past `hang_s` (stuck inside FFmpeg, where the
    worker's own timeout check cannot run), the pool is torn down and this returns
    (jobs in flight, jobs not started); a hung job is marked job['hung'] = True."""
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                               initializer=_worker_init)
    it = iter(jobs)
    inflight: dict = {}
    running_since: dict = {}

    def salvage(first: list) -> tuple[list, list]:
        crashed = list(first)
        for f2, j2 in inflight.items():
            if f2.done() and not f2.cancelled() and f2.exception() is None:
                on_result(j2, f2.result())
            else:
                crashed.append(j2)
        return crashed, list(it)

    try:
        def fill():
            while len(inflight) < 2 * workers:
                j = next(it, None)
                if j is None:
                    return
                inflight[pool.submit(process_one, j)] = j

        fill()
        while inflight:
            done, _ = wait(inflight, timeout=1.0, return_when=FIRST_COMPLETED)
            now = time.monotonic()
            for fut in done:
                j = inflight.pop(fut)
                running_since.pop(fut, None)
                try:
                    res = fut.result()
                except BrokenProcessPool:
                    return salvage([j])
                on_result(j, res)
            # `running` starts when a job is handed to the workers' queue, at most one job
            # before a worker takes it: hence hang_s allows for two jobs' time.
            for fut in inflight:
                if fut.running():
                    running_since.setdefault(fut, now)
            hung = [f for f in inflight if now - running_since.get(f, now) > hang_s]
            if hung:
                for f in hung:
                    inflight[f]["hung"] = True
                _terminate(pool)
                return salvage([])
            fill()
        return [], []
    finally:
        if inflight:
            _terminate(pool)
        pool.shutdown(wait=True, cancel_futures=True)


def _terminate(pool: ProcessPoolExecutor) -> None:
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        if proc.is_alive():
            proc.terminate()


def _noop() -> bool:
    return True


def _check_workers_start() -> None:
    """Before blaming an input for a dead worker, make sure workers can run at all."""
    try:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"),
                                 initializer=_worker_init) as pool:
            pool.submit(_noop).result(timeout=120)
    except Exception as e:
        raise RuntimeError(f"prepare's worker processes do not start ({type(e).__name__}: {e}); "
                           f"run from a script or the fastavts command, not from stdin, or use "
                           f"prepare.workers=1") from None


def prepare(src: str | os.PathLike, out: str | os.PathLike, cfg: Config, progress: bool = True,
            retry_rejected: bool = False, command: str = "",
            shard: tuple[int, int] | None = None) -> dict:
    """Prepare SRC into OUT (see the module docstring). Returns the summary dict.

    `shard=(K, N)`: only the K-th of N shares of the inputs (shard_of: a hash of each input's
    path), with the ids a single prepare would give them; OUT/shard.json records the share.
    `fastavts merge` joins the N shares into one dataset."""
    src, out = Path(src), Path(out)
    cfg.prepare.codec = resolve_codec(cfg.prepare.codec)
    inputs, ignored = list_inputs(src, cfg, out)
    assign_ids(inputs)
    shard_info = None
    if shard is not None:
        k, n = shard
        shard_info = dict(shard=k, of=n, inputs=len(inputs), inputs_sha=inputs_fingerprint(inputs))
        inputs = [inp for inp in inputs if shard_of(inp["rel"], n) == k]
        shard_info["shard_inputs"] = len(inputs)
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)  # held until this process exits or prepare returns
    try:
        _check_shard(out, shard_info)
        return _prepare_locked(src, out, cfg, inputs, ignored, progress, retry_rejected,
                               command, shard_info)
    finally:
        lock.close()


def _check_shard(out: Path, info: dict | None) -> None:
    """A rerun into OUT must be the same share of the same inputs (or unsharded both times)."""
    path = out / SHARD
    had = json.loads(path.read_text()) if path.exists() else None
    started = (out / MANIFEST).exists() or (out / REJECTED).exists()
    if started and had != info and (had is not None or info is not None):
        def say(x):
            return "unsharded" if x is None else f"share {x['shard']}/{x['of']} of {x['inputs']} inputs"
        raise ConfigError(f"'{out}' holds a prepare of {say(had)}; this run asks for "
                          f"{say(info)}. Rerun with the same --shard (and the same inputs) to "
                          f"resume, or prepare into a new folder.")
    if info is not None:
        tmp = out / f".{SHARD}.tmp"
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, path)


def _lock(out: Path):
    """One writer per dataset folder: a second prepare into the same OUT is refused."""
    import fcntl

    fh = open(out / ".lock", "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise ConfigError(f"another fastavts prepare is writing '{out}' right now; wait for it "
                          f"to finish (a rerun afterwards resumes) or use another OUT") from None
    return fh


def _prepare_locked(src: Path, out: Path, cfg: Config, inputs: list, ignored: list,
                    progress: bool, retry_rejected: bool, command: str,
                    shard_info: dict | None = None) -> dict:
    from tqdm import tqdm

    _check_frozen(out, cfg)
    save_config(cfg, out / "config.yaml",
                header=f"# resolved config of: {command or f'fastavts prepare {src} {out}'}")

    manifest = read_jsonl(out / MANIFEST, repair=True)
    rejected = read_jsonl(out / REJECTED, repair=True)
    # Inputs that met a bug of ours are tried again on every run; --retry-rejected: all.
    keep = [] if retry_rejected else [r for r in rejected if not r.get("internal")]
    if len(keep) < len(rejected):
        _rewrite_jsonl(out / REJECTED, keep)
        rejected = keep
    valid = max((r["audio_offset"] + r["audio_samples"] for r in manifest), default=0)
    bank = AudioBankWriter(out, cfg.data.sample_rate, valid)
    done = {r["source"] for r in manifest} | {r["source"] for r in rejected}
    used_ids = {r["id"] for r in manifest} | {r["id"] for r in rejected if "id" in r}

    work = out / WORK
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    (out / "videos").mkdir(exist_ok=True)
    # Files of a video whose row never made it into the manifest (interrupted commit).
    committed = {Path(s["path"]).name for r in manifest for s in r["segments"]}
    for f in (out / "videos").iterdir():
        if f.name not in committed:
            f.unlink()

    pending = []
    for inp in inputs:
        if inp["source"] in done:
            continue
        vid = inp["id"]   # assign_ids: from the whole listing
        if vid in used_ids:   # a set made before ids came from the listing: keep them unique
            base, n = vid, 1
            while vid in used_ids:
                n += 1
                vid = f"{base}-{n}"
        used_ids.add(vid)
        pending.append(dict(inp, id=vid, work=str(work), data=asdict(cfg.data),
                            prepare=asdict(cfg.prepare)))

    stats = Counter(ok=len(manifest), rejected=len(rejected))
    audio_s = sum(r["audio_duration"] for r in manifest)
    video_s = sum(r["duration"] for r in manifest)
    new_audio_s = new_video_s = 0.0
    man_w, rej_w = JsonlWriter(out / MANIFEST), JsonlWriter(out / REJECTED)
    bar = tqdm(total=len(inputs), initial=len(inputs) - len(pending), desc="prepare",
               unit="video", disable=not progress, dynamic_ncols=True)

    def commit(job, res):
        nonlocal new_audio_s, new_video_s
        if res["status"] == "ok":
            rec = res["record"]
            for name in res["files"]:
                os.replace(work / name, out / "videos" / name)
            pcm = np.fromfile(res["audio"], dtype="<i2")
            rec["audio_offset"] = bank.append(pcm)
            man_w.write(rec)
            os.unlink(res["audio"])
            stats["ok"] += 1
            new_audio_s += rec["audio_duration"]
            new_video_s += rec["duration"]
        else:
            row = dict(source=job["source"], reason=res["reason"], id=job["id"])
            if res.get("internal"):
                row["internal"] = True
                stats["internal"] += 1
                if stats["internal"] >= 3 and stats["ok"] == len(manifest):
                    raise RuntimeError(f"prepare stops: the first {stats['internal']} inputs all "
                                       f"failed inside fastavts (a bug, not your data):\n"
                                       f"{res['internal']}")
            rej_w.write(row)
            stats["rejected"] += 1
        bar.update()
        bar.set_postfix(ok=stats["ok"], rejected=stats["rejected"], refresh=False)

    workers = cfg.prepare.workers or os.cpu_count() or 1
    t0 = time.time()
    interrupted = False
    try:
        queue = pending
        hang_s = 2 * cfg.prepare.timeout_s + 5
        while queue:
            crashed, rest = _run_pool(queue, min(workers, len(queue)), commit, hang_s)
            for job in crashed:  # alone, so that a second failure names its culprit
                job.pop("hung", None)
                c2, _ = _run_pool([job], 1, commit, hang_s)
                for j in c2:
                    if j.get("hung"):
                        reason = (f"decoder hangs: no result within {hang_s:g} s with this "
                                  f"file alone in the pool (prepare.timeout_s="
                                  f"{cfg.prepare.timeout_s:g})")
                    else:
                        _check_workers_start()
                        reason = ("decoder crashed: the worker process died with this file "
                                  "alone in the pool")
                    commit(j, dict(status="rejected", reason=reason))
            queue = rest
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        man_w.close()
        rej_w.close()
        bank.close()
        shutil.rmtree(work, ignore_errors=True)
    wall = time.time() - t0
    new = stats["ok"] + stats["rejected"] - len(manifest) - len(rejected)
    reasons = Counter(_reason_kind(r["reason"]) for r in read_jsonl(out / REJECTED))
    summary = dict(
        src=str(src), out=str(out), inputs=len(inputs), prepared=stats["ok"],
        rejected=stats["rejected"], rejected_by_reason=dict(reasons),
        not_videos_ignored=len(ignored), ignored_examples=ignored[:5],
        processed_this_run=new, wall_s=round(wall, 3),
        videos_per_s=round(new / wall, 3) if wall > 0 else None,
        audio_hours_per_s=round(new_audio_s / 3600 / wall, 6) if wall > 0 else None,
        audio_hours=round((audio_s + new_audio_s) / 3600, 4),
        video_hours=round((video_s + new_video_s) / 3600, 4),
        workers=workers, codec=cfg.prepare.codec, interrupted=interrupted,
    )
    if shard_info is not None:
        summary.update(shard=f"{shard_info['shard']}/{shard_info['of']}",
                       all_inputs=shard_info["inputs"])
    tmp = out / f".{SUMMARY}.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out / SUMMARY)
    if interrupted:
        raise KeyboardInterrupt(summary)
    return summary


def _rewrite_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    os.replace(tmp, path)


def _reason_kind(reason: str) -> str:
    """The reason's first words, for counting ('too short', 'no audio stream', ...)."""
    return re.split(r"[:(,]", reason, maxsplit=1)[0].strip()
