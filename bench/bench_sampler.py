"""The data path's host side at scale: the sampler built from a simulated manifest of N videos,
the time of one batch plan, and the memory a worker process adds when it receives the sampler
(as every DALI source worker and PyAV DataLoader worker does).

    python bench/bench_sampler.py --videos 240000 1000000 2000000

The manifest rows are made like prepare's (10-s videos, one segment, 25 fps, 16 kHz sound, the
source_info and meta fields included), in memory: nothing is decoded. For each N: the seconds
to build the Sampler, the median and 99th percentile of Sampler.plan over 200 batches of 64
(train mode, in-batch pairs), the pickled size, and the resident memory a fresh spawned
process adds by unpickling it and after 200 plans, its own (anonymous) memory and its resident
set with the shared pages it read (from /proc/self/smaps_rollup). Rows go to
bench/results/sampler.jsonl. Targets (docs/design.md section 5): at 2M videos built in <= 5 s,
a plan in <= 1 ms, <= 50 MB added per worker.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import pickle
import statistics
import sys
import time

from common import HERE, Rows, context


def manifest(n: int) -> list[dict]:
    """n rows shaped like prepare's."""
    rows = []
    for i in range(n):
        vid = f"v{i:08d}"
        rows.append(dict(
            id=vid, source=f"/data/kinetics/train/class_{i % 400:03d}/{vid}.mp4",
            label=f"class_{i % 400:03d}", fps=25.0, num_frames=250, duration=10.0,
            width=171, height=128, codec="h264",
            segments=[dict(path=f"videos/{vid}.mp4", start_frame=0, num_frames=250)],
            audio_start=0.0, audio_samples=160000, audio_duration=10.0, sample_rate=16000,
            audio_offset=i * 160000,
            source_info=dict(video_stream=0, audio_stream=1, video_codec="h264",
                             audio_codec="aac", width=340, height=256, rotation=0, fps=25.0,
                             audio_channels=2, vfr=False, duration=10.0, first_video_time=0.0,
                             first_audio_time=0.0, audio_rate=44100, audio_peak_db=-3.1,
                             bytes=1234567),
            warnings=[], meta={}))
    return rows


def _memory_mb() -> dict:
    """Resident and anonymous (private, not file-backed) memory of this process, MB."""
    out = {}
    with open("/proc/self/smaps_rollup") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Anonymous"):
                out[key] = int(rest.split()[0]) / 1024
    return out


def _receive(blob: bytes, q) -> None:
    """A fresh worker: the memory its copy of the sampler adds, once received and after 200
    plans (which read the videos' columns: mapped pages of the shared files count in its
    resident set, not in its anonymous memory)."""
    import fastavts.data.sampler  # noqa: F401 (the classes, imported before measuring)
    before = _memory_mb()
    s = pickle.loads(blob)
    received = _memory_mb()
    for b in range(200):
        s.plan(b // len(s), b % len(s))
    s._plans.clear()
    planned = _memory_mb()
    q.put(dict(added_mb=received["Rss"] - before["Rss"],
               anon_after_plans_mb=planned["Anonymous"] - before["Anonymous"],
               rss_after_plans_mb=planned["Rss"] - before["Rss"], videos=len(s.videos)))


def measure(n: int) -> dict:
    from fastavts.config import build_config
    from fastavts.data.sampler import Sampler

    cfg = build_config(overrides=["sampler.pairs=inbatch", "sampler.k=1",
                                  "loader.batch_size=64"])
    rows = manifest(n)
    t = time.perf_counter()
    s = Sampler(rows, cfg.data, cfg.sampler, 64, total_epochs=10)
    build = time.perf_counter() - t
    del rows
    times = []
    for b in range(200):
        t = time.perf_counter()
        s.plan(b // len(s), b % len(s))
        times.append(time.perf_counter() - t)
    s._plans.clear()
    blob = pickle.dumps(s)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_receive, args=(blob, q))
    p.start()
    got = q.get(timeout=1200)
    p.join()
    times.sort()
    return dict(videos=n, build_s=round(build, 3),
                plan_ms_median=round(statistics.median(times) * 1e3, 3),
                plan_ms_p99=round(times[int(0.99 * (len(times) - 1))] * 1e3, 3),
                pickled_mb=round(len(blob) / 2**20, 1),
                worker_added_mb=round(got["added_mb"], 1),
                worker_anon_after_plans_mb=round(got["anon_after_plans_mb"], 1),
                worker_rss_after_plans_mb=round(got["rss_after_plans_mb"], 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", type=int, nargs="+", default=[240000, 1000000, 2000000])
    ap.add_argument("--out", default=str(HERE / "results" / "sampler.jsonl"))
    args = ap.parse_args(argv)
    ctx = context()
    print(f"machine: {ctx['machine']}\nversions: {ctx['versions']}")
    rows = Rows(args.out)
    for n in args.videos:
        r = rows.add(dict(bench="sampler", **measure(n), **ctx))
        print(f"{n:>9,d} videos: built in {r['build_s']} s, plan {r['plan_ms_median']} ms "
              f"(p99 {r['plan_ms_p99']}), pickled {r['pickled_mb']} MB, a worker adds "
              f"{r['worker_added_mb']} MB on receipt, after 200 plans "
              f"{r['worker_anon_after_plans_mb']} MB of its own (resident "
              f"{r['worker_rss_after_plans_mb']} MB with the shared pages it read)", flush=True)
    rows.done()
    return 0


if __name__ == "__main__":
    sys.exit(main())
