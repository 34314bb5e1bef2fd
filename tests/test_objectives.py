"""fastavts/objectives.py: everything a loss kind means lives in its class.

A new kind defined here, in the test file alone, trains, is scored by eval-sync and watched by
the collapse detector; the collapse statistics of every kind match a float64 recomputation;
an unknown kind is refused; the sync classifier's idle projections stay out of DDP."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastavts.config import ConfigError, build_config
from fastavts.objectives import Objective, objective
from fastavts.pairs import Cell, Role

from conftest import small_cfg

FAST = ["data.crop=48", "data.clip_frames=8", "data.frame_stride=4", "model.video=tiny",
        "model.audio=tiny", "loader.batch_size=4", "loader.workers=0", "loader.kind=memory",
        "sampler.clips_per_video=2", "train.log_every=1", "train.ckpt_every=1000",
        "train.loggers=[]", "train.channels_last=false"]


@pytest.fixture
def cosine_kind(monkeypatch):
    """A kind of the test's own: paired pairs, a hinge on the cosine similarity, scored by the
    cosine. Registered in a copy of the registry that the test's end throws away."""
    monkeypatch.setattr(Objective, "registry", dict(Objective.registry))

    class CosineHinge(Objective):
        kind = "test_cosine"
        BLIND = 0.123   # a value no other kind has: the collapse watch must report this one

        @classmethod
        def check(cls, cfg):
            super().check(cfg)
            if cfg.sampler.pairs != "paired":
                raise ConfigError("loss.kind=test_cosine needs sampler.pairs=paired")

        def loss(self, model, b, v, a, fv, fa):
            own, y = b["audio_owner"].to(v.device), b["label"].to(v.device).float()
            cos = torch.nn.functional.cosine_similarity(v[own].float(), a.float())
            return (y * (1 - cos) + (1 - y) * torch.relu(cos - 0.2)).mean()

        def scores(self, model, v, a, fv, fa):
            return torch.nn.functional.cosine_similarity(v.float(), a.float())

        def blind_loss(self, b, x):
            return torch.full((), self.BLIND, device=x.device)

    return CosineHinge


