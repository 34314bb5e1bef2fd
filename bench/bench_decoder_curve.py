"""The decoder curve: decoded frames per second against resolution and the number of decodes
running at once, for the GPU's video decoders and a CPU reference (the GPU-check plan's
`decoders` part; a GPU has several NVDEC engines, an H100 seven, and needs about as many
decodes at once to use them).

    python bench/bench_decoder_curve.py                    # on a GPU machine: 128, 256, 1080 px
    python bench/bench_decoder_curve.py --device cpu --sizes 32 64 --concurrency 1 2 --seconds 1

Makes (once, cached) one synthetic clip per size: --seconds s at 25 fps, `size` pixels high and
16:9 wide, a moving pattern with noise, encoded as prepare encodes (a keyframe every 16 frames,
no B-frames): H.264 on a GPU machine, VP9 with --device cpu (DALI's CPU decoder reads no
H.264), written --files times so that decodes at once read different files. For each size and
each concurrency N, N threads each decode every frame of every file, and the cell's rate is
all frames decoded over the wall time (on a GPU, to the last frame on the device). Decoders:

    dali         DALI fn.decoders.video (device mixed on a GPU: NVDEC; cpu with --device cpu),
                 one pipeline per thread, built once per size
    spdl         SPDL: demux, then decode_packets_nvdec on a GPU (H.264 packets turned to
                 Annex B first), or FFmpeg's CPU decoder with --device cpu
    torchcodec   torchcodec VideoDecoder(device="cuda" on a GPU).get_frames_in_range
    pyav         PyAV, one decoder thread per decode: the CPU reference at every size

A decoder that cannot run here gives one row saying why (not installed, no NVDEC, no FFmpeg
libraries). A cell stops taking files past --cell-seconds; the run stops past --budget seconds,
naming the cells it left out. Rows (bench="decoder_curve") go to --out as each cell is done.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from common import HERE, Rows, context

DECODERS = ("dali", "spdl", "torchcodec", "pyav")


def make_clips(cache: Path, size: int, seconds: float, codec: str, files: int) -> list[str]:
    """`files` copies of one synthetic clip `size` px high (cached)."""
    import shutil

    from fastavts.data.prepare.encoder import _open_encoder

    ext = "mp4" if codec == "h264" else "webm"
    folder = cache / f"curve_{codec}_{size}p_{seconds:g}s"
    first = folder / f"clip_000.{ext}"
    if not first.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        h, w = size, max(2, int(round(size * 16 / 9 / 2)) * 2)
        n = max(1, int(round(seconds * 25)))
        tmp = folder / f".tmp.{ext}"
        c, s = _open_encoder(str(tmp), codec, Fraction(25), w, h, 16, 23 if codec == "h264" else 32)
        import av
        rng = np.random.default_rng(size)
        yy, xx = np.mgrid[0:h, 0:w]
        for i in range(n):
            img = np.empty((h, w, 3), np.uint8)
            img[..., 0] = (xx * 255 // max(1, w - 1) + 4 * i) % 256
            img[..., 1] = (yy * 255 // max(1, h - 1) + 3 * i) % 256
            img[..., 2] = ((xx + yy + 8 * i) // 8 % 2) * 200
            img = np.clip(img.astype(np.int16) + rng.integers(-12, 13, img.shape), 0,
                          255).astype(np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
        c.close()
        tmp.rename(first)
    out = []
    for k in range(files):
        f = folder / f"clip_{k:03d}.{ext}"
        if not f.is_file():
            shutil.copyfile(first, f)
        out.append(str(f))
    return out


# ---------------------------------------------------------------------------------------------
# decoders: make(files, device) -> (decode(path) -> frames decoded, finish() -> None)

def make_pyav(files, device):
    import av

    def decode(path):
        n = 0
        with av.open(path) as c:
            s = c.streams.video[0]
            s.codec_context.thread_count = 1
            for f in c.decode(s):
                f.to_ndarray(format="rgb24")
                n += 1
        return n
    return decode, lambda: None


def make_spdl(files, device):
    import spdl.io as io

    if device == "cpu":
        def decode(path):
            frames = io.decode_packets(io.demux_video(path))
            return io.to_numpy(io.convert_frames(frames)).shape[0]
        decode(files[0])
        return decode, lambda: None
    import torch

    cfg = io.cuda_config(device_index=0)

    def decode(path):
        packets = io.demux_video(path, bsf="h264_mp4toannexb" if path.endswith(".mp4") else None)
        buf = io.decode_packets_nvdec(packets, device_config=cfg)
        return torch.as_tensor(buf, device="cuda").shape[0]
    decode(files[0])
    return decode, torch.cuda.synchronize


def make_torchcodec(files, device):
    from torchcodec.decoders import VideoDecoder

    dev = "cuda" if device == "gpu" else "cpu"

    def decode(path):
        d = VideoDecoder(path, device=dev, num_ffmpeg_threads=1, seek_mode="approximate")
        return d.get_frames_in_range(0, d.metadata.num_frames).data.shape[0]
    decode(files[0])
    if dev == "cuda":
        import torch
        return decode, torch.cuda.synchronize
    return decode, lambda: None


class _DaliPool:
    """One DALI pipeline per concurrent decode (batch 1), each fed its file's bytes and every
    frame index, as the loader's video pipelines are."""

    def __init__(self, files, device, n: int, frames: int):
        from nvidia.dali import fn, pipeline_def, types

        self.pipes, self.lock = [], threading.Lock()
        gpu = device == "gpu"
        idx = np.arange(frames, dtype=np.int32)
        self.current: dict[int, str] = {}

        class Source:   # sample k's file, as the thread using pipeline k sets it
            def __init__(self, pool, k):
                self.pool, self.k = pool, k

            def __call__(self, info):
                return np.fromfile(self.pool.current[self.k], np.uint8), idx

        @pipeline_def(batch_size=1, num_threads=1, device_id=0 if gpu else None,
                      prefetch_queue_depth=1, exec_dynamic=True)
        def pipe(source):
            enc, fr = fn.external_source(source=source, num_outputs=2, batch=False,
                                         dtype=[types.UINT8, types.INT32])
            return fn.decoders.video(enc, device="mixed" if gpu else "cpu", frames=fr,
                                     pad_mode="none")

        for k in range(n):
            self.current[k] = files[0]
            p = pipe(source=Source(self, k))
            p.build()
            self.pipes.append(p)
        self.free = list(range(n))

    def decode(self, path):
        with self.lock:
            k = self.free.pop()
        try:
            self.current[k] = path
            (out,) = self.pipes[k].run()
            if hasattr(out, "as_cpu"):   # to the host: the frames are there, decoded
                out = out.as_cpu()
            return int(np.asarray(out[0]).shape[0])
        finally:
            with self.lock:
                self.free.append(k)


