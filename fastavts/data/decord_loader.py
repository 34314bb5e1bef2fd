"""`loader.kind=decord`: the PyAV loader's worker processes, each clip's frames decoded with
decord (the reader MMAction2's users decode with) instead of PyAV. The plans, crops, flips
and audio windows are the PyAV loader's (`build_batch`), so given a plan the two give
the same batch up to the decoders' YUV->RGB rounding. It is a baseline for
bench/bench_data.py, not a training path: DALI (GPU) and the in-memory loader (small sets on a
CPU) are faster where they apply.

Like the PyAV path, a clip opens its segment file, seeks to the keyframe before its first
frame and decodes forward, one decoder thread per worker (parallelism is across workers).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .pyav_loader import PyAVLoader


class DecordFrames:
    """`frames(video_id, indices)` like Dataset.frames (uint8 (T, H, W, 3) RGB), decoded by
    decord; `.bank` is the dataset's audio bank."""

    def __init__(self, ds):
        import decord

        self.ds, self.bank, self.root = ds, ds.bank, Path(ds.root)
        self._decord = decord

    def _video(self, video) -> dict:
        return self.ds._video(video)

    def frames(self, video, indices) -> np.ndarray:
        """`video`: its record or its id."""
        v, idx, out = self.ds.frame_request(video, indices)
        for seg in v["segments"]:
            lo, n = seg["start_frame"], seg["num_frames"]
            sel = np.nonzero((idx >= lo) & (idx < lo + n))[0]
            if not sel.size:
                continue
            # prepared files are constant frame rate from t=0: frame i of the segment is the
            # i-th decoded frame, which is what decord indexes
            vr = self._decord.VideoReader(str(self.root / seg["path"]),
                                          ctx=self._decord.cpu(0), num_threads=1)
            uniq, inv = np.unique(idx[sel] - lo, return_inverse=True)
            arr = vr.get_batch(uniq.tolist()).asnumpy()
            if arr.shape[1:3] != (v["height"], v["width"]):
                raise RuntimeError(f"decord decoded {arr.shape[2]}x{arr.shape[1]} frames from "
                                   f"{seg['path']}, the manifest says {v['width']}x{v['height']}")
            out[sel] = arr[inv]
            del vr
        return out


class DecordLoader(PyAVLoader):
    kind = "decord"
    shares_spans = False   # each clip its own get_batch
    frame_reader = DecordFrames
