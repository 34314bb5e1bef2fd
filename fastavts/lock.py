"""One writer per folder: the lock that `train` (a run folder), `prepare` and `merge` (a dataset
folder) hold while they write.

The lock is `<folder>/.lock`, held with flock(2) for as long as the command runs: the kernel
lets it go when the process ends however it ends (kill -9 included), so a lock is never left
stale on a local disk or on NFS. The file names its holder (host, pid, command, since when);
a second writer is refused with a ConfigError (exit 2) that names it.

Some cluster filesystems refuse flock (Lustre mounted without `flock`): there the lock is the
file itself, created exclusively, and removed when the holder is done. A holder found dead
(same host, its pid gone, or the pid reused by a later process) is taken over with a warning;
a holder on another host cannot be checked from here, and the message says how to remove it.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

from .errors import ConfigError, write_failure

NAME = ".lock"


def _holder() -> dict:
    return dict(host=socket.gethostname(), pid=os.getpid(), started=round(time.time(), 3),
                boot=_boot_id(), proc_start=_proc_start(os.getpid()),
                command=" ".join(os.path.basename(a) if i == 0 else a
                                 for i, a in enumerate(sys.argv))[:300])


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (a pid reused later differs)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _describe(h: dict | None) -> str:
    if not h:
        return "another process (it left no name)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.get("started", 0)))
    return f"pid {h.get('pid')} on {h.get('host')} since {since} ({h.get('command', '?')})"


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _alive(h: dict) -> bool | None:
    """Whether the holder still runs: True, False, or None where this host cannot tell."""
    if h.get("host") != socket.gethostname() or h.get("boot") != _boot_id():
        return None if h.get("host") != socket.gethostname() else False
    pid = h.get("pid")
    if not isinstance(pid, int):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return _proc_start(pid) == h.get("proc_start", "")


class FolderLock:
    """Held from acquire() to release() (or the process's end). `what`: the command's noun for
    the message ("training run", "dataset")."""

    def __init__(self, folder: Path, what: str, advice: str):
        self.folder, self.what, self.advice = Path(folder), what, advice
        self.path = self.folder / NAME
        self.fh = None
        self.exclusive_file = False

    def acquire(self) -> FolderLock:
        import fcntl

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            existed = self.path.exists()
            fh = open(self.path, "a+")
        except OSError as e:   # not writable, a file in the way, a full disk
            raise write_failure(self.path, e) from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            fh.close()
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(self._refusal(_read(self.path))) from None
            if not existed:   # made just now by open(): not a holder's
                self.path.unlink(missing_ok=True)
            return self._acquire_file()      # flock not supported here
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(_holder()))
        fh.flush()
        self.fh = fh
        return self

    def _acquire_file(self) -> FolderLock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                h = _read(self.path)
                alive = _alive(h) if h else None
                if alive is False:
                    print(f"fastavts: {self.path}: its holder ({_describe(h)}) is gone; taking "
                          f"the lock over", file=sys.stderr)
                    self.path.unlink(missing_ok=True)
                    continue
                msg = self._refusal(h)
                if alive is None:
                    msg += (f" If that process is gone (this host cannot check another), "
                            f"remove {self.path}.")
                raise ConfigError(msg) from None
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(_holder()))
            self.exclusive_file = True
            return self
        raise ConfigError(f"{self.path}: cannot take the lock (another process keeps taking it)")

    def _refusal(self, holder: dict | None) -> str:
        return (f"'{self.folder}' is in use: another {self.what} is writing it "
                f"({_describe(holder)}). {self.advice}")

    def release(self) -> None:
        if self.exclusive_file:
            self.path.unlink(missing_ok=True)
            self.exclusive_file = False
        if self.fh is not None:
            self.fh.close()      # the lock goes with the descriptor; the file stays
            self.fh = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
