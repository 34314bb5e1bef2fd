"""The sampler's videos as columns: what plans and loaders read of each video, in numpy arrays
and packed strings instead of one Python dict per video.

Every DALI source worker and PyAV DataLoader worker receives the sampler; with the manifest as
dicts each held ~2.2 KB a video (531 MB at 240k videos, 2.2 GB at 1M: bench/bench_sampler.py).
A VideoTable holds the fields below in ~130 bytes a video and pickles as a few arrays.

`table[i]` is a read-only view that answers like the manifest record did (`v["fps"]`,
`v["segments"][j]["path"]`, `v.get("codec")`, `v["_ranges"]`), with the same Python types, so
the code that reads videos is unchanged. Fields a record has beyond these are not kept.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from operator import itemgetter

import numpy as np

FLOATS = ("fps", "duration", "audio_start", "audio_duration")
INTS = ("num_frames", "width", "height", "audio_offset", "audio_samples")


class _Strings:
    """Strings packed into one uint8 array with their end offsets."""

    def __init__(self, items: list[str]):
        text = "".join(items)
        if text.isascii():   # a byte a character: no string encoded alone (2M ids: 0.3 s)
            self.blob = np.frombuffer(text.encode(), np.uint8)
            self.ends = np.fromiter(map(len, items), np.int64, count=len(items)).cumsum()
        else:
            enc = [s.encode() for s in items]
            self.blob = np.frombuffer(b"".join(enc), np.uint8)
            self.ends = np.fromiter(map(len, enc), np.int64, count=len(enc)).cumsum()

    def __getitem__(self, i: int) -> str:
        start = int(self.ends[i - 1]) if i else 0
        return self.blob[start:int(self.ends[i])].tobytes().decode()

    def __len__(self) -> int:
        return len(self.ends)

    def take(self, rows: np.ndarray) -> _Strings:
        """The strings at `rows`, packed anew (without a Python string each)."""
        ends = np.asarray(self.ends, np.int64)
        starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        lens = (ends - starts)[rows]
        out = _Strings([])
        out.ends = lens.cumsum()
        total = int(out.ends[-1]) if len(out.ends) else 0
        # byte k of the result comes from byte k + (start of its string - its new start)
        shift = np.repeat(starts[rows] - (out.ends - lens), lens)
        out.blob = np.asarray(self.blob)[np.arange(total, dtype=np.int64) + shift]
        return out


def _column(records: list[dict], key: str, dtype) -> tuple[np.ndarray, np.ndarray | None]:
    """records[i][key] as an array, and which rows lack it (None where none does)."""
    try:
        return np.fromiter(map(itemgetter(key), records), dtype, count=len(records)), None
    except (KeyError, TypeError):   # a row without it (or None): 0 there, a KeyError on read
        col = [r.get(key) for r in records]
        gone = np.array([x is None for x in col], bool)
        return np.array([0 if x is None else x for x in col], dtype), gone


def _columns(records: list[dict], keys: dict) -> dict[str, np.ndarray] | None:
    """{key: records[i][key] as an array of dtype keys[key]}, every row read once (at 2M rows
    a pass per key over the dicts cost ~1.5x as much: each pass fetches every dict again);
    None where a row lacks a key or holds None in an integer column (the caller then reads
    the columns one by one, _column). A None in a float column is NaN either way."""
    dt = np.dtype(list(keys.items()))
    try:
        got = np.fromiter(map(itemgetter(*dt.names), records), dt, count=len(records))
    except (KeyError, TypeError, ValueError):
        return None
    return {k: np.ascontiguousarray(got[k]) for k in dt.names}


class VideoTable(Sequence):
    """Columns of `records` (manifest rows, in order) and each one's clip ranges (inclusive
    ranges of clip start frames, each flagged whether its audio window lies in the recorded
    sound: the sampler's; set with `set_ranges` where not given)."""

    def __init__(self, records: list[dict],
                 ranges: list[list[tuple[int, int, bool]]] | None = None):
        self.ids = _Strings(list(map(itemgetter("id"), records)))
        self.missing: dict[str, np.ndarray] = {}   # key -> rows without it (a KeyError there)
        types = {**dict.fromkeys(FLOATS, np.float64), **dict.fromkeys(INTS, np.int64)}
        cols = _columns(records, types)
        for k, dtype in types.items():
            if cols is not None:
                setattr(self, k, cols[k])
                continue
            col, gone = _column(records, k, dtype)
            if gone is not None and gone.any():
                self.missing[k] = gone
            setattr(self, k, col)
        try:   # (map and itemgetter: C loops, several times faster than comprehensions)
            codecs = list(map(itemgetter("codec"), records))
        except KeyError:
            codecs = [r.get("codec") for r in records]
        self.codec_names = sorted({c for c in set(codecs) if c is not None})
        index = {c: i for i, c in enumerate(self.codec_names)}
        index[None] = -1
        self.codec = np.fromiter(map(index.__getitem__, codecs), np.int16, count=len(codecs))
        segs = list(map(itemgetter("segments"), records))
        n_seg = np.fromiter(map(len, segs), np.int64, count=len(segs))
        self.seg_ptr = np.concatenate([[0], n_seg.cumsum()]).astype(np.int64)
        flat = (list(map(itemgetter(0), segs)) if (n_seg == 1).all()
                else [s for ss in segs for s in ss])
        self.seg_start = np.fromiter(map(itemgetter("start_frame"), flat), np.int64,
                                     count=len(flat))
        self.seg_frames = np.fromiter(map(itemgetter("num_frames"), flat), np.int64,
                                      count=len(flat))
        self.seg_path = _Strings(list(map(itemgetter("path"), flat)))
        if ranges is None:   # none yet (a list per row would cost seconds at 2M rows)
            self.set_ranges(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool),
                            np.zeros(len(records) + 1, np.int64))
        else:
            flat = [x for r in ranges for x in r]
            self.set_ranges(np.array([x[0] for x in flat], np.int64),
                            np.array([x[1] for x in flat], np.int64),
                            np.array([x[2] for x in flat], bool),
                            np.concatenate([[0], np.cumsum([len(r) for r in ranges])]))

    def set_ranges(self, lo: np.ndarray, hi: np.ndarray, ok: np.ndarray,
                   ptr: np.ndarray) -> None:
        """Every video's clip ranges: video i's are lo, hi, ok [ptr[i]:ptr[i + 1]]."""
        self.rng_lo, self.rng_hi = np.asarray(lo, np.int64), np.asarray(hi, np.int64)
        self.rng_ok, self.rng_ptr = np.asarray(ok, bool), np.asarray(ptr, np.int64)

    def take(self, rows: np.ndarray) -> VideoTable:
        """A table of the videos at `rows`, in that order, with their clip ranges."""
        rows = np.asarray(rows, np.int64)
        out = VideoTable.__new__(VideoTable)
        out.ids = self.ids.take(rows)
        out.missing = {k: v[rows] for k, v in self.missing.items() if v[rows].any()}
        for k in (*FLOATS, *INTS, "codec"):
            setattr(out, k, getattr(self, k)[rows])
        out.codec_names = self.codec_names
        out.seg_ptr, seg_rows = _gather(self.seg_ptr, rows)
        out.seg_start, out.seg_frames = self.seg_start[seg_rows], self.seg_frames[seg_rows]
        out.seg_path = self.seg_path.take(seg_rows)
        ptr, rng_rows = _gather(self.rng_ptr, rows)
        out.set_ranges(self.rng_lo[rng_rows], self.rng_hi[rng_rows], self.rng_ok[rng_rows], ptr)
        return out

    def __len__(self) -> int:
        return len(self.ids)

    # --- shared between processes ----------------------------------------------------------
    # Pickled (into a DALI or DataLoader worker), the table is its folder of .npy files,
    # written once by the process that made it; a receiver maps them read-only, so every
    # process reads the same pages of the page cache instead of holding a copy.

    def _arrays(self) -> dict[str, np.ndarray]:
        out = {k: v for k, v in vars(self).items() if isinstance(v, np.ndarray)}
        for name in ("ids", "seg_path"):
            out[f"{name}.blob"], out[f"{name}.ends"] = getattr(self, name).blob, \
                getattr(self, name).ends
        out.update({f"missing.{k}": v for k, v in self.missing.items()})
        return out

    def _shared_folder(self) -> str:
        folder = getattr(self, "_folder", None)
        if folder is None:
            import shutil
            import tempfile
            import weakref

            _remove_orphaned_folders(tempfile.gettempdir())
            folder = tempfile.mkdtemp(prefix=f"fastavts_videos_{os.getpid()}_")
            for name, a in self._arrays().items():
                np.save(os.path.join(folder, f"{name}.npy"), np.ascontiguousarray(a))
            # gone with the table that wrote it (receivers keep their maps: Linux allows it)
            weakref.finalize(self, shutil.rmtree, folder, True)
            self._folder = folder
        return folder

    def __getstate__(self):
        return dict(folder=self._shared_folder(), codec_names=self.codec_names)

    def __setstate__(self, state):
        folder = state["folder"]
        self.codec_names, self.missing = state["codec_names"], {}
        self._folder = None   # a receiver does not own the files
        for f in os.listdir(folder):
            name = f[:-4]
            a = np.load(os.path.join(folder, f), mmap_mode="r")
            if name.startswith("missing."):
                self.missing[name[8:]] = a
            elif "." in name:
                obj, part = name.split(".")
                if not hasattr(self, obj):
                    setattr(self, obj, _Strings([]))
                setattr(getattr(self, obj), part, a)
            else:
                setattr(self, name, a)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [Video(self, j) for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"video {i} outside [0, {len(self)})")
        return Video(self, i)


