"""`fastavts train [CONFIG] [overrides]`: the AVTS training loop, top to bottom.

    setup (device, DDP under torchrun, seeds) -> loader (DALI or PyAV) -> model (AVTS, DDP)
    -> optimizer (AdamW/SGD) + warm-up/cosine schedule -> [resume] -> epochs of steps
    -> checkpoints every ckpt_every steps and at the end -> sync evaluation on held-out videos
    -> metrics.json and one JSON line on stdout

A step: next batch (the wait is the data-wait share) -> forward under autocast -> loss ->
skip it if not finite (too many in a row: checkpoint and stop) -> backward -> clip -> step.
Checkpoints hold model, optimizer, scaler, schedule, loader position, RNG states and the
resolved config, written atomically; `--resume` continues from last.pt exactly.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from .config import Config, ConfigError, save_config, to_yaml
from .data.loader import make_loader
from .losses import (inbatch_contrastive_loss, infonce_loss, pair_kinds,
                     paired_contrastive_loss, sync_ce_loss)
from .models.avts import AVTS


# --------------------------------------------------------------------------------------------
# pieces


def resolve_auto(cfg: Config, cuda: bool) -> Config:
    """Fill the 'auto' settings for this machine (the resolved config records the result)."""
    m = cfg.model
    if m.video == "auto":
        m.video = "r2plus1d_18" if cuda else "tiny"
    if m.audio == "auto":
        m.audio = "default" if cuda else "tiny"
    if cfg.train.precision == "auto":
        cfg.train.precision = "bf16" if cuda else "fp32"
    if cfg.loader.device == "auto":
        cfg.loader.device = "gpu" if cuda else "cpu"
    if cfg.loss.impl == "auto":
        cfg.loss.impl = "triton" if cuda and cfg.loss.kind == "contrastive" else "reference"
    elif cfg.loss.impl == "triton" and not cuda:
        from .kernels.contrastive import INTERPRET
        if not INTERPRET:
            raise ConfigError("loss.impl=triton needs a CUDA GPU (or TRITON_INTERPRET=1 set "
                              "before starting, to run the kernel in Triton's slow interpreter); "
                              "use loss.impl=auto or reference on this machine.")
    return cfg


def compute_loss(model, cfg: Config, batch: dict, v, a, fv, fa):
    lk, sm = cfg.loss, cfg.sampler
    dev = v.device
    if lk.kind == "ce":
        return sync_ce_loss(model.sync_logits(fv, fa), batch["label"].to(dev))
    if lk.kind == "infonce":
        kinds = pair_kinds(batch["clip_video"].to(dev), batch["clip_t0"].to(dev),
                           batch["audio_video"].to(dev), batch["audio_t0"].to(dev),
                           sm.hard_min_shift, lk.sync_tol)
        return infonce_loss(v, a, kinds, lk.temperature)
    if sm.pairs == "paired":
        return paired_contrastive_loss(v, a, batch["label"].to(dev), margin=lk.margin,
                                       impl=lk.impl)
    return inbatch_contrastive_loss(
        v, a, batch["clip_video"].to(dev), batch["clip_t0"].to(dev),
        batch["audio_video"].to(dev), batch["audio_t0"].to(dev), margin=lk.margin,
        hard_share=batch["hard_share"], hard_min_shift=sm.hard_min_shift, sync_tol=lk.sync_tol,
        impl=lk.impl)


class _NvtxAndRecord:
    """A range seen by both the torch profiler and Nsight Systems (NVTX)."""

    def __init__(self, name: str):
        import torch
        self.rf = torch.profiler.record_function(name)
        self.name = name

    def __enter__(self):
        import torch
        torch.cuda.nvtx.range_push(self.name)
        self.rf.__enter__()

    def __exit__(self, *exc):
        import torch
        self.rf.__exit__(*exc)
        torch.cuda.nvtx.range_pop()


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_step(model, opt, scaler, sched, grad_clip: float) -> None:
    """Unscale and clip the gradients (grad_clip > 0), step the optimizer through the grad
    scaler (a no-op scaler outside fp16), then the schedule."""
    if grad_clip:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(opt)
    scaler.update()
    sched.step()


def rng_state() -> dict:
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(ckpt_dir: Path, step: int, state: dict, keep_last: int) -> Path:
    """ckpt_<step>.pt written to a temporary file and renamed (atomic), last.pt the same
    way, older ones beyond keep_last removed."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"ckpt_{step:08d}.pt"
    for target in (path, ckpt_dir / "last.pt"):
        tmp = target.with_name(f".{target.name}.tmp")
        torch.save(state, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    for old in sorted(ckpt_dir.glob("ckpt_*.pt"))[:-keep_last]:
        old.unlink()
    return path


class Metrics:
    """TensorBoard scalars where tensorboard imports; silent otherwise (said once)."""

    def __init__(self, out: Path, enabled: bool):
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out / "tb"))
            except ImportError:
                print("fastavts train: tensorboard is not installed; no TensorBoard logs")

    def scalars(self, step: int, values: dict) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def close(self):
        if self.tb is not None:
            self.tb.close()


