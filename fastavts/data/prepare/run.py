"""prepare's parent process: lock the dataset folder, resume what is there, hand the inputs to
the pool, and commit each result in order (files into place, the sound into the bank, the
manifest row: each fsynced), then write the summary."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ...config import Config, ConfigError, load_yaml, save_config
from ...lock import FolderLock
from ...runtime import resolve_codec
from ..audio_bank import AudioBankWriter
from ..manifest import MANIFEST, REJECTED, JsonlWriter, read_jsonl
from .inputs import SHARD, assign_ids, inputs_fingerprint, list_inputs, shard_of
from .pool import check_workers_start, run_pool

WORK = ".work"
SUMMARY = "summary.json"
# Settings that change what is written: a rerun into an existing OUT must use the same ones.
FROZEN = {"data": ("fps", "sample_rate"),
          "prepare": ("codec", "short_side", "keyframe_interval", "crf", "segment_seconds")}


def prepare(src: str | os.PathLike, out: str | os.PathLike, cfg: Config, progress: bool = True,
            retry_rejected: bool = False, command: str = "",
            shard: tuple[int, int] | None = None) -> dict:
    """Prepare SRC into OUT (see fastavts/data/prepare/__init__.py). Returns the summary dict.

    `shard=(K, N)`: only the K-th of N shares of the inputs (shard_of: a hash of each input's
    path), with the ids a single prepare would give them; OUT/shard.json records the share.
    `fastavts merge` joins the N shares into one dataset."""
    src, out = Path(src), Path(out)
    if cfg.prepare.codec == "auto":   # resolved on a copy: the caller's config stays as it was
        cfg = copy.deepcopy(cfg)
        cfg.prepare.codec = resolve_codec(cfg.prepare.codec)
    inputs, ignored = list_inputs(src, cfg, out)
    assign_ids(inputs)
    shard_info = None
    if shard is not None:
        k, n = shard
        shard_info = dict(shard=k, of=n, inputs=len(inputs), inputs_sha=inputs_fingerprint(inputs))
        inputs = [inp for inp in inputs if shard_of(inp["rel"], n) == k]
        shard_info["shard_inputs"] = len(inputs)
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)  # held until this process exits or prepare returns
    try:
        _check_shard(out, shard_info)
        return _prepare_locked(src, out, cfg, inputs, ignored, progress, retry_rejected,
                               command, shard_info)
    finally:
        lock.release()


def _check_frozen(out: Path, cfg: Config) -> None:
    path = out / "config.yaml"
    if not path.exists() or not (out / MANIFEST).exists():
        return
    old = load_yaml(path)
    for section, keys in FROZEN.items():
        for k in keys:
            was = old.get(section, {}).get(k)
            now = getattr(getattr(cfg, section), k)
            if was is not None and was != now:
                raise ConfigError(
                    f"'{out}' was prepared with {section}.{k}={was!r}, this run asks for {now!r}. "
                    f"Rerun with the same settings to resume, or prepare into a new folder.")


def _check_shard(out: Path, info: dict | None) -> None:
    """A rerun into OUT must be the same share of the same inputs (or unsharded both times)."""
    path = out / SHARD
    had = json.loads(path.read_text()) if path.exists() else None
    started = (out / MANIFEST).exists() or (out / REJECTED).exists()
    if started and had != info and (had is not None or info is not None):
        def say(x):
            return "unsharded" if x is None else f"share {x['shard']}/{x['of']} of {x['inputs']} inputs"
        raise ConfigError(f"'{out}' holds a prepare of {say(had)}; this run asks for "
                          f"{say(info)}. Rerun with the same --shard (and the same inputs) to "
                          f"resume, or prepare into a new folder.")
    if info is not None:
        tmp = out / f".{SHARD}.tmp"
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, path)


def _lock(out: Path):
    """One writer per dataset folder: a second prepare (or merge) into the same OUT is refused,
    naming the holder (fastavts/lock.py)."""
    return FolderLock(out, "prepare or merge", "Wait for it to finish (a rerun afterwards "
                      "resumes) or use another OUT.").acquire()


class _Commit:
    """Takes the pool's results in the parent, one at a time: a prepared input's files moved
    into videos/, its sound appended to the bank, its manifest row written (each fsynced), or
    the rejected row. The counts and hours it has added."""

    def __init__(self, out: Path, work: Path, bank, manifest_rows: int, stats: Counter, bar):
        self.out, self.work, self.bank, self.bar = out, work, bank, bar
        self.manifest_rows, self.stats = manifest_rows, stats
        self.manifest, self.rejected = JsonlWriter(out / MANIFEST), JsonlWriter(out / REJECTED)
        self.audio_s = self.video_s = 0.0

    def __call__(self, job: dict, res: dict) -> None:
        stats = self.stats
        if res["status"] == "ok":
            rec = res["record"]
            for name in res["files"]:
                os.replace(self.work / name, self.out / "videos" / name)
            pcm = np.fromfile(res["audio"], dtype="<i2")
            rec["audio_offset"] = self.bank.append(pcm)
            self.manifest.write(rec)
            os.unlink(res["audio"])
            stats["ok"] += 1
            self.audio_s += rec["audio_duration"]
            self.video_s += rec["duration"]
        else:
            row = dict(source=job["source"], reason=res["reason"], id=job["id"])
            if res.get("internal"):
                row["internal"] = True
                stats["internal"] += 1
                if stats["internal"] >= 3 and stats["ok"] == self.manifest_rows:
                    raise RuntimeError(f"prepare stops: the first {stats['internal']} inputs all "
                                       f"failed inside fastavts (a bug, not your data):\n"
                                       f"{res['internal']}")
            self.rejected.write(row)
            stats["rejected"] += 1
        self.bar.update()
        self.bar.set_postfix(ok=stats["ok"], rejected=stats["rejected"], refresh=False)

    def close(self) -> None:
        self.manifest.close()
        self.rejected.close()
        self.bank.close()


def _resume(out: Path, retry_rejected: bool) -> tuple[list, list]:
    """(manifest rows, rejected rows) already in OUT; torn last lines repaired. Inputs that met
    a bug of ours are tried again on every run; --retry-rejected: every rejected input."""
    manifest = read_jsonl(out / MANIFEST, repair=True)
    rejected = read_jsonl(out / REJECTED, repair=True)
    keep = [] if retry_rejected else [r for r in rejected if not r.get("internal")]
    if len(keep) < len(rejected):
        _rewrite_jsonl(out / REJECTED, keep)
        rejected = keep
    # files of a video whose row never made it into the manifest (interrupted commit)
    (out / "videos").mkdir(exist_ok=True)
    committed = {Path(s["path"]).name for r in manifest for s in r["segments"]}
    for f in (out / "videos").iterdir():
        if f.name not in committed:
            f.unlink()
    return manifest, rejected


def _jobs(inputs: list, manifest: list, rejected: list, work: Path, cfg: Config) -> list[dict]:
    """The inputs not yet in either list, as worker jobs, each with a unique id."""
    done = {r["source"] for r in manifest} | {r["source"] for r in rejected}
    used_ids = {r["id"] for r in manifest} | {r["id"] for r in rejected if "id" in r}
    jobs = []
    for inp in inputs:
        if inp["source"] in done:
            continue
        vid = inp["id"]   # assign_ids: from the whole listing
        if vid in used_ids:   # a set made before ids came from the listing: keep them unique
            base, n = vid, 1
            while vid in used_ids:
                n += 1
                vid = f"{base}-{n}"
        used_ids.add(vid)
        jobs.append(dict(inp, id=vid, work=str(work), data=asdict(cfg.data),
                         prepare=asdict(cfg.prepare)))
    return jobs


def _run_jobs(jobs: list[dict], workers: int, commit, timeout_s: float) -> None:
    """Every job through the pool; the jobs of a pool that broke (a worker died, a job hung)
    again one by one, so a second failure names its culprit."""
    queue = jobs
    hang_s = 2 * timeout_s + 5
    while queue:
        crashed, rest = run_pool(queue, min(workers, len(queue)), commit, hang_s)
        for job in crashed:
            job.pop("hung", None)
            c2, _ = run_pool([job], 1, commit, hang_s)
            for j in c2:
                if j.get("hung"):
                    reason = (f"decoder hangs: no result within {hang_s:g} s with this "
                              f"file alone in the pool (prepare.timeout_s={timeout_s:g})")
                else:
                    check_workers_start()
                    reason = ("decoder crashed: the worker process died with this file "
                              "alone in the pool")
                commit(j, dict(status="rejected", reason=reason))
        queue = rest


def _prepare_locked(src: Path, out: Path, cfg: Config, inputs: list, ignored: list,
                    progress: bool, retry_rejected: bool, command: str,
                    shard_info: dict | None = None) -> dict:
    from tqdm import tqdm

    _check_frozen(out, cfg)
    save_config(cfg, out / "config.yaml",
                header=f"# resolved config of: {command or f'fastavts prepare {src} {out}'}")
    manifest, rejected = _resume(out, retry_rejected)
    valid = max((r["audio_offset"] + r["audio_samples"] for r in manifest), default=0)
    bank = AudioBankWriter(out, cfg.data.sample_rate, valid)
    work = out / WORK
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    jobs = _jobs(inputs, manifest, rejected, work, cfg)
    stats = Counter(ok=len(manifest), rejected=len(rejected))
    bar = tqdm(total=len(inputs), initial=len(inputs) - len(jobs), desc="prepare",
               unit="video", disable=not progress, dynamic_ncols=True)
    commit = _Commit(out, work, bank, len(manifest), stats, bar)
    workers = cfg.prepare.workers or os.cpu_count() or 1
    t0 = time.time()
    interrupted = False
    try:
        _run_jobs(jobs, workers, commit, cfg.prepare.timeout_s)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        commit.close()
        shutil.rmtree(work, ignore_errors=True)
    summary = _summary(src, out, cfg, inputs, ignored, manifest, rejected, stats, commit,
                       workers, time.time() - t0, interrupted, shard_info)
    if interrupted:
        raise KeyboardInterrupt(summary)
    return summary


def _summary(src, out, cfg, inputs, ignored, manifest, rejected, stats, commit, workers,
             wall, interrupted, shard_info) -> dict:
    """OUT/summary.json (written atomically), returned."""
    new = stats["ok"] + stats["rejected"] - len(manifest) - len(rejected)
    reasons = Counter(_reason_kind(r["reason"]) for r in read_jsonl(out / REJECTED))
    audio_s = sum(r["audio_duration"] for r in manifest)
    video_s = sum(r["duration"] for r in manifest)
    summary = dict(
        src=str(src), out=str(out), inputs=len(inputs), prepared=stats["ok"],
        rejected=stats["rejected"], rejected_by_reason=dict(reasons),
        not_videos_ignored=len(ignored), ignored_examples=ignored[:5],
        processed_this_run=new, wall_s=round(wall, 3),
        videos_per_s=round(new / wall, 3) if wall > 0 else None,
        audio_hours_per_s=round(commit.audio_s / 3600 / wall, 6) if wall > 0 else None,
        audio_hours=round((audio_s + commit.audio_s) / 3600, 4),
        video_hours=round((video_s + commit.video_s) / 3600, 4),
        workers=workers, codec=cfg.prepare.codec, interrupted=interrupted,
    )
    if shard_info is not None:
        summary.update(shard=f"{shard_info['shard']}/{shard_info['of']}",
                       all_inputs=shard_info["inputs"])
    tmp = out / f".{SUMMARY}.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out / SUMMARY)
    return summary


def _rewrite_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    os.replace(tmp, path)


def _reason_kind(reason: str) -> str:
    """The reason's first words, for counting ('too short', 'no audio stream', ...)."""
    return re.split(r"[:(,]", reason, maxsplit=1)[0].strip()
