"""Model-only training throughput: a synthetic batch already on the device, no loader.

    python bench/bench_model.py                                   # GPU: the full grid
    python bench/bench_model.py --models tiny audio_tiny --batch-sizes 8 --frames 8 --size 48
    python bench/bench_model.py --once --models r2plus1d_18 --precision bf16 --batch-sizes 64

One training step = forward of the tower and its projection, a loss on the embedding,
backward, fused AdamW step (plain AdamW on a CPU). For each network (r2plus1d_18, mc3_18,
r3d_18, tiny; audio = the default audio net, audio_tiny), precision (fp32, bf16 autocast),
channels_last_3d on/off (video), torch.compile on/off and batch size: clips/s and ms/step
(median and p20/p80 of --repeats steps after --warmup; CUDA events on a GPU). FLOPs are
counted by torch.utils.flop_counter.FlopCounterMode over one real forward+backward (convs and
matmuls; elementwise work left out); MFU = FLOPs per step / step time / the GPU's dense peak
at that precision (table below: bf16 tensor cores for bf16; for fp32 the TF32 tensor cores,
which cuDNN uses for fp32 convolutions by default; unknown GPUs and CPUs get no MFU). Each
configuration compiles afresh and has its own peak memory; rows are appended as they are made. The cuDNN version is
recorded: some cuDNN 9 releases leave the fast path for bf16/fp16 3D convolutions.
Rows: bench/results/model.jsonl. Target (docs/design.md section 5): R(2+1)D-18 16x112x112 bf16 at
least 35 % MFU on an H100/H200.
"""
from __future__ import annotations

import argparse
import statistics
import sys

from common import HERE, Rows, context, quantile, time_calls

# dense (no sparsity) peak TFLOP/s from the vendors' datasheets: (bf16/fp16 tensor cores,
# TF32 tensor cores, fp32 CUDA cores). NVL and PCIe parts run lower clocks and power than SXM
# ones; nvidia-smi names the SXM parts plainly ("NVIDIA H100 80GB HBM3", "NVIDIA H200").
PEAKS = {"H100 NVL": (835.5, 417.5, 60.0), "H100 PCIe": (756.5, 378.0, 51.2),
         "H100": (989.4, 494.7, 66.9), "H200 NVL": (835.5, 417.5, 60.0),
         "H200": (989.4, 494.7, 66.9), "GH200": (989.4, 494.7, 66.9),
         "A100": (312.0, 156.0, 19.5), "L40S": (362.1, 183.0, 91.6)}
VIDEO = ("r2plus1d_18", "mc3_18", "r3d_18", "tiny")
AUDIO = ("audio", "audio_tiny")


def peak_for(gpu_name: str, precision: str, tf32: bool) -> tuple[float | None, str]:
    """(dense peak TFLOP/s, which peak) for a GPU's name at a precision. fp32 convolutions run
    on TF32 tensor cores while torch.backends.cudnn.allow_tf32 is on (PyTorch's default), so
    their peak is the TF32 one; with it off, the fp32 CUDA cores'."""
    import re

    kind = "bf16" if precision in ("bf16", "fp16") else ("tf32" if tf32 else "fp32")
    for key in sorted(PEAKS, key=len, reverse=True):   # "H100 NVL" before "H100"
        if all(re.search(rf"\b{re.escape(part)}\b", gpu_name) for part in key.split()):
            return PEAKS[key][("bf16", "tf32", "fp32").index(kind)], kind
    return None, kind


def peak_tflops(precision: str) -> tuple[float | None, str | None]:
    import torch

    if not torch.cuda.is_available():
        return None, None
    return peak_for(torch.cuda.get_device_name(), precision, torch.backends.cudnn.allow_tf32)


def build(name: str, dim: int = 128):
    """(tower + projection as one module, is_video)."""
    from torch import nn

    from fastavts.models.audio import AUDIO_NETS
    from fastavts.models.avts import projection
    from fastavts.models.video import VIDEO_NETS

    if name in VIDEO:
        net = VIDEO_NETS[name]() if name != "tiny" else VIDEO_NETS[name](time_bins=4)
    else:
        net = AUDIO_NETS["default" if name == "audio" else "tiny"](time_bins=4)
    return nn.Sequential(net, projection(net.out_dim, dim)), name in VIDEO


def make_step(model, opt, x, precision, device_type):
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step():
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            e = model(x)
            loss = e.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def count_flops(model, x, precision, device_type) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with FlopCounterMode(display=False) as fc:
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            loss = model(x).float().pow(2).mean()
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(fc.get_total_flops())