def test_a_new_objective_trains_is_scored_and_watched_without_other_changes(
        cosine_kind, prepared, tmp_path, capsys):
    from fastavts.cli import main
    from fastavts.train import train

    with pytest.raises(ConfigError, match="needs sampler.pairs=paired"):
        build_config(overrides=["loss.kind=test_cosine", "sampler.pairs=inbatch"])
    cfg = small_cfg(*FAST, "loss.kind=test_cosine", f"train.data={prepared}", "train.epochs=1",
                    "sampler.clips_per_video=4")   # 6 videos x 4 clips: 6 steps of 4
    calls = {"loss": 0, "scores": 0}
    real_loss, real_scores = cosine_kind.loss, cosine_kind.scores

    def counted(name, real):
        def f(self, *a, **k):
            calls[name] += 1
            return real(self, *a, **k)
        return f
    cosine_kind.loss = counted("loss", real_loss)
    cosine_kind.scores = counted("scores", real_scores)
    r = train(cfg, tmp_path / "run", progress=False, stop_after_steps=2)
    assert r["stopped_at"] == 2 and calls["loss"] == 2 and all(map(math.isfinite, r["losses"]))
    r = train(cfg, tmp_path / "run", resume=True, progress=False)
    assert r["steps"] == 6 and r["loss"] == "test_cosine"
    # the collapse watch read the new kind's statistics (its label-blind value) at every read
    assert r["collapse"]["reads"] >= 1 and r["collapse"]["blind_loss"] == pytest.approx(0.123)
    # the model has no sync classifier (the kind does not need one)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert not any(k.startswith("classifier.") for k in state["model"])

    calls["scores"] = 0
    assert main(["eval-sync", str(tmp_path / "run" / "checkpoints" / "last.pt"), str(prepared),
                 "--json", "--clips-per-video", "4"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert calls["scores"] >= 1 and 0 <= out["auc_easy"] <= 1


def test_an_unknown_kind_is_refused_and_names_the_kinds():
    with pytest.raises(ConfigError, match="loss.kind='margin' is not allowed; choose one of "
                                          "contrastive, ce, infonce"):
        build_config(overrides=["loss.kind=margin"])
    cfg = build_config()
    cfg.loss.kind = "margin"      # set past validation: still no fall-through to another loss
    with pytest.raises(ConfigError, match="not allowed"):
        objective(cfg)


def _batch(seed=0):
    """6 clips of 3 videos, 2 windows each (own + another), roles from the sampler's rules."""
    g = torch.Generator().manual_seed(seed)
    clip_video = torch.tensor([0, 0, 1, 1, 2, 2])
    clip_t0 = torch.tensor([0.0, 2.0, 0.4, 3.0, 1.0, 1.3], dtype=torch.float64)
    own = torch.arange(6).repeat_interleave(2)
    audio_video = torch.stack([clip_video, torch.tensor([1, 0, 0, 1, 0, 2])], 1).reshape(-1)
    audio_t0 = torch.stack([clip_t0, torch.tensor([0.5, 0.6, 1.0, 0.4, 2.2, 1.33],
                                                  dtype=torch.float64)], 1).reshape(-1)
    role = torch.tensor([0, Role.EASY, 0, Role.HARD, 0, Role.EASY, 0, Role.HARD, 0, Role.EASY,
                         0, Role.SUPERHARD])
    v = torch.nn.functional.normalize(torch.randn(6, 5, generator=g), dim=1)
    a = torch.nn.functional.normalize(torch.randn(12, 5, generator=g), dim=1)
    fv, fa = torch.randn(6, 7, generator=g), torch.randn(12, 9, generator=g)
    return dict(clip_video=clip_video, clip_t0=clip_t0, audio_video=audio_video,
                audio_t0=audio_t0, audio_owner=own, role=role, label=(role == 0).long(),
                hard_share=0.5), v, a, fv, fa


def _stats64(x, role):
    x = np.asarray(x, np.float64)
    pos = np.asarray(role) == 0
    return [x[pos].mean(), x[~pos].mean(), x.std(ddof=1)]


@pytest.mark.parametrize("kind,extra", [
    ("contrastive", ["loss.margin=1.5"]), ("contrastive", ["sampler.pairs=inbatch"]),
    ("infonce", ["sampler.pairs=inbatch"]), ("ce", ["sampler.paired_windows=2"])])
@pytest.mark.parametrize("world", [1, 3])
def test_pair_stats_of_every_kind_against_float64(kind, extra, world):
    """The four statistics the collapse watch reads: mean positive / negative score distance,
    spread, label-blind loss, against an independent float64 computation; for InfoNCE's
    label-blind value the cells are recounted by hand from ids and times."""
    cfg = build_config(overrides=[f"loss.kind={kind}", *extra])
    b, v, a, fv, fa = _batch()
    obj = objective(cfg)
    obj.ranks_in_loss = world   # as with negatives gathered from `world` ranks
    classifier = torch.nn.Sequential(torch.nn.Linear(16, 2))
    model = type("M", (), {"sync_logits": lambda self, f, g: classifier(torch.cat([f, g], 1))})()
    got = obj.pair_stats(model, b, v, a, fv, fa).tolist()
    own = b["audio_owner"].numpy()
    v64, a64 = v.double().numpy(), a.double().numpy()
    if kind == "ce":
        with torch.no_grad():
            lg = classifier(torch.cat([fv[own], fa], 1)).double().numpy()
        x = lg[:, 1] - lg[:, 0]
        blind = math.log(2)
    else:
        x = np.linalg.norm(v64[own] - a64, axis=1)
        if kind == "contrastive":
            blind = (1.5 if "loss.margin=1.5" in extra else 1.0) ** 2 / 4   # m^2/4
        else:
            ct, at = b["clip_t0"].numpy(), b["audio_t0"].numpy()
            cv, av = b["clip_video"].numpy(), b["audio_video"].numpy()
            rows = []
            for i in range(6):
                n_pos = n_kept = 0
                for j in range(12):
                    gap = abs(ct[i] - at[j])
                    if cv[i] != av[j]:
                        n_kept += 1
                    elif gap >= cfg.sampler.hard_min_shift:
                        n_kept += 1
                    elif gap <= cfg.loss.sync_tol:
                        n_kept += 1
                        n_pos += 1
                n_kept += (world - 1) * 12
                if n_pos:
                    rows.append(math.log(n_kept / n_pos))
            blind = float(np.mean(rows))
    want = _stats64(x, b["role"].numpy()) + [blind]
    print(kind, extra, world, got, want)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_cell_and_role_codes_are_distinct_names_for_the_kernels_and_the_sampler():
    from fastavts.data import sampler
    from fastavts.kernels import contrastive

    assert (contrastive.POS, contrastive.EASY, contrastive.HARD, contrastive.IGNORED) == \
        (Cell.POS, Cell.EASY, Cell.HARD, Cell.IGNORED)
    assert (sampler.POSITIVE, sampler.EASY, sampler.HARD, sampler.SUPERHARD) == \
        (Role.POSITIVE, Role.EASY, Role.HARD, Role.SUPERHARD)
    b, *_ = _batch()
    # a super-hard window is a role of the sampler and an IGNORED cell of the loss matrix
    cells = contrastive.pair_cells(b["clip_video"], b["clip_t0"], b["audio_video"],
                                   b["audio_t0"], 0.5, 0.02)
    j = int(np.flatnonzero(b["role"].numpy() == Role.SUPERHARD)[0])
    assert cells[int(b["audio_owner"][j]), j] == Cell.IGNORED


def test_the_sync_classifier_leaves_its_projections_without_gradient(prepared, tmp_path):
    """loss.kind=ce never reaches the projections: the step freezes them (so DDP does not wait
    for their gradients), and the rest trains."""
    from fastavts.train import train

    cfg = small_cfg(*FAST, "loss.kind=ce", f"train.data={prepared}", "train.epochs=1")
    assert Objective.named("ce").idle_parts == ("video_proj", "audio_proj")
    train(cfg, tmp_path / "run", progress=False, stop_after_steps=1)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    moved = [n for n in state["optimizer"]["param_groups"][0]["params"]
             if n in state["optimizer"]["state"]]
    n_params = len(state["optimizer"]["param_groups"][0]["params"])
    n_proj = sum(1 for k in state["model"] if k.startswith(("video_proj.", "audio_proj."))
                 and not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert len(moved) == n_params - n_proj > 0   # Adam moments for every trained parameter


def test_ce_trains_two_epochs_on_two_gloo_ranks(prepared, tmp_path):
    """`fastavts train` with loss.kind=ce under torchrun, 2 gloo ranks, two epochs of 3 steps
    (before: DDP raised "Expected to have finished reduction in the prior iteration" at the
    second step: the projections got no gradient)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", "29533", "-m", "fastavts", "train", "--out", str(tmp_path / "run"),
           "-q", *FAST, f"train.data={prepared}", "loss.kind=ce", "sampler.paired_windows=2",
           "sampler.clips_per_video=4", "train.epochs=2", "synth.width=96", "synth.height=64", "prepare.short_side=64"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    print(p.stdout[-2000:], p.stderr[-3000:])
    assert p.returncode == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["steps"] == 6 and m["world_size"] == 2 and m["skipped_nonfinite"] == 0


def test_a_kind_with_a_fused_kernel_must_say_how_to_warm_it_up():
    """The trainer compiles and autotunes a kind's kernels before the first step through its
    warm_up (kernels/tuning.py): a fused kind without one is refused when it is defined."""
    with pytest.raises(TypeError, match="must say in warm_up"):
        class Fused(Objective):   # defining it is the test
            fused_kernel = True

            def loss(self, model, b, v, a, fv, fa):
                return v.sum()

            def blind_loss(self, b, x):
                return x.sum()
    assert "Fused" not in {c.__name__ for c in Objective.registry.values()}
