"""prepare's inputs: a folder (searched recursively) or a CSV list (Kinetics style, optional
labels) as a listing of dicts {source, rel, label, meta, missing}; each input's id from the whole
listing (so shares of a sharded prepare agree), and the share an input belongs to."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from pathlib import Path

from ...config import Config, ConfigError

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


