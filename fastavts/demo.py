"""The demo behind `fastavts train` with no data: make the synthetic set if missing, prepare it,
train, and evaluate sync on held-out synthetic videos.

    data/demo/synth_train   -> prepare -> data/demo/train     (train.demo_videos videos)
    data/demo/synth_heldout -> prepare -> data/demo/heldout   (train.demo_heldout, other seed)

The preset below sits under the user's YAML file and overrides (the layer a shipped config
that runs without train.data says it sits on). On a CPU: tiny towers keeping 4 time bins, the
video tower's stem striding 4 in space (its first stage at 8x8) and 2 in time, on 32x32 crops
(of 36-px frames) of 16 frames taken every other one (80 ms apart: the 1.28 s window; the
stages see 8 time steps), InfoNCE over in-batch pairs with a video's two clips in the same
batch (each clip's sound is a hard negative for the other: sampler.group_clips), VP9, and the
in-memory loader (the 160 videos fit in RAM decoded, so each is decoded once and batches are
cut from memory); channels_last_3d off (the tiny convolutions run slower in it on a CPU).
On a GPU: R(2+1)D-18 on 16 x 112 x 112 with H.264 for NVDEC and DALI, the same pairing, the
videos prepared at 12.5 fps (the same 16 frames 80 ms apart, stride 1) with a keyframe every 4
frames, so a clip decodes little more than its own frames.

What the demo achieves is in docs/training.md ("The demo"); how the preset was found (profiles,
recipes tried, error analysis) in docs/journal/2026-12-02-cpu-demo-three-passes.md. A change of
either preset fails tests/test_config.py until the demo is measured again.
"""
from __future__ import annotations

import time
from pathlib import Path

from .config import Config

CPU_PRESET = [
    "data.clip_frames=16", "data.frame_stride=2", "data.crop=32", "prepare.short_side=36",
    "prepare.codec=vp9", "model.video=tiny", "model.audio=tiny", "model.time_bins=4",
    "model.tiny_stem_stride=4", "model.tiny_stem_time_stride=2",
    "loss.kind=infonce", "sampler.pairs=inbatch", "sampler.k=0", "sampler.group_clips=true",
    "sampler.curriculum=[[0.0,1.0]]",
    "sampler.clips_per_video=2", "loader.kind=memory", "loader.batch_size=32", "train.lr=0.003",
    "train.channels_last=false", "train.epochs=230",
]
GPU_PRESET = [
    # stored at the rate training samples (the stride folded into prepare) with a keyframe
    # every 4 frames: a clip decodes 17.5 frames for its 16, not 38.5 (data/decode_cost.py)
    "data.fps=12.5", "data.frame_stride=1", "prepare.keyframe_interval=4",
    "prepare.codec=h264", "model.video=r2plus1d_18", "model.audio=default",
    "loss.kind=infonce", "sampler.pairs=inbatch", "sampler.k=0", "sampler.group_clips=true",
    "sampler.curriculum=[[0.0,1.0]]",
    "sampler.clips_per_video=4",
    "loader.batch_size=64", "loader.workers=8", "train.epochs=40",
    "train.demo_videos=512", "train.demo_heldout=128",
]


def preset(cuda: bool) -> list[str]:
    return GPU_PRESET if cuda else CPU_PRESET


def demo_sets(cfg: Config) -> list[tuple[str, Config]]:
    """The demo's two synthetic sets, ("train" | "heldout", the config that makes it)."""
    import copy

    out = []
    for name, n, seed in (("train", cfg.train.demo_videos, cfg.synth.seed),
                          ("heldout", cfg.train.demo_heldout, cfg.synth.seed + 1000)):
        c = copy.deepcopy(cfg)
        c.synth.videos, c.synth.seed = n, seed
        # the CPU demo's sources are MJPEG + PCM: written and read faster than VP9 + Opus, and
        # prepare re-encodes them to VP9 anyway; the GPU preset's H.264 goes through as it is
        c.synth.codec = "h264" if cfg.prepare.codec == "h264" else "mjpeg"
        out.append((name, c))
    return out


def prepare_demo_data(cfg: Config, root: Path = Path("data/demo"), progress: bool = True,
                      local_rank: int = 0) -> Config:
    """Make (or reuse) the demo's train and held-out sets; returns cfg pointing at them. Under
    torchrun only each machine's local rank 0 makes them; the other processes wait for its
    marker (root/.ready, naming the settings it was made with)."""
    import json

    from .data.prepare import prepare
    from .data.synth import synthesize

    key = json.dumps(dict(videos=cfg.train.demo_videos, heldout=cfg.train.demo_heldout,
                          seed=cfg.synth.seed, codec=cfg.prepare.codec, fps=cfg.data.fps,
                          keyframe_interval=cfg.prepare.keyframe_interval,
                          segment_seconds=cfg.prepare.segment_seconds, crf=cfg.prepare.crf,
                          short_side=cfg.prepare.short_side, width=cfg.synth.width,
                          height=cfg.synth.height, sample_rate=cfg.synth.sample_rate),
                     sort_keys=True)
    marker = root / ".ready"
    cfg.train.data, cfg.train.eval_data = str(root / "train"), str(root / "heldout")
    if local_rank != 0:
        deadline = time.monotonic() + 3600
        while not (marker.is_file() and marker.read_text() == key):
            if time.monotonic() > deadline:
                raise TimeoutError(f"local rank 0 did not finish the demo data in {root} "
                                   f"within an hour; see its output")
            time.sleep(1.0)
        return cfg
    if marker.exists():
        marker.unlink()
    # synthesis and prepare resume file by file, so files made with other settings (an older
    # fastavts, other overrides) would be mixed into the set: start over when they differ
    settings = root / ".settings"
    if settings.is_file() and settings.read_text() != key:
        import shutil
        print(f"fastavts train: the demo data in {root} was made with other settings; "
              f"making it again")
        for name in ("synth_train", "synth_heldout", "train", "heldout"):
            shutil.rmtree(root / name, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    settings.write_text(key)
    t0 = time.perf_counter()
    for name, c in demo_sets(cfg):
        synthesize(root / f"synth_{name}", c, progress=progress)
        prepare(root / f"synth_{name}", root / name, c, progress=progress,
                command=f"fastavts train (demo data: {name})")
    marker.write_text(key)
    print(f"fastavts train: demo data ready in {root} ({time.perf_counter() - t0:.1f} s)")
    return cfg
