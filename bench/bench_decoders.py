"""Video decoders side by side on the same clips: decode-only clips/s and decoded frames per
delivered frame, each decoder in its own process, rounds in alternating order.

    python bench/bench_decoders.py                       # every decoder this machine runs
    python bench/bench_decoders.py --decoders pyav spdl --rounds 5

The clips are the training sampler's (train mode, a fixed seed): each is `data.clip_frames`
frames every `data.frame_stride`-th from a random start, read from the prepared set (by default
bench_data.py's cached one: 48 x 10 s VP9 at 128 px). Every decoder returns the same uint8
(T, H, W, 3) RGB frames of every clip, decoding on --threads threads (its own thread pool, or
DALI's); no crop, normalisation, audio or copy to torch. Decoders:

    pyav        PyAV through fastavts's Dataset.frames (its PyAV loader's reader): seek to the
                keyframe, decode forward
    dali        DALI's CPU fn.decoders.video on the clip's bytes and frame indices
    decord      decord.VideoReader.get_batch (pip install decord)
    spdl        SPDL (pip install spdl-io spdl-core): demux the clip's time window, decode,
                convert; it needs FFmpeg's shared libraries (libavcodec.so.N ...): the system's,
                or with --borrow-ffmpeg the ones PyAV's wheel bundles, given their sonames
    torchcodec  torchcodec's VideoDecoder.get_frames_at (pip install torchcodec); its PyPI
                wheel needs the CUDA build of torch (say so where it cannot run)

Each row: decoder, clips/s median and range over the rounds, decoded frames per delivered
frame (counted where the decoder says how many it decoded, else the seeking reader's model of
fastavts/data/decode_cost.py), or the reason the decoder cannot run here. Rows go to
bench/results/data.jsonl (bench="decoders").
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from common import HERE, Rows, context

DECODERS = ("pyav", "dali", "decord", "spdl", "torchcodec")


# --------------------------------------------------------------------------------------------
# the clips

def clips(root: Path, n: int, seed: int, overrides=()) -> tuple[list[dict], object, int]:
    """n clips of the sampler's plans: (path, first frame in the segment, frame indices in the
    segment, fps, seconds of the first frame), the data geometry, the keyframe interval."""
    from fastavts.config import build_config
    from fastavts.data.decode_cost import keyframe_interval
    from fastavts.data.loader import make_loader

    cfg = build_config(overrides=["loader.kind=pyav", "loader.workers=0", "loader.batch_size=16",
                                  "sampler.clips_per_video=32", f"train.seed={seed}",
                                  *overrides])
    sampler = make_loader(cfg, root, rank=0, world_size=1, total_epochs=1000).sampler
    d, out, b = cfg.data, [], 0
    while len(out) < n:
        plan = sampler.plan(0, b)
        for vi, si, f in zip(plan["clip_video"], plan["clip_segment"], plan["clip_frame"]):
            v = sampler.videos[int(vi)]
            seg = v["segments"][int(si)]
            first = int(f) - seg["start_frame"]
            out.append(dict(path=str(root / seg["path"]), first=first, fps=float(v["fps"]),
                            frames=(first + d.frame_stride * np.arange(d.clip_frames)).tolist(),
                            root=str(root), id=v["id"], start=seg["start_frame"]))
        b += 1
    return out[:n], d, keyframe_interval(root)


def modelled(cl: list[dict], d, interval: int) -> int:
    """Frames a seeking reader decodes for these clips (fastavts/data/decode_cost.py)."""
    return sum(c["first"] % interval + (d.clip_frames - 1) * d.frame_stride + 1 for c in cl)


# --------------------------------------------------------------------------------------------
# the decoders (each: clip list -> (frames arrays, decoded frames or None))

def _pool(fn, cl, threads):
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, cl))


def run_pyav(cl, threads):
    """fastavts's own PyAV reader (Dataset.frames), one per thread, which counts the frames
    it decodes."""
    import threading

    from fastavts.data.dataset import Dataset

    local, readers = threading.local(), []

    def one(c):
        ds = getattr(local, "ds", None)
        if ds is None:
            ds = local.ds = Dataset.open(c["root"])
            ds.codec_threads = False
            readers.append(ds)
        return ds.frames(c["id"], [c["start"] + f for f in c["frames"]])
    frames = _pool(one, cl, threads)
    return frames, sum(ds.decoded_frames for ds in readers)


def run_decord(cl, threads):
    import decord

    def one(c):
        vr = decord.VideoReader(c["path"], num_threads=1)
        return vr.get_batch(c["frames"]).asnumpy()
    return _pool(one, cl, threads), None


def run_spdl(cl, threads):
    import spdl.io

    def one(c):
        t0, t1 = c["frames"][0] / c["fps"], (c["frames"][-1] + 0.5) / c["fps"]
        packets = spdl.io.demux_video(c["path"], timestamp=(t0 - 0.5 / c["fps"], t1))
        frames = spdl.io.to_numpy(spdl.io.convert_frames(spdl.io.decode_packets(packets)))
        step = c["frames"][1] - c["frames"][0] if len(c["frames"]) > 1 else 1
        return frames[::step][:len(c["frames"])]
    return _pool(one, cl, threads), None


def run_torchcodec(cl, threads):
    from torchcodec.decoders import VideoDecoder

    def one(c):
        dec = VideoDecoder(c["path"], seek_mode="exact", num_ffmpeg_threads=1)
        return dec.get_frames_at(c["frames"]).data.permute(0, 2, 3, 1).numpy()
    return _pool(one, cl, threads), None


def run_dali(cl, threads):
    from nvidia.dali import fn, pipeline_def, types

    B = 16
    n = len(cl) // B * B

    def source(info):
        c = cl[info.idx_in_epoch % n]
        return (np.fromfile(c["path"], np.uint8), np.asarray(c["frames"], np.int32))

    @pipeline_def(batch_size=B, num_threads=threads, device_id=None, exec_dynamic=True)
    def pipe():
        enc, frames = fn.external_source(source=source, num_outputs=2, batch=False,
                                         dtype=[types.UINT8, types.INT32])
        return fn.decoders.video(enc, device="cpu", frames=frames, pad_mode="none")
    p = pipe()
    p.build()
    out = []
    for _ in range(n // B):
        (o,) = p.run()
        out.extend(np.asarray(o[i]) for i in range(len(o)))
    return out, None


RUN = dict(pyav=run_pyav, dali=run_dali, decord=run_decord, spdl=run_spdl,
           torchcodec=run_torchcodec)


def child(args) -> None:
    """One decoder, one timed round: JSON on stdout."""
    cl, d, interval = clips(Path(args.data), args.clips, args.seed, args.overrides)
    try:
        RUN[args.child](cl[:16], args.threads)     # warm-up: imports, first opens
    except Exception as e:   # an import or a library it cannot load: the reason, as a row
        why = f"{type(e).__name__}: {str(e)[:200]}"
        if e.__cause__ is not None:   # torch's load_library hides the loader's own words
            why += f" ({str(e.__cause__)[:200]})"
        print(json.dumps(dict(error=why)))
        return
    t = time.perf_counter()
    frames, counted = RUN[args.child](cl, args.threads)
    wall = time.perf_counter() - t
    n = len(frames)
    shapes_ok = all(f.shape[0] == d.clip_frames and f.ndim == 4 and f.shape[-1] == 3
                    for f in frames)
    ref = None
    if args.check:   # the same pixels as PyAV for a few clips (mean absolute difference)
        pv, _ = run_pyav(cl[:4], 1)
        ref = float(max(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()
                        for a, b in zip(frames[:4], pv)))
    print(json.dumps(dict(clips=n, wall_s=wall, clips_per_s=n / wall, shapes_ok=shapes_ok,
                          decoded=counted if counted is not None else modelled(cl[:n], d,
                                                                                interval),
                          counted=counted is not None, delivered=n * d.clip_frames,
                          mean_abs_diff_vs_pyav=ref)))


# --------------------------------------------------------------------------------------------
# the parent

def borrowed_ffmpeg() -> str:
    """A folder of PyAV's bundled FFmpeg libraries under their sonames (libavcodec.so.62 ...),
    for decoders that load FFmpeg by soname (fastavts's loader.ffmpeg_libs=pyav)."""
    from fastavts.data.spdl_loader import pyav_ffmpeg_libs
    return pyav_ffmpeg_libs()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--decoders", nargs="+", choices=DECODERS, default=list(DECODERS))
    ap.add_argument("--data", help="a prepared dataset (default: bench_data.py's cached set)")
    ap.add_argument("--clips", type=int, default=256, help="clips per timed round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--borrow-ffmpeg", action="store_true",
                    help="give spdl and torchcodec PyAV's bundled FFmpeg libraries")
    ap.add_argument("--check", action="store_true", help="compare pixels with PyAV's")
    ap.add_argument("--child", choices=DECODERS, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", metavar="section.key=value",
                    help="the clips' geometry (data.clip_frames=16 data.frame_stride=2 ...)")
    ap.add_argument("--out", default=str(HERE / "results" / "data.jsonl"))
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0
    if not args.data:
        from bench_data import prepared_set
        args.data = str(prepared_set(argparse.Namespace(
            device="cpu", cache=str(Path(tempfile.gettempdir()) / "fastavts_bench_src"),
            videos=48, seconds=10.0)))
    ctx = context()
    print(f"machine: {ctx['machine']}\nversions: {ctx['versions']}\ndata: {args.data}")
    env = dict(os.environ)
    if args.borrow_ffmpeg:
        env["LD_LIBRARY_PATH"] = borrowed_ffmpeg() + os.pathsep + env.get("LD_LIBRARY_PATH", "")
    got: dict[str, list[dict]] = {k: [] for k in args.decoders}
    for r in range(args.rounds):
        order = args.decoders[r % len(args.decoders):] + args.decoders[:r % len(args.decoders)]
        for k in order:
            cmd = [sys.executable, __file__, "--child", k, "--data", args.data, "--clips",
                   str(args.clips), "--threads", str(args.threads), "--seed", str(args.seed),
                   *args.overrides]
            if args.check and r == 0:
                cmd.append("--check")
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
            lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
            res = json.loads(lines[-1]) if lines else dict(
                error=f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1:]}")
            got[k].append(res)
            print(f"round {r + 1} {k:10s} " + (f"{res['clips_per_s']:.1f} clips/s"
                                               if "clips_per_s" in res else res["error"]),
                  flush=True)
    rows = Rows(args.out)
    for k, rs in got.items():
        ok = [x for x in rs if "clips_per_s" in x]
        row = dict(bench="decoders", decoder=k, device="cpu", threads=args.threads,
                   clips_per_round=args.clips, rounds=len(ok), data=args.data,
                   ffmpeg_borrowed_from_pyav=args.borrow_ffmpeg and k in ("spdl", "torchcodec"),
                   **ctx)
        if not ok:
            row["error"] = rs[0]["error"] if rs else "not run"
        else:
            rates = [x["clips_per_s"] for x in ok]
            row.update(clips_per_s_median=round(statistics.median(rates), 1),
                       clips_per_s_min=round(min(rates), 1),
                       clips_per_s_max=round(max(rates), 1),
                       decoded_per_delivered=round(ok[0]["decoded"] / ok[0]["delivered"], 3),
                       decoded_counted=ok[0]["counted"], shapes_ok=all(x["shapes_ok"] for x in ok),
                       mean_abs_diff_vs_pyav=ok[0].get("mean_abs_diff_vs_pyav"))
        rows.add(row)
    rows.done()
    print("\n| decoder | clips/s (median, range) | decoded / delivered | note |")
    print("|---|---|---|---|")
    for row in rows.rows:
        if "error" in row:
            print(f"| {row['decoder']} | - | - | cannot run here: {row['error'][:120]} |")
        else:
            print(f"| {row['decoder']} | {row['clips_per_s_median']} ({row['clips_per_s_min']}-"
                  f"{row['clips_per_s_max']}) | {row['decoded_per_delivered']}"
                  f"{'' if row['decoded_counted'] else ' (model)'} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
