"""A run folder's life on a shared machine or a cluster (docs/cluster.md).

    claim      one writer per run folder (fastavts/lock.py), held until the run ends, its
               evaluation included; a folder holding a run is not started over without
               --resume; --resume of a finished run keeps its results
    data       the datasets a run reads, recorded by absolute path and manifest digest in each
               checkpoint; a resume that would read other data is refused
    signals    SIGTERM / SIGINT: a checkpoint at the next step boundary, then the run ends
               with EXIT_SIGTERM / EXIT_SIGINT; train.checkpoint_signal (SIGUSR1): a
               checkpoint, and the run goes on

Every refusal is a ConfigError (exit 2, one line). Under DDP rank 0 decides and tells the
others (one broadcast before training), and the ranks agree on the step a signal takes effect
at (below), so that no rank leaves while another waits in a collective.
"""
from __future__ import annotations

import hashlib
import json
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import checkpoint_candidates
from ..data.manifest import MANIFEST
from ..errors import ConfigError
from ..lock import FolderLock

# exit codes of `fastavts train` stopped by a signal after writing its checkpoint: EX_TEMPFAIL
# (75, "try again": resume) for SIGTERM, the shell's 128 + 2 for SIGINT
EXIT_SIGTERM = 75
EXIT_SIGINT = 130
EXIT_CODES = {signal.SIGTERM: EXIT_SIGTERM, signal.SIGINT: EXIT_SIGINT}
SAVE_SIGNALS = ("USR1", "USR2", "HUP", "none")


# --------------------------------------------------------------------------------------------
# the folder

@dataclass
class Claim:
    """What claim() found: the lock (rank 0's), and the metrics of a run that had finished."""
    lock: FolderLock | None
    finished: dict | None = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _verdict(out: Path, resume: bool) -> tuple[str, object]:
    """("ok" | "finished" | "refused", metrics or message) for a run into `out` (rank 0)."""
    ckpt_dir = out / "checkpoints"
    for tmp in [*ckpt_dir.glob(".*.tmp"), *out.glob(".*.tmp")]:   # a failed save's leftovers
        tmp.unlink(missing_ok=True)
    found = checkpoint_candidates(ckpt_dir)
    if not resume:
        if found:
            return "refused", (f"'{out}' holds a run (newest checkpoint {found[0].name}); "
                               f"continue it with --resume, or give a new --out (starting over "
                               f"here would overwrite it)")
        return "ok", None
    if not found:
        return "refused", (f"--resume: no checkpoint in {ckpt_dir}; give the run's folder with "
                           f"--out (or start it without --resume)")
    metrics = out / "metrics.json"
    if metrics.is_file():
        try:
            return "finished", json.loads(metrics.read_text())
        except ValueError:
            pass   # a torn metrics.json: the run's end is done again
    return "ok", None


def claim(out: Path, resume: bool, rank: int, world: int) -> Claim:
    """Take `out` for this run (module docstring). Rank 0 holds the lock; every rank gets the
    same verdict (a ConfigError on each for a refusal)."""
    lock, verdict = None, None
    if rank == 0:
        try:
            lock = FolderLock(out, "fastavts train", "Wait for it to end, or give another "
                              "--out.").acquire()
            verdict = _verdict(out, resume)
        except ConfigError as e:
            verdict = ("refused", str(e))
    if world > 1:
        box = [verdict]
        torch.distributed.broadcast_object_list(box, src=0)
        verdict = box[0]
    kind, detail = verdict
    if kind == "refused":
        if lock is not None:
            lock.release()
        raise ConfigError(detail)
    return Claim(lock, detail if kind == "finished" else None)


# --------------------------------------------------------------------------------------------
# the data

