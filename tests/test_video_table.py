"""The sampler's columnar videos (fastavts/data/video_table.py): every record reads back as the
manifest row did, and the sampler's plans are the same, batch for batch, as with the manifest
rows as dicts (the representation it had before)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

import fastavts.data.sampler as sampler_mod
from fastavts.config import build_config
from fastavts.data.dataset import Dataset
from fastavts.data.sampler import Sampler
from fastavts.data.video_table import VideoTable


def _reference_ranges(v: dict, clip_span: int, window_s: float):
    """A video's clip ranges worked out one segment at a time in plain Python (the sampler's
    rule, as its docstring says it): per segment the starts whose frames stay inside it,
    narrowed to those whose audio window lies in the sound; where no segment has one, the
    whole ranges, flagged False; None where no segment holds a clip."""
    fps = v["fps"]
    a_lo = max(0.0, v["audio_start"])
    a_hi = min(v["duration"], v["audio_start"] + v["audio_duration"]) - window_s
    out = []
    for s in v["segments"]:
        lo, hi = s["start_frame"], s["start_frame"] + s["num_frames"] - clip_span
        if hi < lo:
            continue
        f_lo = max(lo, int(np.ceil(a_lo * fps - 1e-6)))
        f_hi = min(hi, int(np.floor(a_hi * fps + 1e-6)))
        out.append((f_lo, f_hi, True) if f_lo <= f_hi else (lo, hi, False))
    if not out:
        return None
    return [r for r in out if r[2]] or out


def _usable_as_dicts(videos, clip_span, window_s):
    """The sampler's videos as it held them before its columns: dicts in id order."""
    kept, skipped = [], []
    for v in sorted(videos, key=lambda v: v["id"]):
        r = _reference_ranges(v, clip_span, window_s)
        if r is None:
            skipped.append(v["id"])
        else:
            kept.append(dict(v, _ranges=r))
    return kept, skipped


