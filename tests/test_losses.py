"""Reference losses against hand-computed cases and float64 gradients."""
import math

import pytest
import torch

from fastavts.losses import (
    EASY,
    HARD,
    IGNORED,
    POS,
    inbatch_contrastive_loss,
    infonce_loss,
    pair_cells,
    paired_contrastive_loss,
)


def test_paired_contrastive_by_hand():
    v = torch.zeros(3, 2)
    a = torch.tensor([[3.0, 4.0], [0.6, 0.8], [0.3, 0.4]])   # distances 5, 1, 0.5
    y = torch.tensor([1, 0, 0])
    # 0.5 * 25 + 0.5 * mean(relu(1-1)^2, relu(1-0.5)^2) = 12.5 + 0.5 * 0.125
    assert paired_contrastive_loss(v, a, y, margin=1.0).item() == pytest.approx(12.5625)
    # no negatives: mean of the positives' d^2; no positives: the negatives' term alone
    assert paired_contrastive_loss(v, a, torch.tensor([1, 1, 1])).item() == pytest.approx(
        (25 + 1 + 0.25) / 3)
    assert paired_contrastive_loss(v, a, torch.tensor([0, 0, 0]), margin=2.0).item() == pytest.approx(
        (0 + 1 + 2.25) / 3)


def test_pair_cells_by_hand():
    clip_video = torch.tensor([0, 1])
    clip_t0 = torch.tensor([1.0, 2.0])
    audio_video = torch.tensor([0, 0, 0, 1, 0])
    audio_t0 = torch.tensor([1.01, 1.3, 1.5, 2.0, 3.0])
    k = pair_cells(clip_video, clip_t0, audio_video, audio_t0, hard_min_shift=0.5, sync_tol=0.02)
    assert k.tolist() == [[POS, IGNORED, HARD, EASY, HARD],
                          [EASY, EASY, EASY, POS, EASY]]


def test_inbatch_contrastive_by_hand():
    # 1-D embeddings so distances are plain differences
    v = torch.tensor([[0.0], [10.0]])
    a = torch.tensor([[0.5], [0.2], [10.0], [9.7]])
    clip_video, clip_t0 = torch.tensor([0, 1]), torch.tensor([0.0, 0.0])
    audio_video, audio_t0 = torch.tensor([0, 0, 1, 1]), torch.tensor([0.0, 1.0, 0.0, 2.0])
    # kinds: row 0: pos (d .5), hard (d .2), easy (10), easy (9.7)
    #        row 1: easy (9.5), easy (9.8), pos (0), hard (.3)
    margin, h = 1.0, 0.25
    pos = (0.25 + 0.0) / 2
    easy = 0.0                                   # all easy distances exceed the margin
    hard = ((1 - 0.2) ** 2 + (1 - 0.3) ** 2) / 2
    want = 0.5 * pos + 0.5 * ((1 - h) * easy + h * hard)
    got = inbatch_contrastive_loss(v, a, clip_video, clip_t0, audio_video, audio_t0,
                                   margin=margin, hard_share=h)
    assert got.item() == pytest.approx(want)
    # no hard pairs: the easy term takes the whole negative half
    got = inbatch_contrastive_loss(v, a[[0, 2]], clip_video, clip_t0, audio_video[[0, 2]],
                                   audio_t0[[0, 2]], margin=20.0, hard_share=h)
    easy20 = ((20 - 10) ** 2 + (20 - 9.5) ** 2) / 2   # clip 0 vs window 2, clip 1 vs window 0
    assert got.item() == pytest.approx(0.5 * (0.25 / 2) + 0.5 * easy20)