def fingerprint(root: str | Path) -> dict:
    """A prepared set as a run records it: absolute path, manifest digest and size."""
    root = Path(root).resolve()
    h, size = hashlib.sha256(), 0
    with open(root / MANIFEST, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return dict(path=str(root), manifest_sha256=h.hexdigest(), manifest_bytes=size)


def data_record(cfg) -> dict:
    """{setting: fingerprint} of the datasets the run reads."""
    tc = cfg.train
    return {key: fingerprint(root) for key, root in (("train.data", tc.data),
                                                     ("train.eval_data", tc.eval_data)) if root}


def check_data(saved: dict | None, cfg, is_main: bool) -> None:
    """Refuse a resume whose datasets are not the ones the checkpoint recorded: another set at
    the recorded path, or a different set given. The same set moved elsewhere is taken (its
    digest matches), with a note. Checkpoints of older versions record nothing: a warning."""
    if saved is None:
        if is_main:
            print("fastavts train: warning: this checkpoint does not record its datasets "
                  "(written by an older fastavts); the data given now is trusted",
                  file=sys.stderr)
        return
    now = data_record(cfg)
    for key, was in saved.items():
        cur = now.get(key)
        if cur is None:
            raise ConfigError(f"--resume: the run read {key}={was['path']}; this resume gives "
                              f"none. Give {key}={was['path']}.")
        if cur["manifest_sha256"] != was["manifest_sha256"]:
            where = ("the set there has changed since" if cur["path"] == was["path"]
                     else f"this resume gives {cur['path']}, another set")
            raise ConfigError(f"--resume: the run trained on {key}={was['path']} (manifest "
                              f"digest {was['manifest_sha256'][:12]}); {where} (digest "
                              f"{cur['manifest_sha256'][:12]}). Resume with the run's own data, "
                              f"or start a new run.")
        if cur["path"] != was["path"] and is_main:
            print(f"fastavts train: {key}: the run's set, moved from {was['path']} to "
                  f"{cur['path']} (same manifest)", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# signals

class Signals:
    """SIGTERM and SIGINT ask the run to stop, train.checkpoint_signal to checkpoint; the loop
    polls at every step boundary. A second SIGINT stops at once (KeyboardInterrupt).

    Handlers are installed whatever the process inherited: a run started in the background by
    a script (SIGINT ignored there) still stops cleanly. On one rank a request takes effect at
    the next boundary. On several, each rank adds its requests to a 2-element tensor reduced
    (max) over the ranks every step, asynchronously; a step's result is read two boundaries
    later (its copy to the host long done: no wait on the queue), so every rank acts on the
    same step."""

    LAG = 2

    def __init__(self, save_signal: str = "USR1", world: int = 1, device=None):
        self.world, self.device = world, device or torch.device("cpu")
        self.stop_sig, self.save_req = 0, False
        self.save_signum = (0 if save_signal == "none"
                            else int(getattr(signal, f"SIG{save_signal}")))
        self.previous: dict[int, object] = {}
        self.ring: list = []
        for sig in [signal.SIGTERM, signal.SIGINT] + ([self.save_signum]
                                                      if self.save_signum else []):
            self.previous[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        if signum == self.save_signum:
            self.save_req = True
        elif signum == signal.SIGINT and self.stop_sig:
            raise KeyboardInterrupt   # the second interrupt: no waiting for the step
        elif not self.stop_sig:
            self.stop_sig = signum

    def poll(self) -> tuple[int, bool]:
        """At a step boundary: (the signal to stop for or 0, whether to checkpoint now)."""
        stop, save = self.stop_sig, self.save_req
        self.save_req = False
        if self.world == 1:
            return stop, save
        dev = self.device
        flags = torch.zeros(2, dtype=torch.float32, device=dev)
        flags[0].fill_(float(stop))
        flags[1].fill_(float(save))
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        if dev.type == "cuda":
            host = torch.empty(2, dtype=torch.float32, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self.ring.append((host, done))
        else:
            self.ring.append((flags, None))
        if len(self.ring) <= self.LAG:
            return 0, False
        host, done = self.ring.pop(0)
        if done is not None:
            done.synchronize()
        a, b = host.tolist()
        return int(a), bool(b)

    def restore(self) -> None:
        """The handlers the process had before."""
        for sig, old in self.previous.items():
            signal.signal(sig, old)
        self.previous.clear()


def stopped_line(signum: int, step: int, path: Path | None, out: Path) -> str:
    name = signal.Signals(signum).name
    where = f"checkpoint {path}" if path is not None else "no checkpoint written"
    return (f"fastavts train: stopped at step {step} by {name}; {where}; resume with: "
            f"fastavts train --out {out} --resume")
