"""A run folder's life on a cluster (fastavts/train/lifecycle.py, docs/cluster.md): one writer
per folder, no silent reuse, a finished run left alone, settings given with --resume applied,
the same data on resume, signals that checkpoint (real signals, in this process and in a
started `fastavts train`), and ranks that agree on where a signal stops them."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastavts.cli import main
from fastavts.config import ConfigError, load_yaml
from fastavts.train import train
from fastavts.train.lifecycle import EXIT_SIGINT, EXIT_SIGTERM, Signals
from fastavts.train.step import TrainStep

from conftest import small_cfg, spawn_ranks

FAST = ["data.crop=48", "data.clip_frames=8", "data.frame_stride=4", "model.video=tiny",
        "model.audio=tiny", "loader.batch_size=4", "loader.kind=memory",
        "sampler.clips_per_video=2", "sampler.pairs=paired", "train.log_every=1",
        "train.ckpt_every=1000", "train.keep_last=100", "train.loggers=[]"]
ROOT = Path(__file__).resolve().parents[1]


def cfg_for(prepared, *extra):
    return small_cfg(*FAST, f"train.data={prepared}", *extra)


def cli(*args) -> list[str]:
    return [*FAST, *args, "synth.width=96", "synth.height=64", "prepare.short_side=64"]


def signal_when(p: subprocess.Popen, ready: Path, sig: int, wait: float = 120) -> str:
    """Send `sig` to a started command once `ready` exists (or it ended, or `wait` passed);
    its stderr once it has ended."""
    try:
        deadline = time.time() + wait
        while time.time() < deadline and p.poll() is None and not ready.exists():
            time.sleep(0.05)
        p.send_signal(sig)
        return p.communicate(timeout=120)[1]
    finally:
        if p.poll() is None:
            p.kill()


def signal_at(monkeypatch, step: int, sig: int):
    """Send `sig` to this process in the middle of call number `step` of the training step."""
    real, calls = TrainStep.__call__, [0]

    def call(self, batch):
        calls[0] += 1
        if calls[0] == step:
            os.kill(os.getpid(), sig)
        return real(self, batch)
    monkeypatch.setattr(TrainStep, "__call__", call)


# --------------------------------------------------------------------------------------------
# the folder

def test_a_second_run_into_a_running_runs_folder_is_refused_and_the_first_is_intact(
        prepared, tmp_path, capsys):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastavts", "train", "-q", "--out", str(out),
           *cli(f"train.data={prepared}", "train.epochs=6")]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None:
            lock = out / ".lock"
            if lock.is_file() and f'"pid": {first.pid}' in lock.read_text():
                break
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()
        code = main(["train", "-q", "--out", str(out), *cli(f"train.data={prepared}")])
        err = capsys.readouterr().err
        assert code == 2
        assert f"pid {first.pid}" in err and "is in use" in err, err
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr
    metrics = json.loads((out / "metrics.json").read_text())
    printed = json.loads(stdout.strip().splitlines()[-1])
    assert metrics["steps"] == printed["steps"] == 6 * 3
    assert metrics["final_loss"] == printed["final_loss"]
    assert len(list((out / "checkpoints").glob("ckpt_*.pt"))) == 1
    assert load_yaml(out / "config.yaml")["train"]["epochs"] == 6   # the first run's


def test_a_run_holding_a_checkpoint_is_not_started_over(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    train(cfg_for(prepared, "train.epochs=2"), out, progress=False, stop_after_steps=2)
    before = {p.name: p.read_bytes() for p in [*out.glob("*.yaml"),
                                               *(out / "checkpoints").iterdir()]}
    with pytest.raises(ConfigError, match="--resume, or give a new --out"):
        train(cfg_for(prepared, "train.epochs=2"), out, progress=False)
    code = main(["train", "-q", "--out", str(out), *cli(f"train.data={prepared}")])
    assert code == 2 and "holds a run" in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in [*out.glob("*.yaml"),
                                              *(out / "checkpoints").iterdir()]}
    assert after == before
    # a folder without a checkpoint (a start that died early) may be used again
    shutil.rmtree(out / "checkpoints")
    assert train(cfg_for(prepared, "train.epochs=1"), out, progress=False)["steps"] == 3


def test_resuming_a_finished_run_keeps_its_results(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    done = train(cfg_for(prepared, "train.epochs=1"), out, progress=False)
    saved = (out / "metrics.json").read_bytes()
    again = train(cfg_for(prepared, "train.epochs=1"), out, resume=True, progress=False)
    assert again["finished_before"] and again["steps"] == done["steps"]
    assert (out / "metrics.json").read_bytes() == saved
    assert main(["train", "-q", "--out", str(out), "--resume"]) == 0
    cap = capsys.readouterr()
    assert "had finished" in cap.err
    assert json.loads(cap.out.strip().splitlines()[-1])["final_loss"] == done["final_loss"]
    assert (out / "metrics.json").read_bytes() == saved


def test_auto_resume_starts_then_continues(prepared, tmp_path):
    out = tmp_path / "run"
    args = ["train", "-q", "--auto-resume", "--out", str(out), *cli(f"train.data={prepared}",
                                                                      "train.epochs=1")]
    assert main(args) == 0
    saved = (out / "metrics.json").read_bytes()
    assert main(args) == 0     # a requeue of the same command: the run had finished
    assert (out / "metrics.json").read_bytes() == saved


def test_a_config_given_with_resume_is_applied(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    train(cfg_for(prepared, "train.epochs=1"), out, progress=False, stop_after_steps=2)
    more = tmp_path / "more.yaml"
    more.write_text("train:\n  epochs: 2\n")
    assert main(["train", str(more), "-q", "--out", str(out), "--resume"]) == 0
    cap = capsys.readouterr()
    assert "--resume changes train.epochs: 1 -> 2" in cap.err
    assert json.loads(cap.out.strip().splitlines()[-1])["steps"] == 6


def test_a_stale_lock_file_of_a_dead_process_is_taken_over(prepared, tmp_path):
    """flock: the kernel lets a dead holder's lock go; the file it left naming a pid that is
    gone does not stand in the way."""
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (out / ".lock").write_text(json.dumps(dict(host=os.uname().nodename, pid=int(dead))))
    assert train(cfg_for(prepared, "train.epochs=1"), out, progress=False)["steps"] == 3


# --------------------------------------------------------------------------------------------
# the data

def _other_set(prepared, where: Path) -> Path:
    """A copy of the prepared set with the same video ids but another manifest (a field no
    loader reads changed): what an unrelated set at the same relative path looks like."""
    shutil.copytree(prepared, where, symlinks=True)
    man = where / "manifest.jsonl"
    rows = [json.loads(x) for x in man.read_text().splitlines() if x.strip()]
    for r in rows:
        r["source"] = "elsewhere/" + str(r.get("source", ""))
    man.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return where


def test_resume_from_another_directory_reads_the_runs_own_data(prepared, tmp_path,
                                                               monkeypatch, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(prepared, a / "data", symlinks=True)
    _other_set(prepared, b / "data")
    out = tmp_path / "run"
    monkeypatch.chdir(a)
    train(cfg_for("data", "train.epochs=2"), out, progress=False, stop_after_steps=2)
    monkeypatch.chdir(b)
    # the saved config names the set by its absolute path: the run's own set is read
    assert main(["train", "-q", "--out", str(out), "--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 6


def test_resume_with_another_set_is_refused(prepared, tmp_path, monkeypatch, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(prepared, a / "data", symlinks=True)
    _other_set(prepared, b / "data")
    out = tmp_path / "run"
    monkeypatch.chdir(a)
    train(cfg_for("data", "train.epochs=2"), out, progress=False, stop_after_steps=2)
    monkeypatch.chdir(b)
    code = main(["train", "-q", "--out", str(out), "--resume", "train.data=data"])
    err = capsys.readouterr().err
    assert code == 2 and "another set" in err and "manifest" in err, err
    # a config written by an older fastavts named the set relative to where it was started
    cfg = (out / "config.yaml").read_text().replace(str(a / "data"), "data")
    (out / "config.yaml").write_text(cfg)
    assert main(["train", "-q", "--out", str(out), "--resume"]) == 2
    # the same set moved elsewhere is taken
    shutil.move(a / "data", tmp_path / "moved")
    assert main(["train", "-q", "--out", str(out), "--resume",
                 f"train.data={tmp_path / 'moved'}"]) == 0
    assert "moved from" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# signals

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_checkpoints_and_resume_gives_the_same_losses(prepared, tmp_path,
                                                                    monkeypatch, sig):
    cfg = cfg_for(prepared, "train.epochs=3")
    full = train(cfg, tmp_path / "full", progress=False)["losses"]
    k = random.Random(int(sig)).randrange(2, len(full) - 1)
    signal_at(monkeypatch, k, sig)
    before = signal.getsignal(sig)
    cut = train(cfg, tmp_path / "cut", progress=False)
    monkeypatch.undo()
    assert cut["stopped_by"] == sig and cut["stopped_at"] == k, (k, cut)
    assert cut["checkpoint"].name == f"ckpt_{k:08d}.pt" and cut["checkpoint"].is_file()
    assert cut["losses"] == full[:k]
    assert signal.getsignal(sig) == before      # the process's own handler back
    rest = train(cfg, tmp_path / "cut", resume=True, progress=False)
    assert cut["losses"] + rest["losses"] == full


def test_the_checkpoint_signal_checkpoints_and_the_run_goes_on(prepared, tmp_path,
                                                               monkeypatch, capsys):
    cfg = cfg_for(prepared, "train.epochs=2")
    full = train(cfg, tmp_path / "full", progress=False)["losses"]
    k = random.Random(10).randrange(2, len(full) - 1)
    signal_at(monkeypatch, k, signal.SIGUSR1)
    run = train(cfg, tmp_path / "usr1", progress=False)
    assert run["losses"] == full and run["steps"] == len(full)
    assert (tmp_path / "usr1" / "checkpoints" / f"ckpt_{k:08d}.pt").is_file()
    assert f"at step {k} (asked by SIGUSR1)" in capsys.readouterr().err


def test_the_cli_exits_with_the_documented_code_after_sigterm(prepared, tmp_path, monkeypatch,
                                                              capsys):
    signal_at(monkeypatch, 2, signal.SIGTERM)
    out = tmp_path / "run"
    assert main(["train", "-q", "--out", str(out), *cli(f"train.data={prepared}",
                                                          "train.epochs=2")]) == EXIT_SIGTERM
    err = capsys.readouterr().err
    assert (f"stopped at step 2 by SIGTERM; checkpoint {out / 'checkpoints' / 'ckpt_00000002.pt'}"
            f"; resume with: fastavts train --out {out} --resume") in err


def test_sigint_reaches_a_run_started_by_a_script_and_it_resumes(prepared, tmp_path):
    """A job script's background command inherits SIGINT ignored; the run still stops at a
    step with a checkpoint, says how to resume, exits 130; --resume finishes it."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastavts", "train", "-q", "--out", str(out),
           *cli(f"train.data={prepared}", "train.epochs=4", "train.ckpt_every=1",
                "train.keep_last=2")]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                     signal.SIG_IGN))
    err = signal_when(p, out / "checkpoints" / "ckpt_00000002.pt", signal.SIGINT)
    assert p.returncode == EXIT_SIGINT, err
    assert "by SIGINT; checkpoint" in err and "--resume" in err, err
    r = subprocess.run([sys.executable, "-m", "fastavts", "train", "-q", "--out", str(out),
                        "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["steps"] == 12


def test_ranks_agree_on_the_step_a_signal_stops_them(tmp_path):
    """Rank 1 alone is signalled at its step 3: both ranks stop after the same step."""
    files = [tmp_path / f"rank{r}.json" for r in range(2)]
    spawn_ranks(_agree_worker, (2, str(tmp_path / "store"), tmp_path), 2,
                lambda: all(f.is_file() for f in files))
    r0, r1 = (json.loads(f.read_text()) for f in files)
    assert r0 == r1 == dict(stopped_after=3 + Signals.LAG, signum=int(signal.SIGTERM)), (r0, r1)


def _agree_worker(rank, world, store, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        sig = Signals("USR1", world, torch.device("cpu"))
        result = None
        try:
            for step in range(1, 20):
                if rank == 1 and step == 3:
                    os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01 * (1 + rank))    # the ranks out of step with each other
                signum, _ = sig.poll()
                if signum:
                    result = dict(stopped_after=step, signum=signum)
                    break
        finally:
            sig.restore()
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# full disks

def _no_tmp_left(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_a_checkpoint_on_a_full_disk_is_one_line_and_the_last_good_one_stays(
        prepared, tmp_path, monkeypatch, capsys):
    """ENOSPC injected into the third checkpoint's write, after half of it."""
    import errno

    real, calls = torch.save, [0]

    def save(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] == 3:
            Path(f).write_bytes(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    code = main(["train", "-q", "--out", str(out), *cli(f"train.data={prepared}",
                                                          "train.epochs=2", "train.ckpt_every=1")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(f"fastavts train: error: cannot write {out / 'checkpoints'}"
                              f"/ckpt_00000003.pt: No space left on device"), err
    assert _no_tmp_left(out) == []
    monkeypatch.undo()
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert state["step"] == 2
    # the run resumes from there once there is room
    assert main(["train", "-q", "--out", str(out), "--resume"]) == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 5 MiB tmpfs (one checkpoint of the tiny model fits, not two) (skipped where this process may not mount one)."""
    where = tmp_path / "disk"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_real_full_disk_on_checkpoint_and_on_resume(prepared, tmp_path, small_disk, capsys):
    out = small_disk / "run"
    args = cli(f"train.data={prepared}", "train.epochs=3", "train.ckpt_every=1",
               "train.keep_last=1")
    code = main(["train", "-q", "--out", str(out), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "No space left on device" in err[-1] and "MiB free" in err[-1], err
    assert _no_tmp_left(out) == []
    good = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["step"]
    assert good >= 1
    # the disk filled to the last byte: --resume says so and leaves nothing behind
    filler = small_disk / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass
    code = main(["train", "-q", "--out", str(out), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "No space left on device" in err[-1], err
    assert _no_tmp_left(out) == []
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=False)["step"] == good


# --------------------------------------------------------------------------------------------
# damaged inputs

@pytest.mark.parametrize("damage,kind", [("truncated", "dali"), ("truncated", "pyav"),
                                         ("deleted", "memory")])
def test_eval_sync_leaves_out_and_names_an_undecodable_held_out_video(
        prepared, tmp_path, tiny_checkpoint, capsys, damage, kind):
    held = tmp_path / "held"
    shutil.copytree(prepared, held)
    rows = [json.loads(x) for x in (held / "manifest.jsonl").read_text().splitlines()]
    victim = rows[2]
    seg = held / victim["segments"][0]["path"]
    if damage == "truncated":
        seg.write_bytes(seg.read_bytes()[:300])
    else:
        seg.unlink()
    code = main(["eval-sync", str(tiny_checkpoint), str(held), "--clips-per-video", "4",
                 "--json", f"loader.kind={kind}"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    out = json.loads(cap.out.strip().splitlines()[-1])
    assert list(out["eval_skipped_videos"]) == [victim["id"]], out
    assert victim["segments"][0]["path"] in out["eval_skipped_videos"][victim["id"]]
    assert f"left out 1 video(s) that do not decode: {victim['id']}" in cap.err
    # the pairs are those of the set without it: 5 videos x 4 clips
    assert sum(out["eval_pairs"].values()) == (len(rows) - 1) * 4


def _damaged_copy(prepared, tmp_path, how: str) -> Path:
    ds = tmp_path / "ds"
    shutil.copytree(prepared, ds)
    man = ds / "manifest.jsonl"
    lines = man.read_text().splitlines(keepends=True)
    if how == "truncated bank":
        bank = ds / "audio_bank.s16"
        bank.write_bytes(bank.read_bytes()[: bank.stat().st_size // 2 + 1])
    elif how == "bank header":
        (ds / "audio_bank.json").write_text('{"sample_rate": 16000, "fi')
    elif how == "garbage line":
        man.write_text("".join(lines[:2] + ["this is not json\n"] + lines[2:]))
    elif how == "duplicated row":
        man.write_text("".join(lines + lines[1:2]))
    elif how == "torn last line":
        man.write_text("".join(lines) + lines[0][:40])
    return ds


@pytest.mark.parametrize("how,names", [("truncated bank", "audio_bank.s16"),
                                       ("bank header", "audio_bank.json"),
                                       ("garbage line", "manifest.jsonl: line 3"),
                                       ("duplicated row", "is listed twice")])
def test_a_damaged_dataset_is_one_line_naming_the_file(prepared, tmp_path, capsys, how, names):
    ds = _damaged_copy(prepared, tmp_path, how)
    code = main(["train", "-q", "--out", str(tmp_path / "run"), *cli(f"train.data={ds}",
                                                                       "train.epochs=1")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and names in err[0] and "Traceback" not in err[0], err


def test_a_torn_last_manifest_line_is_said_and_left_out(prepared, tmp_path, capsys):
    ds = _damaged_copy(prepared, tmp_path, "torn last line")
    assert main(["train", "-q", "--out", str(tmp_path / "run"), *cli(f"train.data={ds}",
                                                                       "train.epochs=1")]) == 0
    assert "its last line is torn" in capsys.readouterr().err


def test_where_flock_is_refused_the_lock_is_an_exclusive_file(tmp_path, monkeypatch, capsys):
    """Lustre without `flock`: the lock file itself, created exclusively; a second writer is
    refused naming the first; a holder that died on this host is taken over; release removes
    the file."""
    import errno
    import fcntl

    from fastavts.lock import FolderLock

    def no_flock(fh, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "flock", no_flock)
    folder = tmp_path / "run"
    first = FolderLock(folder, "fastavts train", "wait").acquire()
    assert first.exclusive_file and (folder / ".lock").is_file()
    with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
        FolderLock(folder, "fastavts train", "wait").acquire()
    first.release()
    assert not (folder / ".lock").exists()
    # a holder on this host that is gone: taken over, with a word
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    held = FolderLock(folder, "fastavts train", "wait").acquire()
    info = json.loads((folder / ".lock").read_text())
    (folder / ".lock").write_text(json.dumps(dict(info, pid=int(dead))))
    held.exclusive_file = False   # forget it without removing the file
    again = FolderLock(folder, "fastavts train", "wait").acquire()
    assert "is gone; taking the lock over" in capsys.readouterr().err
    again.release()
    # a holder on another host cannot be checked: the message says what to do
    (folder / ".lock").write_text(json.dumps(dict(info, host="elsewhere")))
    with pytest.raises(ConfigError, match="remove .*lock"):
        FolderLock(folder, "fastavts train", "wait").acquire()


def test_sigterm_to_torchrun_stops_both_ranks_with_a_checkpoint_and_resume_finishes(
        prepared, tmp_path):
    """SLURM's preemption as it arrives: SIGTERM to torchrun, which passes it to its 2 gloo
    workers; they stop after the same step with rank 0's checkpoint, say how to resume, and a
    resume under torchrun finishes the run."""
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def torchrun(*args):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", "29541", "-m", "fastavts", "train", "-q", "--out", str(out),
                *args]
    p = subprocess.Popen(torchrun(*cli(f"train.data={prepared}", "train.epochs=30",
                                       "train.ckpt_every=1", "train.keep_last=2")),
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    err = signal_when(p, out / "checkpoints" / "ckpt_00000003.pt", signal.SIGTERM, wait=180)
    assert p.returncode != 0, err
    line = [x for x in err.splitlines() if "stopped at step" in x]
    assert len(line) == 1 and "by SIGTERM" in line[0] and "--resume" in line[0], err[-3000:]
    stopped = int(line[0].split("stopped at step ")[1].split()[0])
    assert (out / "checkpoints" / f"ckpt_{stopped:08d}.pt").is_file()
    assert not (out / "metrics.json").exists()
    r = subprocess.run(torchrun("--resume"), cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] > stopped + 20 and m["world_size"] == 2
    # each rank resumed its own sampler position and RNGs: the last 20 losses are those of
    # the same run uninterrupted (before, rank 1 took rank 0's position and was refused)
    out = tmp_path / "whole"
    r = subprocess.run(torchrun(*cli(f"train.data={prepared}", "train.epochs=30")), cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    whole = json.loads((out / "metrics.json").read_text())
    assert whole["steps"] == m["steps"] and whole["final_loss"] == m["final_loss"]
