"""Data pipeline throughput: clips/s of the DALI, PyAV and decord loaders on a prepared set.

    python bench/bench_data.py --device cpu --loader dali pyav decord decoder --batch-size 16
    python bench/bench_data.py --device gpu --loader dali pyav --batch-size 64 --pipelines 1 2 4 7

Without --data it makes (once, cached) a synthetic set of 10-s videos and prepares it: VP9 for
--device cpu (DALI's CPU decoder), H.264 for --device gpu (NVDEC). Each loader is warmed up
for --warmup batches, then timed over --repeats windows of --batches batches; it prints the
median and the spread (min-max) in clips/s, with peak host memory, the machine and versions,
and appends one row per loader (and per --pipelines value for DALI) to
bench/results/data.jsonl as each is done. `decord` is the PyAV loader's workers decoding with
decord (MMAction2's reader; pip install decord); `decoder` is DALI's video decoder alone on the
same plans (files and frame indices fed from this thread, no crop, normalisation, audio or
copy to torch): the ceiling the DALI loader's video pipeline can reach. The PyAV, SPDL and
decord loaders hand uint8 video and int16 sound windows over, which the training step makes
into the model's inputs (normalised video, log-mel) on its device: on a GPU each batch is
copied there and made so in the timed loop; on a CPU only with --normalise (each row says
where). On a GPU the clock stops after
torch.cuda.synchronize(), so batches count only once they are on the device, and NVML's SM
and NVDEC (video decoder) utilisation are sampled over the timed windows: with enough
pipelines the loader alone should be decode-engine-bound (NVDEC near 100 %).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import HERE, Rows, context, peak_rss_mb, synthetic_input

SAMPLED_RATE = ["data.fps=12.5", "data.frame_stride=1", "prepare.keyframe_interval=4"]


def prepared_set(args) -> Path:
    from fastavts.config import build_config
    from fastavts.data.prepare import prepare

    codec = "vp9" if args.device == "cpu" else "h264"
    src = synthetic_input(args.cache, args.videos, args.seconds, codec)
    tag = "_sampled_rate" if args.sampled_rate else ""
    out = Path(args.cache) / f"prepared_{codec}_{args.videos}x{args.seconds:g}s{tag}"
    prepare(src, out, build_config(overrides=[f"prepare.codec={codec}",
                                              *(SAMPLED_RATE if args.sampled_rate else [])]),
            progress=False)
    return out


def decoder_batches(root: Path, args, cfg):
    """DALI's fn.decoders.video alone over the loader's plans: the decoder's own rate."""
    from nvidia.dali import fn, pipeline_def, types

    from fastavts.data.dali_loader import ClipSource
    from fastavts.data.loader import make_loader
    from fastavts.runtime import default_threads

    sampler = make_loader(cfg, root, total_epochs=1000).sampler
    B = cfg.loader.batch_size
    gpu = args.device == "gpu"
    threads = args.threads or default_threads(1, gpu)

    @pipeline_def(batch_size=B, num_threads=threads, device_id=0 if gpu else None,
                  prefetch_queue_depth=cfg.loader.prefetch, exec_dynamic=True)
    def pipe():
        src = ClipSource(str(root), sampler, 0, 1000 * len(sampler), 0, 1, frozenset(), B)
        enc, frames = fn.external_source(
            source=lambda info: src(info)[:2], num_outputs=2, batch=False,
            dtype=[types.UINT8, types.INT32])
        return fn.decoders.video(enc, device="mixed" if gpu else "cpu", frames=frames,
                                 pad_mode="none")

    p = pipe()
    p.build()

    class _Loader:
        faults: dict = {}
        video_pipelines, threads_ = 1, threads

        def __len__(self):
            return len(sampler)

        def epoch(self, e):
            for _ in range(len(sampler)):
                (out,) = p.run()
                yield {"clip_video": range(len(out))}

        def close(self):
            pass
    return _Loader()


WORKER_LOADERS = ("pyav", "decord", "spdl", "auto")   # workers: --pyav-workers (auto: the
# default loader.kind, on a CPU SPDL or PyAV)


