"""Collapse: the towers stop telling in-sync pairs from the rest.

A pair loss has a label-blind value, the best it can do with outputs that ignore the label:

    contrastive  every distance m/2          -> 0.5 (m/2)^2 + 0.5 (m - m/2)^2 = m^2/4
    ce           every prediction 50/50      -> ln 2
    infonce      every logit of a row equal  -> mean over rows of ln(kept pairs / positives)

A run that sits there while positive and negative pairs look the same (their mean distances, or
sync logits, equal and hardly spread) has collapsed: it is not learning slowly, it has found
the answer that ignores the sound. `pair_stats` measures this on the device every step (no
host sync); the trainer reads it with the loss every train.log_every steps and `Detector` says
so, in the console, TensorBoard (collapse/*) and metrics.json (`collapse`).
"""
from __future__ import annotations

import math

import torch

from .kernels.contrastive import IGNORED, POS, pair_kinds

POSITIVE = 0   # the sampler's kind of a window that is its clip's aligned one


def pair_stats(model, cfg, b: dict, v, a, fv, fa, world: int = 1) -> torch.Tensor:
    """(4,) float32 on the device: mean score of positive pairs, of negative pairs, the spread
    (std) of all scores, and this batch's label-blind loss. The scores are the distances of
    each audio window to its own clip (positive, hard or easy by the sampler's kind), or for
    loss.kind=ce the sync logit margins."""
    lk = cfg.loss
    with torch.no_grad():
        if lk.kind == "ce":   # each window with its own clip
            lg = model.sync_logits(fv.detach()[b["audio_owner"]], fa.detach()).float()
            x = lg[:, 1] - lg[:, 0]
            blind = torch.tensor(math.log(2.0), device=x.device)
        else:
            own = b["audio_owner"]
            x = (v.detach().float()[own] - a.detach().float()).norm(dim=1)
            if lk.kind == "contrastive":
                blind = torch.tensor(lk.margin ** 2 / 4, device=x.device)
            else:   # infonce: ln(kept / positives) of each row with a positive
                kinds = pair_kinds(b["clip_video"], b["clip_t0"], b["audio_video"], b["audio_t0"],
                                   cfg.sampler.hard_min_shift, lk.sync_tol)
                n_pos = (kinds == POS).sum(1).double()
                # gathered negatives: the other ranks' windows are all kept for this rank's rows
                n_kept = (kinds != IGNORED).sum(1).double() + (world - 1) * kinds.shape[1]
                rows = n_pos > 0
                blind = (torch.log(n_kept.clamp_min(1) / n_pos.clamp_min(1)) * rows).sum() \
                    / rows.sum().clamp_min(1)
        pos = b["kind"] == POSITIVE
        n_pos, n_neg = pos.sum().clamp_min(1), (~pos).sum().clamp_min(1)
        spread = x.std() if x.numel() > 1 else x.new_zeros(())
        return torch.stack([(x * pos).sum() / n_pos, (x * ~pos).sum() / n_neg, spread,
                            blind.float()]).float()


class Detector:
    """Reads the stats with each loss read (train.log_every) and keeps the verdict.

    A network at its initialisation ignores the label too (InfoNCE starts at its label-blind
    value), so nothing is judged before the warm-up is over and a tenth of training done, and a
    verdict needs 3 reads in a row."""

    NEED = 3

    def __init__(self, cfg, total_steps: int = 0):
        self.kind = cfg.loss.kind
        # the scale the separations are judged at: the margin's units, logits, distances
        self.scale = cfg.loss.margin if self.kind == "contrastive" else 1.0
        self.from_step = max(int(cfg.train.warmup * total_steps), math.ceil(0.1 * total_steps))
        self.first_step = None
        self.reads = self.collapsed_reads = self.streak = 0
        self.now = False
        self.last: dict = {}

    def collapsed(self, loss: float, d_pos: float, d_neg: float, spread: float,
                  blind: float) -> bool:
        """At the label-blind loss (within 3 %) with positives and negatives alike: means
        within 5 % of the scale and a spread under 10 % of it."""
        if not all(map(math.isfinite, (loss, d_pos, d_neg, spread, blind))):
            return False
        return (abs(loss - blind) <= 0.03 * max(blind, 1e-3)
                and abs(d_pos - d_neg) <= 0.05 * self.scale and spread <= 0.1 * self.scale)

    def update(self, step: int, loss: float, stats: list[float]) -> str | None:
        """The message to print, when the state changes."""
        d_pos, d_neg, spread, blind = stats
        self.last = dict(loss=round(loss, 5), blind_loss=round(blind, 5), pos=round(d_pos, 5),
                         neg=round(d_neg, 5), spread=round(spread, 5))
        if step < self.from_step:
            return None
        self.reads += 1
        hit = self.collapsed(loss, d_pos, d_neg, spread, blind)
        self.streak = self.streak + 1 if hit else 0
        self.collapsed_reads += hit
        was, self.now = self.now, (self.streak >= self.NEED) or (self.now and hit)
        what = "sync logit margins" if self.kind == "ce" else "distances"
        if self.now and not was:
            if self.first_step is None:
                self.first_step = step
            return (f"fastavts train: step {step}: collapse: the loss sits at its label-blind "
                    f"value ({loss:.4f}; {blind:.4f} for outputs that ignore the label) and "
                    f"positive and negative pairs look the same ({what}: positives "
                    f"{d_pos:.3f}, negatives {d_neg:.3f}, spread {spread:.3f}). The towers "
                    f"ignore whether the sound belongs to the clip. {self.advice()}")
        if was and not self.now:
            return (f"fastavts train: step {step}: out of the collapse (loss {loss:.4f}, "
                    f"{what}: positives {d_pos:.3f}, negatives {d_neg:.3f})")
        return None

    def advice(self) -> str:
        if self.kind == "contrastive":
            return ("Try: a margin above the distance the towers start at (L2-normalised "
                    "embeddings start ~1.41 apart: loss.margin=2.0), in-batch pairs "
                    "(sampler.pairs=inbatch: every other clip's sound is a negative), or a "
                    "lower train.lr.")
        if self.kind == "ce":
            return ("Try: the contrastive loss (loss.kind=contrastive, loss.margin=2.0), which "
                    "compares embeddings directly, or in-batch pairs with loss.kind=infonce.")
        return "Try: a lower train.lr, a longer train.warmup, or loss.temperature=0.2."

    def summary(self) -> dict:
        return dict(collapsed_at_end=self.now, first_step=self.first_step,
                    reads_collapsed=self.collapsed_reads, reads=self.reads, **self.last)
