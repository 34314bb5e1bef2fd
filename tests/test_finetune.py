"""fastavts finetune on tiny fake copies of the official UCF101 and HMDB51 layouts (AVI files
generated here, named and listed exactly as the released sets; some without sound, as in the
real sets), and the clear errors for malformed split files."""
import json
import shutil
from fractions import Fraction

import av
import numpy as np
import pytest

from fastavts.cli import main as cli
from fastavts.config import build_config
from fastavts.data.action_sets import LayoutError, match_prepared, read_split
from fastavts.data.manifest import read_jsonl
from fastavts.data.prepare import prepare

COLOURS = {"ApplyEyeMakeup": (220, 40, 40), "Biking": (40, 60, 220)}
HMDB = {"brush_hair": (220, 40, 40), "cartwheel": (40, 60, 220)}


def write_avi(path, colour, seed, sound=True, seconds=2.4, fps=25):
    """MPEG-4 Part 2 in AVI (UCF101's and HMDB51's format): a bar of `colour` sliding over a
    grey background; with sound, a noise track (mp3)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="avi") as c:
        vs = c.add_stream("mpeg4", rate=Fraction(fps))
        vs.width, vs.height, vs.pix_fmt = 80, 60, "yuv420p"
        as_ = c.add_stream("mp3", rate=22050, layout="mono") if sound else None
        x0 = rng.integers(0, 40)
        for i in range(int(seconds * fps)):
            a = np.full((60, 80, 3), 110, np.uint8)
            x = int(x0 + 2 * i) % 60
            a[10:50, x:x + 20] = colour
            f = av.VideoFrame.from_ndarray(a, format="rgb24")
            f.pts, f.time_base = i, Fraction(1, fps)
            for p in vs.encode(f):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        if as_ is not None:
            n = int(seconds * 22050)
            wave_ = (rng.standard_normal(n) * 0.2).astype(np.float32)
            fs = as_.codec_context.frame_size or 1152
            for i in range(0, n - fs + 1, fs):
                fr = av.AudioFrame.from_ndarray(wave_[None, i:i + fs], format="flt", layout="mono")
                fr.sample_rate, fr.pts = 22050, i
                for p in as_.encode(fr):
                    c.mux(p)
            for p in as_.encode():
                c.mux(p)


def prepared_from(videos, out):
    cfg = build_config(overrides=["prepare.codec=vp9", "prepare.workers=2",
                                  "prepare.short_side=52", "prepare.require_audio=false"])
    prepare(videos, out, cfg, progress=False)
    return out


@pytest.fixture(scope="module")
def ucf(tmp_path_factory):
    """UCF101: UCF-101/<Class>/v_<Class>_gNN_cMM.avi, ucfTrainTestlist/classInd.txt,
    trainlist01.txt (groups 1-3, with labels), testlist01.txt (group 4)."""
    root = tmp_path_factory.mktemp("UCF101")
    lists = root / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("".join(f"{i} {c}\r\n" for i, c in
                                                enumerate(COLOURS, 1)))
    train, test = [], []
    for ci, (cls, colour) in enumerate(COLOURS.items(), 1):
        for g in range(1, 5):
            for k in (1, 2):
                name = f"v_{cls}_g{g:02d}_c{k:02d}.avi"
                write_avi(root / "UCF-101" / cls / name, colour, seed=ci * 100 + g * 10 + k,
                          sound=k == 1)
                (train if g < 4 else test).append(f"{cls}/{name}")
    (lists / "trainlist01.txt").write_text("".join(f"{r} {list(COLOURS).index(r.split('/')[0]) + 1}"
                                                   f"\r\n" for r in train))
    (lists / "testlist01.txt").write_text("".join(f"{r}\r\n" for r in test))
    prepared_from(root / "UCF-101", root / "prepared")
    return root


@pytest.fixture(scope="module")
def hmdb(tmp_path_factory):
    """HMDB51: hmdb51_org/<class>/<name>.avi and testTrainMulti_7030_splits/
    <class>_test_split1.txt with '<name>.avi <1|2|0>' lines."""
    root = tmp_path_factory.mktemp("HMDB51")
    splits = root / "testTrainMulti_7030_splits"
    splits.mkdir()
    for ci, (cls, colour) in enumerate(HMDB.items()):
        lines = []
        for k in range(7):
            name = f"Clip_{cls}_{k}_f_nm_np1_fr_med_{k}.avi"
            write_avi(root / "hmdb51_org" / cls / name, colour, seed=ci * 10 + k, sound=False)
            lines.append(f"{name} {2 if k >= 5 else (0 if k == 4 else 1)} \n")
        (splits / f"{cls}_test_split1.txt").write_text("".join(lines))
    prepared_from(root / "hmdb51_org", root / "prepared")
    return root


def run(*args):
    return cli(["finetune", *map(str, args), "--json"])


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_videos_without_sound_are_kept_only_when_asked(ucf):
    rows = read_jsonl(ucf / "prepared" / "manifest.jsonl")
    assert len(rows) == 16 and not read_jsonl(ucf / "prepared" / "rejected.jsonl")
    silent = [r for r in rows if r["audio_samples"] == 0]
    assert len(silent) == 8 and all("no sound" in r["warnings"][-1] for r in silent)
    loud = [r for r in rows if r["audio_samples"] > 0]
    assert all(abs(r["audio_duration"] - 2.4) < 0.1 for r in loud)


def test_ucf101_split_files_are_read_as_released(ucf):
    s = read_split("ucf101", ucf, 1, ucf / "prepared")
    assert s.classes == list(COLOURS)
    assert len(s.train) == 12 and len(s.test) == 4
    assert ("v_Biking_g04_c02.avi", 1) in s.test and ("v_ApplyEyeMakeup_g01_c01.avi", 0) in s.train
    ids = match_prepared(s, ucf / "prepared")
    assert len(ids["train"]) == 12 and len(ids["test"]) == 4 and not ids["left_out"]


@pytest.mark.parametrize("scratch", [False, True])
def test_ucf101_finetune_end_to_end(ucf, tiny_checkpoint, tmp_path, capsys, scratch):
    args = [tiny_checkpoint, "--dataset", "ucf101", ucf, "--prepared", ucf / "prepared",
            "--split", "1", "--epochs", "8", "--lr", "0.003", "--eval-clips", "3",
            "--out", tmp_path / "run"] + (["--scratch"] if scratch else [])
    assert run(*args) == 0
    r = last_json(capsys)
    print(r)
    assert r["classes"] == 2 and r["train_videos"] == 12 and r["test_videos"] == 4
    assert r["test_clips"] == 12 and r["scratch"] == scratch
    # red bars against blue bars: learnt in a few steps, by any initialisation
    assert r["clip_accuracy"] >= 0.75 and r["video_accuracy"] >= 0.75
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["video_accuracy"] == \
        r["video_accuracy"]


def test_hmdb51_split_files_and_finetune(hmdb, tiny_checkpoint, tmp_path, capsys):
    s = read_split("hmdb51", hmdb, 1, hmdb / "prepared")
    assert s.classes == sorted(HMDB)
    assert len(s.train) == 8 and len(s.test) == 4          # label 0 (unused) left out
    assert run(tiny_checkpoint, "--dataset", "hmdb51", hmdb, "--prepared", hmdb / "prepared",
               "--epochs", "2", "--eval-clips", "2", "--out", tmp_path / "h") == 0
    r = last_json(capsys)
    assert r["test_videos"] == 4 and r["test_clips"] == 8 and 0 <= r["video_accuracy"] <= 1


def test_malformed_splits_name_the_file(ucf, hmdb, tmp_path, tiny_checkpoint, capsys):
    bad = tmp_path / "ucf"
    shutil.copytree(ucf / "ucfTrainTestlist", bad / "ucfTrainTestlist")
    test = bad / "ucfTrainTestlist" / "testlist01.txt"
    test.write_text(test.read_text() + "Surfing/v_Surfing_g04_c01.avi\n")
    with pytest.raises(LayoutError, match=r"testlist01.txt line 5: class 'Surfing'"):
        read_split("ucf101", bad, 1, ucf / "prepared")
    (bad / "ucfTrainTestlist" / "classInd.txt").unlink()
    assert run(tiny_checkpoint, "--dataset", "ucf101", bad, "--prepared", ucf / "prepared") == 2
    assert "classInd.txt not found" in capsys.readouterr().err
    # a split video that was never prepared: say how to prepare it
    s = read_split("ucf101", ucf, 1, ucf / "prepared")
    s.test.append(("v_Biking_g05_c01.avi", 1))
    with pytest.raises(LayoutError, match="v_Biking_g05_c01.avi.*fastavts prepare"):
        match_prepared(s, ucf / "prepared")
    # HMDB51 line with a bad flag
    h = tmp_path / "hmdb"
    shutil.copytree(hmdb / "testTrainMulti_7030_splits", h / "testTrainMulti_7030_splits")
    f = h / "testTrainMulti_7030_splits" / "cartwheel_test_split1.txt"
    f.write_text(f.read_text() + "x.avi 7\n")
    with pytest.raises(LayoutError, match="cartwheel_test_split1.txt line 8"):
        read_split("hmdb51", h, 1, hmdb / "prepared")
    with pytest.raises(LayoutError, match=r"\*_test_split2.txt"):
        read_split("hmdb51", h, 2, hmdb / "prepared")


def test_finetune_under_torchrun_with_two_gloo_ranks(ucf, tiny_checkpoint, tmp_path):
    """DDP on the CPU: both ranks train on their own shard of the split, rank 0 evaluates."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", "29517", "-m", "fastavts.cli", "finetune", str(tiny_checkpoint),
           "--dataset", "ucf101", str(ucf), "--prepared", str(ucf / "prepared"), "--epochs", "2",
           "--eval-clips", "2", "--out", str(tmp_path / "ddp"), "--json",
           "loader.batch_size=4"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    print(p.stdout[-2000:], p.stderr[-3000:])
    assert p.returncode == 0
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    r0 = [r for r in rows if "clip_accuracy" in r]
    assert len(rows) == len(r0) == 1 and r0[0]["test_clips"] == 8   # rank 0 reports
    # 12 training videos x 4 clips = 48 items over 2 ranks of batch 4: 6 steps an epoch each
    assert r0[0]["steps"] == 12
    assert (tmp_path / "ddp" / "checkpoints" / "last.pt").is_file()