def run_one(kind: str, root: Path, args, pipelines: int = 0) -> dict:
    import torch

    from fastavts.config import build_config
    from fastavts.data.loader import make_loader
    from fastavts.gpu_monitor import GpuMonitor

    cfg = build_config(overrides=[
        f"loader.device={args.device}", f"loader.batch_size={args.batch_size}",
        f"loader.kind={'dali' if kind == 'decoder' else kind}",
        f"loader.workers={args.pyav_workers if kind in WORKER_LOADERS else args.workers}",
        *([f"loader.ffmpeg_libs={args.ffmpeg_libs}"] if kind == "spdl" and args.ffmpeg_libs
          else []),
        f"loader.pool={args.pool}",
        *(SAMPLED_RATE[:2] if args.sampled_rate else []),
        f"loader.threads={args.threads}",
        f"loader.video_pipelines={pipelines}",
        f"sampler.pairs={args.pairs}", f"sampler.clips_per_video={args.clips_per_video}"])
    loader = (decoder_batches(root, args, cfg) if kind == "decoder"
              else make_loader(cfg, root, total_epochs=1000))
    sync = torch.cuda.synchronize if args.device == "gpu" else (lambda: None)

    from fastavts.data.features import ModelInputs

    inputs = ModelInputs(cfg.data)
    inputs.prepare("cuda" if args.device == "gpu" else "cpu")
    seen = {}

    def batches():
        # the CPU loaders hand uint8 video and int16 sound over: on a GPU they are copied and
        # made into the model's inputs there (what the step does), on a CPU only with
        # --normalise (else the step's work)
        epoch = 0
        while True:
            for b in loader.epoch(epoch):
                if "video" in b:
                    seen["dtype"] = str(b["video"].dtype).replace("torch.", "")
                    if "audio" in b:
                        seen["audio"] = str(b["audio"].dtype).replace("torch.", "")
                    if args.device == "gpu":
                        b = inputs({k: (t.to("cuda", non_blocking=True)
                                        if k in ("video", "audio") else t)
                                    for k, t in b.items()})
                    elif args.normalise:
                        b = inputs(b)
                yield b
            epoch += 1

    it = batches()
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        next(it)
    sync()
    startup = time.perf_counter() - t0
    monitor = GpuMonitor(quiet=True).start() if args.device == "gpu" else None
    rates = []
    for _ in range(1 if args.once else args.repeats):
        t = time.perf_counter()
        clips = 0
        for _ in range(args.batches):
            clips += len(next(it)["clip_video"])
        sync()
        rates.append(clips / (time.perf_counter() - t))
    gpu = monitor.stop() if monitor is not None else {}
    loader.close()
    extra = {}
    if kind == "auto":   # the row names what the default resolved to
        extra = dict(asked="auto")
        kind = loader.kind
    if hasattr(loader, "pool"):
        extra["pool"] = loader.pool
    if kind == "dali":
        extra.update(video_pipelines=loader.video_pipelines, threads=loader.threads)
    if kind == "decoder":
        extra = dict(video_pipelines=1, threads=loader.threads_)
    extra.update(video_dtype=seen.get("dtype"), audio_dtype=seen.get("audio"),
                 model_inputs_in=("loader" if seen.get("dtype") == "float32" else
                                  "timed loop" if args.device == "gpu" or args.normalise
                                  else "not timed (the step's work)"))
    return dict(loader=kind, **extra, batches_per_epoch=len(loader),
                clips_per_s_median=round(statistics.median(rates), 2),
                clips_per_s_min=round(min(rates), 2), clips_per_s_max=round(max(rates), 2),
                repeats=len(rates), warmup_s=round(startup, 2), faults=sum(loader.faults.values()),
                decoded_per_delivered=getattr(getattr(loader, "decode_count", None), "ratio",
                                              None),
                peak_rss_mb=peak_rss_mb(), **gpu)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--loader", nargs="+",
                    choices=["auto", "dali", "pyav", "decord", "spdl", "decoder"],
                    default=["dali", "pyav"],
                    help="auto: the default loader.kind (on a CPU SPDL where its FFmpeg loads, "
                    "else PyAV; DALI on a GPU); decord: pip install decord; spdl: pip install 'fastavts[spdl]' "
                    "(--ffmpeg-libs); decoder: DALI's video decoder alone")
    ap.add_argument("--pool", choices=["auto", "processes", "threads"], default="auto",
                    help="loader.pool of the pyav, spdl and decord loaders (auto, the default: "
                    "threads on a CPU; spdl in threads needs FFmpeg's libraries on "
                    "LD_LIBRARY_PATH when python starts, else it takes processes)")
    ap.add_argument("--normalise", action="store_true",
                    help="on a CPU, make the model's inputs (normalised video, log-mel) of the "
                    "uint8 video and int16 sound the PyAV, SPDL and decord loaders hand over, "
                    "in the timed loop (the step's work; DALI does it in its pipelines); on a "
                    "GPU they are always copied there and made so")
    ap.add_argument("--ffmpeg-libs", default="pyav",
                    help="loader.ffmpeg_libs for spdl (default: PyAV's bundled FFmpeg)")
    ap.add_argument("--sampled-rate", action="store_true",
                    help="prepare the set at the rate training samples: 12.5 fps, stride 1, a "
                    "keyframe every 4 frames (the GPU preset's)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=os.cpu_count(),
                    help="PyAV DataLoader workers; DALI source workers per pipeline")
    ap.add_argument("--pyav-workers", type=int, default=os.cpu_count(),
                    help="PyAV DataLoader workers (default: every core, the fair baseline)")
    ap.add_argument("--prepare-only", action="store_true",
                    help="make (or find) the cached prepared set, print its path, stop")
    ap.add_argument("--threads", type=int, default=0,
                    help="DALI threads per pipeline (0 = auto: the cores over the pipelines)")
    ap.add_argument("--pipelines", type=int, nargs="+", default=[0],
                    help="DALI video pipelines per process, one row each (0 = auto: one per "
                    "NVDEC engine on a GPU); e.g. 1 2 4 7 on an H100/H200")
    ap.add_argument("--pairs", choices=["paired", "inbatch"], default="paired")
    ap.add_argument("--data", help="a prepared dataset (default: a cached synthetic one)")
    ap.add_argument("--videos", type=int, default=48)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clips-per-video", type=int, default=32,
                    help="clips per video and epoch: many batches an epoch, so a timed window "
                    "is not mostly epoch starts")
    ap.add_argument("--warmup", type=int, default=3, help="batches before timing")
    ap.add_argument("--batches", type=int, default=8, help="batches per timed window")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--once", action="store_true",
                    help="one window of the first loader only, nothing recorded (for profilers)")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "fastavts_bench_src"))
    ap.add_argument("--out", default=str(HERE / "results" / "data.jsonl"))
    args = ap.parse_args()

    root = Path(args.data) if args.data else prepared_set(args)
    print(f"prepared set: {root}", flush=True)
    if args.prepare_only:
        return 0
    ctx = context()
    print(f"machine: {ctx['machine']}\nversions: {ctx['versions']}\ndata: {root}")
    rows = Rows(args.out, enabled=not args.once)
    runs = [(k, p) for k in (args.loader[:1] if args.once else args.loader)
            for p in (args.pipelines if k == "dali" else [0])]
    for kind, pipes in runs[:1] if args.once else runs:
        r = run_one(kind, root, args, pipes)
        r.update(bench="data", device=args.device, batch_size=args.batch_size,
                 workers=(args.pyav_workers if kind in WORKER_LOADERS else
                          0 if kind == "decoder" else args.workers),
                 pairs=args.pairs, data=str(root), sampled_rate=args.sampled_rate,
                 **({} if "pool" in r else dict(pool=None)), **ctx)
        rows.add(r)
        extra = (f", {r['video_pipelines']} pipeline(s) x {r['threads']} threads"
                 if r["loader"] in ("dali", "decoder") else f" as {r['pool']}")
        gpu = (f", SM {r['gpu_sm_util_median']} %, NVDEC {r.get('gpu_nvdec_util_median', '-')} %"
               if "gpu_sm_util_median" in r else "")
        name = kind if kind == r["loader"] else f"{kind}={r['loader']}"
        print(f"{name:7s} on {args.device}: {r['clips_per_s_median']:.1f} clips/s (range "
              f"{r['clips_per_s_min']:.1f}-{r['clips_per_s_max']:.1f}, {r['repeats']} x "
              f"{args.batches} batches of {args.batch_size}), peak RSS {r['peak_rss_mb']} MB, "
              f"{r['workers']} workers{extra}{gpu}, video {r['video_dtype']} and audio "
              f"{r['audio_dtype']}, model inputs made in {r['model_inputs_in']}")
    best = {k: max((r["clips_per_s_median"] for r in rows.rows if r["loader"] == k), default=None)
            for k in ("dali", "pyav", "decord", "spdl", "decoder")}
    if best["dali"] and best["pyav"]:
        print(f"dali (best) / pyav = {best['dali'] / best['pyav']:.2f}")
    if best["spdl"] and best["dali"]:
        print(f"spdl / dali (best) = {best['spdl'] / best['dali']:.2f}")
    if best["dali"] and best["decord"]:
        print(f"dali (best) / decord = {best['dali'] / best['decord']:.2f}")
    if best["dali"] and best["decoder"]:
        print(f"dali loader / its decoder alone = {best['dali'] / best['decoder']:.2f}")
    rows.done()
    return 0


if __name__ == "__main__":
    sys.exit(main())
