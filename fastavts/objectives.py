"""What a loss kind means, all of it in one class per kind (`loss.kind`).

    kind          class        pairs             what it compares
    contrastive   Contrastive  paired | inbatch  embedding distances, margin loss (the paper's)
    ce            SyncCE       paired            a sync classifier on (clip, audio) features
    infonce       InfoNCE      inbatch           embedding distances, softmax over a clip's row

An objective owns:
  * `check(cfg)`: the settings it refuses (config validation calls it; a ConfigError);
  * `gathers(cfg, world)`: whether it takes every rank's audio windows as negatives under DDP;
  * `fused_kernel`: whether it has a Triton kernel (loss.impl=auto picks it on a GPU);
  * `needs_classifier`: whether the model carries the sync classifier head;
  * `idle_parts`: the model parts the loss never reaches, which get no gradient; the trainer
    freezes them before DDP (which would otherwise wait for their gradients for ever);
  * `loss(...)`: the training loss of a batch (a 0-d tensor on the device);
  * `warm_up(...)`: its fused kernels launched once at the run's shapes before the first step
    (compiled, and autotuned on rank 0 for every rank);
  * `scores(...)`: per paired (clip i, window i), a score that is high when in sync (sync
    evaluation, offsets);
  * `pair_stats(...)`: the collapse watch's statistics, computed on the device (fastavts/
    collapse.py reads them with the loss), with the label-blind loss of the batch: the best the
    loss can do with outputs that ignore whether the sound belongs to the clip;
  * `stat_scale`, `score_name`, `advice()`: how the collapse watch judges and explains it.

A new kind is a subclass with a `kind` name: it registers itself, `loss.kind=<name>` then
selects it everywhere (training, DDP, sync evaluation, collapse watch, export). An unknown kind
is refused, never mapped to another.

Batches (data/base_loader.py) hold clip_video, clip_t0 (B,) and audio_video, audio_t0,
audio_owner (the clip each window was drawn for), role (fastavts.pairs.Role), label (M,).
The model gives v (B, dim), a (M, dim) embeddings and fv (B, Cv), fa (M, Ca) tower features.
"""
from __future__ import annotations

import abc
import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .kernels.contrastive import (
    IGNORED,
    POS,
    inbatch_contrastive_loss,
    pair_cells,
    paired_contrastive_loss,
)
from .kernels.infonce import inbatch_infonce_loss
from .pairs import Role, windows_per_clip


