"""Which held-out sync pairs a trained model gets wrong, and what the synthetic videos hold there.

    python bench/sync_errors.py runs/demo-*/checkpoints/last.pt data/demo/heldout

Scores the fixed held-out pairs exactly as the demo's evaluation does (fastavts.evaluate:
threshold chosen on the even-numbered videos, errors counted on the odd ones), then lists each
wrong test pair with the impacts (time within the window, kind) of the clip and of the audio
window, read from the synthetic videos' sidecar files next to the prepared set's sources
(`fastavts synth` writes them). A hard negative counts as "same pattern" when its window holds
as many impacts as the clip and each lies within --tol seconds of the clip's at the same
place: a shift by whole periods of a steady bounce, which frames further apart than --tol
cannot tell from the true alignment. Prints the list and the counts; appends the counts to
bench/results/sync_errors.jsonl.
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path

from common import HERE, Rows, context


def impacts(meta: dict, t0: float, length: float) -> list[tuple[float, str]]:
    return [(round(e["t"] - t0, 3), e["kind"]) for e in meta["events"] if t0 <= e["t"] < t0 + length]


def same_pattern(a: list, b: list, tol: float) -> bool:
    return len(a) == len(b) and all(abs(x[0] - y[0]) <= tol for x, y in zip(a, b))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("heldout", help="the prepared held-out set (its sources' .json sidecars "
                                    "are read for the impact times)")
    ap.add_argument("--tol", type=float, default=0.05)
    ap.add_argument("--out", default=str(HERE / "results" / "sync_errors.jsonl"))
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from fastavts.data.loader import make_loader
    from fastavts.data.sampler import EASY, HARD, POSITIVE
    from fastavts.evaluate import collect, eval_config, sync_metrics
    from fastavts.models.avts import load_model
    from fastavts.objectives import objective

    model, cfg = load_model(args.checkpoint, torch.device("cpu"))
    c = eval_config(cfg, cfg.train.eval_clips)
    loader = make_loader(c, args.heldout, mode="eval", rank=0, world_size=1)
    try:
        plans = [loader.sampler.plan(0, b) for b in range(len(loader.sampler))]
        videos = loader.sampler.videos
        r = collect(model, loader, objective(cfg), torch.device("cpu"), nullcontext)
    finally:
        loader.close()
    m = sync_metrics(r)
    cat = {k: np.concatenate([p[k] for p in plans]) for k in
           ("clip_video", "clip_t0", "audio_video", "audio_t0", "role")}
    if not (np.array_equal(cat["role"], r["role"]) and np.array_equal(cat["clip_video"], r["video"])):
        raise RuntimeError("the eval plans do not line up with the scored pairs")
    metas = {}

    def meta(vi):
        if vi not in metas:
            # the manifest row (the sampler keeps only what plans read)
            side = Path(loader.dataset.by_id[videos[vi]["id"]]["source"]).with_suffix(".json")
            if not side.is_file():
                raise SystemExit(f"sync_errors: no sidecar {side} for video {videos[vi]['id']}: "
                                 f"this tool reads the impact times `fastavts synth` writes")
            metas[vi] = json.loads(side.read_text())
        return metas[vi]

    length = cfg.data.clip_frames * cfg.data.frame_stride / videos[0]["fps"]
    s, kind, test = r["score"], r["role"], r["video"] % 2 == 1
    wrong = test & np.where(kind == POSITIVE, s < m["threshold"], s >= m["threshold"])
    names = {POSITIVE: "positive", EASY: "easy", HARD: "hard"}
    counts = {"positive_rejected": 0, "easy_accepted": 0, "hard_accepted": 0,
              "hard_accepted_same_pattern": 0}
    for i in np.flatnonzero(wrong):
        cv, av = int(cat["clip_video"][i]), int(cat["audio_video"][i])
        clip = impacts(meta(cv), float(cat["clip_t0"][i]), length)
        audio = impacts(meta(av), float(cat["audio_t0"][i]), length)
        k = int(kind[i])
        counts[{POSITIVE: "positive_rejected", EASY: "easy_accepted",
                HARD: "hard_accepted"}[k]] += 1
        same = k == HARD and same_pattern(clip, audio, args.tol)
        counts["hard_accepted_same_pattern"] += same
        print(f"{names[k]:8s} score {s[i]:.3f} clip {videos[cv]['id']} at "
              f"{cat['clip_t0'][i]:.2f} s, sound {videos[av]['id']} at {cat['audio_t0'][i]:.2f} s"
              f"{'  [same pattern]' if same else ''}")
        print(f"         clip impacts {clip}\n         sound impacts {audio}")
    ctx = context()
    print(f"machine: {ctx['machine']}\nversions: {ctx['versions']}")
    print(json.dumps(dict(metrics={k: v for k, v in m.items() if k != "eval_pairs"}, **counts)))
    rows = Rows(args.out)
    rows.add(dict(bench="sync_errors", checkpoint=str(args.checkpoint), tol=args.tol, **m,
                  **counts, **ctx))
    rows.done()
    return 0


if __name__ == "__main__":
    sys.exit(main())