def test_contrastive_gradients_in_float64():
    torch.manual_seed(0)
    v = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    a = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    cv, at = torch.tensor([0, 1, 2, 0, 1]), torch.tensor([0, 1, 2, 0, 1, 3, 4])
    ct = torch.tensor([0.0, 0.0, 0.0, 2.0, 1.0])
    aa = torch.tensor([0.0, 0.0, 0.0, 2.0, 1.0, 0.0, 0.0])

    def f(v, a):
        d = torch.cdist(v, a)
        from fastavts.losses import contrastive_terms
        return contrastive_terms(d, pair_cells(cv, ct, at, aa), margin=2.0, hard_share=0.3)
    assert torch.autograd.gradcheck(f, (v, a))


def test_infonce_by_hand():
    v = torch.tensor([[0.0, 0.0]])
    a = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    kinds = torch.tensor([[POS, HARD, IGNORED]], dtype=torch.int8)
    t = 0.5
    want = -math.log(math.exp(-1 / t) / (math.exp(-1 / t) + math.exp(-4 / t)))
    assert infonce_loss(v, a, kinds, temperature=t).item() == pytest.approx(want, rel=1e-4)


def _infonce_both_ways_float64(v, a, kinds, t):
    """Plain float64: InfoNCE over rows (clips) and over columns (windows) of the kinds
    matrix, each the mean over the lines that hold a positive; returns (rows, columns)."""
    d2 = ((v.double()[:, None, :] - a.double()[None, :, :]) ** 2).sum(-1)
    logits = -d2 / t
    kept, pos = kinds != IGNORED, kinds == POS

    def one_way(lg, kp, ps):
        out = []
        for i in range(lg.shape[0]):
            if ps[i].any():
                out.append(torch.logsumexp(lg[i][kp[i]], 0) - torch.logsumexp(lg[i][ps[i]], 0))
        return torch.stack(out).mean()
    return one_way(logits, kept, pos), one_way(logits.T, kept.T, pos.T)


def test_symmetric_infonce_is_the_mean_of_both_directions():
    """loss.symmetric: the trainer's loss = (rows + columns) / 2 of an independent float64
    computation, value and gradients; columns without a positive clip (a window of a video with
    no clip in the batch) and ignored pairs (near-aligned) are left out as in rows."""
    from fastavts.config import build_config
    from fastavts.objectives import objective

    cfg = build_config(overrides=["loss.kind=infonce", "sampler.pairs=inbatch",
                                  "loss.symmetric=true", "loss.impl=reference",
                                  "loss.temperature=0.3"])
    g = torch.Generator().manual_seed(3)
    clip_video = torch.tensor([0, 0, 1, 1, 2, 3, 3])
    clip_t0 = torch.tensor([0.0, 2.0, 1.0, 1.2, 0.4, 0.0, 0.3])
    # each clip's own window, then a shifted window of video 1 and one of video 5 (no clip)
    audio_video = torch.cat([clip_video, torch.tensor([1, 5])])
    audio_t0 = torch.cat([clip_t0, torch.tensor([3.0, 0.0])])
    v = torch.randn(7, 5, generator=g, requires_grad=True)
    a = torch.randn(9, 5, generator=g, requires_grad=True)
    batch = dict(clip_video=clip_video, clip_t0=clip_t0, audio_video=audio_video,
                 audio_t0=audio_t0)
    got = objective(cfg).loss(None, batch, v, a, None, None)
    kinds = pair_cells(clip_video, clip_t0, audio_video, audio_t0,
                       cfg.sampler.hard_min_shift, cfg.loss.sync_tol)
    assert (kinds == IGNORED).any() and (kinds == HARD).any()   # the case covers both
    rows, cols = _infonce_both_ways_float64(v, a, kinds, 0.3)
    want = 0.5 * (rows + cols)
    assert abs(rows.item() - cols.item()) > 1e-3     # the two directions differ here
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    gv, ga = torch.autograd.grad(got, (v, a))
    wv, wa = torch.autograd.grad(want, (v, a))
    torch.testing.assert_close(gv, wv, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ga, wa, rtol=1e-4, atol=1e-6)


def test_symmetric_needs_infonce():
    from fastavts.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="loss.symmetric"):
        build_config(overrides=["loss.kind=contrastive", "loss.symmetric=true"])
