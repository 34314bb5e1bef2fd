"""Throughput of `fastavts prepare` on 10-s synthetic videos: videos/s and audio-hours/s.

    python bench/bench_prepare.py --videos 24 --repeats 3 --codec vp9 h264 --workers 2

Generates the synthetic inputs once (cached under --cache), then prepares them --repeats times
into fresh folders and reports the median and the spread (min/max) of the wall time of the
whole `prepare` call (pool start-up included, the CLI's Python start-up not). Prints the
machine and versions and appends one JSON row per configuration to
bench/results/prepare.jsonl.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import HERE, context, synthetic_input, write_rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", type=int, default=24)
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each input video")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--codec", nargs="+", default=["vp9", "h264"], choices=["vp9", "h264"],
                    help="output codec(s) of prepare")
    ap.add_argument("--source-codec", default="vp9", choices=["vp9", "h264"])
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "fastavts_bench_src"))
    ap.add_argument("--once", action="store_true", help="one run of one configuration (for "
                    "profilers); nothing is recorded")
    ap.add_argument("--out", default=str(HERE / "results" / "prepare.jsonl"))
    args = ap.parse_args()

    from fastavts.config import build_config
    from fastavts.data.prepare import prepare

    src = synthetic_input(args.cache, args.videos, args.seconds, args.source_codec)
    ctx = context()
    print(f"machine: {ctx['machine']}\nversions: {ctx['versions']}\ninputs: {args.videos} x "
          f"{args.seconds:g} s {args.source_codec} synthetic videos")

    rows = []
    for codec in args.codec[:1] if args.once else args.codec:
        walls, audio_h = [], None
        for _ in range(1 if args.once else args.repeats):
            out = Path(tempfile.mkdtemp(prefix="fastavts_bench_out_"))
            cfg = build_config(overrides=[f"prepare.codec={codec}",
                                          f"prepare.workers={args.workers}"])
            t0 = time.perf_counter()
            s = prepare(src, out, cfg, progress=False)
            walls.append(time.perf_counter() - t0)
            audio_h = s["audio_hours"]
            assert s["prepared"] == args.videos, s
            shutil.rmtree(out)
        med = statistics.median(walls)
        row = dict(
            bench="prepare", codec=codec, source_codec=args.source_codec, videos=args.videos,
            seconds_per_video=args.seconds, workers=args.workers, repeats=len(walls),
            wall_s_median=round(med, 3), wall_s_min=round(min(walls), 3),
            wall_s_max=round(max(walls), 3),
            videos_per_s=round(args.videos / med, 3),
            videos_per_s_range=[round(args.videos / max(walls), 3),
                                round(args.videos / min(walls), 3)],
            audio_hours_per_s=round(audio_h / med, 6),
            device="cpu", **ctx,
        )
        rows.append(row)
        print(f"prepare -> {codec:4s}: {row['videos_per_s']:.2f} videos/s "
              f"(range {row['videos_per_s_range'][0]:.2f}-{row['videos_per_s_range'][1]:.2f}), "
              f"{row['audio_hours_per_s'] * 3600:.1f} audio-s/s = "
              f"{row['audio_hours_per_s']:.4f} audio-hours/s, median of {len(walls)} "
              f"({args.workers} workers, {ctx['machine']['cpu_count']} cores)")
    if not args.once:
        write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
