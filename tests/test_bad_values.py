"""Bad values end in exit code 2 and a message naming the key or file and what to do, never a
traceback: every setting given a wrong type, zero, a negative, a huge number, NaN or infinity;
values impossible for the data at hand (found before training starts); a truncated last.pt
(--resume falls back to the newest readable checkpoint and says which)."""
import dataclasses

import pytest

from fastavts.cli import main as cli
from fastavts.config import Config, ConfigError, _dataclass_of, build_config
from fastavts.train import train

from conftest import small_cfg
from test_train import FAST

BAD = ["nan", "inf", "-inf", "-1", "0", "1e12", "abc", "[1,2]", "''", "{a: 1}", "-3.5"]
KEYS = [f"{s.name}.{f.name}" for s in dataclasses.fields(Config)
        for f in dataclasses.fields(_dataclass_of(s.type))]


@pytest.mark.parametrize("key", KEYS)
def test_every_setting_refuses_bad_values_with_a_config_error(key):
    """Each value is either accepted (and then finite, in its range) or refused by a
    ConfigError that names the key; no other exception escapes."""
    for v in BAD:
        try:
            cfg = build_config(overrides=[f"{key}={v}"])
        except ConfigError as e:
            assert key.split(".")[1] in str(e) or key in str(e) or "not a" in str(e), (key, v, e)
            continue
        got = getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])
        assert got == got, (key, v)                          # never NaN
        if isinstance(got, float):
            assert abs(got) != float("inf"), (key, v)
        if isinstance(got, bool):
            assert v in ("0",), (key, v)                      # 0 = false; -1 is not a bool


def _cli_err(capsys, *args):
    code = cli(list(map(str, args)))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_nan_lr_crop_too_large_and_impossible_hard_shift_exit_2_before_training(
        prepared, tmp_path, capsys):
    base = ["train", *FAST, f"train.data={prepared}", "--out"]
    code, err = _cli_err(capsys, *base, tmp_path / "a", "train.lr=nan")
    assert code == 2 and "train.lr=nan is not a finite number" in err
    # the set was prepared at 64 px (conftest): a 200-px crop cannot be cut from it
    code, err = _cli_err(capsys, *base, tmp_path / "b", "data.crop=200")
    assert code == 2 and "data.crop=200" in err and "prepare.short_side" in err
    assert not (tmp_path / "b" / "checkpoints").exists()       # refused before training
    code, err = _cli_err(capsys, *base, tmp_path / "c", "sampler.hard_min_shift=100",
                         "sampler.curriculum=[[0.0,0.25]]")
    assert code == 2 and "sampler.hard_min_shift=100" in err and "easy" in err
    code, err = _cli_err(capsys, *base, tmp_path / "d", "data.fps=30")
    assert code == 2 and "data.fps=30" in err and "25" in err
    code, err = _cli_err(capsys, *base, tmp_path / "e", "data.clip_frames=200")
    assert code == 2 and "longest video" in err
    code, err = _cli_err(capsys, *base, tmp_path / "f", "train.flip=-1")
    assert code == 2 and "unknown key" in err
    code, err = _cli_err(capsys, *base, tmp_path / "g", "data.flip=-1")
    assert code == 2 and "not a boolean" in err
    code, err = _cli_err(capsys, *base, tmp_path / "h", "loader.batch_size=4096")
    assert code == 2 and "do not fill one batch" in err
    code, err = _cli_err(capsys, *base, tmp_path / "i", "loader.kind=memory",
                         "loader.memory_gb=0.0001")
    assert code == 2 and "loader.memory_gb" in err
    code, err = _cli_err(capsys, "train", *FAST, f"train.data={tmp_path / 'nothing'}")
    assert code == 2 and "nothing" in err and "fastavts prepare" in err


def test_resume_falls_back_to_the_newest_readable_checkpoint(prepared, tmp_path, capsys):
    extra = ["sampler.pairs=paired", "train.epochs=2", "train.ckpt_every=1", "train.keep_last=3",
             "loader.kind=memory"]
    full = train(small_cfg(*FAST, f"train.data={prepared}", *extra), tmp_path / "full",
                 progress=False)["losses"]
    n = len(full)
    run = tmp_path / "cut"
    train(small_cfg(*FAST, f"train.data={prepared}", *extra), run, progress=False,
          stop_after_steps=n - 2)
    ck = run / "checkpoints"
    newest = sorted(ck.glob("ckpt_*.pt"))[-1]
    for p in (ck / "last.pt", newest):                  # torn: last.pt and the newest step
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    capsys.readouterr()
    rest = train(small_cfg(*FAST, f"train.data={prepared}", *extra), run, resume=True,
                 progress=False)
    out = capsys.readouterr()
    used = sorted(ck.glob("ckpt_*.pt"))[0].name
    assert f"ckpt_{n - 3:08d}.pt" in out.out and "newest readable" in out.out
    assert "last.pt cannot be read" in out.err and newest.name in out.err
    assert rest["losses"] == full[n - 3:], used           # resumed exactly from that step
    # nothing readable (a run that has not finished): exit 2 naming the files, via the CLI
    (run / "metrics.json").unlink()
    for p in ck.glob("*.pt"):
        p.write_bytes(b"PK\x03\x04 not a whole zip")
    code, err = _cli_err(capsys, "train", "--out", run, "--resume")
    assert code == 2 and "no readable checkpoint" in err and "last.pt" in err
