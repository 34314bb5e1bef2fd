"""prepare's per-file worker: one input in, one re-encoded video (or its segments) and its
sound out, or a reason to reject it. Runs in a worker process (fastavts/data/prepare/pool.py).

    open the file -> pick the video and audio streams -> decode both in one demux pass:
        video frames -> CfrWriter (encoder.py)      audio frames -> AudioTrack (audio_track.py)
    -> what the source says of itself -> the checks that reject (too short, silent, no sound
       where the clip is) -> the manifest row, the encoded files and the sound in the work folder
"""
from __future__ import annotations

import math
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...runtime import die_with_parent
from .audio_track import AudioTrack
from .encoder import CfrWriter

DEFAULT_CRF = {"h264": 20, "vp9": 32}


class Reject(Exception):
    """An input that cannot be used; the message is the reason written to rejected.jsonl."""


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
        vs, as_ = _pick_streams(container, p)
        writer = _writer(work, vid, d, p)
        stream_start = float((as_.start_time or 0) * as_.time_base) \
            if as_ is not None and as_.time_base else 0.0
        track = AudioTrack(d["sample_rate"], stream_start)
        dec = _decode(container, vs, as_, writer, track, d, p, t_start)
        audio = track.finish()
        if writer.prev is None:
            writer.abort()
            raise Reject("the video stream has no decodable frame")
        duration_src = writer.finish(dec.last_dur)
        info, declared = _source_info(container, vs, as_, writer)
    warnings = dec.warnings(duration_src, declared, track.gaps)
    return _finish(job, writer, track, audio, info, duration_src, size, warnings)


def _pick_streams(container, p: dict):
    """(video stream, audio stream or None): the best video stream that is not cover art."""
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
    return vs, as_


def _writer(work: Path, vid: str, d: dict, p: dict) -> CfrWriter:
    codec = p["codec"]
    crf = p["crf"] if p["crf"] >= 0 else DEFAULT_CRF[codec]
    seg_frames = int(round(p["segment_seconds"] * d["fps"])) if p["segment_seconds"] else 0
    return CfrWriter(work, vid, "mp4" if codec == "h264" else "webm", codec, d["fps"],
                     p["short_side"], p["keyframe_interval"], crf, seg_frames)


@dataclass
class _Decoded:
    """What the demux pass saw besides the frames."""
    last_t: float | None = None       # the last kept video frame's time
    last_dur: float | None = None     # ... and its duration
    dropped: int = 0                  # video frames with repeated or backwards timestamps
    errors: Counter = field(default_factory=Counter)   # undecodable packets per stream type
    notes: list = field(default_factory=list)

    def warnings(self, duration_src: float, declared: float | None, gaps: float) -> list[str]:
        out = list(self.notes)
        if declared and duration_src < declared - max(0.5, 0.1 * declared):
            out.append(f"decoded {duration_src:.2f} s of the {declared:.2f} s the container "
                       f"declares: the file is probably truncated")
        for kind, n in self.errors.items():
            out.append(f"{n} undecodable {kind} packet(s) skipped")
        if self.dropped:
            out.append(f"{self.dropped} video frame(s) with repeated or backwards timestamps "
                       f"dropped")
        if gaps:
            out.append(f"audio holes of {gaps:.3f} s in total filled with silence")
        return out


