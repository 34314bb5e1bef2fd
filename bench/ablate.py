"""The paper's claims on the synthetic set, at equal budget (the same steps, batch and data).

    python bench/ablate.py                       # all variants, 40 epochs each (CPU ~ 4 min each)
    python bench/ablate.py --epochs 80 --only curriculum hard_from_start

Every variant trains the demo's model (the CPU preset on a CPU, the GPU preset on a GPU) on the
demo's training set (data/demo, made if missing) for --epochs epochs, then is scored by the
same sync evaluation on the held-out videos (threshold on half the videos, accuracy and ROC
AUC on the other half; train.eval_clips clips per video). Variants:

  curriculum        contrastive loss over in-batch pairs; hard negatives weighted 0 for the
                    first third of training, then 0.25 (AVTS's curriculum)
  hard_from_start   the same with weight 0.25 from the first step
  easy_only         the same with weight 0 throughout (hard windows are in the batch, unused)
  contrastive_pair  contrastive loss on paired (clip, audio, label) examples, curriculum
  ce_pair           the paper's baseline: a sync classifier with cross-entropy on the same
                    paired examples, curriculum
  infonce           the demo's own loss (InfoNCE over in-batch pairs), for reference

Prints a table (markdown, for the README) and appends one row per variant to
bench/results/ablate.jsonl, with the machine and versions.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import HERE, context, write_rows

CURRICULUM = "sampler.curriculum=[[0.0,0.0],[0.333,0.25]]"
VARIANTS = {
    "curriculum": ["loss.kind=contrastive", "sampler.pairs=inbatch", CURRICULUM],
    "hard_from_start": ["loss.kind=contrastive", "sampler.pairs=inbatch",
                        "sampler.curriculum=[[0.0,0.25]]"],
    "easy_only": ["loss.kind=contrastive", "sampler.pairs=inbatch",
                  "sampler.curriculum=[[0.0,0.0]]"],
    "contrastive_pair": ["loss.kind=contrastive", "sampler.pairs=paired", CURRICULUM],
    "ce_pair": ["loss.kind=ce", "sampler.pairs=paired", CURRICULUM],
    "infonce": ["loss.kind=infonce", "sampler.pairs=inbatch", CURRICULUM],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--runs", default="runs/ablate", help="run directories go under this")
    ap.add_argument("--data", default="data/demo", help="where the demo data are (made if not)")
    ap.add_argument("--out", default=str(HERE / "results" / "ablate.jsonl"))
    ap.add_argument("--once", action="store_true",
                    help="the first variant for one epoch, nothing recorded (for profilers)")
    ap.add_argument("overrides", nargs="*", help="extra section.key=value for every variant")
    args = ap.parse_args(argv)
    if args.once:
        args.only, args.epochs = args.only[:1], 1

    import torch

    from fastavts.config import build_config
    from fastavts.demo import prepare_demo_data, preset
    from fastavts.train import train

    cuda = torch.cuda.is_available()
    ctx = context()
    print(f"machine: {ctx['machine']}\nversions: {ctx['versions']}\ngit: {ctx['git']}")
    rows = []
    for name in args.only:
        over = [*VARIANTS[name], f"train.epochs={args.epochs}", *args.overrides]
        cfg = build_config(None, over, base=preset(cuda))
        cfg = prepare_demo_data(cfg, Path(args.data), progress=False)
        t0 = time.perf_counter()
        r = train(cfg, Path(args.runs) / name, progress=False)
        r.pop("losses", None)
        row = dict(ctx, bench="ablate", variant=name, overrides=over, epochs=args.epochs,
                   steps=r["steps"], clips=r["steps"] * cfg.loader.batch_size,
                   wall_s=round(time.perf_counter() - t0, 1),
                   **{k: r.get(k) for k in ("sync_acc_easy", "sync_acc_hard", "auc_easy",
                                            "auc_hard", "final_loss", "eval_pairs")})
        rows.append(row)
        print(f"{name}: easy {row['sync_acc_easy']}, hard {row['sync_acc_hard']}, AUC "
              f"{row['auc_easy']}/{row['auc_hard']} ({row['wall_s']} s)", flush=True)
    print(f"\n{'CPU' if not cuda else 'GPU'} ({ctx['machine'].get('cpu', '')}), "
          f"{args.epochs} epochs per variant, {rows[0]['steps'] if rows else 0} steps\n")
    print("| variant | sync acc. easy | sync acc. hard | AUC easy | AUC hard | train s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {100 * r['sync_acc_easy']:.1f} % | "
              f"{100 * r['sync_acc_hard']:.1f} % | {r['auc_easy']:.3f} | {r['auc_hard']:.3f} | "
              f"{r['wall_s']:.0f} |")
    if not args.once:
        write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
