"""What every benchmark shares: the machine and versions it ran on, a cached synthetic input
set, and appending result rows to bench/results/*.jsonl."""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def git_sha() -> str:
    """The commit of the fastavts code this process imported, "+dirty" where its package
    files differ from it; "unknown" outside a checkout. Not the bench script's folder: an
    editable install's import hook comes before PYTHONPATH, so a script run from a worktree of
    another commit still measures the installed checkout's code."""
    import fastavts

    root = Path(fastavts.__file__).resolve().parent.parent

    def git(*args) -> str:
        return subprocess.run(["git", *args], cwd=root, text=True, capture_output=True,
                              check=True).stdout.strip()
    try:
        sha = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "fastavts", "kernels")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def context() -> dict:
    """Machine, versions, git sha and date, for every row and for the printout."""
    from fastavts.machine import machine_info, versions

    m = machine_info()
    try:
        import torch
        if torch.cuda.is_available():
            m["driver"] = _nvidia_driver()
            m["cudnn"] = torch.backends.cudnn.version()
    except ImportError:
        pass
    return dict(machine=m, versions=versions(), git=git_sha(),
                date=time.strftime("%Y-%m-%d %H:%M:%S"))


def _nvidia_driver() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              text=True, capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def peak_rss_mb() -> dict:
    """Peak resident memory of this process and of its finished children, in MB."""
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return dict(self=round(self_kb / 1024, 1), children_max=round(kids_kb / 1024, 1))


def synthetic_input(cache: str, videos: int, seconds: float, codec: str) -> Path:
    """A cached synthetic set of `videos` x `seconds` s (generated once)."""
    from fastavts.config import build_config
    from fastavts.data.synth import synthesize

    src = Path(cache) / f"{codec}_{videos}x{seconds:g}s"
    cfg = build_config(overrides=[f"synth.videos={videos}", "synth.seed=123",
                                  f"synth.codec={codec}", f"synth.min_duration={seconds}",
                                  f"synth.max_duration={seconds}"])
    synthesize(src, cfg, progress=False)
    return src


def time_calls(fn, n: int, cuda: bool) -> list[float]:
    """Milliseconds of each of n calls of fn(): CUDA events on a GPU, perf_counter on a CPU."""
    import torch

    out = []
    for _ in range(n):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            out.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def quantile(xs, q: float) -> float:
    """The q-quantile of xs by nearest rank (p20/p80 of the benchmark rows)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def write_rows(path: str | Path, rows: list[dict], quiet: bool = False) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    if not quiet:
        print(f"{len(rows)} row(s) appended to {path}")


class Rows:
    """Rows appended to a .jsonl file as each is made (a run cut short by a time limit keeps
    what it measured), and kept in memory; `enabled=False` (--once) records nothing."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path, self.enabled, self.rows = Path(path), enabled, []

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        if self.enabled:
            write_rows(self.path, [row], quiet=True)
        return row

    def done(self) -> None:
        if self.enabled:
            print(f"{len(self.rows)} row(s) appended to {self.path}")
