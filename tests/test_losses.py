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
    pair_kinds,
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


def test_pair_kinds_by_hand():
    clip_video = torch.tensor([0, 1])
    clip_t0 = torch.tensor([1.0, 2.0])
    audio_video = torch.tensor([0, 0, 0, 1, 0])
    audio_t0 = torch.tensor([1.01, 1.3, 1.5, 2.0, 3.0])
    k = pair_kinds(clip_video, clip_t0, audio_video, audio_t0, hard_min_shift=0.5, sync_tol=0.02)
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
        return contrastive_terms(d, pair_kinds(cv, ct, at, aa), margin=2.0, hard_share=0.3)
    assert torch.autograd.gradcheck(f, (v, a))


def test_infonce_by_hand():
    v = torch.tensor([[0.0, 0.0]])
    a = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    kinds = torch.tensor([[POS, HARD, IGNORED]], dtype=torch.int8)
    t = 0.5
    want = -math.log(math.exp(-1 / t) / (math.exp(-1 / t) + math.exp(-4 / t)))
    assert infonce_loss(v, a, kinds, temperature=t).item() == pytest.approx(want, rel=1e-4)