def _fake_two_gpu_rank(monkeypatch):
    """Rank 1 of 2 on a machine with 2 (mocked) CUDA devices; records the CUDA-only calls."""
    import torch
    import torch.distributed as dist

    calls = []
    for k, v in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(dist, "is_initialized", lambda: bool([c for c in calls if c[0] == "init"]))
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **kw: calls.append(("init", backend, kw)))
    return calls


def test_the_rank_device_is_set_before_the_process_group_starts(monkeypatch):
    import torch

    from fastavts.runtime import setup_distributed

    calls = _fake_two_gpu_rank(monkeypatch)
    rank, world, device = setup_distributed()
    cuda1 = torch.device("cuda", 1)
    assert (rank, world, device) == (1, 2, cuda1)
    assert calls == [("set_device", cuda1), ("init", "nccl", {"device_id": cuda1})]
    assert torch.backends.cudnn.benchmark is True
    monkeypatch.setenv("LOCAL_RANK", "2")     # a third process on a 2-GPU machine: said clearly
    with pytest.raises(RuntimeError, match="LOCAL_RANK=2 but this machine shows 2 CUDA"):
        setup_distributed()


def test_finetune_and_train_start_their_ranks_through_setup_distributed(
        ucf, tiny_checkpoint, tmp_path, monkeypatch):
    import fastavts.runtime as runtime
    import fastavts.train as tr
    from fastavts.finetune import finetune

    class Started(Exception):
        pass

    def sentinel():
        raise Started

    monkeypatch.setattr(runtime, "setup_distributed", sentinel)
    with pytest.raises(Started):
        finetune(tiny_checkpoint, "ucf101", ucf, ucf / "prepared", 1, out=tmp_path / "f")
    from fastavts.config import build_config
    with pytest.raises(Started):
        tr.train(build_config(), tmp_path / "t")
