"""AVTS losses, plain PyTorch references (the fused Triton kernel plugs in behind loss.impl).

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

import torch
import torch.nn.functional as F

POS, EASY, HARD, IGNORED = 0, 1, 2, 3


def pair_kinds(clip_video, clip_t0, audio_video, audio_t0, hard_min_shift: float = 0.5,
               sync_tol: float = 0.02):
    """(B, M) int8 kinds of all clip-audio pairs."""
    same = clip_video[:, None] == audio_video[None, :]
    gap = (clip_t0[:, None].double() - audio_t0[None, :].double()).abs()
    kinds = torch.full(same.shape, EASY, dtype=torch.int8, device=same.device)
    kinds[same & (gap <= sync_tol)] = POS
    kinds[same & (gap > sync_tol) & (gap < hard_min_shift)] = IGNORED
    kinds[same & (gap >= hard_min_shift)] = HARD
    return kinds


def _weighted_mean(values, mask):
    n = mask.sum()
    return (values * mask).sum() / n.clamp_min(1), n > 0


def contrastive_terms(d, kinds, margin: float, hard_share: float):
    """The contrastive loss from distances d and kinds of the same shape."""
    d2 = d.pow(2)
    neg = F.relu(margin - d).pow(2)
    pos, has_pos = _weighted_mean(d2, kinds == POS)
    easy, has_easy = _weighted_mean(neg, kinds == EASY)
    hard, has_hard = _weighted_mean(neg, kinds == HARD)
    w_easy = (1 - hard_share) * has_easy
    w_hard = hard_share * has_hard
    if not (has_easy or has_hard):
        return pos if has_pos else d.sum() * 0
    if w_easy + w_hard == 0:  # the only negatives present have weight 0: give them the half
        w_easy, w_hard = has_easy.float(), has_hard.float()
    negative = (w_easy * easy + w_hard * hard) / (w_easy + w_hard)
    if not has_pos:
        return negative
    return 0.5 * pos + 0.5 * negative


def inbatch_contrastive_loss(v, a, clip_video, clip_t0, audio_video, audio_t0, *,
                             margin: float = 1.0, hard_share: float = 0.25,
                             hard_min_shift: float = 0.5, sync_tol: float = 0.02):
    """All B x M pairs (materialises the matrix: the reference the fused kernel must match)."""
    d = torch.cdist(v.float(), a.float())                       # (B, M)
    kinds = pair_kinds(clip_video, clip_t0, audio_video, audio_t0, hard_min_shift, sync_tol)
    return contrastive_terms(d, kinds, margin, hard_share)


def paired_contrastive_loss(v, a, y, *, margin: float = 1.0):
    """Pair i = (v_i, a_i) with label y_i: 0.5 mean_{y=1} d^2 + 0.5 mean_{y=0} relu(m - d)^2."""
    d = (v.float() - a.float()).norm(dim=1)
    kinds = torch.where(y.bool(), POS, EASY).to(torch.int8)
    return contrastive_terms(d, kinds, margin, hard_share=0.0)


def infonce_loss(v, a, kinds, temperature: float = 0.1):
    logits = -torch.cdist(v.float(), a.float()).pow(2) / temperature    # (B, M)
    logits = logits.masked_fill(kinds == IGNORED, float("-inf"))
    pos = kinds == POS
    rows = pos.any(1)
    if not rows.any():
        return logits.sum() * 0
    logz = torch.logsumexp(logits[rows], dim=1)
    logpos = torch.logsumexp(logits[rows].masked_fill(~pos[rows], float("-inf")), dim=1)
    return (logz - logpos).mean()


def sync_ce_loss(logits, y):
    return F.cross_entropy(logits.float(), y.long())


def sync_scores(model, v, a, fv, fa, kind: str):
    """Per paired (clip i, audio i): a score that is high when in sync."""
    if kind == "ce":
        lg = model.sync_logits(fv, fa).float()
        return lg[:, 1] - lg[:, 0]
    return -(v.float() - a.float()).norm(dim=1)
