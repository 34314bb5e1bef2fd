"""AVTS losses as functions. The contrastive and InfoNCE losses (references and fused Triton
kernels, switched by `impl`) live in kernels/ (fastavts.kernels.contrastive, .infonce) and are
re-exported here; which loss a run trains, and everything else a loss kind means, is its
objective's (fastavts/objectives.py).

d(i, j) = ||v_i - a_j||_2. The cell (clip i, audio window j) of the loss matrix, from ids and
start times (fastavts.pairs.Cell; pair_cells):
  POS      same video, |clip_t0 - audio_t0| <= sync_tol
  HARD     same video, gap >= hard_min_shift
  IGNORED  same video, gap in between (overlapping windows)
  EASY     different videos

contrastive (docs/design.md section 1), every pair of the batch (inbatch) or the listed pairs (paired):
  0.5 * mean_pos(d^2) + 0.5 * ((1 - h) * mean_easy(relu(m - d)^2) + h * mean_hard(relu(m - d)^2))
  h = the curriculum's hard share. A cell kind without pairs drops out and the remaining weights of
  its half are renormalised; without negatives the loss is mean_pos(d^2).
ce: cross-entropy of a sync classifier on concatenated (clip, audio) features, paired pairs.
infonce: for each clip with a positive window, -log softmax over its row of -d^2 / temperature
  (ignored pairs left out).
"""
from __future__ import annotations

from .kernels.contrastive import (  # noqa: F401
    EASY,
    HARD,
    IGNORED,
    POS,
    contrastive_terms,
    inbatch_contrastive_loss,
    pair_cells,
    pair_kinds,
    paired_contrastive_loss,
)
from .kernels.infonce import inbatch_infonce_loss, infonce_rows_reference, loss_from_rows  # noqa: F401
from .objectives import sync_ce_loss  # noqa: F401


def infonce_loss(v, a, cells, temperature: float = 0.1):
    """InfoNCE from embeddings and a (B, M) matrix of loss-matrix cells: the mean over the
    clips that have a positive window of -log(sum_pos e^l / sum_kept e^l), l = -d^2 /
    temperature (kernels/infonce.py's reference; branch-free, no host sync). The trainer calls
    inbatch_infonce_loss, which forms the cells itself and has the fused kernel."""
    return loss_from_rows(*infonce_rows_reference(v, a, cells, temperature))
