"""The error a user can act on: a setting, a combination of settings or an input that fastavts
refuses, with a message that says what was wrong and what to do. Every command ends with exit
code 2 and that one line (fastavts/cli.py). Here, below every other module, so any module can
raise it without importing the config machinery."""


class ConfigError(ValueError):
    """A config value or combination of values that fastavts refuses (message says which)."""


class DiskError(ConfigError):
    """A file that could not be written (no space left, no permission, a read-only disk): the
    message names the file and the cause; what was there before is left whole."""


def write_failure(path, e: BaseException) -> DiskError:
    """The DiskError of a failed write of `path`, its cause read from `e` and the disk."""
    import errno
    import os
    import shutil

    if isinstance(e, OSError) and e.errno is not None:
        cause = os.strerror(e.errno)
    else:
        cause = (str(e).splitlines() or [type(e).__name__])[0][:160]
    try:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path)) or ".").free
        room = f"; {free / 2**20:.1f} MiB free there"
        if free < 2**20 and not isinstance(e, OSError):   # torch.save's words for it
            cause = os.strerror(errno.ENOSPC)
    except OSError:
        room = ""
    return DiskError(f"cannot write {path}: {cause}{room}")
