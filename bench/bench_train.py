"""End-to-end training throughput with the real loader, against the model alone, in one run.

    python bench/bench_train.py                       # GPU: R(2+1)D-18 16x112x112 bf16, DALI vs PyAV
    python bench/bench_train.py --steps 20 --warmup 3 # CPU: the demo's tiny preset
    python bench/bench_train.py --once --loader dali  # one loader, a few steps (for nsys)

For each loader (--loader dali pyav) on a prepared set (--data, or a cached synthetic set made
like bench_data.py's: VP9 on a CPU, H.264 on a GPU), the model, optimizer, autocast and loss
of `fastavts train` with the given config run --warmup steps, then --steps timed steps:
clips/s, ms/step, and the share of the step time spent waiting for the next batch. Then, in the
same process, the same configuration without the loader (one batch of that loader kept on the
device, the same steps): model-only clips/s, and the ratio end-to-end / model-only (target
DESIGN.md section 5: at least 0.9 on an H100/H200 with DALI). GPU counters (NVML: SM and
memory utilisation, power; target SM utilisation over 90 %) are sampled during the timed
end-to-end steps. Rows: bench/results/train.jsonl.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from common import HERE, context, write_rows

GPU_MODEL = ["model.video=r2plus1d_18", "model.audio=default", "data.clip_frames=16",
             "data.crop=112", "train.precision=bf16", "loss.kind=contrastive",
             "sampler.pairs=inbatch", "sampler.k=1"]


def prepared_set(cache: str, videos: int, codec: str) -> Path:
    from common import synthetic_input

    from fastavts.config import build_config
    from fastavts.data.prepare import prepare

    src = synthetic_input(cache, videos, 10.0, codec)
    out = Path(cache) / f"prepared_{codec}_{videos}x10s"
    prepare(src, out, build_config(overrides=[f"prepare.codec={codec}"]), progress=False)
    return out


def setup(cfg, device):
    import torch

    from fastavts.models.avts import AVTS

    model = AVTS.from_config(cfg).to(device)
    if cfg.train.channels_last:
        model.video_net.to(memory_format=torch.channels_last_3d)
    net = torch.compile(model) if cfg.train.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
    return model, net, opt, autocast


def make_step(model, net, opt, autocast, cfg, device):
    import torch

    from fastavts.train import compute_loss

    def step(batch):
        video = batch["video"].to(device, non_blocking=True)
        if cfg.train.channels_last:
            video = video.contiguous(memory_format=torch.channels_last_3d)
        audio = batch["audio"].to(device, non_blocking=True)
        with autocast():
            v, a, fv, fa = net(video, audio)
            loss = compute_loss(model, cfg, batch, v, a, fv, fa)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def run_loader(kind, root, args, base, device):
    import torch

    from fastavts.config import build_config
    from fastavts.data.loader import make_loader
    from fastavts.gpu_monitor import GpuMonitor
    from fastavts.train import resolve_auto

    cuda = device.type == "cuda"
    cfg = build_config(None, [*base, f"loader.kind={kind}", f"loader.batch_size={args.batch_size}",
                              f"loader.workers={args.workers}",
                              f"loader.threads={max(1, args.workers)}", *args.overrides])
    cfg = resolve_auto(cfg, cuda)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model, net, opt, autocast = setup(cfg, device)
    step = make_step(model, net, opt, autocast, cfg, device)
    loader = make_loader(cfg, root, mode="train", total_epochs=1000)
    need = args.warmup + args.steps
    waits, totals, kept, monitor = [], [], None, None

    def batches():
        e = 0
        while True:
            yield from loader.epoch(e)
            e += 1
    it = batches()
    try:
        for i in range(need):
            if i == args.warmup:
                sync()
                monitor = GpuMonitor(quiet=True).start() if cuda else None
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            step(batch)
            sync()
            t2 = time.perf_counter()
            if kept is None:
                kept = {k: (x.to(device) if torch.is_tensor(x) else x) for k, x in batch.items()}
            if i >= args.warmup:
                waits.append(t1 - t0)
                totals.append(t2 - t0)
    finally:
        gpu = monitor.stop() if monitor is not None else {}
        loader.close()
    e2e_ms = statistics.median(totals) * 1e3
    e2e = args.batch_size * len(totals) / sum(totals)
    # the same configuration without the loader: one of its batches, on the device
    m_times = []
    for i in range(need):
        t0 = time.perf_counter()
        step(kept)
        sync()
        if i >= args.warmup:
            m_times.append(time.perf_counter() - t0)
    model_only = args.batch_size * len(m_times) / sum(m_times)
    return dict(loader=kind, loader_device=cfg.loader.device, model=f"{cfg.model.video}+"
                f"{cfg.model.audio}", precision=cfg.train.precision,
                clip=[cfg.data.clip_frames, cfg.data.crop, cfg.data.crop],
                batch=args.batch_size, workers=args.workers, steps=len(totals),
                clips_per_s=round(e2e, 1), ms_per_step_median=round(e2e_ms, 2),
                data_wait_share=round(sum(waits) / sum(totals), 3),
                model_only_clips_per_s=round(model_only, 1),
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
    p.add_argument("--workers", type=int, default=8 if cuda else 2)
    p.add_argument("--steps", type=int, default=50 if cuda else 20)
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
        args.loader, args.warmup, args.steps = args.loader[:1], 3, 5
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
    rows = []
    for kind in args.loader:
        r = run_loader(kind, root, args, base, device)
        rows.append(dict(ctx, bench="train", data=str(root), **r))
        print(f"{kind:>5}: {r['clips_per_s']} clips/s end to end ({r['ms_per_step_median']} ms/step),"
              f" data wait {100 * r['data_wait_share']:.1f} %, model alone "
              f"{r['model_only_clips_per_s']} clips/s, ratio {r['ratio_to_model_only']}"
              + (f", SM util median {r['gpu_sm_util_median']} %" if "gpu_sm_util_median" in r
                 else ""))
    if not args.once:
        write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