def _ugly_manifest(n: int, seed: int) -> list[dict]:
    """Rows with what real sets have: several segments, segments shorter than a clip, sound
    starting late or ending early or shorter than a window, no sound, ids out of order and
    not ASCII, paths of any length, rows without a codec."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in rng.permutation(n):
        fps = float(rng.choice([12.5, 25.0, 29.97, 30.0]))
        nseg = int(rng.integers(0, 4))
        segs, start = [], 0
        for j in range(nseg):
            k = int(rng.integers(5, 200))
            segs.append(dict(path=f"videos/{i}/seg{j}{'é' * int(rng.integers(0, 3))}.mp4",
                             start_frame=start, num_frames=k))
            start += k
        dur = start / fps
        a0 = float(rng.choice([0.0, rng.uniform(-1, 2), rng.uniform(0, dur + 1),
                               int(rng.integers(0, 50)) * 0.04]))   # on frames, give or take
        # a rounding error: the rule's 1e-6 tolerance decides
        ad = float(rng.choice([0.0, rng.uniform(0, 2), rng.uniform(0, dur + 2)]))
        row = dict(id=f"v{i:05d}" + ("ü" if i % 7 == 0 else ""), fps=fps, num_frames=start,
                   duration=dur, width=64, height=48, audio_start=a0, audio_duration=ad,
                   audio_offset=int(i) * 10, audio_samples=int(ad * 16000), segments=segs)
        if i % 5:
            row["codec"] = ["h264", "vp9"][int(i) % 2]
        rows.append(row)
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clip_ranges_and_order_equal_the_reference(seed):
    """The ranges computed for all segments at once equal the plain per-segment rule, video
    by video; the table is in id order and skips exactly the videos without a clip."""
    rows = _ugly_manifest(400, seed)
    for span, window in ((32, 1.28), (16, 1.28), (120, 4.0)):
        table, skipped = sampler_mod._usable_videos(rows, span, window)
        want, want_skipped = _usable_as_dicts(rows, span, window)
        assert skipped == want_skipped and len(want_skipped) > 0
        assert len(table) == len(want) > 0
        assert any(not r[2] for v in want for r in v["_ranges"])        # padded windows too
        assert any(len(v["segments"]) > 1 for v in want)
        for got, w in zip(table, want):
            assert got["id"] == w["id"] and got["_ranges"] == w["_ranges"], w["id"]
            assert got["segments"] == w["segments"] and got.get("codec") == w.get("codec")
            assert got["audio_start"] == w["audio_start"] and got["fps"] == w["fps"]


def test_records_read_back_as_the_manifest_rows(prepared):
    rows = Dataset.open(prepared).videos
    rows = rows + [dict(rows[0], id="extra", codec=None, segments=[
        dict(path="a.webm", start_frame=0, num_frames=10),
        dict(path="b/é.webm", start_frame=10, num_frames=7)])]
    ranges = [[(0, 3, True)], *[[(i, i + 5, bool(i % 2)), (9, 9, False)] for i in
                                range(len(rows) - 1)]]
    table = VideoTable(rows, ranges)
    assert len(table) == len(rows)
    for i, r in enumerate(rows):
        v = table[i]
        for k in ("id", "fps", "duration", "audio_start", "audio_duration", "num_frames",
                  "width", "height", "audio_offset", "audio_samples"):
            assert v[k] == r[k] and type(v[k]) is type(r[k]), (k, v[k], r[k])
        assert v["segments"] == [dict(path=s["path"], start_frame=s["start_frame"],
                                      num_frames=s["num_frames"]) for s in r["segments"]]
        assert v["_ranges"] == ranges[i]
        assert v.get("codec") == r.get("codec")
    assert table[-1]["id"] == "extra" and "codec" not in table[-1]
    with pytest.raises(KeyError):
        table[0]["source_info"]
    with pytest.raises(IndexError):
        table[len(rows)]
    again = pickle.loads(pickle.dumps(table))
    assert [v["segments"] for v in again] == [v["segments"] for v in table]


@pytest.mark.parametrize("overrides", [
    ["sampler.pairs=paired"],
    ["sampler.pairs=paired", "sampler.paired_windows=2"],
    ["sampler.pairs=inbatch", "sampler.k=2", "sampler.curriculum=[[0.0,0.5]]"],
    ["sampler.pairs=inbatch", "sampler.k=1", "sampler.group_clips=true"],
], ids=["paired", "paired2", "inbatch_hard", "grouped"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_plans_equal_those_made_from_the_rows_as_dicts(prepared, monkeypatch, overrides, mode):
    cfg = build_config(overrides=["data.crop=48", "data.clip_frames=8", "data.frame_stride=4",
                                  "sampler.clips_per_video=4", *overrides])
    rows = Dataset.open(prepared).videos

    def make():
        return Sampler(rows, cfg.data, cfg.sampler, 4, mode=mode, rank=1, world_size=2,
                       total_epochs=3)
    columns = make()
    monkeypatch.setattr(sampler_mod, "_usable_videos", _usable_as_dicts)
    dicts = make()
    assert columns.fingerprint() == dicts.fingerprint()
    assert len(columns) == len(dicts) > 0
    for epoch in range(2):
        for b in range(len(columns)):
            a, d = columns.plan(epoch, b), dicts.plan(epoch, b)
            assert a.keys() == d.keys()
            for k in a:
                if isinstance(a[k], np.ndarray):
                    np.testing.assert_array_equal(a[k], d[k], err_msg=f"{k}, batch {b}")
                else:
                    assert a[k] == d[k], (k, b)


def test_shared_folders_of_dead_processes_are_removed(prepared, tmp_path, monkeypatch):
    import os
    import subprocess
    import sys
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)
    left = tmp_path / f"fastavts_videos_{dead}_abc"
    left.mkdir()
    mine = tmp_path / f"fastavts_videos_{os.getpid()}_old"
    mine.mkdir()
    rows = Dataset.open(prepared).videos
    table = VideoTable(rows, [[(0, 1, True)]] * len(rows))
    blob = pickle.dumps(table)
    assert not left.exists() and mine.exists()
    assert len(pickle.loads(blob)) == len(rows)
    made = [p for p in tmp_path.iterdir() if p.name.startswith(f"fastavts_videos_{os.getpid()}_")
            and p != mine]
    assert len(made) == 1
    del table
    import gc
    gc.collect()
    assert not made[0].exists()      # gone with the table that wrote it


def test_a_loader_worker_reads_frames_without_the_manifest_rows(prepared):
    """A DataLoader worker's Dataset holds no manifest rows (2M of them as dicts are ~4 GB a
    worker): it decodes from the sampler's records the same frames as the full Dataset by id,
    and reads the same audio bank."""
    full, worker = Dataset.open(prepared), Dataset.for_worker(prepared)
    assert worker.videos == [] and worker.by_id == {} and len(full.videos) > 0
    cfg = build_config(overrides=["data.crop=48", "data.clip_frames=8", "data.frame_stride=4"])
    s = Sampler(full.videos, cfg.data, cfg.sampler, 4)
    for vi in range(len(s.videos)):
        rec = s.videos[vi]
        idx = [0, 5, rec["num_frames"] - 1, 5]
        np.testing.assert_array_equal(worker.frames(rec, idx), full.frames(rec["id"], idx))
    assert np.array_equal(worker.bank.pcm, full.bank.pcm)
    with pytest.raises(KeyError, match="no video"):
        worker.frames(rec["id"], [0])   # by id it has nothing to look in


def test_columns_read_in_one_pass_equal_those_read_key_by_key(prepared, monkeypatch):
    """The one pass over the rows (VideoTable's columns) against a pass per key (_column, the
    reading it replaced), on whole rows, and on rows where one lacks a key, one holds None (a
    float: NaN; an integer: 0, flagged missing), one a NaN: the same columns and the same
    missing rows either way."""
    import numpy as np

    import fastavts.data.video_table as vt

    rows = Dataset.open(prepared).videos
    odd = [dict(rows[0], id="nan", duration=float("nan")),
           dict(rows[1], id="none", audio_start=None, width=None),
           {k: v for k, v in dict(rows[0], id="lacks").items() if k != "audio_samples"}]
    for case in (rows, rows + odd[:1], rows + odd):
        one = VideoTable(case)
        monkeypatch.setattr(vt, "_columns", lambda records, keys: None)
        each = VideoTable(case)
        monkeypatch.undo()
        for k in (*vt.FLOATS, *vt.INTS):
            np.testing.assert_array_equal(getattr(one, k), getattr(each, k))
            assert getattr(one, k).dtype == getattr(each, k).dtype
            blank = float("nan") if k in vt.FLOATS else 0
            want = np.array([blank if r.get(k) is None else r[k] for r in case], float)
            np.testing.assert_array_equal(getattr(one, k).astype(float), want)
        assert one.missing.keys() == each.missing.keys()
        for k in one.missing:
            np.testing.assert_array_equal(one.missing[k], each.missing[k])
        if case is not rows:
            assert np.isnan(one.duration[len(rows)])
    assert set(one.missing) == {"width", "audio_samples"}
    with pytest.raises(KeyError):
        one[len(rows) + 2]["audio_samples"]
