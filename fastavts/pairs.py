"""The two vocabularies of (clip, audio window) pairs, one table each.

`Role`: what a *sampled* audio window is for the clip it was drawn for. The sampler decides it
(data/sampler.py), batches carry it as `role` (M,), the sync evaluation and the collapse watch
read it.

    POSITIVE   the clip's aligned window
    EASY       a window of another video
    HARD       the same video, shifted by at least sampler.hard_min_shift
    SUPERHARD  the same video, shifted by [sampler.superhard_min_shift, hard_min_shift)

`Cell`: what one cell (clip i, window j) of a *loss matrix* is, computed from video ids and
start times alone (kernels/contrastive.pair_cells; the fused kernels compute the same inside).
In-batch losses compare every clip with every window, so a window sampled for another clip is a
cell of this clip's row too.

    POS      same video, |start gap| <= loss.sync_tol
    EASY     another video
    HARD     same video, |start gap| >= sampler.hard_min_shift
    IGNORED  same video in between (overlapping windows: a SUPERHARD window is one), or padding
             (a negative id: columns gathered from a rank with fewer windows); left out

The numbers are what batches, plans and the kernels hold (int8); they are part of no on-disk
format.
"""
from __future__ import annotations

from enum import IntEnum


class Role(IntEnum):
    """A sampled audio window's role for its own clip."""
    POSITIVE = 0
    EASY = 1
    HARD = 2
    SUPERHARD = 3


class Cell(IntEnum):
    """A loss-matrix cell (clip i, window j)."""
    POS = 0
    EASY = 1
    HARD = 2
    IGNORED = 3


ROLE_NAMES = tuple(r.name.lower() for r in Role)   # ("positive", "easy", "hard", "superhard")


def windows_per_clip(cfg) -> int:
    """Audio windows a batch holds per clip (cfg: a Config): M = batch size x this. In-batch
    pairs: the aligned window and sampler.k more; paired: sampler.paired_windows."""
    sm = cfg.sampler
    return 1 + sm.k if sm.pairs == "inbatch" else sm.paired_windows
