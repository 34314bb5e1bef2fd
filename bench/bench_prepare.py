"""Throughput of `fastavts prepare` on 10-s synthetic videos: videos/s and audio-hours/s.

    python bench/bench_prepare.py --videos 24 --repeats 3 --codec vp9 h264 --workers 2
    python bench/bench_prepare.py --codec h264 --variant default= \
        "sampled_rate=data.fps=12.5 prepare.keyframe_interval=4"     # the GPU preset's set

Generates the synthetic inputs once (cached under --cache), then prepares them --repeats times
into fresh folders and reports the median and the spread (min/max) of the wall time of the
whole `prepare` call (pool start-up included, the CLI's Python start-up not), and the bytes it
wrote per second of video. A --variant is NAME=OVERRIDES (space-separated config overrides);
the configurations take turns within each repeat, so a slow minute of the machine falls on all
of them. Prints the machine and versions and appends one JSON row per configuration to
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
    ap.add_argument("--variant", nargs="+", default=["default="],
                    help="NAME=OVERRIDES, e.g. 'sampled_rate=data.fps=12.5 "
                    "prepare.keyframe_interval=4'")
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

    variants = []
    for v in args.variant:
        name, _, over = v.partition("=")
        variants.append((name, over.split()))
    combos = [(c, n, o) for c in args.codec for n, o in variants]
    if args.once:
        combos = combos[:1]
    walls = {(c, n): [] for c, n, _ in combos}
    sizes, audio_h = {}, {}
    for rep in range(1 if args.once else args.repeats):
        for codec, name, over in combos[rep % len(combos):] + combos[:rep % len(combos)]:
            out = Path(tempfile.mkdtemp(prefix="fastavts_bench_out_"))
            cfg = build_config(overrides=[f"prepare.codec={codec}",
                                          f"prepare.workers={args.workers}", *over])
            t0 = time.perf_counter()
            s = prepare(src, out, cfg, progress=False)
            walls[codec, name].append(time.perf_counter() - t0)
            audio_h[codec, name] = s["audio_hours"]
            assert s["prepared"] == args.videos, s
            sizes[codec, name] = sum(f.stat().st_size for f in out.rglob("*")
                                     if f.is_file() and f.suffix in (".mp4", ".webm"))
            shutil.rmtree(out)
    rows = []
    for codec, name, over in combos:
        w = walls[codec, name]
        med = statistics.median(w)
        row = dict(
            bench="prepare", codec=codec, variant=name, overrides=over,
            source_codec=args.source_codec, videos=args.videos,
            seconds_per_video=args.seconds, workers=args.workers, repeats=len(w),
            wall_s_median=round(med, 3), wall_s_min=round(min(w), 3),
            wall_s_max=round(max(w), 3),
            videos_per_s=round(args.videos / med, 3),
            videos_per_s_range=[round(args.videos / max(w), 3),
                                round(args.videos / min(w), 3)],
            audio_hours_per_s=round(audio_h[codec, name] / med, 6),
            video_kbytes_per_s=round(sizes[codec, name] / 1000 / (args.videos * args.seconds),
                                     2),
            device="cpu", **ctx,
        )
        rows.append(row)
        print(f"prepare -> {codec:4s} {name:>14s}: {row['videos_per_s']:.2f} videos/s "
              f"(range {row['videos_per_s_range'][0]:.2f}-{row['videos_per_s_range'][1]:.2f}), "
              f"{row['audio_hours_per_s'] * 3600:.1f} audio-s/s, "
              f"{row['video_kbytes_per_s']:.1f} kB per video-s, median of {len(w)} "
              f"({args.workers} workers, {ctx['machine']['cpu_count']} cores)")
    if not args.once:
        write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
