"""Where the DALI CPU loader loses against its own decoder: each part of its video pipeline.

    python bench/dali_parts.py --rounds 8          # on bench_data.py's cached VP9 set

Variants, each in a process of its own (the machine's speed drifts, so they run in turn, round
after round, and each is read as a ratio to the decoder alone of the same round):
    decoder   fn.decoders.video alone on the loader's plans (what bench_data.py calls decoder)
    slice     + fn.slice to the planned crop (the loader's crop before issue 14)
    two_pass  + fn.slice, then crop_mirror_normalize to float32 CFHW, into torch
    loader    the DALI loader as it is (one crop_mirror_normalize pass, log-mel pipeline,
              plan bookkeeping), loader.workers=0
Each process times --batches batches of --batch-size after 3 of warm-up. Prints the median
clips/s and the median (min-max) ratio to the decoder per variant; rows to
bench/results/dali_parts.jsonl.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import HERE, Rows, context

VARIANTS = ("decoder", "slice", "two_pass", "loader")


def one(variant: str, root: str, batch: int, batches: int) -> float:
    """clips/s of one variant in this process."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    from fastavts.config import build_config
    from fastavts.data.dali_loader import ClipSource
    from fastavts.data.loader import make_loader

    cfg = build_config(overrides=["loader.device=cpu", "loader.kind=dali", "loader.workers=0",
                                  f"loader.batch_size={batch}", "sampler.clips_per_video=32"])
    loader = make_loader(cfg, root, total_epochs=1000)
    if variant == "loader":
        def batches_():
            e = 0
            while True:
                yield from loader.epoch(e)
                e += 1
        it = batches_()
        step = lambda: next(it)
    else:
        d, sampler = cfg.data, loader.sampler

        src = ClipSource(root, sampler, 0, 1000 * len(sampler), 0, 1, frozenset(), batch)

        def with_anchor(info):   # the planned crop's pixel, as fn.slice takes it
            data, frames, _, _, flip, _ = src(info)
            plan = src.plan_for(info.iteration)
            i = info.idx_in_batch % len(plan["clip_video"])
            return (data, frames, np.array([plan["crop_y"][i], plan["crop_x"][i]], np.int32),
                    flip)

        @pipeline_def(batch_size=batch, num_threads=2, device_id=None, prefetch_queue_depth=2,
                      exec_dynamic=True)
        def pipe():
            enc, frames, anchor, flip = fn.external_source(
                source=with_anchor, num_outputs=4, batch=False,
                dtype=[types.UINT8, types.INT32, types.INT32, types.INT32])
            v = fn.decoders.video(enc, device="cpu", frames=frames, pad_mode="none")
            if variant == "decoder":
                return v
            v = fn.slice(v, anchor, np.array([d.crop, d.crop], np.int32), axes=[1, 2],
                         out_of_bounds_policy="error")
            if variant == "slice":
                return v
            return fn.crop_mirror_normalize(v, mirror=flip, dtype=types.FLOAT,
                                            output_layout="CFHW",
                                            mean=[m * 255 for m in d.mean],
                                            std=[s * 255 for s in d.std])
        p = pipe()
        p.build()
        if variant == "two_pass":
            it = DALIGenericIterator([p], ["video"], auto_reset=False, prepare_first_batch=False)
            step = lambda: next(it)
        else:
            step = p.run
    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(batches):
        step()
    return batches * batch / (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "fastavts_bench_src"
                                          / "prepared_vp9_48x10s"),
                    help="a VP9 prepared set (default: bench_data.py --device cpu's cache)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batches", type=int, default=24)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)   # the child
    ap.add_argument("--out", default=str(HERE / "results" / "dali_parts.jsonl"))
    args = ap.parse_args(argv)
    if args.variant:
        print(json.dumps(one(args.variant, args.data, args.batch_size, args.batches)))
        return 0
    if not Path(args.data, "manifest.jsonl").is_file():
        sys.exit(f"{args.data} is not a prepared set: run python bench/bench_data.py --device "
                 f"cpu --prepare-only first, or give --data")
    rates = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for v in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--variant", v, "--data", args.data,
                                  "--batch-size", str(args.batch_size),
                                  "--batches", str(args.batches)],
                                 capture_output=True, text=True, check=True)
            rates[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"round {r + 1}: " + ", ".join(f"{v} {rates[v][-1]:.1f}" for v in VARIANTS),
              flush=True)
    ctx = context()
    print(f"machine: {ctx['machine']}\nversions: {ctx['versions']}")
    rows = Rows(args.out)
    for v in VARIANTS:
        ratio = [a / b for a, b in zip(rates[v], rates["decoder"])]
        row = rows.add(dict(bench="dali_parts", variant=v, rounds=args.rounds,
                            batch_size=args.batch_size, batches=args.batches, data=args.data,
                            clips_per_s_median=round(statistics.median(rates[v]), 2),
                            clips_per_s_min=round(min(rates[v]), 2),
                            clips_per_s_max=round(max(rates[v]), 2),
                            vs_decoder_median=round(statistics.median(ratio), 3),
                            vs_decoder_min=round(min(ratio), 3),
                            vs_decoder_max=round(max(ratio), 3), **ctx))
        print(f"{v:9s} {row['clips_per_s_median']:7.1f} clips/s, / decoder "
              f"{row['vs_decoder_median']:.3f} ({row['vs_decoder_min']:.3f}-"
              f"{row['vs_decoder_max']:.3f})")
    rows.done()
    return 0


if __name__ == "__main__":
    sys.exit(main())
