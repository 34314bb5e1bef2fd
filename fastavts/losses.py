"""AVTS losses. The contrastive loss (reference and fused Triton kernel, switched by `impl`)
lives in kernels/contrastive.py (fastavts.kernels.contrastive) and is re-exported here.

d(i, j) = ||v_i - a_j||_2. Kind of the pair (clip i, audio window j), from ids and start times:
  positive  same video, |clip_t0 - audio_t0| <= sync_tol
  hard      same video, gap >= hard_min_shift
  ignored   same video, gap in between (overlapping windows)
  easy      different videos

contrastive (DESIGN.md section 1), every pair of the batch (inbatch) or the listed pairs (paired):
  0.5 * mean_pos(d^2) + 0.5 * ((1 - h) * mean_easy(relu(m - d)^2) + h * mean_hard(relu(m - d)^2))
  h = the curriculum's hard share. A kind without pairs drops out and the remaining weights of
  its half are renormalised; without negatives the loss is mean_pos(d^2).
ce: cross-entropy of a sync classifier on concatenated (clip, audio) features, paired pairs.
infonce: for each clip with a positive window, -log softmax over its row of -d^2 / temperature
  (ignored pairs left out).
"""
from __future__ import annotations

import torch.nn.functional as F

from .kernels.contrastive import (  # noqa: F401
    EASY,
    HARD,
    IGNORED,
    POS,
    contrastive_terms,
    inbatch_contrastive_loss,
    pair_kinds,
    paired_contrastive_loss,
)
from .kernels.infonce import inbatch_infonce_loss, infonce_rows_reference, loss_from_rows  # noqa: F401


def infonce_loss(v, a, kinds, temperature: float = 0.1):
    """InfoNCE from embeddings and a (B, M) matrix of pair kinds: the mean over the clips that
    have a positive window of -log(sum_pos e^l / sum_kept e^l), l = -d^2 / temperature
    (kernels/infonce.py's reference; branch-free, no host sync). The trainer calls
    inbatch_infonce_loss, which forms the kinds itself and has the fused kernel."""
    return loss_from_rows(*infonce_rows_reference(v, a, kinds, temperature))


def sync_ce_loss(logits, y):
    return F.cross_entropy(logits.float(), y.long())


def sync_scores(model, v, a, fv, fa, kind: str):
    """Per paired (clip i, audio i): a score that is high when in sync."""
    if kind == "ce":
        lg = model.sync_logits(fv, fa).float()
        return lg[:, 1] - lg[:, 0]
    return -(v.float() - a.float()).norm(dim=1)
