"""Shared fixtures: a small synthetic set and its prepared dataset, made once per session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# The Triton kernels run compiled on a GPU and in Triton's interpreter elsewhere; the switch is
# read when the kernel module is imported, so it is set before anything imports fastavts.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:  # one tile configuration per kernel: autotuning each test's shape would take minutes
    os.environ.setdefault("FASTAVTS_AUTOTUNE", "0")

REPO = Path(__file__).resolve().parents[1]
# Real clips with their licences (SOURCES.md), beside the checkout where there is a copy.
MEDIA = Path(os.environ.get("FASTAVTS_MEDIA", REPO.parent / "shared" / "media"))
sys.path.insert(0, str(Path(__file__).parent))


def small_cfg(*overrides):
    from fastavts.config import build_config
    return build_config(overrides=["synth.width=96", "synth.height=64", "synth.min_duration=3",
                                   "synth.max_duration=5", "synth.workers=2",
                                   "prepare.workers=2", "prepare.short_side=64",
                                   *overrides])


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    from fastavts.data.synth import synthesize
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, small_cfg("synth.videos=6", "synth.seed=7"), progress=False)
    return out


@pytest.fixture(scope="session")
def prepared(synth_dir, tmp_path_factory):
    from fastavts.data.prepare import prepare
    out = tmp_path_factory.mktemp("prepared")
    prepare(synth_dir, out, small_cfg("prepare.codec=vp9"), progress=False)
    return out


@pytest.fixture(scope="session")
def media_dir():
    """Real clips of many containers and codecs (with their licences in SOURCES.md), kept
    beside the repository, not in it: tests that need them skip where they are absent."""
    if not MEDIA.is_dir():
        pytest.skip(f"real test media not found at {MEDIA} (a folder of real clips with a "
                    f"SOURCES.md, kept beside the repository); set FASTAVTS_MEDIA to a copy "
                    f"to run this test")
    return MEDIA


TINY = ["model.video=tiny", "model.audio=tiny", "model.time_bins=4", "data.clip_frames=8",
        "data.frame_stride=4", "data.crop=48", "loader.kind=memory", "loader.batch_size=8",
        "train.channels_last=false"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny model saved in the trainer's checkpoint format (random weights, seeded), with the
    CPU demo's clip geometry (8 frames every 4th, 48-px crops)."""
    from fastavts.config import build_config, to_yaml
    from fastavts.models.avts import AVTS

    cfg = build_config(overrides=TINY)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    torch.save(dict(model=AVTS.from_config(cfg).state_dict(), config=to_yaml(cfg)), path)
    return path


def spawn_ranks(fn, args, nprocs: int, done) -> None:
    """torch.multiprocessing.spawn of `nprocs` gloo ranks. torch 2.13's CPU build sometimes
    aborts a rank while it exits ("terminate called without an active exception") after its
    work is done: that abort counts only where `done()` says the results are not all there."""
    import torch.multiprocessing as mp

    try:
        mp.spawn(fn, args=args, nprocs=nprocs, join=True)
    except mp.ProcessExitedException as e:
        if "SIGABRT" not in str(e) or not done():
            raise
        print("a rank aborted on exit after its results were written:", e)
