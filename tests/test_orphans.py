"""No orphans: every process a command starts ends with it, however the command dies. Each test
starts a real command, waits until it has started its workers, kills it with SIGKILL (no
handler of it runs) and then watches every process it had started: none may be left 15 s
later."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import small_cfg  # noqa: F401 (sets TRITON_INTERPRET for the children too)

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["synth.width=96", "synth.height=64", "prepare.short_side=64"]


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, state, start time) of a process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[1]), fields[0], fields[19]


def descendants(root: int) -> dict[int, str]:
    """{pid: start time} of every process below `root`."""
    kids: dict[int, list[int]] = {}
    starts = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                kids.setdefault(st[0], []).append(int(entry))
                starts[int(entry)] = st[2]
    found, todo = {}, [root]
    while todo:
        for child in kids.get(todo.pop(), []):
            found[child] = starts[child]
            todo.append(child)
    return found


def alive(procs: dict[int, str]) -> list[int]:
    """The ones still running (the same process: same start time; zombies count as gone)."""
    out = []
    for pid, start in procs.items():
        st = _stat(pid)
        if st is not None and st[2] == start and st[1] != "Z":
            out.append(pid)
    return out


def kill9_and_watch(cmd: list[str], ready, min_children: int, timeout: float = 180) -> None:
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         start_new_session=True)
    try:
        deadline = time.time() + timeout
        procs = {}
        while time.time() < deadline and p.poll() is None:
            procs = descendants(p.pid)
            if len(procs) >= min_children and ready():
                break
            time.sleep(0.1)
        assert p.poll() is None, p.stderr.read().decode()[-2000:]
        assert len(procs) >= min_children, procs
        procs = descendants(p.pid)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        end = time.time() + 15
        while time.time() < end and alive(procs):
            time.sleep(0.2)
        left = alive(procs)
        assert not left, [Path(f"/proc/{x}/cmdline").read_bytes()[:200] for x in left]
    finally:
        if p.poll() is None:
            p.kill()
        try:
            os.killpg(p.pid, signal.SIGKILL)   # whatever is left of the test's own command
        except ProcessLookupError:
            pass


def test_kill_9_of_prepare_leaves_no_worker(synth_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, f in enumerate(sorted(synth_dir.glob("*.webm"))):
        for k in range(3):   # enough inputs to keep both workers busy for a while
            os.symlink(f, src / f"v{i}_{k}.webm")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fastavts", "prepare", str(src), str(out), "-q",
           "prepare.workers=2", *SMALL]
    kill9_and_watch(cmd, lambda: (out / "manifest.jsonl").exists(), min_children=3)


@pytest.mark.parametrize("kind", ["pyav", "dali"])
def test_kill_9_of_train_leaves_no_loader_process(prepared, tmp_path, kind):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastavts", "train", "-q", "--out", str(out),
           f"train.data={prepared}", f"loader.kind={kind}", "loader.workers=2",
           "loader.pool=processes",
           "loader.device=cpu", "data.crop=48", "data.clip_frames=8", "data.frame_stride=4",
           "model.video=tiny", "model.audio=tiny", "loader.batch_size=4",
           "sampler.clips_per_video=8", "train.epochs=50", "train.ckpt_every=1",
           "train.loggers=[]", *SMALL]
    kill9_and_watch(cmd, lambda: (out / "checkpoints" / "last.pt").exists(), min_children=2)