def run_config(name, precision, channels_last, compiled, batch, args, device):
    import torch

    cuda = device.type == "cuda"
    if compiled:   # a fresh compilation per configuration (dynamo's recompile limit is 8)
        torch._dynamo.reset()
    if cuda:       # each configuration's own peak memory
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, is_video = build(name)
    model = model.to(device)
    if is_video:
        x = torch.randn(batch, 3, args.frames, args.size, args.size, device=device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
            x = x.contiguous(memory_format=torch.channels_last_3d)
    else:
        x = torch.randn(batch, 1, args.n_mels, args.audio_frames, device=device)
    flops = count_flops(model, x, precision, device.type)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    fn = torch.compile(model) if compiled else model
    step = make_step(fn, opt, x, precision, device.type)
    times = time_calls(step, args.warmup, cuda)          # warm-up (and compilation)
    times = time_calls(step, 1 if args.once else args.repeats, cuda)
    med = statistics.median(times)
    peak, peak_kind = peak_tflops(precision)
    return dict(model=name, precision=precision, channels_last=channels_last if is_video else None,
                compile=compiled, batch=batch,
                input=list(x.shape), ms_per_step=round(med, 3),
                p20_ms=round(quantile(times, .2), 3), p80_ms=round(quantile(times, .8), 3),
                repeats=len(times),
                clips_per_s=round(batch / (med / 1e3), 1), flops_per_step=flops,
                tflops=float(f"{flops / (med / 1e3) / 1e12:.4g}"),
                mfu=None if peak is None else round(flops / (med / 1e3) / (peak * 1e12), 4),
                flop_count="torch.utils.flop_counter.FlopCounterMode, forward+backward",
                peak_tflops=peak, peak_kind=peak_kind,
                max_mem_mb=round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None)


def main(argv=None) -> int:
    import torch

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", choices=VIDEO + AUDIO,
                   default=list(VIDEO + AUDIO) if cuda else ["tiny", "audio_tiny"])
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16"],
                   default=["fp32", "bf16"] if cuda else ["fp32"])
    p.add_argument("--channels-last", nargs="+", choices=["on", "off"], default=["on", "off"])
    p.add_argument("--compile", nargs="+", choices=["on", "off"],
                   default=["off", "on"] if cuda else ["off"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64] if cuda else [8])
    p.add_argument("--frames", type=int, default=16 if cuda else 8)
    p.add_argument("--size", type=int, default=112 if cuda else 48)
    p.add_argument("--n-mels", type=int, default=64)
    p.add_argument("--audio-frames", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--once", action="store_true", help="first configuration only, one step")
    p.add_argument("--out", default=str(HERE / "results" / "model.jsonl"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
    ctx = context()
    print(f"machine: {ctx['machine']}\nversions: {ctx['versions']}\ngit: {ctx['git']}\n"
          f"cudnn: {torch.backends.cudnn.version() if cuda else None}")
    if not cuda:
        print("NOTE: no CUDA GPU: CPU figures, no MFU (the targets are for an H100/H200)")
    configs = [(m, pr, cl == "on", co == "on", b) for m in args.models for pr in args.precision
               for cl in (args.channels_last if m in VIDEO else ["off"])
               for co in args.compile for b in args.batch_sizes]
    if args.once:
        configs = configs[:1]
        args.warmup = max(1, min(args.warmup, 3))
    print(f"{'model':>12} {'prec':>5} {'CL':>3} {'comp':>4} {'batch':>5} {'ms/step':>9} "
          f"{'p20':>8} {'p80':>8} {'clips/s':>9} {'TFLOP/s':>8} {'MFU':>6}")
    rows = Rows(args.out, enabled=not args.once)
    for cfg in configs:
        try:
            r = run_config(*cfg, args, device)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"{cfg}: out of memory")
            continue
        rows.add(dict(ctx, bench="model", device=device.type, **r))
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"{r['model']:>12} {r['precision']:>5} {'y' if r['channels_last'] else 'n':>3} "
              f"{'y' if r['compile'] else 'n':>4} {r['batch']:>5} {r['ms_per_step']:>9.2f} "
              f"{r['p20_ms']:>8.2f} {r['p80_ms']:>8.2f} {r['clips_per_s']:>9.1f} "
              f"{r['tflops']:>8.4g} {mfu:>6}")
    rows.done()
    return 0


if __name__ == "__main__":
    sys.exit(main())