class Video(Mapping):
    """One row of a VideoTable, read like the manifest record."""

    __slots__ = ("t", "i")
    KEYS = ("id", *FLOATS, *INTS, "codec", "segments", "_ranges")

    def __init__(self, table: VideoTable, i: int):
        self.t, self.i = table, i

    def __getitem__(self, key: str):
        t, i = self.t, self.i
        if key == "id":
            return t.ids[i]
        if key in t.missing and t.missing[key][i]:
            raise KeyError(key)
        if key in FLOATS:
            return float(getattr(t, key)[i])
        if key in INTS:
            return int(getattr(t, key)[i])
        if key == "segments":
            return [dict(path=t.seg_path[j], start_frame=int(t.seg_start[j]),
                         num_frames=int(t.seg_frames[j]))
                    for j in range(t.seg_ptr[i], t.seg_ptr[i + 1])]
        if key == "_ranges":
            return [(int(t.rng_lo[j]), int(t.rng_hi[j]), bool(t.rng_ok[j]))
                    for j in range(t.rng_ptr[i], t.rng_ptr[i + 1])]
        if key == "codec":
            c = int(t.codec[i])
            if c >= 0:
                return t.codec_names[c]
        raise KeyError(key)

    def __iter__(self):
        t, i = self.t, self.i
        return (k for k in self.KEYS if not (k == "codec" and t.codec[i] < 0)
                and not (k in t.missing and t.missing[k][i]))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"Video({dict(self)!r})"


def _gather(ptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For per-video runs of items (video i's are ptr[i]:ptr[i + 1]): the pointer array of the
    videos at `rows` and the item numbers it points into, in that order."""
    lens = (ptr[1:] - ptr[:-1])[rows]
    new_ptr = np.concatenate([[0], lens.cumsum()]).astype(np.int64)
    items = np.repeat(ptr[:-1][rows] - new_ptr[:-1], lens) + np.arange(int(new_ptr[-1]),
                                                                       dtype=np.int64)
    return new_ptr, items


def _remove_orphaned_folders(where: str) -> None:
    """Shared folders left by processes that died without their finaliser (kill -9): named
    fastavts_videos_<pid>_*, removed when no process has that pid."""
    import shutil

    for name in os.listdir(where):
        parts = name.split("_")
        if not name.startswith("fastavts_videos_") or len(parts) < 4 or not parts[2].isdigit():
            continue
        try:
            os.kill(int(parts[2]), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(where, name), ignore_errors=True)
        except PermissionError:
            pass

