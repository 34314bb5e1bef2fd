"""Action recognition splits in their official released formats, matched to a prepared set.

    ucf101   ROOT/ucfTrainTestlist/ (or ROOT itself) holding classInd.txt ("1 ApplyEyeMakeup"),
             trainlist0N.txt ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1") and
             testlist0N.txt ("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi"), N = 1, 2, 3
    hmdb51   ROOT/testTrainMulti_7030_splits/ (or ROOT itself) holding <class>_test_split<N>.txt,
             one line per video: "<name>.avi <1|2|0>" (1 train, 2 test, 0 unused)
    synth    a prepared synthetic set with one sounding object per video: the label is its kind;
             split N tests on the videos at positions i (id order) with i mod 5 == N - 1

The videos themselves are prepared with `fastavts prepare` (video-only files need
`prepare.require_audio=false`: many UCF101 and all of some HMDB51 classes have no sound) and
found in the prepared set by file name. A split video that prepare rejected is left out and
counted; one that was never given to prepare is an error that says how to prepare it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .audio_sets import LayoutError, synth_videos
from .manifest import MANIFEST, REJECTED, read_jsonl


@dataclass
class Split:
    classes: list[str]
    train: list[tuple[str, int]]          # (video file name, class index)
    test: list[tuple[str, int]]
    files: list[str] = field(default_factory=list)   # the split files read


def _split_dir(root: Path, sub: str) -> Path:
    return root / sub if (root / sub).is_dir() else root


def _lines(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        raise LayoutError(f"split file {path} not found")
    return [(n, line.strip()) for n, line in
            enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if line.strip()]


def read_ucf101(root: Path, split: int) -> Split:
    d = _split_dir(root, "ucfTrainTestlist")
    ind = d / "classInd.txt"
    classes = {}
    for n, line in _lines(ind):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise LayoutError(f"{ind} line {n}: expected '<index> <ClassName>', got {line!r}")
        classes[parts[1]] = int(parts[0]) - 1
    names = [c for c, _ in sorted(classes.items(), key=lambda kv: kv[1])]
    out = Split(names, [], [], [str(ind)])
    for kind in ("train", "test"):
        f = d / f"{kind}list{split:02d}.txt"
        out.files.append(str(f))
        for n, line in _lines(f):
            parts = line.split()
            rel = parts[0]
            cls = rel.split("/")[0] if "/" in rel else None
            if cls not in classes:
                raise LayoutError(f"{f} line {n}: class {cls!r} of {rel!r} is not in {ind}")
            if kind == "train" and len(parts) > 1 and int(parts[1]) - 1 != classes[cls]:
                raise LayoutError(f"{f} line {n}: label {parts[1]} disagrees with {ind}, where "
                                  f"{cls} is {classes[cls] + 1}")
            getattr(out, kind).append((rel.split("/")[-1], classes[cls]))
    return out


def read_hmdb51(root: Path, split: int) -> Split:
    d = _split_dir(root, "testTrainMulti_7030_splits")
    files = sorted(d.glob(f"*_test_split{split}.txt"))
    if not files:
        raise LayoutError(f"no HMDB51 split files *_test_split{split}.txt in {d}; ROOT must hold "
                          f"the unpacked test_train_splits.rar (testTrainMulti_7030_splits/)")
    names = sorted(re.sub(rf"_test_split{split}$", "", f.stem) for f in files)
    out = Split(names, [], [], [str(f) for f in files])
    for f in files:
        c = names.index(re.sub(rf"_test_split{split}$", "", f.stem))
        for n, line in _lines(f):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise LayoutError(f"{f} line {n}: expected '<video>.avi <0|1|2>', got {line!r}")
            if parts[1] == "1":
                out.train.append((parts[0], c))
            elif parts[1] == "2":
                out.test.append((parts[0], c))
    return out


def read_synth_split(prepared: Path, split: int) -> Split:
    videos = synth_videos(prepared)
    names = sorted({k for _, k in videos})
    out = Split(names, [], [], [str(prepared / MANIFEST)])
    for i, (v, k) in enumerate(videos):
        (out.test if i % 5 == split - 1 else out.train).append((Path(v["source"]).name,
                                                              names.index(k)))
    return out


def read_split(dataset: str, root: str | Path, split: int, prepared: str | Path) -> Split:
    root = Path(root)
    if split not in (1, 2, 3):
        raise LayoutError(f"--split must be 1, 2 or 3, got {split}")
    if dataset == "ucf101":
        return read_ucf101(root, split)
    if dataset == "hmdb51":
        return read_hmdb51(root, split)
    if dataset == "synth":
        return read_synth_split(Path(prepared), split)
    raise LayoutError(f"unknown dataset {dataset!r}; choose ucf101, hmdb51 or synth")


def match_prepared(split: Split, prepared: str | Path) -> dict:
    """Video ids of the prepared set for the split's files: {train: [(id, class)], test: [...],
    left_out: {file: prepare's reason}}; raises if a file was never prepared."""
    prepared = Path(prepared)
    if not (prepared / MANIFEST).is_file():
        raise LayoutError(f"{prepared} is not a prepared set (no {MANIFEST}); run: fastavts "
                          f"prepare VIDEOS {prepared} prepare.require_audio=false")
    by_name = {Path(v["source"]).name: v["id"] for v in read_jsonl(prepared / MANIFEST)}
    rejected = {Path(r["source"]).name: r.get("reason", "?")
                for r in read_jsonl(prepared / REJECTED)}
    out = {"train": [], "test": [], "left_out": {}}
    never = []
    for kind in ("train", "test"):
        for name, c in getattr(split, kind):
            if name in by_name:
                out[kind].append((by_name[name], c))
            elif name in rejected:
                out["left_out"][name] = rejected[name]
            else:
                never.append(name)
    if never:
        raise LayoutError(f"{len(never)} videos of the split are not in {prepared} (e.g. "
                          f"{never[:3]}); prepare the dataset's video folder into it: fastavts "
                          f"prepare VIDEOS {prepared} prepare.require_audio=false")
    for kind in ("train", "test"):
        if not out[kind]:
            raise LayoutError(f"no {kind} video of the split is usable in {prepared}")
    return out
