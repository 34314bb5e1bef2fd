"""The sampler: curriculum statistics, shards, resume, negatives that respect their rules."""
import numpy as np
import pytest

from fastavts.config import build_config
from fastavts.data.sampler import EASY, HARD, POSITIVE, SUPERHARD, Curriculum, Sampler


def fake_videos(n=40, seed=0, short=()):
    """Manifest-like rows: 25 fps, durations 4-12 s (some given ones 1.5 s)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        dur = 1.5 if i in short else float(rng.uniform(4, 12))
        nf = int(round(dur * 25))
        out.append(dict(id=f"v{i}", fps=25.0, num_frames=nf, duration=nf / 25, width=160,
                        height=128, audio_start=float(rng.uniform(-0.1, 0.1)),
                        audio_duration=nf / 25, segments=[dict(path=f"v{i}.webm",
                                                               start_frame=0, num_frames=nf)]))
    return out


def make(*overrides, videos=None, batch=8, **kw):
    cfg = build_config(overrides=list(overrides))
    return Sampler(videos or fake_videos(), cfg.data, cfg.sampler, batch, **kw), cfg


def test_curriculum_schedule_is_followed_by_the_batches():
    s, cfg = make("sampler.curriculum=[[0,0.0],[2,0.5],[4,1.0]]", "sampler.curriculum_unit=epoch",
                  "sampler.clips_per_video=8", batch=16, total_epochs=6)
    for epoch, want in [(0, 0.0), (1, 0.0), (2, 0.5), (3, 0.5), (4, 1.0), (5, 1.0)]:
        kinds = np.concatenate([s.plan(epoch, b)["role"] for b in range(len(s))])
        neg = kinds[kinds != POSITIVE]
        share = np.mean(neg == HARD)
        print(epoch, want, share, len(neg))
        assert np.mean(kinds == POSITIVE) == pytest.approx(0.5)  # exactly half per batch
        assert abs(share - want) < 4 * np.sqrt(want * (1 - want) / len(neg)) + 1e-9
        assert s.hard_share(epoch, 0) == want


@pytest.mark.parametrize("share_as", ["sample", "loss_weight"])
def test_inbatch_hard_windows_follow_the_schedule_as_sampled_shares(share_as):
    """hard_share_as=sample: each clip's extra windows are hard with the scheduled share, else
    windows of other videos (the paper's sampled share); loss_weight: always hard."""
    s, cfg = make("sampler.pairs=inbatch", "sampler.k=2", f"sampler.hard_share_as={share_as}",
                  "sampler.curriculum=[[0,0.0],[2,0.25],[4,0.75]]", "sampler.curriculum_unit=epoch",
                  "sampler.clips_per_video=8", batch=16, total_epochs=6)
    for epoch, want in [(0, 0.0), (1, 0.0), (2, 0.25), (3, 0.25), (4, 0.75), (5, 0.75)]:
        plans = [s.plan(epoch, b) for b in range(len(s))]
        kinds = np.concatenate([p["role"] for p in plans])
        extra = kinds.reshape(-1, 3)[:, 1:].ravel()           # the k=2 windows after each aligned one
        assert (kinds.reshape(-1, 3)[:, 0] == POSITIVE).all()
        fallback = sum(p["fallback_easy"] for p in plans)      # hard that could not fit: easy
        got = np.mean(extra == HARD)
        if share_as == "loss_weight":
            assert got + fallback / len(extra) == pytest.approx(1.0)
            continue
        print(epoch, want, got, len(extra), fallback)
        assert set(np.unique(extra)) <= {EASY, HARD}
        tol = 4 * np.sqrt(want * (1 - want) / len(extra)) + fallback / len(extra) + 1e-9
        assert abs(got - want) <= tol
        if want == 0:
            assert got == 0


def test_curriculum_in_fractions_and_steps():
    c = Curriculum([[0, 0.0], [0.333, 0.25]], "fraction", total_steps=300)
    assert [c.share(0, s, 100) for s in (0, 99, 100, 299)] == [0.0, 0.0, 0.25, 0.25]
    c = Curriculum([[10, 0.3]], "step")
    assert (c.share(0, 9, 5), c.share(0, 10, 5)) == (0.0, 0.3)
    with pytest.raises(ValueError, match="total number of steps"):
        Curriculum([[0, 0.1]], "fraction")


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_are_disjoint_and_cover_the_epoch(world):
    shards = [make(batch=4, rank=r, world_size=world)[0].shard(epoch=3) for r in range(world)]
    allitems = np.concatenate(shards)
    assert len(np.unique(allitems)) == len(allitems) == 40  # disjoint, complete
    samplers = [make(batch=4, rank=r, world_size=world)[0] for r in range(world)]
    assert len({len(s) for s in samplers}) == 1  # the same number of batches on every rank
    used = [s.plan(3, b)["clip_video"] for s in samplers for b in range(len(s))]
    used = np.concatenate(used)
    assert len(np.unique(used)) == len(used)  # batches never repeat a clip across ranks
    assert len(used) + samplers[0].dropped_per_epoch == 40


def test_plans_are_deterministic_and_epochs_differ():
    a, b = make()[0], make()[0]
    pa, pb = a.plan(2, 1), b.plan(2, 1)
    for k in pa:
        assert np.array_equal(pa[k], pb[k]), k
    assert not np.array_equal(a.plan(3, 1)["clip_video"], pa["clip_video"])
    c = make("sampler.seed=1")[0]
    assert not np.array_equal(c.plan(2, 1)["clip_frame"], pa["clip_frame"])


def test_resume_mid_epoch_reproduces_the_remaining_batches():
    s, _ = make()
    s.set_epoch(1)
    it = iter(s)
    for _ in range(2):
        next(it)
    state = s.state_dict()
    rest = list(it)
    r, _ = make()
    r.load_state_dict(state)
    again = list(r)
    assert len(again) == len(rest) == len(s) - 2
    for x, y in zip(rest, again):
        for k in x:
            assert np.array_equal(x[k], y[k])
    other, _ = make(batch=4)
    with pytest.raises(ValueError, match="another dataset, config, batch size"):
        other.load_state_dict(state)


def test_negatives_follow_their_rules():
    vids = fake_videos(short=(0, 1, 2))
    s, cfg = make("sampler.curriculum=[[0,0.6]]", "sampler.superhard_share=0.2",
                  "sampler.clips_per_video=6", videos=vids, batch=12)
    W = s.window_s
    fallbacks = 0
    for b in range(len(s)):
        p = s.plan(0, b)
        fallbacks += p["fallback_easy"]
        for i in range(len(p["role"])):
            cv, av, k = p["clip_video"][i], p["audio_video"][i], p["role"][i]
            shift = abs(p["audio_t0"][i] - p["clip_t0"][i])
            v = s.videos[av]
            assert -1e-9 <= p["audio_t0"][i] and p["audio_t0"][i] + W <= v["duration"] + 1e-9
            if k == POSITIVE:
                assert av == cv and shift < 1e-9
            elif k == EASY:
                assert av != cv
            elif k == HARD:
                assert av == cv and shift >= cfg.sampler.hard_min_shift - 1e-9
            else:
                assert k == SUPERHARD and av == cv
                assert cfg.sampler.superhard_min_shift - 1e-9 <= shift < cfg.sampler.hard_min_shift
            # clip frames and window inside the video
            f0 = p["clip_frame"][i]
            assert 0 <= f0 and f0 + s.clip_span <= s.videos[cv]["num_frames"]
            assert 0 <= p["crop_y"][i] <= 128 - 112 and 0 <= p["crop_x"][i] <= 160 - 112
    # the 1.5 s videos cannot hold a clip and a window shifted by 0.5 s: counted fallbacks
    assert fallbacks > 0


def test_inbatch_pairs_have_one_aligned_and_k_hard_windows_per_clip():
    s, cfg = make("sampler.pairs=inbatch", "sampler.k=2", "sampler.curriculum=[[0,1.0]]")
    p = s.plan(0, 0)
    B = len(p["clip_video"])
    assert len(p["role"]) == 3 * B
    assert np.array_equal(p["audio_owner"], np.repeat(np.arange(B), 3))
    kinds = p["role"].reshape(B, 3)
    assert (kinds[:, 0] == POSITIVE).all() and (kinds[:, 1:] == HARD).all()


def test_eval_mode_is_fixed_and_centred():
    s, _ = make(mode="eval", batch=7)
    a, b = s.plan(0, 0), s.plan(5, 0)
    assert np.array_equal(a["clip_frame"], b["clip_frame"]) and not a["flip"].any()
    assert (a["crop_y"] == 8).all() and (a["crop_x"] == 24).all()
    covered = np.concatenate([s.plan(0, i)["clip_video"] for i in range(len(s))])
    assert sorted(covered) == list(range(40))  # eval keeps the partial last batch


def test_refuses_what_cannot_work():
    with pytest.raises(ValueError, match="at least 2 usable videos"):
        make(videos=fake_videos(n=1))
    with pytest.raises(ValueError, match="do not fill one batch"):
        make(batch=64)


def test_paired_with_two_windows_per_clip():
    """paired_windows=2: every clip with its aligned window and one negative, drawn by the
    curriculum (hard with the scheduled share): half positives, pairs sharing the clip."""
    s, cfg = make("sampler.pairs=paired", "sampler.paired_windows=2",
                  "sampler.curriculum=[[0,0.0],[2,0.5]]", "sampler.curriculum_unit=epoch",
                  "sampler.clips_per_video=8", batch=16, total_epochs=4)
    for epoch, want in [(0, 0.0), (3, 0.5)]:
        plans = [s.plan(epoch, b) for b in range(len(s))]
        for p in plans:
            B = len(p["clip_video"])
            assert len(p["role"]) == 2 * B
            assert np.array_equal(p["audio_owner"], np.repeat(np.arange(B), 2))
            assert (p["role"][0::2] == POSITIVE).all() and (p["role"][1::2] != POSITIVE).all()
        neg = np.concatenate([p["role"][1::2] for p in plans])
        fallback = sum(p["fallback_easy"] for p in plans) / len(neg)
        got = np.mean(neg == HARD)
        assert abs(got - want) <= 4 * np.sqrt(want * (1 - want) / len(neg)) + fallback + 1e-9


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("cpv", [2, 4])
def test_grouped_clips_share_their_batch_and_give_hard_pairs(world, cpv):
    over = ["sampler.pairs=inbatch", "sampler.k=0", f"sampler.clips_per_video={cpv}",
            "sampler.group_clips=true"]
    samplers = [make(*over, batch=8, rank=r, world_size=world)[0] for r in range(world)]
    assert len({len(s) for s in samplers}) == 1
    items = np.concatenate([s.shard(2) for s in samplers])
    assert len(np.unique(items)) == len(items) and len(items) <= 40 * cpv  # disjoint
    assert {int(i) // cpv for i in items} == set(range(40))                 # whole videos
    for s_ in samplers:
        assert (np.bincount(s_.shard(2) // cpv, minlength=40) % cpv == 0).all()
    hard = pairs = 0
    for s in samplers:
        for b in range(len(s)):
            p = s.plan(2, b)
            counts = np.bincount(p["clip_video"])
            assert set(counts[counts > 0].tolist()) == {cpv}   # each video's clips together
            assert len(p["role"]) == 8 and (p["role"] == POSITIVE).all()   # k=0: M = B
            # the other clips' aligned windows of the same video: hard negatives for the loss
            # (shifted by >= hard_min_shift), formed from ids and times as the kernel does
            for i in range(8):
                for j in range(8):
                    if i != j and p["clip_video"][i] == p["audio_video"][j]:
                        pairs += 1
                        hard += abs(p["clip_t0"][i] - p["audio_t0"][j]) >= 0.5
    assert pairs > 0 and hard / pairs > 0.7
    # not grouped: the same clips spread over the epoch's batches
    flat = make(*over[:3], batch=8)[0]
    together = [set(np.bincount(flat.plan(2, b)["clip_video"]).tolist()) <= {0, cpv}
                for b in range(len(flat))]
    assert not any(together)


# --------------------------------------------------------------------------------------------
# the distributions docs/data.md states (train mode), against their own definitions

def _two_segment_videos(n=40):
    """Videos of two segments, 60 and 200 frames at 25 fps, sound over all of them: clip ranges
    [0, 28] and [60, 228] at 16 frames every 2nd (29 and 169 starts)."""
    return [dict(id=f"v{i:02d}", fps=25.0, num_frames=260, duration=10.4, width=160,
                 height=128, audio_start=0.0, audio_duration=10.4,
                 segments=[dict(path=f"v{i}a.webm", start_frame=0, num_frames=60),
                           dict(path=f"v{i}b.webm", start_frame=60, num_frames=200)])
            for i in range(n)]


def _chi2_ok(counts, probs, alpha_z=3.7):
    """Pearson's chi-square of counts against probabilities below its 1e-4 upper quantile
    (Wilson-Hilferty: z = 3.7)."""
    counts, probs = np.asarray(counts, float), np.asarray(probs, float)
    exp = counts.sum() * probs
    stat = ((counts - exp) ** 2 / exp).sum()
    k = len(counts) - 1
    limit = k * (1 - 2 / (9 * k) + alpha_z * np.sqrt(2 / (9 * k))) ** 3
    return stat < limit, stat, limit


def _ks_uniform_ok(u, c=1.95):
    """Kolmogorov-Smirnov of samples u against U(0, 1), below its 1e-3 critical value."""
    u = np.sort(np.asarray(u))
    n = len(u)
    d = max((np.arange(1, n + 1) / n - u).max(), (u - np.arange(n) / n).max())
    return d < c / np.sqrt(n), d


def _plans(s, epochs):
    return [s.plan(e, b) for e in range(epochs) for b in range(len(s))]


def test_clip_starts_crops_and_flips_are_uniform():
    """A clip's start is uniform over all its video's start frames (each range weighs its
    length: 29 against 169), its crop offsets uniform, its flip a fair coin."""
    s, _ = make("sampler.clips_per_video=16", videos=_two_segment_videos(), batch=64)
    plans = _plans(s, 30)
    starts = np.concatenate([p["clip_frame"] for p in plans])
    valid = np.r_[0:29, 60:229]
    assert np.isin(starts, valid).all() and len(starts) >= 19000
    counts = np.array([(starts == f).sum() for f in valid])
    ok, stat, limit = _chi2_ok(counts, np.full(len(valid), 1 / len(valid)))
    assert ok, (stat, limit)
    assert abs((starts < 60).mean() - 29 / 198) < 0.015   # not range first, then a start
    for key, size in (("crop_y", 128 - 112 + 1), ("crop_x", 160 - 112 + 1)):
        v = np.concatenate([p[key] for p in plans])
        ok, stat, limit = _chi2_ok(np.bincount(v, minlength=size), np.full(size, 1 / size))
        assert ok and v.min() == 0 and v.max() == size - 1, (key, stat, limit)
    flips = np.concatenate([p["flip"] for p in plans])
    assert abs(flips.mean() - 0.5) < 4 * 0.5 / np.sqrt(len(flips))


def test_negative_shifts_and_roles_are_as_documented():
    """Paired, half positives: a negative is super-hard with sampler.superhard_share, hard with
    (1 - that) x the curriculum's share, else easy. A hard window's start is uniform over the
    video's audio range less [t0 - hard_min_shift, t0 + hard_min_shift] (both sides, by their
    lengths), a super-hard one's over the shifts in [superhard_min_shift, hard_min_shift), an
    easy one's over another video's audio range, the video uniform among the others.
    Checked by the probability integral transform: each start mapped through the CDF of its
    own allowed set is U(0, 1)."""
    vids = fake_videos(n=30, seed=3)
    s, cfg = make("sampler.curriculum=[[0,0.5]]", "sampler.superhard_share=0.2",
                  "sampler.clips_per_video=8", videos=vids, batch=48)
    sm = cfg.sampler
    u = {HARD: [], SUPERHARD: [], EASY: []}
    roles, others, fallbacks = [], [], 0
    for p in _plans(s, 16):
        fallbacks += p["fallback_easy"]
        for i in range(len(p["role"])):
            k, t0, t = int(p["role"][i]), p["clip_t0"][p["audio_owner"][i]], p["audio_t0"][i]
            roles.append(k)
            if k == POSITIVE:
                continue
            lo, hi = s.audio_range(s.videos[int(p["audio_video"][i])])
            if k == EASY:
                u[EASY].append((t - lo) / (hi - lo))
                cv = int(p["clip_video"][p["audio_owner"][i]])
                others.append(int(p["audio_video"][i]) - (int(p["audio_video"][i]) > cv))
                continue
            near, far = ((sm.hard_min_shift, np.inf) if k == HARD
                         else (sm.superhard_min_shift, sm.hard_min_shift))
            pieces = [(max(lo, t0 - far), min(hi, t0 - near)), (max(lo, t0 + near), min(hi, t0 + far))]
            pieces = [(a, b) for a, b in pieces if b > a]
            total = sum(b - a for a, b in pieces)
            below = sum(min(max(t - a, 0), b - a) for a, b in pieces)
            u[k].append(below / total)
    roles = np.array(roles)
    neg = roles[roles != POSITIVE]
    assert (roles == POSITIVE).mean() == 0.5 and fallbacks == 0   # 4-12 s videos: room
    for k, want in ((SUPERHARD, 0.2), (HARD, 0.8 * 0.5), (EASY, 0.8 * 0.5)):
        got = (neg == k).mean()
        assert abs(got - want) < 4 * np.sqrt(want * (1 - want) / len(neg)) + 0.01, (k, got, want)
    for k, vals in u.items():   # the sample grid moves a start by < 1/16000 s: inside the test
        assert len(vals) > 300, k
        ok, d = _ks_uniform_ok(np.clip(vals, 0, 1))
        assert ok, (k, d, len(vals))
    ok, stat, limit = _chi2_ok(np.bincount(others, minlength=29), np.full(29, 1 / 29))
    assert ok, (stat, limit)
