"""Sync evaluation: is this sound in sync with this clip?

On a held-out prepared set the eval-mode sampler makes fixed (clip, window) pairs: half
positives, the negatives half easy (another video) and half hard (same video, shifted by at
least hard_min_shift). The model scores each pair as its objective does
(fastavts/objectives.py: minus the embedding distance; the sync classifier's logit margin for
loss.kind=ce). Videos are split in two halves by position in the manifest: the threshold is
chosen on the validation half (best accuracy over all its pairs) and the reported accuracies
and ROC AUCs come from the test half:

  sync_acc_easy  accuracy over the test positives and easy negatives
  sync_acc_hard  accuracy over the test positives and hard negatives
  auc_easy / auc_hard  ROC AUC of positives against each negative role (threshold-free)
"""
from __future__ import annotations

import copy
from contextlib import nullcontext

import numpy as np

from .pairs import Role

POSITIVE, EASY, HARD = Role.POSITIVE, Role.EASY, Role.HARD


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney U)."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    i = 0
    while i < len(allv):  # average ranks of ties
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def best_threshold(scores: np.ndarray, positive: np.ndarray) -> float:
    """The threshold (score >= t means in sync) with the best accuracy; midpoints between
    neighbouring scores."""
    s = np.sort(np.unique(scores))
    cands = np.concatenate([[s[0] - 1], (s[:-1] + s[1:]) / 2, [s[-1] + 1]])
    acc = [((scores >= t) == positive).mean() for t in cands]
    return float(cands[int(np.argmax(acc))])


def collect(model, loader, objective, device, autocast) -> dict:
    """Scores (objective.scores: fastavts/objectives.py), roles and video indices of every eval
    pair."""
    import torch

    from .data.features import ModelInputs

    inputs = ModelInputs(loader.cfg.data)   # uint8 video, int16 sound: made on the device
    model.eval()
    out = {"score": [], "role": [], "video": []}
    with torch.no_grad(), autocast():
        for b in loader.epoch(0):
            x = inputs({k: b[k].to(device, non_blocking=True) for k in ("video", "audio")})
            v, a, fv, fa = model(x["video"], x["audio"])
            out["score"].append(objective.scores(model, v, a, fv, fa).float().cpu().numpy())
            out["role"].append(b["role"].numpy())
            out["video"].append(b["clip_video"].numpy())
    model.train()
    return {k: np.concatenate(v) for k, v in out.items()}


def sync_metrics(r: dict) -> dict:
    val = r["video"] % 2 == 0
    test = ~val
    thr = best_threshold(r["score"][val], r["role"][val] == POSITIVE)
    pred = r["score"] >= thr

    def acc(neg_kind):
        m = test & ((r["role"] == POSITIVE) | (r["role"] == neg_kind))
        return float((pred[m] == (r["role"][m] == POSITIVE)).mean()) if m.any() else float("nan")

    pos = r["score"][test & (r["role"] == POSITIVE)]
    return dict(
        sync_acc_easy=round(acc(EASY), 4), sync_acc_hard=round(acc(HARD), 4),
        auc_easy=round(roc_auc(pos, r["score"][test & (r["role"] == EASY)]), 4),
        auc_hard=round(roc_auc(pos, r["score"][test & (r["role"] == HARD)]), 4),
        threshold=round(thr, 5),
        eval_pairs=dict(positive=int((test & (r["role"] == POSITIVE)).sum()),
                        easy=int((test & (r["role"] == EASY)).sum()),
                        hard=int((test & (r["role"] == HARD)).sum()),
                        validation=int(val.sum())))


def eval_config(cfg, clips_per_video: int = 32):
    """The training config turned into the fixed eval pairs described above."""
    c = copy.deepcopy(cfg)
    c.sampler.pairs, c.sampler.positive_share, c.sampler.paired_windows = "paired", 0.5, 1
    c.sampler.curriculum, c.sampler.curriculum_unit = [[0.0, 0.5]], "step"
    c.sampler.superhard_share, c.sampler.clips_per_video = 0.0, clips_per_video
    return c


def evaluate_sync(model, cfg, root, device, autocast=nullcontext,
                  clips_per_video: int = 32) -> dict:
    """Sync accuracy and AUC on the held-out set `root`. Videos that do not decode are left
    out, named on stderr and in `eval_skipped_videos` ({video id: file and error}), and the
    pairs are made again without them (so no pair stands in for a lost one)."""
    import sys

    from .data.checks import check_dataset
    from .data.dataset import Dataset
    from .data.loader import make_loader
    from .errors import ConfigError
    from .objectives import objective

    c = eval_config(cfg, clips_per_video)
    check_dataset(c, root, "dataset")
    every = [v["id"] for v in Dataset.open(root).videos]
    skipped: dict[str, str] = {}
    while True:
        ids = [v for v in every if v not in skipped]
        if len(ids) < 2:
            raise ConfigError(f"dataset {root}: {len(skipped)} of its {len(every)} videos do "
                              f"not decode ({_first(skipped)}); evaluate on a set that does")
        loader = make_loader(c, root, mode="eval", rank=0, world_size=1,
                             videos=ids if skipped else None)
        try:
            r = collect(model, loader, objective(cfg), device, autocast)
            found = {f["video"]: f["error"] for f in loader.fault_log}
        except Exception:   # a batch none of whose clips decode: find the culprits
            found = undecodable(loader)
            if not found:
                raise
            r = None
        finally:
            loader.close()
        new = {k: _named(root, loader, k, e) for k, e in found.items() if k not in skipped}
        if not new and r is not None:
            break
        if not new:
            raise RuntimeError(f"evaluation of {root} failed again without new undecodable "
                               f"videos ({_first(found)})")
        skipped.update(new)
    out = sync_metrics(r)
    if skipped:
        print(f"fastavts: evaluation of {root}: left out {len(skipped)} video(s) that do not "
              f"decode: " + "; ".join(f"{k} ({e})" for k, e in skipped.items()),
              file=sys.stderr)
        out["eval_skipped_videos"] = skipped
    return out


def undecodable(loader) -> dict[str, str]:
    """{video id: error} of the videos whose planned eval clips PyAV cannot read."""
    bad: dict[str, str] = {}
    for b in range(len(loader.sampler)):
        plan = loader.sampler.plan(0, b)
        for i, err in loader.unreadable_clips(plan, skip=set(bad)).items():
            bad.setdefault(loader.video_ids[int(plan["clip_video"][i])], err[:200])
    return bad


def _named(root, loader, vid: str, err: str) -> str:
    """The error with the video's first file named."""
    segs = loader.dataset.by_id[vid].get("segments") or [{}]
    return f"{root}/{segs[0].get('path', '?')}: {err}"


def _first(d: dict) -> str:
    return next(iter(d.items()), ("", ""))[1] if d else "no error recorded"
