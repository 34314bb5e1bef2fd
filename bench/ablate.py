"""The paper's claims on the synthetic set, at equal budget, over several seeds.

    python bench/ablate.py --epochs 100 --seeds 0 1 2            # every variant, 3 seeds
    python bench/ablate.py --epochs 60 --only paper hard_from_start --seeds 0 1

Every variant trains the demo's model (the CPU preset on a CPU, the GPU preset on a GPU) on the
demo's training set (data/demo, made if missing) for --epochs epochs (the same steps, batch and
data), then is scored by the same sync evaluation on the held-out videos (threshold on half the
videos, accuracy and ROC AUC on the other half; the same fixed pairs for every run). A seed
sets the model's initialisation and the sampler's plans (train.seed, sampler.seed). Variants:

  paper               the paper's form: paired examples (each clip with its aligned window and
                      one negative: half positives), margin loss with margin 1 on centred
                      (model.embed_bn), L2-normalised embeddings, both windows of a clip in the
                      same step (configs/avts_paper_cpu.yaml; docs/training.md "The paper's recipe" says
                      why), curriculum: no hard negatives for the first third, then 25 % of the
                      sampled negatives hard, every negative pair weighing the same
  hard_from_start     the same, 25 % hard from the first step
  easy_only           the same, no hard negatives
  paired_ce           the paper's baseline: a sync classifier with cross-entropy on the same
                      paired examples and curriculum
  inbatch             contrastive loss over all in-batch pairs (every other clip's windows are
                      negatives), the same curriculum as sampled shares
  inbatch_lossweight  in-batch, every extra window hard, the curriculum as a loss weight on the
                      hard pairs' mean (fastavts before the paper's curriculum)
  infonce             the demo's loss (InfoNCE over in-batch pairs, every extra window hard)

Prints per-run lines and a markdown table (mean and standard deviation over the seeds, and the
range), and appends one row per run to bench/results/ablate.jsonl with the machine and versions.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from common import HERE, Rows, context

CURRICULUM = "sampler.curriculum=[[0.0,0.0],[0.333,0.25]]"
EMBED = ["model.embed_bn=true"]
PAPER = ["loss.kind=contrastive", "sampler.pairs=paired", "sampler.paired_windows=2",
         "loss.margin=1.0", "sampler.hard_share_as=sample", *EMBED]
VARIANTS = {
    "paper": [*PAPER, CURRICULUM],
    "hard_from_start": [*PAPER, "sampler.curriculum=[[0.0,0.25]]"],
    "easy_only": [*PAPER, "sampler.curriculum=[[0.0,0.0]]"],
    "paired_ce": ["loss.kind=ce", "sampler.pairs=paired", "sampler.paired_windows=2", *EMBED,
                  CURRICULUM],
    "inbatch": ["loss.kind=contrastive", "sampler.pairs=inbatch", "loss.margin=1.0", *EMBED,
                "sampler.hard_share_as=sample", CURRICULUM],
    "inbatch_lossweight": ["loss.kind=contrastive", "sampler.pairs=inbatch", "loss.margin=1.0",
                           *EMBED, "sampler.hard_share_as=loss_weight", CURRICULUM],
    "infonce": ["loss.kind=infonce", "sampler.pairs=inbatch", "sampler.curriculum=[[0.0,1.0]]"],
}
METRICS = ("auc_easy", "auc_hard", "sync_acc_easy", "sync_acc_hard")


def table(rows: list[dict], variants: list[str]) -> str:
    out = ["| variant | seeds | AUC easy | AUC hard | sync acc. easy | sync acc. hard | final loss "
           "(label-blind) | collapsed | train s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name in variants:
        rs = [r for r in rows if r["variant"] == name]
        if not rs:
            continue

        def cell(k, pct=False, rs=rs):
            xs = [r[k] for r in rs]
            f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.3f}")
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            return f"{f(statistics.mean(xs))} ± {f(sd)} ({f(min(xs))}-{f(max(xs))})"
        blind = rs[0].get("collapse", {}).get("blind_loss")
        loss = statistics.mean(r["final_loss"] for r in rs)
        out.append(f"| {name} | {len(rs)} | {cell('auc_easy')} | {cell('auc_hard')} | "
                   f"{cell('sync_acc_easy', True)} % | {cell('sync_acc_hard', True)} % | "
                   f"{loss:.3f} ({blind if blind is not None else '-'}) | "
                   f"{sum(bool(r.get('collapse', {}).get('collapsed_at_end')) for r in rs)} | "
                   f"{statistics.mean(r['wall_s'] for r in rs):.0f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--runs", default="runs/ablate", help="run directories go under this")
    ap.add_argument("--data", default="data/demo", help="where the demo data are (made if not)")
    ap.add_argument("--out", default=str(HERE / "results" / "ablate.jsonl"))
    ap.add_argument("--once", action="store_true",
                    help="the first variant for one epoch, nothing recorded (for profilers)")
    ap.add_argument("overrides", nargs="*", help="extra section.key=value for every variant")
    args = ap.parse_args(argv)
    if args.once:
        args.only, args.epochs, args.seeds = args.only[:1], 1, args.seeds[:1]

    import torch

    from fastavts.config import build_config
    from fastavts.demo import prepare_demo_data, preset
    from fastavts.train import train

    cuda = torch.cuda.is_available()
    ctx = context()
    print(f"machine: {ctx['machine']}\nversions: {ctx['versions']}\ngit: {ctx['git']}")
    rows = Rows(args.out, enabled=not args.once)
    for name in args.only:
        for seed in args.seeds:
            over = [*VARIANTS[name], f"train.epochs={args.epochs}", f"train.seed={seed}",
                    f"sampler.seed={seed}", "train.gpu_counters=false", *args.overrides]
            cfg = build_config(None, over, base=preset(cuda))
            cfg = prepare_demo_data(cfg, Path(args.data), progress=False)
            t0 = time.perf_counter()
            r = train(cfg, Path(args.runs) / f"{name}-s{seed}", progress=False)
            r.pop("losses", None)
            row = rows.add(dict(
                ctx, bench="ablate", variant=name, seed=seed, overrides=over, epochs=args.epochs,
                steps=r["steps"], clips=r["steps"] * cfg.loader.batch_size,
                wall_s=round(time.perf_counter() - t0, 1),
                **{k: r.get(k) for k in (*METRICS, "final_loss", "eval_pairs", "collapse")}))
            print(f"{name} seed {seed}: AUC {row['auc_easy']}/{row['auc_hard']}, acc "
                  f"{row['sync_acc_easy']}/{row['sync_acc_hard']}, loss {row['final_loss']}"
                  f"{' (COLLAPSED)' if (row['collapse'] or {}).get('collapsed_at_end') else ''}"
                  f" ({row['wall_s']} s)", flush=True)
    print(f"\n{'CPU' if not cuda else 'GPU'} ({ctx['machine'].get('cpu', '')}), {args.epochs} "
          f"epochs per run, seeds {args.seeds}\n")
    print(table(rows.rows, args.only))
    rows.done()
    return 0


if __name__ == "__main__":
    sys.exit(main())