class Objective(abc.ABC):
    """The base: a kind names itself in `kind` and says at least its loss and its label-blind
    value; the other defaults fit a distance-based loss."""

    kind: ClassVar[str] = ""
    fused_kernel: ClassVar[bool] = False
    needs_classifier: ClassVar[bool] = False
    reads_both_ways: ClassVar[bool] = False     # loss.symmetric is meaningful
    idle_parts: ClassVar[tuple[str, ...]] = ()
    score_name: ClassVar[str] = "distances"
    registry: ClassVar[dict[str, type[Objective]]] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.fused_kernel and cls.warm_up is Objective.warm_up:
            raise TypeError(f"{cls.__name__} has a fused kernel: it must say in warm_up how a "
                            f"step launches it (kernels/tuning.py autotunes there)")
        if cls.kind:
            Objective.registry[cls.kind] = cls

    # --- settings ---------------------------------------------------------------------------

    @classmethod
    def named(cls, kind: str) -> type[Objective]:
        """The class of loss.kind=`kind`; a ConfigError naming the kinds there are."""
        if kind not in cls.registry:
            raise ConfigError(f"loss.kind={kind!r} is not allowed; choose one of "
                              f"{', '.join(cls.registry)}.")
        return cls.registry[kind]

    @classmethod
    def check(cls, cfg) -> None:
        """Refuse the settings this kind cannot honour (called by config.validate)."""
        lc = cfg.loss
        if lc.symmetric and not cls.reads_both_ways:
            raise ConfigError(f"loss.symmetric=true reads InfoNCE's pairs both ways; loss.kind="
                              f"{lc.kind} has no such reading: use loss.kind=infonce or "
                              f"loss.symmetric=false.")
        if lc.impl == "triton" and not cls.fused_kernel:
            fused = " and ".join(k for k, c in cls.registry.items() if c.fused_kernel)
            raise ConfigError(f"loss.impl=triton: the fused kernels compute loss.kind={fused}; "
                              f"loss.kind={lc.kind} has the reference only (use impl=auto).")

    @classmethod
    def gathers(cls, cfg, world: int) -> bool:
        """loss.gather_negatives resolved for `world` ranks."""
        g = cfg.loss.gather_negatives
        if g == "off" or world == 1:
            return False
        return g == "on" or cls.gathers_by_default(cfg)

    @classmethod
    def gathers_by_default(cls, cfg) -> bool:
        return False

    @classmethod
    def default_impl(cls, cuda: bool) -> str:
        """loss.impl=auto: the fused kernel on a GPU where there is one."""
        return "triton" if cuda and cls.fused_kernel else "reference"

    # --- a run ------------------------------------------------------------------------------

    def __init__(self, cfg, world: int = 1):
        self.cfg, self.world = cfg, world
        # negatives from every rank: the default process group
        self.group = torch.distributed.group.WORLD if self.gathers(cfg, world) else None
        # the ranks whose windows a row sees (the label-blind value counts them)
        self.ranks_in_loss = world if self.group is not None else 1

    @abc.abstractmethod
    def loss(self, model, b: dict, v, a, fv, fa) -> torch.Tensor:
        """The training loss of a batch: a 0-d tensor on the device."""

    def scores(self, model, v, a, fv, fa) -> torch.Tensor:
        """(n,) for paired (clip i, window i): minus the embedding distance."""
        return -(v.float() - a.float()).norm(dim=1)

    @property
    def launches_kernels(self) -> bool:
        """Whether this run's loss runs on the fused Triton kernels (loss.impl resolved)."""
        return self.fused_kernel and self.cfg.loss.impl == "triton"

    def warm_up(self, device: torch.device, dtype: torch.dtype) -> None:  # noqa: B027
        """Launch this kind's fused kernels once, forward and backward, on made-up embeddings
        of `dtype` at the shapes a step of this run gives them (rows, columns after the
        gather, D), so that they compile and autotune before the first step (TrainStep.warm_up
        calls it where launches_kernels; kernels/tuning.py). No collective. A kind without a
        fused kernel launches nothing; one with a kernel must say how (checked when the class
        is defined)."""

    @abc.abstractmethod
    def blind_loss(self, b: dict, x: torch.Tensor) -> torch.Tensor:
        """The batch's label-blind loss, a 0-d float32 tensor on x's device."""

    def stat_values(self, model, b: dict, v, a, fv, fa) -> torch.Tensor:
        """(M,) what the collapse watch compares for each window and the clip it was drawn
        for: the embedding distance."""
        return (v.float()[b["audio_owner"]] - a.float()).norm(dim=1)

    def pair_stats(self, model, b: dict, v, a, fv, fa) -> torch.Tensor:
        """(4,) float32 on the device, no host sync: the mean of stat_values over positive
        windows, over negative windows, their spread (std) over all, the label-blind loss."""
        with torch.no_grad():
            x = self.stat_values(model, b, v.detach(), a.detach(), fv.detach(),
                                 fa.detach()).float()
            pos = b["role"] == Role.POSITIVE
            n_pos, n_neg = pos.sum().clamp_min(1), (~pos).sum().clamp_min(1)
            spread = x.std() if x.numel() > 1 else x.new_zeros(())
            return torch.stack([(x * pos).sum() / n_pos, (x * ~pos).sum() / n_neg, spread,
                                self.blind_loss(b, x).float()]).float()

    # --- the collapse watch's reading -------------------------------------------------------

    @property
    def stat_scale(self) -> float:
        """The scale pair_stats' separations are judged at."""
        return 1.0

    def advice(self) -> str:
        return "Try: a lower train.lr or a longer train.warmup."


def _full(value: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-d float32 constant on like's device, made there (a tensor built from a host number
    would be a blocking copy on a GPU)."""
    return torch.full((), value, dtype=torch.float32, device=like.device)


def _capacity(cfg) -> int:
    """Windows every rank's batch fits: its size times the windows per clip."""
    return cfg.loader.batch_size * windows_per_clip(cfg)


def _made_up(rows: int, dim: int, device, dtype) -> torch.Tensor:
    """Embeddings for a warm-up launch: (rows, dim) of `dtype`, no random numbers drawn."""
    x = torch.arange(rows * dim, device=device, dtype=torch.float32).reshape(rows, dim)
    return torch.sin(0.37 * x).to(dtype).requires_grad_()


