"""`fastavts offset CHECKPOINT VIDEO...`: how far is the sound from the picture?

Each file goes through `prepare` into a temporary dataset (so any container and codec that
prepare accepts works, and the frames and sound are what training saw). For `clips` clips
spread over the video, the clip's embedding is compared with the embeddings of audio windows
shifted by -N..+N frames; the distances are averaged over the clips. The offset is the shift
with the smallest mean distance: positive means the audio lags the picture (the sound that
matches the clip at t comes at t + offset). Confidence, as SyncNet reports it: the median
distance minus the minimum.
"""
from __future__ import annotations

import csv
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .models.avts import load_model  # (model, cfg) from a checkpoint or an export folder


def offset_curve(model, cfg, ds, record: dict, max_shift: int, clips: int, device) -> dict:
    """Mean embedding distance per audio shift (frames) for one prepared video."""
    import torch

    from .data.features import AudioGeometry, LogMel, audio_window, video_transform

    d = cfg.data
    fps, T, s, c = record["fps"], d.clip_frames, d.frame_stride, d.crop
    window = T * s / fps
    lo, hi = max_shift / fps, record["duration"] - window - max_shift / fps
    if hi < lo:
        raise ValueError(f"{record['duration']:.2f} s is too short for one {window:.2f} s window "
                         f"shifted by +-{max_shift} frames; lower --max-shift")
    starts = np.unique(np.round(np.linspace(lo, hi, clips) * fps).astype(int))
    geo = AudioGeometry(d)
    clips_t = []
    for f0 in starts:
        frames = ds.frames(record["id"], f0 + s * np.arange(T))
        y, x = (record["height"] - c) // 2, (record["width"] - c) // 2
        clips_t.append(video_transform(frames, y, x, c, False, d.mean, d.std))
    shifts = np.arange(-max_shift, max_shift + 1)
    waves = [audio_window(ds.bank, record, f0 / fps + k / fps, geo) for f0 in starts for k in shifts]
    with torch.no_grad():
        video = torch.stack(clips_t).to(device)
        v, _ = model.embed_video(video.contiguous(memory_format=torch.channels_last_3d))
        audio = LogMel(geo)(torch.from_numpy(np.stack(waves))).to(device)
        a = torch.cat([model.embed_audio(chunk)[0] for chunk in audio.split(256)])
        a = a.view(len(starts), len(shifts), -1)
        dist = (v[:, None, :] - a).norm(dim=-1).mean(0).cpu().numpy()    # (shifts,)
    best = int(np.argmin(dist))
    return dict(offset_frames=int(shifts[best]), offset_s=round(float(shifts[best] / fps), 4),
                confidence=round(float(np.median(dist) - dist[best]), 5), clips=len(starts),
                distances=[round(float(x), 5) for x in dist])


def detect_offsets(checkpoint: str | Path, files: Sequence[str | Path], max_shift: int = 15,
                   clips: int = 8, workers: int = 0, keep_curve: bool = False) -> list[dict]:
    import torch

    from .data.dataset import Dataset
    from .data.prepare import prepare

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_model(checkpoint, device)
    cfg.prepare.codec = "vp9"
    cfg.prepare.workers = workers
    cfg.prepare.label_from = "none"
    files = [Path(f).resolve() for f in files]
    # a folder is not a video: said as such (prepare would take it for a missing file)
    folders = {f: f"a folder; offset takes video files (e.g. {f}/*.mp4)" for f in files
               if f.is_dir()}
    out = []
    with tempfile.TemporaryDirectory(prefix="fastavts_offset_") as tmp:
        lst = Path(tmp) / "list.csv"
        with open(lst, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path"])
            for f in files:
                if f not in folders:
                    w.writerow([str(f)])
        prepare(lst, Path(tmp) / "ds", cfg, progress=False)
        ds = Dataset.open(Path(tmp) / "ds")
        by_src = {v["source"]: v for v in ds.videos}
        rejected = {r["source"]: r["reason"] for r in ds.rejected}
        for f in files:
            row = dict(file=str(f))
            if f in folders:
                row["error"] = folders[f]
            elif str(f) in by_src:
                try:
                    r = offset_curve(model, cfg, ds, by_src[str(f)], max_shift, clips, device)
                    if not keep_curve:
                        r.pop("distances")
                    row.update(r)
                except ValueError as e:
                    row["error"] = str(e)
            else:
                row["error"] = rejected.get(str(f), "not prepared")
            out.append(row)
    return out
