"""Sound classification sets in their official released layouts, read as (file, label, fold).

    esc50      ROOT/audio/*.wav and ROOT/meta/esc50.csv (columns filename, fold, target,
               category, ...): 2,000 5-s clips, 50 classes, 5 folds; the score is the mean of
               the 5 leave-one-fold-out accuracies.
    dcase2014  the IEEE AASP (DCASE) 2013/2014 acoustic scene classification set as released:
               ROOT/scenes_stereo/<scene><NN>.wav (the development set, training) and
               ROOT/scenes_stereo_testset/<scene><NN>.wav (the test set): 10 scenes, 10
               recordings of 30 s each per split; the label is the file name without its two
               digits. One split: train on the first, test on the second.
    synth      a prepared synthetic set (`fastavts prepare` of `fastavts synth` output with one
               sounding object per video): the label is the object's kind; 5 folds by the
               video's position in id order (i mod 5).

Every problem found is a `LayoutError` naming the file and what was expected.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class LayoutError(ValueError):
    """A dataset folder that is not in the official layout (the message names the file)."""


@dataclass
class Item:
    path: str            # a media file, or "<prepared root>::<video id>" for the synthetic set
    label: str
    fold: int            # 1..K (test fold of a K-fold protocol); dcase2014: 1 = train, 2 = test


def _find_dir(root: Path, name: str) -> Path | None:
    """ROOT/name, or ROOT/name/name (how the zip files unpack)."""
    for cand in (root / name / name, root / name):
        if cand.is_dir():
            return cand
    return None


def read_esc50(root: Path) -> list[Item]:
    meta = root / "meta" / "esc50.csv"
    if not meta.is_file():
        raise LayoutError(f"ESC-50: {meta} not found; ROOT must be the unpacked ESC-50 folder "
                          f"holding audio/ and meta/esc50.csv")
    with open(meta, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    need = {"filename", "fold", "category"}
    if not rows or not need <= set(rows[0]):
        raise LayoutError(f"ESC-50: {meta} lacks the columns {sorted(need)} (has "
                          f"{sorted(rows[0]) if rows else 'no rows'})")
    items = []
    for n, r in enumerate(rows, 2):
        path = root / "audio" / r["filename"]
        if not path.is_file():
            raise LayoutError(f"ESC-50: {path} is listed in {meta} (line {n}) but missing")
        try:
            fold = int(r["fold"])
        except ValueError:
            raise LayoutError(f"ESC-50: {meta} line {n}: fold {r['fold']!r} is not a number") from None
        if not 1 <= fold <= 5:
            raise LayoutError(f"ESC-50: {meta} line {n}: fold {fold} is not in 1..5")
        items.append(Item(str(path), r["category"], fold))
    return items


def read_dcase2014(root: Path) -> list[Item]:
    items = []
    for fold, name in ((1, "scenes_stereo"), (2, "scenes_stereo_testset")):
        d = _find_dir(root, name)
        if d is None:
            raise LayoutError(f"DCASE2014: folder {root / name} not found; ROOT must hold the "
                              f"unpacked scenes_stereo.zip (training) and scenes_stereo_testset.zip "
                              f"(test)")
        files = sorted(p for p in d.iterdir() if p.suffix.lower() == ".wav")
        if not files:
            raise LayoutError(f"DCASE2014: no .wav files in {d}")
        for p in files:
            stem = p.stem
            if len(stem) < 3 or not stem[-2:].isdigit():
                raise LayoutError(f"DCASE2014: {p}: file names are <scene><two digits>.wav "
                                  f"(e.g. bus01.wav)")
            items.append(Item(str(p), stem[:-2], fold))
    train = {i.label for i in items if i.fold == 1}
    for i in items:
        if i.fold == 2 and i.label not in train:
            raise LayoutError(f"DCASE2014: {i.path}: scene {i.label!r} has no recording in the "
                              f"training folder (scenes there: {sorted(train)})")
    return items


def synth_videos(root: Path) -> list[tuple[dict, str]]:
    """(manifest row, its one sounding kind) of a prepared synthetic set, in id order (the
    manifest's order follows prepare's workers, so folds taken from it would vary by run)."""
    from .manifest import MANIFEST, read_jsonl

    if not (root / MANIFEST).is_file():
        raise LayoutError(f"synth: {root} is not a prepared set (no {MANIFEST})")
    out = []
    for v in sorted(read_jsonl(root / MANIFEST), key=lambda v: v["id"]):
        kinds = (v.get("meta") or {}).get("kinds")
        if not kinds or len(kinds) != 1:
            raise LayoutError(f"synth: video {v['id']} of {root} has sounding objects {kinds}; the "
                              f"synthetic downstream task needs exactly one per video "
                              f"(fastavts synth ... synth.min_objects=1 synth.max_objects=1)")
        out.append((v, kinds[0]))
    return out


def read_synth(root: Path) -> list[Item]:
    return [Item(f"{root}::{v['id']}", kind, i % 5 + 1)
            for i, (v, kind) in enumerate(synth_videos(root))]


READERS = {"esc50": read_esc50, "dcase2014": read_dcase2014, "synth": read_synth}


def read_audio_set(name: str, root: str | Path) -> list[Item]:
    root = Path(root)
    if name not in READERS:
        raise LayoutError(f"unknown dataset {name!r}; choose one of {', '.join(READERS)}")
    if not root.is_dir():
        raise LayoutError(f"{name}: {root} is not a folder")
    return READERS[name](root)


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """float32 mono samples of a sound file (any format FFmpeg reads), resampled."""
    import av
    import av.error

    try:
        with av.open(str(path), metadata_errors="ignore") as c:
            if not c.streams.audio:
                raise LayoutError(f"{path}: no audio stream")
            s = c.streams.audio[0]
            res = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            out = []
            for f in c.decode(s):
                for g in res.resample(f):
                    out.append(g.to_ndarray().reshape(-1))
            for g in res.resample(None):
                out.append(g.to_ndarray().reshape(-1))
    except av.error.FFmpegError as e:
        raise LayoutError(f"{path}: unreadable audio ({e.strerror or e})") from None
    if not out:
        raise LayoutError(f"{path}: no decodable sound")
    return np.concatenate(out).astype(np.float32)
