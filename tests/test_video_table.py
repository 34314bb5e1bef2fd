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


def _as_dicts(records, ranges):
    return [dict(r, _ranges=rg) for r, rg in zip(records, ranges)]


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
    monkeypatch.setattr(sampler_mod, "VideoTable", _as_dicts)
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