def _made_up_ids(rows: int, cols: int, device):
    """(clip_video, clip_t0, audio_video, audio_t0) of a warm-up launch: every clip with its
    aligned window and windows of other clips and times."""
    r, c = torch.arange(rows, device=device), torch.arange(cols, device=device)
    return r, torch.zeros(rows, device=device), c % rows, (c // rows).float() * 0.5


def _ids(b: dict, dev):
    return (b["clip_video"].to(dev), b["clip_t0"].to(dev), b["audio_video"].to(dev),
            b["audio_t0"].to(dev))


class Contrastive(Objective):
    """The AVTS margin loss on embedding distances d: y d^2 + (1 - y) relu(margin - d)^2, each
    class weighing half (kernels/contrastive.py). Paired pairs score the listed (clip, window)
    pairs; in-batch pairs every clip against every window of the batch (and of every rank,
    gathered). Label-blind: every distance margin / 2, loss margin^2 / 4."""

    kind = "contrastive"
    fused_kernel = True

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        lc = cfg.loss
        if lc.margin <= 0:
            raise ConfigError(f"loss.margin={lc.margin}: with a margin of 0 negatives are never "
                              f"pushed apart and the towers collapse to one point; use a margin "
                              f"> 0 (1.0 on L2-normalised embeddings).")
        if cfg.model.normalize and lc.margin > 2:
            raise ConfigError(f"loss.margin={lc.margin}: L2-normalised embeddings are at most 2 "
                              f"apart, so every negative pair would stay inside the margin for "
                              f"ever; use a margin <= 2 or model.normalize=false.")
        if lc.gather_negatives == "on" and cfg.sampler.pairs == "paired":
            raise ConfigError("loss.gather_negatives=on: paired pairs are scored one by one, so "
                              "loss.kind=contrastive has no negatives to gather there; use "
                              "sampler.pairs=inbatch, or gather_negatives=off (or auto).")

    @classmethod
    def gathers_by_default(cls, cfg) -> bool:
        return cfg.sampler.pairs == "inbatch"

    def loss(self, model, b, v, a, fv, fa):
        lk, sm = self.cfg.loss, self.cfg.sampler
        dev = v.device
        if sm.pairs == "paired":
            own = b["audio_owner"].to(dev)
            return paired_contrastive_loss(v[own], a, b["label"].to(dev), margin=lk.margin,
                                           impl=lk.impl)
        # the paper's curriculum samples the hard negatives: then every negative pair weighs
        # the same (hard_share None); loss_weight weighs the hard pairs' mean by the share
        share = b["hard_share"] if sm.hard_share_as == "loss_weight" else None
        return inbatch_contrastive_loss(
            v, a, *_ids(b, dev), margin=lk.margin, hard_share=share,
            hard_min_shift=sm.hard_min_shift, sync_tol=lk.sync_tol, impl=lk.impl,
            group=self.group, gather_capacity=_capacity(self.cfg))

    def warm_up(self, device, dtype):
        lk, sm = self.cfg.loss, self.cfg.sampler
        B, M, D = self.cfg.loader.batch_size, _capacity(self.cfg), self.cfg.model.dim
        if sm.pairs == "paired":   # a step's pairs: each window with its clip
            v, a = _made_up(M, D, device, dtype), _made_up(M, D, device, dtype)
            y = torch.arange(M, device=device) % 2
            loss = paired_contrastive_loss(v, a, y, margin=lk.margin, impl=lk.impl)
        else:   # the columns as the gather leaves them: every rank's, each padded to M
            cols = M * self.ranks_in_loss
            v, a = _made_up(B, D, device, dtype), _made_up(cols, D, device, dtype)
            loss = inbatch_contrastive_loss(
                v, a, *_made_up_ids(B, cols, device), margin=lk.margin, hard_share=0.5,
                hard_min_shift=sm.hard_min_shift, sync_tol=lk.sync_tol, impl=lk.impl)
        loss.backward()

    def blind_loss(self, b, x):
        return _full(self.cfg.loss.margin ** 2 / 4, x)

    @property
    def stat_scale(self) -> float:
        return self.cfg.loss.margin

    def advice(self) -> str:
        return ("Try: a margin above the distance the towers start at (L2-normalised "
                "embeddings start ~1.41 apart: loss.margin=2.0), in-batch pairs "
                "(sampler.pairs=inbatch: every other clip's sound is a negative), or a "
                "lower train.lr.")


class SyncCE(Objective):
    """The paper's baseline: a classifier on concatenated (clip, audio) tower features says
    "in sync" or not, cross-entropy on the labels; each window with the clip it was drawn for
    (paired pairs; paired_windows=2 repeats clips). The projections to embeddings are not used,
    so they get no gradient. Label-blind: 50/50 for every pair, ln 2."""

    kind = "ce"
    needs_classifier = True
    idle_parts = ("video_proj", "audio_proj")
    score_name = "sync logit margins"

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if cfg.sampler.pairs != "paired":
            raise ConfigError("loss.kind=ce scores (clip, audio) pairs one by one: it needs "
                              "sampler.pairs=paired; use contrastive or infonce with inbatch.")
        if cfg.loss.gather_negatives == "on":
            raise ConfigError("loss.gather_negatives=on: loss.kind=ce scores pairs one by one "
                              "and has no negatives to gather; use contrastive or infonce, or "
                              "gather_negatives=off.")

    def loss(self, model, b, v, a, fv, fa):
        dev = v.device
        own = b["audio_owner"].to(dev)
        return sync_ce_loss(model.sync_logits(fv[own], fa), b["label"].to(dev))

    def scores(self, model, v, a, fv, fa):
        """The sync logit margin (in sync minus not)."""
        lg = model.sync_logits(fv, fa).float()
        return lg[:, 1] - lg[:, 0]

    def stat_values(self, model, b, v, a, fv, fa):
        """The logit margins of each window with its own clip, as they are (high = in sync)."""
        own = b["audio_owner"]
        return self.scores(model, v[own], a, fv[own], fa)

    def blind_loss(self, b, x):
        return _full(math.log(2.0), x)

    def advice(self) -> str:
        return ("Try: the contrastive loss (loss.kind=contrastive, loss.margin=2.0), which "
                "compares embeddings directly, or in-batch pairs with loss.kind=infonce.")


class InfoNCE(Objective):
    """For each clip with an aligned window, -log softmax over its row of -d^2 / temperature
    (ignored cells left out; kernels/infonce.py); with loss.symmetric, also each window against
    the batch's clips, the mean of both. Label-blind: every logit of a row equal, the mean over
    rows of ln(kept cells / aligned cells)."""

    kind = "infonce"
    fused_kernel = True
    reads_both_ways = True

    @classmethod
    def gathers_by_default(cls, cfg) -> bool:
        return True

    def loss(self, model, b, v, a, fv, fa):
        lk, sm = self.cfg.loss, self.cfg.sampler
        ids = _ids(b, v.device)
        kw = dict(temperature=lk.temperature, hard_min_shift=sm.hard_min_shift,
                  sync_tol=lk.sync_tol, impl=lk.impl, group=self.group)
        loss = inbatch_infonce_loss(v, a, *ids, gather_capacity=_capacity(self.cfg), **kw)
        if lk.symmetric:   # rows are now windows, columns (gathered under DDP) the clips
            cv, ct, av, at = ids
            loss = 0.5 * (loss + inbatch_infonce_loss(
                a, v, av, at, cv, ct, gather_capacity=self.cfg.loader.batch_size, **kw))
        return loss

    def warm_up(self, device, dtype):
        lk, sm = self.cfg.loss, self.cfg.sampler
        B, M, D = self.cfg.loader.batch_size, _capacity(self.cfg), self.cfg.model.dim
        kw = dict(temperature=lk.temperature, hard_min_shift=sm.hard_min_shift,
                  sync_tol=lk.sync_tol, impl=lk.impl)
        n = self.ranks_in_loss   # the columns as the gather leaves them (each rank's padded)
        v, a = _made_up(B, D, device, dtype), _made_up(M * n, D, device, dtype)
        loss = inbatch_infonce_loss(v, a, *_made_up_ids(B, M * n, device), **kw)
        if lk.symmetric:   # rows the windows, columns every rank's clips
            a, v = _made_up(M, D, device, dtype), _made_up(B * n, D, device, dtype)
            cv, ct, av, at = _made_up_ids(B * n, M, device)
            loss = loss + inbatch_infonce_loss(a, v, av, at, cv, ct, **kw)
        loss.backward()

    def blind_loss(self, b, x):
        cells = pair_cells(b["clip_video"], b["clip_t0"], b["audio_video"], b["audio_t0"],
                           self.cfg.sampler.hard_min_shift, self.cfg.loss.sync_tol)
        n_pos = (cells == POS).sum(1).double()
        # gathered negatives: the other ranks' windows are all kept for this rank's rows
        n_kept = (cells != IGNORED).sum(1).double() + (self.ranks_in_loss - 1) * cells.shape[1]
        rows = n_pos > 0
        return (torch.log(n_kept.clamp_min(1) / n_pos.clamp_min(1)) * rows).sum() \
            / rows.sum().clamp_min(1)

    def advice(self) -> str:
        return "Try: a lower train.lr, a longer train.warmup, or loss.temperature=0.2."


def sync_ce_loss(logits, y):
    """Cross-entropy of the sync classifier's two logits against the labels (1 = in sync)."""
    return F.cross_entropy(logits.float(), y.long())


def objective(cfg, world: int = 1) -> Objective:
    """The objective of cfg.loss.kind for a run on `world` ranks."""
    return Objective.named(cfg.loss.kind)(cfg, world)


def kinds() -> tuple[str, ...]:
    """The loss kinds there are (loss.kind's choices)."""
    return tuple(Objective.registry)
