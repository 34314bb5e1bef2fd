"""The synthetic downstream task: does AVTS pretraining beat scratch, at equal budget?

    fastavts train --out runs/demo                         # pretrain (the demo)
    python bench/downstream.py runs/demo/checkpoints/last.pt

Makes (once) a labelled synthetic set: `--videos` videos with exactly one sounding object each
(6 kinds: ball, bell, block, glass, drum, spring; seed 3000, never seen in pretraining),
prepared with the checkpoint's geometry. Then, for the pretrained checkpoint and for the same
architecture freshly initialised (`--scratch`):

  audio  fastavts probe-audio --dataset synth: linear SVM on the audio net's features, 5 folds
  video  fastavts finetune --dataset synth --split 1..--splits: the video net + a new classifier,
         for each budget in --epochs (the same for both inits), clip and video accuracy on the
         held-out fifth. The task is easy for both at full budget; the short budget shows which
         initialisation learns faster.

Prints a markdown table and appends one row per (task, init) to bench/results/downstream.jsonl.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from common import HERE, context, write_rows


def make_set(root: Path, videos: int, cfg) -> Path:
    import copy

    from fastavts.data.prepare import prepare
    from fastavts.data.synth import synthesize

    c = copy.deepcopy(cfg)
    c.synth.videos, c.synth.seed = videos, 3000
    c.synth.min_objects = c.synth.max_objects = 1
    c.synth.codec = "h264" if c.prepare.codec == "h264" else "vp9"
    synthesize(root / "synth_downstream", c, progress=False)
    prepare(root / "synth_downstream", root / "downstream", c, progress=False,
            command="bench/downstream.py")
    return root / "downstream"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--data", default="data/demo", help="the labelled set goes under this")
    ap.add_argument("--videos", type=int, default=150)
    ap.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 15],
                    help="fine-tuning budgets in epochs (both inits)")
    ap.add_argument("--splits", type=int, default=1, help="fine-tuning splits to average (1-3)")
    ap.add_argument("--layer", default="stage4")
    ap.add_argument("--once", action="store_true", help="one fine-tuning epoch, nothing recorded")
    ap.add_argument("--out", default=str(HERE / "results" / "downstream.jsonl"))
    args = ap.parse_args(argv)

    from fastavts.finetune import finetune
    from fastavts.models.avts import load_model
    from fastavts.probe import probe_audio

    _, cfg = load_model(args.checkpoint, "cpu")
    root = make_set(Path(args.data), args.videos, cfg)
    ctx = context()
    print(f"machine: {ctx['machine']}\nversions: {ctx['versions']}\ngit: {ctx['git']}\n"
          f"set: {root} ({args.videos} videos, one sounding object each, 6 classes)")
    budgets = [1] if args.once else args.epochs
    rows = []
    for scratch in (False, True):
        init = "scratch" if scratch else "pretrained"
        t = time.perf_counter()
        p = probe_audio(args.checkpoint, "synth", root, layer=args.layer, scratch=scratch,
                        progress=False)
        rows.append(dict(ctx, bench="downstream", task="audio linear probe (5 folds)", init=init,
                         accuracy=p["accuracy"], fold_accuracy=p["fold_accuracy"],
                         layer=args.layer, wall_s=round(time.perf_counter() - t, 1)))
        print(f"audio probe, {init}: {100 * p['accuracy']:.1f} %", flush=True)
        for epochs in budgets:
            clip, vid = [], []
            t = time.perf_counter()
            for split in range(1, args.splits + 1):
                r = finetune(args.checkpoint, "synth", root, root, split, scratch=scratch,
                             epochs=epochs, progress=False,
                             out=Path("runs") / "downstream" / f"{init}_e{epochs}_s{split}")
                clip.append(r["clip_accuracy"])
                vid.append(r["video_accuracy"])
            rows.append(dict(ctx, bench="downstream", task=f"video fine-tuning, {epochs} "
                             f"epoch{'s' if epochs > 1 else ''} ({args.splits} split"
                             f"{'s' if args.splits > 1 else ''}; clip / video accuracy)",
                             init=init, clip_accuracy=round(float(np.mean(clip)), 4),
                             accuracy=round(float(np.mean(vid)), 4), epochs=epochs,
                             wall_s=round(time.perf_counter() - t, 1)))
            print(f"video fine-tuning {epochs} epochs, {init}: clip {100 * np.mean(clip):.1f} %, "
                  f"video {100 * np.mean(vid):.1f} %", flush=True)
    dev = ctx["machine"].get("gpu") or f"CPU, {ctx['machine']['cpu_count']} cores"
    print(f"\n{dev}; checkpoint {args.checkpoint}\n")
    print("| task | pretrained | scratch |\n|---|---|---|")
    def cell(r):
        clip = f"{100 * r['clip_accuracy']:.1f} % / " if "clip_accuracy" in r else ""
        return f"{clip}{100 * r['accuracy']:.1f} %"
    for task in dict.fromkeys(r["task"] for r in rows):
        a = {r["init"]: r for r in rows if r["task"] == task}
        print(f"| {task} | {cell(a['pretrained'])} | {cell(a['scratch'])} |")
    if not args.once:
        write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