# --------------------------------------------------------------------------------------------
# the run


def train(cfg: Config, out: Path, resume: bool = False, progress: bool = True,
          stop_after_steps: int = 0) -> dict:
    """Train, evaluate, write metrics.json; returns the metrics. `stop_after_steps` ends the
    run early after writing a checkpoint (tests use it to interrupt and resume)."""
    from tqdm import tqdm

    # --- setup: device, processes, seeds
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    cuda = torch.cuda.is_available()
    cfg = resolve_auto(cfg, cuda)
    tc = cfg.train
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    random.seed(tc.seed)
    is_main = rank == 0
    out.mkdir(parents=True, exist_ok=True)
    if is_main:
        save_config(cfg, out / "config.yaml", header=f"# resolved config of: fastavts train --out {out}")

    # --- data, model, optimizer, schedule
    loader = make_loader(cfg, tc.data, mode="train", rank=rank, world_size=world,
                         total_epochs=tc.epochs)
    model = AVTS.from_config(cfg).to(device)
    if tc.channels_last:  # NDHWC: cuDNN's fast 3D layout (off in the CPU demo: slower there)
        model.video_net.to(memory_format=torch.channels_last_3d)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if tc.compile:
        net = torch.compile(net)
    if tc.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay,
                                fused=cuda)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=0.9,
                              weight_decay=tc.weight_decay)
    total = tc.epochs * len(loader)
    warmup = int(tc.warmup * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, max(1, warmup)))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.precision)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16")

    # --- resume
    step, epoch0 = 0, 0
    ckpt_dir = out / "checkpoints"
    if resume:
        state = torch.load(ckpt_dir / "last.pt", map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        step, epoch0 = state["step"], state["loader"]["sampler"]["epoch"]
        if is_main:
            print(f"fastavts train: resumed from {ckpt_dir / 'last.pt'} at step {step}")

    def checkpoint():
        if is_main:
            save_checkpoint(ckpt_dir, step, dict(
                model=model.state_dict(), optimizer=opt.state_dict(), schedule=sched.state_dict(),
                scaler=scaler.state_dict(), loader=loader.state_dict(), rng=rng_state(),
                step=step, config=to_yaml(cfg)), tc.keep_last)

    # --- the loop (named ranges for the profiler and Nsight when asked for)
    ranges = tc.profile or tc.nvtx

    def rng_(name):
        if not ranges:
            return nullcontext()
        if cuda and tc.nvtx:
            return _NvtxAndRecord(name)
        return torch.profiler.record_function(name)

    if ranges:
        loader.range = rng_   # "decode" and "audio_features" inside the loader's "data"
    prof = None
    if tc.profile and is_main:
        w, wu, act = (int(x) for x in tc.profile_steps)
        acts = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        prof = torch.profiler.profile(
            activities=acts, schedule=torch.profiler.schedule(wait=w, warmup=wu, active=act, repeat=1),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(str(out / "profile")),
            record_shapes=True, with_stack=False)
        prof.start()
    monitor = None
    if tc.gpu_counters and is_main and cuda:
        from .gpu_monitor import GpuMonitor
        monitor = GpuMonitor().start()
    metrics = Metrics(out, is_main)
    history, skipped, nonfinite_run = [], 0, 0
    clips = 0
    t_start = time.perf_counter()
    wait_total = 0.0
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not (progress and is_main),
               dynamic_ncols=True)
    model.train()
    for epoch in range(epoch0, tc.epochs):
        batches = loader.epoch(epoch)
        while True:
            t0 = time.perf_counter()
            with rng_("data"):   # decode + audio features (the loader's pipelines)
                batch = next(batches, None)
            if batch is None:
                break
            t_data = time.perf_counter() - t0
            video = batch["video"].to(device, non_blocking=True)
            audio = batch["audio"].to(device, non_blocking=True)
            if tc.channels_last:
                video = video.contiguous(memory_format=torch.channels_last_3d)
            with autocast():
                with rng_("forward"):
                    v, a, fv, fa = net(video, audio)
                with rng_("loss"):
                    loss = compute_loss(model, cfg, batch, v, a, fv, fa)
            if not torch.isfinite(loss):
                skipped += 1
                nonfinite_run += 1
                opt.zero_grad(set_to_none=True)
                print(f"fastavts train: step {step}: non-finite loss {loss.item()}, skipped")
                if nonfinite_run >= tc.max_nonfinite:
                    checkpoint()
                    raise RuntimeError(f"{nonfinite_run} non-finite losses in a row at step {step}:"
                                       f" lower train.lr or use train.precision=fp32; the last "
                                       f"checkpoint is {ckpt_dir / 'last.pt'}")
                continue
            nonfinite_run = 0
            opt.zero_grad(set_to_none=True)
            with rng_("backward"):
                scaler.scale(loss).backward()
            with rng_("optimizer"):
                optimizer_step(model, opt, scaler, sched, tc.grad_clip)
            if prof is not None:
                prof.step()
            step += 1
            n = len(batch["clip_video"]) * world
            clips += n
            wait_total += t_data
            elapsed = time.perf_counter() - t_start
            history.append(float(loss.item()))
            bar.update()
            bar.set_postfix(loss=f"{history[-1]:.4f}", clips_s=f"{clips / elapsed:.1f}",
                            wait=f"{wait_total / elapsed:.0%}", refresh=False)
            if step % tc.log_every == 0:
                metrics.scalars(step, {"loss": history[-1], "lr": sched.get_last_lr()[0],
                                       "clips_per_s": clips / elapsed,
                                       "data_wait_share": wait_total / elapsed,
                                       "hard_share": batch["hard_share"],
                                       "faults": sum(loader.faults.values())})
                if monitor is not None:
                    metrics.scalars(step, {f"gpu/{k}": x for k, x in monitor.latest().items()})
            if step % tc.ckpt_every == 0 or step == stop_after_steps:
                checkpoint()
            if step == stop_after_steps:
                bar.close()
                loader.close()
                metrics.close()
                if prof is not None:
                    prof.stop()
                if monitor is not None:
                    monitor.stop()
                return dict(stopped_at=step, losses=history)
    bar.close()
    wall = time.perf_counter() - t_start
    if prof is not None:
        prof.stop()
        print(f"fastavts train: profiler trace in {out / 'profile'} (tensorboard --logdir "
              f"{out / 'profile'}, or open the .json in https://ui.perfetto.dev)")
    gpu = monitor.stop() if monitor is not None else {}
    checkpoint()
    loader.close()

    # --- evaluation on held-out videos
    result = dict(steps=step, epochs=tc.epochs, clips_per_s=round(clips / wall, 2),
                  wall_s=round(wall, 1), data_wait_share=round(wait_total / wall, 3),
                  final_loss=round(float(np.mean(history[-20:])), 5) if history else None,
                  skipped_nonfinite=skipped, faults=dict(loader.faults),
                  model=f"{cfg.model.video}+{cfg.model.audio}", loss=cfg.loss.kind,
                  pairs=cfg.sampler.pairs, **gpu)
    if gpu:
        metrics.scalars(step, {f"gpu_summary/{k}": x for k, x in gpu.items()})
    if is_main and tc.eval_data:
        from .evaluate import evaluate_sync
        t = time.perf_counter()
        result.update(evaluate_sync(model, cfg, tc.eval_data, device, autocast,
                                    clips_per_video=tc.eval_clips))
        result["eval_s"] = round(time.perf_counter() - t, 1)
        metrics.scalars(step, {k: result[k] for k in ("sync_acc_easy", "sync_acc_hard",
                                                       "auc_easy", "auc_hard")})
    metrics.close()
    result["losses"] = history
    if is_main:
        (out / "metrics.json").write_text(json.dumps({k: v for k, v in result.items()
                                                      if k != "losses"}, indent=1))
    if world > 1:
        torch.distributed.destroy_process_group()
    return result
