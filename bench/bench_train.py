"""End-to-end training throughput with the real loader, against the model alone, in one run.

    python bench/bench_train.py                       # GPU: R(2+1)D-18 16x112x112 bf16, DALI vs PyAV
    python bench/bench_train.py --steps 20 --warmup 3 # CPU: the demo's tiny preset
    python bench/bench_train.py --once --loader dali  # one loader, a few steps (for nsys)

For each loader (--loader dali pyav) on a prepared set (--data, or a cached synthetic set made
like bench_data.py's: VP9 on a CPU, H.264 on a GPU; --clips-per-video makes every epoch many
batches long), the training step of `fastavts train` itself (fastavts.train.TrainStep: model,
fused optimizer, autocast, loss, clipping, the on-device non-finite skip) runs --warmup steps,
then --steps timed steps in --windows windows (the device synchronised at the ends of a window
only, as the trainer never waits inside a run): clips/s (median, min-max over the windows),
ms/step, and the share of the time spent waiting for the next batch. Then, in the same
process, the same step without the loader (one batch of that loader kept on the device):
model-only clips/s, and the ratio end-to-end / model-only (target docs/design.md section 5: at least
0.9 on an H100/H200 with DALI). GPU counters (NVML: SM, memory and NVDEC utilisation, power;
target SM utilisation over 90 %) are sampled during the timed end-to-end steps. Rows:
bench/results/train.jsonl, each appended when its loader is done.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import HERE, Rows, context

GPU_MODEL = ["model.video=r2plus1d_18", "model.audio=default", "data.clip_frames=16",
             "data.crop=112", "train.precision=bf16", "loss.kind=contrastive",
             "sampler.pairs=inbatch", "sampler.k=1"]


def prepared_set(cache: str, videos: int, codec: str) -> Path:
    from fastavts.config import build_config
    from fastavts.data.prepare import prepare

    from common import synthetic_input

    src = synthetic_input(cache, videos, 10.0, codec)
    out = Path(cache) / f"prepared_{codec}_{videos}x10s"
    prepare(src, out, build_config(overrides=[f"prepare.codec={codec}"]), progress=False)
    return out


def setup(cfg, device):
    """The trainer's model and step (fastavts.train.step.build_step: wrapping, optimizer,
    schedule, scaler, the objective): the benchmark times exactly the step `fastavts train`
    runs."""
    from fastavts.models.avts import AVTS
    from fastavts.train.step import build_step

    model = AVTS.from_config(cfg).to(device)
    return build_step(model, cfg, device, 1, total_steps=10**6, video_net=model.video_net)


def run_loader(kind, root, args, base, device):
    import torch

    from fastavts.config import build_config
    from fastavts.data.loader import make_loader
    from fastavts.gpu_monitor import GpuMonitor
    from fastavts.runtime import resolve_auto

    cuda = device.type == "cuda"
    cfg = build_config(None, [*base, f"loader.kind={kind}", f"loader.batch_size={args.batch_size}",
                              f"loader.workers={args.pyav_workers if kind == 'pyav' else args.workers}",
                              f"sampler.clips_per_video={args.clips_per_video}", *args.overrides])
    cfg = resolve_auto(cfg, cuda)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step = setup(cfg, device)
    loader = make_loader(cfg, root, mode="train", total_epochs=1000)
    waits, kept, monitor = [], None, None

    def batches():
        e = 0
        while True:
            yield from loader.epoch(e)
            e += 1
    it = batches()

    def windows(get_batch, record_wait: bool) -> list[float]:
        """clips/s of --windows windows of --steps/--windows steps each; the clock is read with
        the device synchronised at both ends of a window, never inside one (as in training)."""
        n = max(1, min(args.windows, args.steps))
        per = max(1, args.steps // n)
        rates = []
        for _ in range(n):
            sync()
            t = time.perf_counter()
            for _ in range(per):
                t0 = time.perf_counter()
                batch = get_batch()
                if record_wait:
                    waits.append(time.perf_counter() - t0)
                step(batch)
            sync()
            rates.append(args.batch_size * per / (time.perf_counter() - t))
        return rates

    try:
        for _ in range(args.warmup):      # compilation, cuDNN autotuning, pipeline start
            batch = next(it)
            step(batch)
            if kept is None:
                kept = step.to_device(batch)
        sync()
        monitor = GpuMonitor(quiet=True).start() if cuda else None
        t_all = time.perf_counter()
        e2e_rates = windows(lambda: next(it), True)
        e2e_wall = time.perf_counter() - t_all
    finally:
        gpu = monitor.stop() if monitor is not None else {}
        loader.close()
    # the same step without the loader: one of its batches, kept on the device
    model_rates = windows(lambda: kept, False)
    e2e, model_only = statistics.median(e2e_rates), statistics.median(model_rates)
    extra = {}
    if kind == "dali":
        extra = dict(video_pipelines=loader.video_pipelines, threads=loader.threads)
    return dict(loader=kind, loader_device=cfg.loader.device, model=f"{cfg.model.video}+"
                f"{cfg.model.audio}", precision=cfg.train.precision,
                clip=[cfg.data.clip_frames, cfg.data.crop, cfg.data.crop],
                batch=args.batch_size,
                workers=args.pyav_workers if kind == "pyav" else args.workers, steps=len(waits),
                batches_per_epoch=len(loader), **extra,
                clips_per_s=round(e2e, 1), clips_per_s_min=round(min(e2e_rates), 1),
                clips_per_s_max=round(max(e2e_rates), 1), windows=len(e2e_rates),
                ms_per_step_median=round(1e3 * args.batch_size / e2e, 2),
                data_wait_share=round(sum(waits) / e2e_wall, 3),
                model_only_clips_per_s=round(model_only, 1),
                model_only_min_max=[round(min(model_rates), 1), round(max(model_rates), 1)],
                ratio_to_model_only=round(e2e / model_only, 3), **gpu)


def main(argv=None) -> int:
    import torch

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--loader", nargs="+", default=["dali", "pyav"],
                   help="dali, pyav and/or memory")
    p.add_argument("--data", help="a prepared set (default: a cached synthetic one)")
    p.add_argument("--videos", type=int, default=64 if cuda else 32)
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "fastavts_bench"))
    p.add_argument("--batch-size", type=int, default=64 if cuda else 16)
    p.add_argument("--workers", type=int, default=2,
                   help="PyAV DataLoader workers; DALI source workers per pipeline")
    p.add_argument("--pyav-workers", type=int, default=os.cpu_count(),
                   help="PyAV DataLoader workers (default: every core)")
    p.add_argument("--clips-per-video", type=int, default=32 if cuda else 8,
                   help="clips per video and epoch: many batches an epoch, so that the timed "
                   "steps are not epoch starts")
    p.add_argument("--steps", type=int, default=60 if cuda else 20, help="timed steps")
    p.add_argument("--windows", type=int, default=5,
                   help="the timed steps in this many windows (median and spread of clips/s)")
    p.add_argument("--warmup", type=int, default=10 if cuda else 3)
    p.add_argument("--once", action="store_true", help="the first loader, 3 + 5 steps")
    p.add_argument("--out", default=str(HERE / "results" / "train.jsonl"))
    p.add_argument("overrides", nargs="*", help="section.key=value for the training config")
    args = p.parse_args(argv)
    # section.key=value words after --loader land in its list: move them to the overrides
    args.overrides += [x for x in args.loader if "=" in x]
    args.loader = [x for x in args.loader if "=" not in x]
    bad = [x for x in args.loader if x not in ("dali", "pyav", "memory")]
    if bad or not args.loader:
        p.error(f"--loader takes dali, pyav and/or memory, got {bad or 'nothing'}")
    if args.once:
        args.loader, args.warmup, args.steps, args.windows = args.loader[:1], 3, 5, 1
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
    from fastavts.demo import CPU_PRESET
    base = GPU_MODEL if cuda else [o for o in CPU_PRESET if not o.startswith(
        ("loader.", "train.epochs", "prepare."))]
    root = Path(args.data) if args.data else prepared_set(args.cache, args.videos,
                                                          "h264" if cuda else "vp9")
    ctx = context()
    print(f"machine: {ctx['machine']}\nversions: {ctx['versions']}\ngit: {ctx['git']}")
    if not cuda:
        print("NOTE: no CUDA GPU: CPU figures (the targets are for an H100/H200)")
    rows = Rows(args.out, enabled=not args.once)
    for kind in args.loader:
        r = run_loader(kind, root, args, base, device)
        rows.add(dict(ctx, bench="train", data=str(root), **r))
        print(f"{kind:>5}: {r['clips_per_s']} clips/s end to end ({r['ms_per_step_median']} ms/step),"
              f" data wait {100 * r['data_wait_share']:.1f} %, model alone "
              f"{r['model_only_clips_per_s']} clips/s, ratio {r['ratio_to_model_only']}"
              + (f", SM util median {r['gpu_sm_util_median']} %" if "gpu_sm_util_median" in r
                 else ""))
    rows.done()
    return 0


if __name__ == "__main__":
    sys.exit(main())
