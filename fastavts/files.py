"""Files written whole or not at all: a temporary file in the same folder, fsynced, renamed
over the target. A failed write (a full disk, no permission) removes its temporary file and
raises a DiskError naming the file and the cause (exit 2); the old file stays as it was."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import write_failure


def _readable(path) -> None:
    """The umask's permissions (mkstemp makes 0600 files: a shared folder must be readable)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def atomic_write(path: Path, data: bytes) -> None:
    """`data` into `path` through a temporary file in the same folder, fsynced and renamed; on
    a failed write the temporary file is removed and a DiskError names the file and cause."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise write_failure(path, e) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        _readable(tmp)
        os.replace(tmp, path)
    except OSError as e:
        err = write_failure(path, e)
        Path(tmp).unlink(missing_ok=True)
        raise err from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, text.encode())
