"""Where the CPU demo's seconds go: `fastavts train` (no data: the demo), phase by phase.

    python bench/profile_demo.py                    # the demo as shipped, in a temporary folder
    python bench/profile_demo.py train.epochs=20    # overrides go on top of the demo preset

It runs the demo's own chain with the demo's preset for this machine (fastavts/demo.py):
synthesis and prepare of the training and the held-out set (each timed), training through
`fastavts.train.train` with a wall-clock timer on each of its named ranges (the loader's `data`
with `decode` and `audio_features` inside it; the step's `forward`, `loss`, `backward`,
`optimizer`), the first epoch apart from the rest (the in-memory loader decodes every video the
first time one of its clips is asked for, so that epoch carries the decoding), then the held-out
evaluation; last, each tower's forward + backward alone on a batch of the demo's shapes. On a
CPU every operation is synchronous, so a range's wall time is its cost. The timers are the
same `record_function` ranges `train.profile=true` records, timed instead of traced.

Prints the table and appends one row to bench/results/demo_profile.jsonl.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from common import HERE, Rows, context, peak_rss_mb


class Ranges:
    """`record_function` stand-in: wall seconds per range name, per training phase."""

    def __init__(self):
        self.phase = "first_epoch"
        self.seconds: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    def __call__(self, name: str, *args):
        ranges = self

        class _Timed:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                ranges.seconds[ranges.phase][name] += time.perf_counter() - self.t
                return False
        return _Timed()


def tower_costs(cfg, repeats: int = 10) -> dict:
    """Median ms of forward + backward of each tower alone on a batch of the demo's shapes."""
    import torch

    from fastavts.data.features import AudioGeometry
    from fastavts.data.sampler import windows_per_clip
    from fastavts.models.avts import AVTS

    d, B = cfg.data, cfg.loader.batch_size
    M = B * windows_per_clip(cfg)
    geo = AudioGeometry(d)
    model = AVTS.from_config(cfg)
    inputs = dict(video=(model.video_net, torch.randn(B, 3, d.clip_frames, d.crop, d.crop)),
                  audio=(model.audio_net, torch.randn(M, 1, geo.n_mels, geo.frames)))
    out = {}
    for name, (net, x) in inputs.items():
        if name == "video" and cfg.train.channels_last:
            net.to(memory_format=torch.channels_last_3d)
            x = x.contiguous(memory_format=torch.channels_last_3d)
        times = []
        for i in range(repeats + 2):
            t = time.perf_counter()
            net.zero_grad(set_to_none=True)
            net(x).float().square().mean().backward()
            if i >= 2:
                times.append(time.perf_counter() - t)
        out[f"{name}_fwd_bwd_ms"] = round(1000 * statistics.median(times), 1)
        out[f"{name}_batch"] = len(x)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("overrides", nargs="*", help="config overrides on top of the demo preset")
    ap.add_argument("--dir", help="work folder (default: a temporary one, removed after)")
    ap.add_argument("--out", default=str(HERE / "results" / "demo_profile.jsonl"))
    args = ap.parse_args(argv)

    import torch

    import fastavts.train.loop as train_mod
    from fastavts.config import build_config
    from fastavts.data.prepare import prepare
    from fastavts.data.synth import synthesize
    from fastavts.demo import demo_sets, preset

    cuda = torch.cuda.is_available()
    cfg = build_config(overrides=args.overrides, base=preset(cuda))
    cfg.train.nvtx = True          # the named ranges on (timed below, not traced)
    tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="fastavts_profile_")
    root = Path(args.dir or tmp.name)
    t_all = time.perf_counter()
    row: dict = dict(bench="demo_profile", overrides=args.overrides, device="cuda" if cuda else "cpu")

    # --- data: the demo's two sets, as prepare_demo_data makes them
    for name, c in demo_sets(cfg):
        t = time.perf_counter()
        synthesize(root / f"synth_{name}", c, progress=False)
        row[f"synth_{name}_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        prepare(root / f"synth_{name}", root / name, c, progress=False)
        row[f"prepare_{name}_s"] = round(time.perf_counter() - t, 2)
    cfg.train.data, cfg.train.eval_data = str(root / "train"), str(root / "heldout")

    # --- training with the ranges timed; the first epoch apart
    ranges = Ranges()
    real_record_function = train_mod.torch.profiler.record_function
    train_mod.torch.profiler.record_function = ranges   # what rng_ calls on a CPU
    real_make_loader = train_mod.make_loader
    marks: dict[int, float] = {}

    def make_loader(*a, **kw):   # the training loader: note when each epoch starts
        loader = real_make_loader(*a, **kw)
        inner = loader.epoch

        def epoch(e):
            ranges.phase = "first_epoch" if e == 0 else "later_epochs"
            marks.setdefault(e, time.perf_counter())
            yield from inner(e)
        loader.epoch = epoch
        return loader
    train_mod.make_loader = make_loader
    t = time.perf_counter()
    try:
        result = train_mod.train(cfg, root / "run", progress=False)
    finally:   # this process may go on (tests): put torch and the trainer back
        train_mod.torch.profiler.record_function = real_record_function
        train_mod.make_loader = real_make_loader
    train_s = time.perf_counter() - t
    row.update(train_and_eval_s=round(train_s, 2), train_wall_s=result["wall_s"],
               eval_s=result.get("eval_s"), steps=result["steps"], epochs=result["epochs"],
               clips_per_s=result["clips_per_s"],
               first_epoch_s=round(marks[1] - marks[0], 2) if 1 in marks else None,
               sync_acc_easy=result.get("sync_acc_easy"), sync_acc_hard=result.get("sync_acc_hard"),
               auc_easy=result.get("auc_easy"), auc_hard=result.get("auc_hard"))
    for phase, secs in ranges.seconds.items():
        for k, v in secs.items():
            row[f"{phase}/{k}_s"] = round(v, 2)
    row.update(tower_costs(cfg))
    row["whole_s"] = round(time.perf_counter() - t_all, 2)
    row.update(peak_rss_mb=peak_rss_mb(), **context())
    if tmp is not None:
        tmp.cleanup()

    print(f"machine: {row['machine']}\nversions: {row['versions']}")
    data_s = sum(row[f"{p}_{n}_s"] for p in ("synth", "prepare") for n in ("train", "heldout"))
    print(f"{'phase':44s} {'s':>8s}")
    for k in ("synth_train_s", "prepare_train_s", "synth_heldout_s", "prepare_heldout_s"):
        print(f"  {k[:-2]:42s} {row[k]:8.1f}")
    print(f"data, all {'':33s} {data_s:8.1f}")
    print(f"training wall (first epoch {row['first_epoch_s'] or 0:.1f} s) {'':8s} {row['train_wall_s']:8.1f}")
    for phase in ("first_epoch", "later_epochs"):
        for k, v in sorted(ranges.seconds.get(phase, {}).items(), key=lambda kv: -kv[1]):
            print(f"  {phase}/{k:30s} {v:8.1f}")
    print(f"evaluation {'':33s} {row['eval_s'] or 0:8.1f}")
    print(f"whole (this script) {'':24s} {row['whole_s']:8.1f}")
    print(f"towers alone, forward + backward: video {row['video_fwd_bwd_ms']} ms on "
          f"{row['video_batch']} clips, audio {row['audio_fwd_bwd_ms']} ms on {row['audio_batch']} windows")
    print(f"held-out: {row['sync_acc_easy']} easy / {row['sync_acc_hard']} hard "
          f"(AUC {row['auc_easy']} / {row['auc_hard']}), {row['clips_per_s']} clips/s")
    rows = Rows(args.out)
    rows.add(row)
    rows.done()
    return 0


if __name__ == "__main__":
    sys.exit(main())