MAKE = dict(pyav=make_pyav, spdl=make_spdl, torchcodec=make_torchcodec)


def cell(decode, finish, files, n: int, cell_s: float) -> tuple[int, float, int]:
    """N threads decoding files in turn (thread i takes files i, i + N, ...) until all are
    done or cell_s passes: (frames, seconds, files decoded)."""
    lock, done = threading.Lock(), {"frames": 0, "files": 0}
    t0 = time.perf_counter()
    errors = []

    def worker(i):
        for path in files[i::n]:
            if time.perf_counter() - t0 > cell_s:
                return
            try:
                got = decode(path)
            except Exception as e:   # reported as the cell's error
                errors.append(f"{type(e).__name__}: {str(e)[:200]}")
                return
            with lock:
                done["frames"] += got
                done["files"] += 1
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    finish()
    if errors:
        raise RuntimeError(errors[0])
    return done["frames"], time.perf_counter() - t0, done["files"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    ap.add_argument("--decoders", nargs="+", choices=DECODERS, default=list(DECODERS))
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 1080])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 7, 10, 14])
    ap.add_argument("--seconds", type=float, default=4.0, help="length of each clip")
    ap.add_argument("--files", type=int, default=28, help="files per size (>= the concurrency)")
    ap.add_argument("--cell-seconds", type=float, default=3.0)
    ap.add_argument("--budget", type=float, default=200.0, help="seconds for the whole run")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "fastavts_bench_src"))
    ap.add_argument("--make-only", action="store_true", help="make the clips, stop")
    ap.add_argument("--out", default=str(HERE / "results" / "decoder_curve.jsonl"))
    args = ap.parse_args(argv)

    t_start = time.monotonic()
    codec = "h264" if args.device == "gpu" else "vp9"
    clips = {s: make_clips(Path(args.cache), s, args.seconds, codec, args.files)
             for s in args.sizes}
    print(f"clips: {', '.join(f'{s} px: {len(c)} x {args.seconds:g} s' for s, c in clips.items())}"
          f" ({codec}), made in {time.monotonic() - t_start:.1f} s", flush=True)
    if args.make_only:
        return 0
    ctx = context()
    print(f"machine: {ctx['machine']}\nversions: {ctx['versions']}", flush=True)
    rows = Rows(args.out)
    frames_per_file = max(1, int(round(args.seconds * 25)))
    left_out = []
    for name in args.decoders:
        for size in args.sizes:
            files = clips[size]
            base = dict(bench="decoder_curve", decoder=name, device=args.device, size=size,
                        codec=codec, seconds_per_file=args.seconds, **ctx)
            try:
                if name == "dali":
                    pool = _DaliPool(files, args.device, max(args.concurrency), frames_per_file)
                    decode = pool.decode
                    finish = (__import__("torch").cuda.synchronize if args.device == "gpu"
                              else (lambda: None))
                else:
                    decode, finish = MAKE[name](files, args.device)
            except Exception as e:   # not installed, no NVDEC, no FFmpeg libraries ...
                why = f"{type(e).__name__}: {str(e)[:300]}"
                rows.add(dict(base, error=why))
                print(f"{name:10s} {size:5d} px: cannot run here: {why}", flush=True)
                break   # the same reason at every size
            for n in args.concurrency:
                if time.monotonic() - t_start > args.budget:
                    left_out.append(f"{name}/{size}px/x{n}")
                    continue
                try:
                    frames, secs, nfiles = cell(decode, finish, files, n, args.cell_seconds)
                    r = rows.add(dict(base, concurrency=n, files=nfiles, frames=frames,
                                      wall_s=round(secs, 3),
                                      frames_per_s=round(frames / secs, 1)))
                    print(f"{name:10s} {size:5d} px x {n:2d} at once: "
                          f"{r['frames_per_s']:9.1f} frames/s ({nfiles} files)", flush=True)
                except Exception as e:
                    rows.add(dict(base, concurrency=n, error=f"{type(e).__name__}: {e}"[:300]))
                    print(f"{name:10s} {size:5d} px x {n:2d}: {e}", flush=True)
    if left_out:
        print(f"left out (past the {args.budget:g} s budget): {', '.join(left_out)}")
    rows.done()
    print(json.dumps(dict(cells=len(rows.rows), left_out=len(left_out))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