def _decode(container, vs, as_, writer: CfrWriter, track: AudioTrack, d: dict, p: dict,
            t_start: float) -> _Decoded:
    """One demux pass over both streams: video frames to the writer in presentation order,
    audio frames to the track."""
    import av.error

    dec = _Decoded()
    sar = vs.codec_context.sample_aspect_ratio
    sar = sar if sar and sar.numerator and sar != 1 else None
    tb = vs.time_base

    def on_video(f):
        t = f.time
        if t is None:  # no timestamp: continue the rate we know
            rate = float(vs.average_rate or vs.guessed_rate or d["fps"])
            t = 0.0 if dec.last_t is None else dec.last_t + 1 / rate
        if dec.last_t is not None and t <= dec.last_t + 1e-6:
            dec.dropped += 1  # duplicate or backwards timestamp
            return
        writer.add(f, t, sar)
        dec.last_t = t
        dec.last_dur = float(f.duration * tb) if f.duration and tb else None

    packets = container.demux(*(x for x in (vs, as_) if x is not None))
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            break
        except av.error.FFmpegError as e:
            dec.notes.append(f"demuxing stopped early: {e.strerror or e}")
            break
        if time.monotonic() - t_start > p["timeout_s"]:
            writer.abort()
            raise Reject(f"took longer than prepare.timeout_s={p['timeout_s']} s")
        try:
            frames = packet.decode()
        except av.error.FFmpegError as e:
            dec.errors[packet.stream.type] += 1
            if sum(dec.errors.values()) > 100:
                dec.notes.append(f"stopped after 100 undecodable packets ({e.strerror or e})")
                break
            continue
        handle = on_video if packet.stream.index == vs.index else track.add
        for f in frames:
            handle(f)
    return dec


def _source_info(container, vs, as_, writer: CfrWriter) -> tuple[dict, float | None]:
    """What the source says of itself (read while the container is open: stream objects are
    not valid after), and the picture's declared duration: the stream's own where the
    container keeps one (mp4), else the container's (Matroska), which may be the audio's."""
    tb = vs.time_base
    declared = (float(vs.duration * tb) if vs.duration and tb else
                container.duration / 1e6 if container.duration else None)
    src_rate = vs.average_rate or vs.guessed_rate
    info = dict(
        video_stream=vs.index, audio_stream=as_.index if as_ else None,
        video_codec=vs.codec_context.name,
        audio_codec=as_.codec_context.name if as_ else None, width=writer.src_size[0],
        height=writer.src_size[1], rotation=writer.source_rotation,
        fps=round(float(src_rate), 4) if src_rate else None,
        audio_channels=len(as_.codec_context.layout.channels) if as_ else 0)
    return info, declared


def _finish(job: dict, writer: CfrWriter, track: AudioTrack, audio: np.ndarray, info: dict,
            duration_src: float, size: int, warnings: list[str]) -> dict:
    """The checks that reject a decoded input, then its manifest row; the sound written to
    the work folder."""
    d, p, work, vid = job["data"], job["prepare"], Path(job["work"]), job["id"]
    fps, sr = d["fps"], d["sample_rate"]
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
    peak = int(np.abs(audio.astype(np.int32)).max()) if len(audio) else 0
    peak_db = 20 * math.log10(peak / 32768) if peak else -math.inf
    # from the first frame to the sound
    audio_start = (track.start - writer.first_t) if track.start is not None else 0.0
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
        id=vid, source=job["source"], label=job.get("label"),
        fps=fps, num_frames=num_frames, duration=round(duration, 6),
        width=writer.width, height=writer.height, codec=p["codec"],
        segments=[dict(path=f"videos/{f['path']}", start_frame=f["start_frame"],
                       num_frames=f["num_frames"]) for f in writer.files],
        audio_start=round(audio_start, 6), audio_samples=int(len(audio)),
        audio_duration=round(len(audio) / sr, 6), sample_rate=sr,
        source_info=dict(
            info, vfr=_is_vfr(writer.intervals), duration=round(duration_src, 4),
            first_video_time=round(writer.first_t, 6),
            first_audio_time=round(track.start, 6) if track.start is not None else None,
            audio_rate=track.rate, audio_peak_db=round(peak_db, 2) if peak else None,
            bytes=size),
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


def worker_init(parent: int | None = None):
    """A pool worker's start: Ctrl-C left to the parent, one OpenMP thread, and an exit as
    soon as the parent (pid `parent`) is gone, kill -9 included."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    die_with_parent(parent)


