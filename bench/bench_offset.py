"""Offset detection on held-out synthetic videos whose audio is delayed or advanced by a known
number of frames.

    python bench/bench_offset.py runs/demo-.../checkpoints/last.pt --videos 50

Video i of the held-out seed is regenerated (synth is deterministic), its sound shifted by a
drawn number of frames in [-range, range] (positive = the sound comes later), and encoded as
a new webm; `fastavts offset` logic is run on all of them. Prints the share found within +-1
frame and exactly, the mean absolute error, and appends a row to bench/results/offset.jsonl.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import HERE, context, write_rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--videos", type=int, default=50)
    ap.add_argument("--seed", type=int, default=5000, help="synthetic seed (not a training one)")
    ap.add_argument("--range", type=int, default=10, help="true shifts drawn in [-range, range]")
    ap.add_argument("--max-shift", type=int, default=15, help="shifts searched")
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--once", action="store_true",
                    help="one video, nothing recorded (to point a profiler at)")
    ap.add_argument("--out", default=str(HERE / "results" / "offset.jsonl"))
    args = ap.parse_args()
    if args.once:
        args.videos = 1

    from fastavts.config import build_config
    from fastavts.data.synth import encode, generate_video
    from fastavts.offset import detect_offsets

    scfg = build_config(overrides=[f"synth.seed={args.seed}", "synth.min_duration=6"]).synth
    rng = np.random.default_rng(args.seed)
    truth = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastavts_offset_bench_") as tmp:
        for i in range(args.videos):
            frames, audio, meta = generate_video(i, scfg)
            k = int(rng.integers(-args.range, args.range + 1))
            n = int(round(k * scfg.sample_rate / scfg.fps))
            if n > 0:
                audio = np.concatenate([np.zeros(n, np.float32), audio[:-n]])
            elif n < 0:
                audio = np.concatenate([audio[-n:], np.zeros(-n, np.float32)])
            path = Path(tmp) / f"shift_{i:04d}_{k:+d}.webm"
            encode(path, frames, audio, scfg.fps, scfg.sample_rate, "vp9")
            truth[str(path.resolve())] = k
        rows = detect_offsets(args.checkpoint, list(truth), max_shift=args.max_shift,
                              clips=args.clips)
    err = np.array([r["offset_frames"] - truth[r["file"]] for r in rows if "error" not in r])
    res = dict(bench="offset", checkpoint=str(args.checkpoint), videos=len(rows),
               failed=sum("error" in r for r in rows), within_1_frame=round(float((np.abs(err) <= 1).mean()), 4),
               exact=round(float((err == 0).mean()), 4), mean_abs_error_frames=round(float(np.abs(err).mean()), 3),
               shift_range=args.range, max_shift=args.max_shift, clips=args.clips,
               wall_s=round(time.perf_counter() - t0, 1), **context())
    print(f"offset: {res['within_1_frame']:.1%} within +-1 frame, {res['exact']:.1%} exact, mean "
          f"|error| {res['mean_abs_error_frames']} frames over {len(err)} videos "
          f"({res['failed']} failed), {res['wall_s']} s")
    if not args.once:
        write_rows(args.out, [res])
    return 0


if __name__ == "__main__":
    sys.exit(main())
