"""`prepare --shard K/N` on N "machines" + `merge` = one `prepare`, record for record (ids, audio
samples, frames, rejected inputs); mismatched, overlapping, missing and unfinished shares are
refused; an interrupted merge finishes when run again."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastavts.data import Dataset
from fastavts.data.merge import merge
from fastavts.data.prepare import assign_ids, prepare, shard_of

from conftest import small_cfg


@pytest.fixture(scope="module")
def src(synth_dir, tmp_path_factory):
    """The 6 synthetic videos in two folders (one name repeated: ids need the whole listing),
    plus broken inputs that must end in the rejected list."""
    root = tmp_path_factory.mktemp("shard_src")
    vids = sorted(synth_dir.glob("*.webm"))
    for i, f in enumerate(vids):
        d = root / ("a" if i % 2 else "b")
        d.mkdir(exist_ok=True)
        shutil.copy(f, d / f.name)
        side = f.with_suffix(".json")
        if side.exists():
            shutil.copy(side, d / side.name)
    shutil.copy(vids[0], root / "b__synth_000000.webm")   # the slug of b/synth_000000.webm
    (root / "empty.mp4").write_bytes(b"")
    (root / "notes.mkv").write_text("not a video")
    (root / "b" / "cut.webm").write_bytes(vids[1].read_bytes()[:3000])
    return root


def cfg(*extra):
    return small_cfg("prepare.codec=vp9", "prepare.workers=2", *extra)


@pytest.fixture(scope="module")
def single(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    prepare(src, out, cfg(), progress=False)
    return out


@pytest.fixture(scope="module")
def shares(src, tmp_path_factory):
    base = tmp_path_factory.mktemp("shares")
    for k in range(3):
        # each "machine" with its own worker count: the split must not depend on it
        prepare(src, base / f"s{k}", cfg(f"prepare.workers={1 + k % 2}"), progress=False,
                shard=(k, 3))
    return [base / f"s{k}" for k in range(3)]


def rows(root: Path, name: str) -> dict:
    return {r["id"]: r for r in (json.loads(x) for x in (root / name).read_text().splitlines())}


def test_the_split_is_a_function_of_the_paths_alone(src, shares):
    from fastavts.data.prepare import list_inputs

    inputs, _ = list_inputs(src, cfg(), src / "nowhere")
    assign_ids(inputs)
    ids = [i["id"] for i in inputs]
    assert "b__synth_000000" in ids and "b__synth_000000-2" in ids      # listing-wide ids
    got = {k: {json.loads(x)["id"] for f in ("manifest.jsonl", "rejected.jsonl")
               for x in (shares[k] / f).read_text().splitlines()} for k in range(3)}
    for inp in inputs:
        assert inp["id"] in got[shard_of(inp["rel"], 3)]
    assert sum(len(v) for v in got.values()) == len(inputs) and all(got.values())


def test_merged_shares_equal_one_prepare(single, shares, tmp_path):
    out = tmp_path / "merged"
    s = merge(shares, out, progress=False)
    assert s["shares"] == 3 and (out / "merge.json").is_file() and not (out / ".merge").exists()
    one, many = rows(single, "manifest.jsonl"), rows(out, "manifest.jsonl")
    assert one.keys() == many.keys() and len(one) >= 6
    skip = {"audio_offset", "source"}
    for vid in one:
        assert {k: v for k, v in one[vid].items() if k not in skip} == \
               {k: v for k, v in many[vid].items() if k not in skip}, vid
    r1, r2 = rows(single, "rejected.jsonl"), rows(out, "rejected.jsonl")
    assert r1.keys() == r2.keys() and len(r1) == 3
    assert all(r1[k]["reason"] == r2[k]["reason"] for k in r1)
    d1, d2 = Dataset.open(single), Dataset.open(out)
    for vid, rec in one.items():
        a1 = d1.audio(vid, rec["audio_start"], rec["audio_duration"])
        a2 = d2.audio(vid, rec["audio_start"], rec["audio_duration"])
        assert np.array_equal(a1, a2), vid                              # sample for sample
        idx = np.arange(0, rec["num_frames"], 7)
        assert np.array_equal(d1.frames(vid, idx), d2.frames(vid, idx)), vid
    # the bank holds exactly the tracks, in id order
    assert (out / "audio_bank.s16").stat().st_size == 2 * sum(r["audio_samples"] for r in one.values())
    again = merge(shares, out, progress=False)                          # a second run: no-op
    assert again["prepared"] == s["prepared"]


def test_the_merge_command_and_its_refusals(src, shares, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "fastavts", "merge", *map(str, args),
                               "--out", str(tmp_path / "m"), "-q"],
                              capture_output=True, text=True, timeout=300)

    r = run(shares[0], shares[2])
    assert r.returncode == 2 and "share(s) 1/3 missing" in r.stderr
    r = run(shares[0], shares[1], shares[1], shares[2])
    assert r.returncode == 2 and "overlap" in r.stderr
    other = tmp_path / "other"
    prepare(src, other, cfg("prepare.short_side=48"), progress=False, shard=(1, 3))
    r = run(shares[0], other, shares[2])
    assert r.returncode == 2 and "prepare.short_side=48" in r.stderr
    four = tmp_path / "four"
    prepare(src, four, cfg(), progress=False, shard=(1, 4))
    r = run(shares[0], four, shares[2])
    assert r.returncode == 2 and "different prepares" in r.stderr
    cut = tmp_path / "cut"
    shutil.copytree(shares[1], cut)
    lines = (cut / "manifest.jsonl").read_text().splitlines()
    (cut / "manifest.jsonl").write_text("\n".join(lines[:-1]) + "\n")   # one video short
    r = run(shares[0], cut, shares[2])
    assert r.returncode == 2 and "unfinished" in r.stderr
    assert not (tmp_path / "m" / "manifest.jsonl").exists()             # nothing written
    r = run(*shares)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["prepared"] >= 6


def test_a_share_resumes_only_as_itself(src, shares):
    from fastavts.config import ConfigError

    with pytest.raises(ConfigError, match="share 1/3"):
        prepare(src, shares[1], cfg(), progress=False, shard=(2, 3))
    with pytest.raises(ConfigError, match="unsharded"):
        prepare(src, shares[1], cfg(), progress=False)
    s = prepare(src, shares[1], cfg(), progress=False, shard=(1, 3))     # resume: nothing to do
    assert s["processed_this_run"] == 0 and s["shard"] == "1/3"


def test_an_interrupted_merge_finishes_when_run_again(single, shares, tmp_path, monkeypatch):
    from fastavts.data import merge as M

    real, calls = M.JsonlWriter.write, {"n": 0}

    def dies_at_the_fourth(self, rec):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        real(self, rec)

    out = tmp_path / "m"
    monkeypatch.setattr(M.JsonlWriter, "write", dies_at_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        merge(shares, out, progress=False)
    monkeypatch.setattr(M.JsonlWriter, "write", real)
    assert not (out / "merge.json").exists() and (out / ".merge").exists()
    merge(shares, out, progress=False)
    assert rows(out, "manifest.jsonl").keys() == rows(single, "manifest.jsonl").keys()
    d = Dataset.open(out)
    for rec in d.videos:
        assert len(d.audio(rec["id"], rec["audio_start"], rec["audio_duration"])) > 0


def test_a_second_merge_into_a_folder_being_merged_is_refused(shares, tmp_path):
    from fastavts.config import ConfigError
    from fastavts.data.merge import merge
    from fastavts.lock import FolderLock

    out = tmp_path / "merged"
    with FolderLock(out, "prepare or merge", "") as held:
        with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
            merge(shares, out, progress=False)
    assert held.fh is None and not (out / "manifest.jsonl").exists()
