"""Collapse: the towers stop telling in-sync pairs from the rest.

A pair loss has a label-blind value, the best it can do with outputs that ignore the label
(each objective knows its own: fastavts/objectives.py):

    contrastive  every distance m/2          -> 0.5 (m/2)^2 + 0.5 (m - m/2)^2 = m^2/4
    ce           every prediction 50/50      -> ln 2
    infonce      every logit of a row equal  -> mean over rows of ln(kept pairs / positives)

A run that sits there while positive and negative pairs look the same (their mean distances, or
sync logits, equal and hardly spread) has collapsed: it is not learning slowly, it has found
the answer that ignores the sound. The objective's `pair_stats` measures this on the device
every step (no host sync); the trainer reads it with the loss every train.log_every steps and
`Detector` says so, in the console, TensorBoard (collapse/*) and metrics.json (`collapse`).
"""
from __future__ import annotations

import math

from .objectives import Objective


class Detector:
    """Reads the stats with each loss read (train.log_every) and keeps the verdict.

    A network at its initialisation ignores the label too (InfoNCE starts at its label-blind
    value), so nothing is judged before the warm-up is over and a tenth of training done, and a
    verdict needs 3 reads in a row."""

    NEED = 3

    def __init__(self, cfg, total_steps: int = 0, objective: Objective | None = None):
        self.objective = objective or Objective.named(cfg.loss.kind)(cfg)
        # the scale the separations are judged at: the margin's units, logits, distances
        self.scale = self.objective.stat_scale
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
        what = self.objective.score_name
        if self.now and not was:
            if self.first_step is None:
                self.first_step = step
            return (f"fastavts train: step {step}: collapse: the loss sits at its label-blind "
                    f"value ({loss:.4f}; {blind:.4f} for outputs that ignore the label) and "
                    f"positive and negative pairs look the same ({what}: positives "
                    f"{d_pos:.3f}, negatives {d_neg:.3f}, spread {spread:.3f}). The towers "
                    f"ignore whether the sound belongs to the clip. {self.objective.advice()}")
        if was and not self.now:
            return (f"fastavts train: step {step}: out of the collapse (loss {loss:.4f}, "
                    f"{what}: positives {d_pos:.3f}, negatives {d_neg:.3f})")
        return None

    def summary(self) -> dict:
        return dict(collapsed_at_end=self.now, first_step=self.first_step,
                    reads_collapsed=self.collapsed_reads, reads=self.reads, **self.last)
