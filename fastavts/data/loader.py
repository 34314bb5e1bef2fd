"""Loaders: plans from the sampler in, batches of torch tensors out.

    loader = make_loader(cfg, "data/synth_prepared", mode="train", total_epochs=10)
    for epoch in range(10):
        for batch in loader.epoch(epoch):
            batch["video"]   # (B, 3, T, crop, crop): float32 normalised (DALI) or uint8
                             # crops (the CPU loaders)
            batch["audio"]   # (M, 1, n_mels, frames) float32 log-mel (DALI, memory) or
                             # (M, samples) int16 sound windows (PyAV, SPDL, decord);
                             # M = B or B(1+k); the step makes both into the model's inputs
                             # on its device (features.ModelInputs)
            ...              # label, role, clip_video, clip_t0, audio_video, audio_t0,
                             # audio_owner (M or B,), hard_share, faults

`loader.kind` is "auto" (the default: runtime.loader_choice, "dali" where it decodes on a
GPU, else "spdl" where its FFmpeg loads here, else "pyav"), "dali", "pyav", "memory" (frames
decoded once and kept in RAM; small sets on a CPU), "decord" (the PyAV loader's workers
decoding with decord, MMAction2's reader: a baseline for the benchmarks) or "spdl" (the PyAV loader's workers decoding with SPDL, the
fastest CPU decoder; spdl_loader.py says what it needs); all take the same plans and give the
same layout.
`loader.state_dict()` saves the position (the sampler's), so a resumed run continues at the
next batch. A clip that cannot be decoded is replaced by another clip of the
same batch (with its audio windows) and counted in `batch["faults"]` and `loader.faults`.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..config import Config
from .base_loader import BaseLoader, dist_rank_world

__all__ = ["make_loader", "BaseLoader", "dist_rank_world"]


def make_loader(cfg: Config, root: str | Path, *, mode: str = "train",
                rank: int | None = None, world_size: int | None = None,
                total_epochs: int = 1, device: str | None = None,
                videos: Sequence[str] | None = None):
    """The loader named by cfg.loader.kind, for this rank's shard (one per rank: under
    torchrun each process makes its own, and DALI runs on the GPU of LOCAL_RANK). `videos`:
    only these video ids of the set (default all)."""
    if cfg.loader.kind == "auto":   # a config runtime.resolve has not seen
        import copy

        import torch

        from ..runtime import loader_choice
        cfg = copy.deepcopy(cfg)
        cfg.loader.kind = loader_choice(cfg.loader, torch.cuda.is_available())[0]
    r, w = dist_rank_world()
    kw = dict(mode=mode, rank=r if rank is None else rank,
              world_size=w if world_size is None else world_size, total_epochs=total_epochs,
              videos=videos)
    if cfg.loader.kind == "pyav":
        from .pyav_loader import PyAVLoader
        return PyAVLoader(cfg, root, **kw)
    if cfg.loader.kind == "memory":
        from .memory_loader import MemoryLoader
        return MemoryLoader(cfg, root, **kw)
    if cfg.loader.kind == "decord":
        from .decord_loader import DecordLoader
        return DecordLoader(cfg, root, **kw)
    if cfg.loader.kind == "spdl":
        from .spdl_loader import SpdlLoader
        return SpdlLoader(cfg, root, **kw)
    from .dali_loader import DALILoader
    return DALILoader(cfg, root, device=device, **kw)
