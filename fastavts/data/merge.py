"""`fastavts merge SHARE_DIR... --out DIR`: join the shares of a sharded prepare into one dataset.

    machine k:  fastavts prepare SRC share_k --shard k/N      (k = 0 .. N-1; SLURM array, ...)
    then:       fastavts merge share_0 ... share_{N-1} --out DIR

The shares must be the N shares of one listing of inputs (the same SRC, the same N; each
share's `shard.json` says so), made with the same settings (every `data.*` and `prepare.*`
key but the worker count, the time limit and the CSV video root), and finished (every input of
a share in its manifest or its rejected list). Anything else is refused with a message naming
the shares and what differs; nothing is written then.

The result equals a single-machine prepare of the same inputs record for record: the ids come
from the whole listing in both (prepare.assign_ids), the audio of each video is copied sample
for sample into one bank (rows in id order, `audio_offset` rewritten), the video files are
hard-linked from the shares (copied where the shares sit on another filesystem, or with
--copy), and the rejected rows are joined. It is built in DIR/.merge and moved into place at
the end, `merge.json` last; an interrupted merge is run again with the same command (the shares
are never changed).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..config import ConfigError, load_yaml
from ..lock import FolderLock
from .audio_bank import BANK, HEADER, AudioBank, AudioBankWriter
from .manifest import MANIFEST, REJECTED, JsonlWriter, read_jsonl
from .prepare import SHARD, SUMMARY

MERGED = "merge.json"
STAGE = ".merge"
# settings that may differ between shares: how fast a machine worked, where its CSV's files are
FREE = {"prepare": {"workers", "timeout_s", "video_root"}}
OUTPUTS = ("videos", BANK, HEADER, MANIFEST, REJECTED, "config.yaml", SUMMARY, MERGED)


class Share:
    def __init__(self, root: Path):
        self.root = root
        if not (root / SHARD).is_file():
            raise ConfigError(f"'{root}' is not a share of a sharded prepare (no {SHARD}); make "
                              f"shares with: fastavts prepare SRC DIR --shard K/N")
        self.info = json.loads((root / SHARD).read_text())
        self.config = load_yaml(root / "config.yaml")
        self.manifest = read_jsonl(root / MANIFEST)
        self.rejected = read_jsonl(root / REJECTED)

    @property
    def name(self) -> str:
        return f"'{self.root}' (share {self.info['shard']}/{self.info['of']})"

    def settings(self) -> dict:
        out = {}
        for section in ("data", "prepare"):
            for k, v in (self.config.get(section) or {}).items():
                if k not in FREE.get(section, ()):
                    out[f"{section}.{k}"] = v
        return out


def check_shares(shares: list[Share]) -> None:
    """Refuse what cannot make one dataset: other inputs or N, other settings, a share given
    twice (or two shares with the same number), a share missing, an unfinished share, ids in
    more than one share."""
    first = shares[0]
    for s in shares[1:]:
        for key in ("of", "inputs", "inputs_sha"):
            if s.info[key] != first.info[key]:
                raise ConfigError(f"{s.name} and {first.name} are shares of different prepares "
                                  f"({key}: {s.info[key]} vs {first.info[key]}): every share "
                                  f"must come from the same SRC split the same way (--shard K/N "
                                  f"with one N)")
        a, b = s.settings(), first.settings()
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            k = diff[0]
            raise ConfigError(f"{s.name} was prepared with {k}={a.get(k)!r}, {first.name} with "
                              f"{k}={b.get(k)!r} ({len(diff)} setting(s) differ: "
                              f"{', '.join(diff[:5])}); prepare every share with the same "
                              f"settings")
    seen: dict[int, Share] = {}
    for s in shares:
        k = s.info["shard"]
        if k in seen:
            raise ConfigError(f"{s.name} and {seen[k].name} overlap: both are share {k}; give "
                              f"each share once")
        seen[k] = s
    n = first.info["of"]
    missing = [k for k in range(n) if k not in seen]
    if missing:
        raise ConfigError(f"share(s) {', '.join(f'{k}/{n}' for k in missing)} missing: a merge "
                          f"needs all {n} shares of the prepare (given: "
                          f"{', '.join(str(k) for k in sorted(seen))})")
    for s in shares:
        done = len(s.manifest) + len(s.rejected)
        if done != s.info["shard_inputs"]:
            raise ConfigError(f"{s.name} is unfinished: {done} of its {s.info['shard_inputs']} "
                              f"inputs are recorded; run its prepare command again to finish it")
    owner: dict[str, Share] = {}
    for s in shares:
        for r in s.manifest + s.rejected:
            if r["id"] in owner:
                raise ConfigError(f"video id {r['id']!r} is in {s.name} and in "
                                  f"{owner[r['id']].name}: the shares overlap")
            owner[r["id"]] = s


def _place(src: Path, dst: Path, copy: bool) -> None:
    if not copy:
        try:
            os.link(src, dst)
            return
        except OSError:   # another filesystem, or links not allowed: copy
            pass
    shutil.copy2(src, dst)


def merge(share_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, copy: bool = False,
          progress: bool = True) -> dict:
    """Join the shares into `out` (see the module docstring); returns the summary."""
    t0 = time.time()
    out = Path(out)
    shares = [Share(Path(d)) for d in share_dirs]
    if not shares:
        raise ConfigError("merge needs the share folders: fastavts merge SHARE... --out DIR")
    check_shares(shares)
    if any(out.resolve() == s.root.resolve() for s in shares):
        raise ConfigError(f"--out '{out}' is one of the shares; merge into a new folder")
    with FolderLock(out, "prepare or merge", "Wait for it to finish, or merge into another "
                    "--out."):
        return _merge_into(out, shares, copy, progress, t0)


def _merge_into(out: Path, shares: list[Share], copy: bool, progress: bool, t0: float) -> dict:
    """merge with the lock of `out` held."""
    from tqdm import tqdm

    key = dict(inputs_sha=shares[0].info["inputs_sha"], of=shares[0].info["of"],
               share_dirs=sorted(str(s.root.resolve()) for s in shares))
    if (out / MERGED).is_file():
        done = json.loads((out / MERGED).read_text())
        if {k: done.get(k) for k in key} == key:
            print(f"merge: {out} already holds this merge")
            return done
        raise ConfigError(f"'{out}' holds another merge ({out / MERGED}); merge into a new folder")
    if (out / MANIFEST).exists() and not (out / STAGE).exists():
        raise ConfigError(f"'{out}' holds a dataset that is not a merge of these shares; merge "
                          f"into a new folder")
    # a merge cut short: clear what it had moved into place, start the stage again
    for name in OUTPUTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    stage = out / STAGE
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "videos").mkdir(parents=True)

    first = shares[0]
    sr = int(first.config["data"]["sample_rate"])
    rows = sorted(((r, s) for s in shares for r in s.manifest), key=lambda x: x[0]["id"])
    banks = {id(s): AudioBank(s.root) for s in shares}
    bank = AudioBankWriter(stage, sr, 0)
    man = JsonlWriter(stage / MANIFEST)
    bar = tqdm(total=len(rows), desc="merge", unit="video", disable=not progress)
    try:
        for rec, s in rows:
            pcm = banks[id(s)].pcm[rec["audio_offset"]:rec["audio_offset"] + rec["audio_samples"]]
            new = dict(rec, audio_offset=bank.append(np.asarray(pcm)))
            for seg in rec["segments"]:
                _place(s.root / seg["path"], stage / seg["path"], copy)
            man.write(new)
            bar.update()
    finally:
        bar.close()
        bank.close()
        man.close()
    rejected = sorted((r for s in shares for r in s.rejected), key=lambda r: r["id"])
    (stage / REJECTED).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                          for r in rejected))
    text = (first.root / "config.yaml").read_text()
    (stage / "config.yaml").write_text(f"# merged by fastavts merge from {len(shares)} shares "
                                       f"({', '.join(str(s.root) for s in shares)})\n" + text)
    summary = dict(out=str(out), shares=len(shares), inputs=first.info["inputs"],
                   prepared=len(rows), rejected=len(rejected),
                   audio_hours=round(sum(r["audio_duration"] for r, _ in rows) / 3600, 4),
                   video_hours=round(sum(r["duration"] for r, _ in rows) / 3600, 4),
                   linked=not copy, wall_s=round(time.time() - t0, 3))
    (stage / SUMMARY).write_text(json.dumps(summary, indent=1))
    # into place: the data first, the marker last
    for name in ("videos", BANK, HEADER, REJECTED, "config.yaml", SUMMARY, MANIFEST):
        os.replace(stage / name, out / name)
    done = dict(key, **summary)
    (stage / MERGED).write_text(json.dumps(done, indent=1))
    os.replace(stage / MERGED, out / MERGED)
    shutil.rmtree(stage, ignore_errors=True)
    return done
