"""Read a prepared dataset: `Dataset.open(OUT)`.

    ds = Dataset.open("data/synth_prepared")
    ds.videos                        # manifest records (dicts), in manifest order
    ds.audio(vid, start_s, dur_s)    # float32 mono at ds.sample_rate; t=0 is the first frame
    ds.frames(vid, [0, 2, 4])        # uint8 (T, H, W, 3) RGB frames of the prepared video

This is the plain reference path (PyAV decoding on the host): the tests, the PyTorch loader and
debugging use it; the DALI pipeline decodes the same files on the GPU.
"""
from __future__ import annotations

import os
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .audio_bank import AudioBank
from .decode_cost import decode_runs, keyframe_interval
from .manifest import MANIFEST, REJECTED, read_jsonl

_local = threading.local()


def reformatter():
    """This thread's PyAV VideoReformatter, kept for its scaler context: frame.reformat and
    frame.to_ndarray(format=...) set up a new one for every frame or video (several times the
    cost of the conversion itself on small frames), with the same pixels. Used by the readers
    here and by prepare."""
    from av.video.reformatter import VideoReformatter

    rf = getattr(_local, "reformatter", None)
    if rf is None:
        rf = _local.reformatter = VideoReformatter()
    return rf


def _rgb24(frame) -> np.ndarray:
    """uint8 (H, W, 3) RGB of a decoded frame (frame.to_ndarray(format="rgb24")'s pixels)."""
    return reformatter().reformat(frame, format="rgb24").to_ndarray()


class Dataset:
    shares_spans = True   # frames() reads a video's clips asked together in shared passes
    def __init__(self, root: Path, videos: list[dict], rejected: list[dict]):
        self.root = root
        # FFmpeg frame threads speed up one reader; loader workers, many in parallel, set this
        # to False (threads in every worker only compete, and they outlive a killed worker).
        self.codec_threads = True
        self.decoded_frames = 0   # frames frames() has decoded (data/decode_cost.py)
        self.keyframe_interval = keyframe_interval(root)
        self.videos = videos
        self.rejected = rejected
        self.by_id = {v["id"]: v for v in videos}
        self.bank = AudioBank(root) if videos else None
        self.sample_rate = self.bank.sample_rate if self.bank else None
        if self.bank is not None:
            need = max(int(v["audio_offset"]) + int(v["audio_samples"]) for v in videos)
            if need > len(self.bank.pcm):
                raise ConfigError(f"{self.bank.path}: holds {len(self.bank.pcm)} samples but "
                                  f"the manifest's sound reaches sample {need}: the bank is "
                                  f"truncated or from another prepare; restore it or prepare "
                                  f"into a new folder")

    @classmethod
    def open(cls, root: str | os.PathLike) -> Dataset:
        root = Path(root)
        if not (root / MANIFEST).is_file():
            raise FileNotFoundError(f"'{root}' is not a prepared dataset (no {MANIFEST}); "
                                    f"make one with: fastavts prepare VIDEOS {root}")
        torn: list[str] = []
        videos = read_jsonl(root / MANIFEST, torn=torn)
        for said in torn:
            print(f"fastavts: warning: {said}", file=sys.stderr)
        seen: dict[str, int] = {}
        for line, v in enumerate(videos, 1):
            if not isinstance(v, dict) or "id" not in v:
                raise ConfigError(f"{root / MANIFEST}: record {line} is not a video record (no "
                                  f"id); the file is damaged: restore it or prepare again")
            if v["id"] in seen:
                raise ConfigError(f"{root / MANIFEST}: video {v['id']!r} is listed twice "
                                  f"(records {seen[v['id']]} and {line}); the file is damaged: "
                                  f"restore it or prepare again")
            seen[v["id"]] = line
        return cls(root, videos, read_jsonl(root / REJECTED))

    def __len__(self) -> int:
        return len(self.videos)

    @classmethod
    def for_worker(cls, root: str | os.PathLike) -> Dataset:
        """The set as a loader's worker needs it: its audio bank and files, no manifest rows
        (the sampler's columns describe the videos; `frames` takes their records). At 2M
        videos the rows as dicts are ~4 GB in every worker."""
        root = Path(root)
        ds = cls(root, [], [])
        ds.bank = AudioBank(root)
        ds.sample_rate = ds.bank.sample_rate
        return ds

    def _video(self, video) -> dict:
        """The record of a video: given one (a mapping, e.g. the sampler's), or by its id."""
        if isinstance(video, Mapping):
            return video
        video_id = video
        try:
            return self.by_id[video_id]
        except KeyError:
            raise KeyError(f"no video '{video_id}' in {self.root} "
                           f"({len(self.videos)} videos, e.g. {list(self.by_id)[:3]})") from None

    def audio(self, video_id: str, start_s: float, duration_s: float) -> np.ndarray:
        """float32 samples of [start_s, start_s + duration_s), times measured from the video's
        first frame; zeros where the window lies outside the recorded sound."""
        v = self._video(video_id)
        if duration_s < 0:
            raise ValueError(f"duration_s must be >= 0, got {duration_s}")
        return self.bank.window(v["audio_offset"], v["audio_samples"], v["audio_start"],
                                start_s, duration_s)

    def frame_request(self, video, indices: Sequence[int]
                      ) -> tuple[dict, np.ndarray, np.ndarray]:
        """(record, int64 indices, uint8 (T, H, W, 3) output to fill) of a frames() call, the
        indices checked against the video: what every frame reader starts with."""
        v = self._video(video)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= v["num_frames"]):
            raise IndexError(f"frame indices must lie in [0, {v['num_frames']}) for "
                             f"'{v['id']}', got min {idx.min()} max {idx.max()}")
        return v, idx, np.empty((idx.size, v["height"], v["width"], 3), np.uint8)

    def frames(self, video, indices: Sequence[int]) -> np.ndarray:
        """uint8 (T, H, W, 3) RGB frames at the given frame indices (any order, repeats ok).
        Several clips of a video asked for in one call are read in one pass where their spans
        overlap or nearly touch (decode_cost.decode_runs), with the same pixels as asked for
        one by one."""
        import av

        v, idx, out = self.frame_request(video, indices)
        video_id = v["id"]
        want = {}
        for pos, i in enumerate(idx.tolist()):
            want.setdefault(i, []).append(pos)
        fps = v["fps"]
        for seg in v["segments"]:
            lo, n = seg["start_frame"], seg["num_frames"]
            need = sorted(i for i in want if lo <= i < lo + n)
            if not need:
                continue
            with av.open(str(self.root / seg["path"])) as c:
                s = c.streams.video[0]
                if self.codec_threads:
                    s.thread_type = "AUTO"
                else:
                    s.codec_context.thread_count = 1
                # one pass per run of frames close enough to decode on through (decode_cost.py)
                for run in decode_runs(need, lo, self.keyframe_interval):
                    first = run[0] - lo
                    if first > 0:  # seek to the keyframe at or before the run's first frame
                        c.seek(int(first / fps / s.time_base), stream=s, backward=True)
                    left = set(run)
                    for f in c.decode(s):
                        self.decoded_frames += 1
                        i = lo + int(round(f.time * fps))
                        if i in left:
                            a = _rgb24(f)
                            for pos in want[i]:
                                out[pos] = a
                            left.discard(i)
                            if not left:
                                break
                    if left:
                        raise RuntimeError(f"frames {sorted(left)[:5]} of '{video_id}' could "
                                           f"not be decoded from {seg['path']}")
        return out
