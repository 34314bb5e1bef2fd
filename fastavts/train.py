"""`fastavts train [CONFIG] [overrides]`: the AVTS training loop, top to bottom.

    setup (device, DDP under torchrun, seeds) -> loader (DALI or PyAV) -> model (AVTS, DDP)
    -> optimizer (AdamW/SGD) + warm-up/cosine schedule -> [resume] -> epochs of steps
    -> checkpoints every ckpt_every steps and at the end -> sync evaluation on held-out videos
    -> metrics.json and one JSON line on stdout

A step (TrainStep): next batch (the wait is the data-wait share) -> forward under autocast ->
loss -> backward -> clip -> fused optimizer step, skipped on every rank when any rank's loss
(or the gradient norm) is not finite, decided on the device. The host reads the losses and the
skip counters every train.log_every steps (too many non-finite in a row: checkpoint and stop);
between reads it never waits for the GPU.
Checkpoints hold model, optimizer, scaler, schedule, loader position, RNG states and the
resolved config, written atomically; `--resume` continues from last.pt exactly.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from .collapse import Detector, pair_stats
from .config import Config, ConfigError, save_config, to_yaml
from .data.loader import make_loader
from .data.sampler import windows_per_clip
from .losses import (
    inbatch_contrastive_loss,
    inbatch_infonce_loss,
    paired_contrastive_loss,
    sync_ce_loss,
)
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
        cfg.loss.impl = "triton" if cuda and cfg.loss.kind in ("contrastive", "infonce") \
            else "reference"
    elif cfg.loss.impl == "triton" and not cuda:
        from .kernels.contrastive import INTERPRET
        if not INTERPRET:
            raise ConfigError("loss.impl=triton needs a CUDA GPU (or TRITON_INTERPRET=1 set "
                              "before starting, to run the kernel in Triton's slow interpreter); "
                              "use loss.impl=auto or reference on this machine.")
    return cfg


def gathers_negatives(cfg: Config, world: int) -> bool:
    """loss.gather_negatives resolved: in-batch losses share negatives across ranks."""
    g = cfg.loss.gather_negatives
    if g == "off" or world == 1:
        return False
    return g == "on" or cfg.loss.kind == "infonce" or (
        cfg.loss.kind == "contrastive" and cfg.sampler.pairs == "inbatch")


def compute_loss(model, cfg: Config, batch: dict, v, a, fv, fa, group=None):
    """The configured loss of one batch. `group`: gather every rank's audio windows as
    negatives (the loss is then the whole batch's; see kernels/contrastive.gather_columns)."""
    lk, sm = cfg.loss, cfg.sampler
    dev = v.device
    if lk.kind == "ce":   # each window with its own clip (paired_windows=2: clips repeat)
        own = batch["audio_owner"].to(dev)
        return sync_ce_loss(model.sync_logits(fv[own], fa), batch["label"].to(dev))
    ids = (batch["clip_video"].to(dev), batch["clip_t0"].to(dev), batch["audio_video"].to(dev),
           batch["audio_t0"].to(dev))
    # every rank's windows fit this: the batch's size, times the windows per clip
    capacity = cfg.loader.batch_size * windows_per_clip(cfg)
    if lk.kind == "infonce":
        kw = dict(temperature=lk.temperature, hard_min_shift=sm.hard_min_shift,
                  sync_tol=lk.sync_tol, impl=lk.impl, group=group)
        loss = inbatch_infonce_loss(v, a, *ids, gather_capacity=capacity, **kw)
        if lk.symmetric:   # rows are now windows, columns (gathered under DDP) the clips
            cv, ct, av, at = ids
            loss = 0.5 * (loss + inbatch_infonce_loss(a, v, av, at, cv, ct,
                                                      gather_capacity=cfg.loader.batch_size,
                                                      **kw))
        return loss
    if sm.pairs == "paired":
        own = batch["audio_owner"].to(dev)
        return paired_contrastive_loss(v[own], a, batch["label"].to(dev), margin=lk.margin,
                                       impl=lk.impl)
    # the paper's curriculum samples the hard negatives: then every negative pair weighs the
    # same (hard_share None); loss_weight weighs the hard pairs' mean by the share
    share = batch["hard_share"] if sm.hard_share_as == "loss_weight" else None
    return inbatch_contrastive_loss(
        v, a, *ids, margin=lk.margin, hard_share=share,
        hard_min_shift=sm.hard_min_shift, sync_tol=lk.sync_tol, impl=lk.impl, group=group,
        gather_capacity=capacity)


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
    scaler (a no-op scaler outside fp16), then the schedule (fine-tuning's step)."""
    if grad_clip:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(opt)
    scaler.update()
    sched.step()


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process. Under torchrun the CUDA device of
    LOCAL_RANK is made current *before* the process group starts, and the group is given it
    (NCCL binds its communicators to a device: without this every rank's first collective
    lands on cuda:0). gloo on a CPU."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device("cpu")
    if cuda:
        n = torch.cuda.device_count()
        if local >= n:
            raise RuntimeError(f"LOCAL_RANK={local} but this machine shows {n} CUDA device(s): "
                               f"start at most {n} processes per node (torchrun "
                               f"--nproc-per-node {n})")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True   # fixed input shapes: pick the fastest kernels
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo",
                                             device_id=device if cuda else None)
    return rank, world, device


def make_optimizer(params, tc) -> torch.optim.Optimizer:
    """Fused AdamW or SGD (on CPU too, torch >= 2.4): the fused kernels take a `found_inf`
    flag on the device, which is how a non-finite step is skipped without the host looking."""
    params = list(params)
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=True)
    return torch.optim.SGD(params, lr=tc.lr, momentum=0.9, weight_decay=tc.weight_decay,
                           fused=True)


class TrainStep:
    """One training step that never waits for the host (DESIGN.md section 2, "Feeding the GPU"):

        batch to the device (pinned, non-blocking) -> forward under autocast -> loss
        -> bad = loss is not finite, max over all ranks (all_reduce on the device)
        -> backward (every rank: DDP needs all of them) -> unscale + clip
        -> optimizer step with found_inf = bad or the gradient norm not finite: the fused
           optimizer leaves parameters, moments and its step count as they were
        -> schedule step

    A skipped update still counts as a step (the schedule moves on), as with torch.amp's
    skipped fp16 steps. With fp16 the GradScaler makes the same decision from the gradients.
    Counters on the device: `bad_total` (skipped updates), `bad_run` (skipped in a row) and
    `bad_run_max`; the trainer reads them every `train.log_every` steps. Shared by the trainer
    and bench/bench_train.py, so the benchmark times the trainer's own step."""

    def __init__(self, model, net, opt, scaler, sched, cfg, device, world: int = 1):
        self.model, self.net, self.opt, self.scaler, self.sched = model, net, opt, scaler, sched
        self.cfg, self.device, self.world = cfg, device, world
        tc = cfg.train
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.precision)
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
        self.range = lambda name: nullcontext()
        z = lambda: torch.zeros((), dtype=torch.float32, device=device)
        self.bad_total, self.bad_run, self.bad_run_max = z(), z(), z()
        self.stats = torch.zeros(4, device=device)   # collapse.pair_stats of the last step
        # negatives from every rank (loss.gather_negatives): the default process group
        self.group = torch.distributed.group.WORLD if gathers_negatives(cfg, world) else None

    def to_device(self, batch: dict) -> dict:
        """Every tensor of the batch on the device (asynchronous from pinned memory)."""
        out = dict(batch)
        for k, t in batch.items():
            if torch.is_tensor(t) and t.device != self.device:
                out[k] = t.to(self.device, non_blocking=True)
        return out

    def __call__(self, batch: dict) -> torch.Tensor:
        """One step on `batch`; returns the loss (a 0-d tensor on the device, detached)."""
        tc, dist = self.cfg.train, torch.distributed
        b = self.to_device(batch)
        video, audio = b["video"], b["audio"]
        if tc.channels_last:
            video = video.contiguous(memory_format=torch.channels_last_3d)
        with self.autocast():
            with self.range("forward"):
                v, a, fv, fa = self.net(video, audio)
            with self.range("loss"):
                loss = compute_loss(self.model, self.cfg, b, v, a, fv, fa, group=self.group)
                # collapse watch (fastavts/collapse.py): device-side, read with the loss
                self.stats = pair_stats(self.model, self.cfg, b, v, a, fv, fa,
                                        self.world if self.group is not None else 1)
        bad = (~torch.isfinite(loss.detach())).to(torch.float32)
        if self.world > 1:   # one rank's NaN skips the step on every rank
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.opt.zero_grad(set_to_none=True)
        with self.range("backward"):
            self.scaler.scale(loss).backward()
        with self.range("optimizer"):
            skip = bad
            if self.scaler.is_enabled():   # fp16: the scaler skips non-finite gradients itself
                if tc.grad_clip:
                    self.scaler.unscale_(self.opt)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                found_inf = bad
                if tc.grad_clip:
                    norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
                    found_inf = torch.maximum(bad, (~torch.isfinite(norm)).to(torch.float32))
                self.opt.grad_scale, self.opt.found_inf = None, found_inf
                try:
                    self.opt.step()
                finally:
                    del self.opt.grad_scale, self.opt.found_inf
                skip = found_inf
            self.sched.step()
        self.bad_total += skip
        self.bad_run.add_(1).mul_(skip)
        torch.maximum(self.bad_run_max, self.bad_run, out=self.bad_run_max)
        return loss.detach()


def rng_state() -> dict:
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _cpu_bytes(t) -> torch.Tensor:
    """An RNG state as torch wants it: a CPU uint8 tensor (a checkpoint loaded with
    map_location='cuda' holds them on the GPU, and set_rng_state refuses those)."""
    return t.cpu().to(torch.uint8) if hasattr(t, "cpu") else torch.as_tensor(t, dtype=torch.uint8)


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(_cpu_bytes(s["torch"]))
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        states = [_cpu_bytes(t) for t in s["cuda"]]
        n = torch.cuda.device_count()
        # a checkpoint from a machine with more GPUs: restore the ones this one has
        torch.cuda.set_rng_state_all(states[:n])


def _command() -> str:
    """The command line that runs this training (for the exported model card)."""
    import shlex
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("fastavts", "__main__.py", "cli.py"):
        argv[0] = "fastavts"
    elif argv and argv[0].endswith(".py"):
        argv = ["python", *argv]
    return shlex.join(argv)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's contents with every tensor on the CPU: the model and optimizer copy them
    to their devices as they load, and the RNG states must stay CPU tensors."""
    return torch.load(path, map_location="cpu", weights_only=False)


RESUME_KEYS = ("model", "optimizer", "schedule", "scaler", "loader", "rng", "step")


def checkpoint_candidates(ckpt_dir: Path) -> list[Path]:
    """last.pt, then ckpt_<step>.pt newest first."""
    return [p for p in [ckpt_dir / "last.pt", *sorted(ckpt_dir.glob("ckpt_*.pt"), reverse=True)]
            if p.is_file()]


def newest_readable_checkpoint(ckpt_dir: Path) -> tuple[dict, Path, list[tuple[Path, str]]]:
    """(state, its path, [(unreadable path, why)]): last.pt, or where it is truncated or
    damaged, the newest ckpt_<step>.pt that reads whole. A ConfigError when none does."""
    unreadable = []
    for path in checkpoint_candidates(ckpt_dir):
        try:
            state = load_checkpoint(path)
        except Exception as e:  # a torn or truncated zip, not a torch file, ...
            unreadable.append((path, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"))
            continue
        missing = [k for k in RESUME_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            unreadable.append((path, f"not a full training checkpoint: no {', '.join(missing)}"))
            continue
        return state, path, unreadable
    listed = "; ".join(f"{p.name}: {w}" for p, w in unreadable) or "no checkpoint files"
    raise ConfigError(f"--resume: no readable checkpoint in {ckpt_dir} ({listed}); start the "
                      f"run again without --resume (or in another --out)")


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


class _SyncCheck:
    """train.sync_check: inside a steady-state step, a host-device synchronisation raises
    (torch.cuda.set_sync_debug_mode('error')); the trainer's own reads are let through."""

    def __init__(self, from_step: int, cuda: bool):
        self.from_step, self.cuda = from_step, cuda

    def step(self, step: int):
        if not (self.cuda and self.from_step and step >= self.from_step):
            return nullcontext()
        return self._mode("error")

    @staticmethod
    @contextmanager
    def _mode(mode: str):
        torch.cuda.set_sync_debug_mode(mode)
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")


class Metrics:
    """Scalars to the loggers of train.loggers: TensorBoard (<run>/tb) and Weights & Biases
    (the resolved config with them; a resumed run continues the same wandb run, its id kept
    in <run>/wandb_id). Only the main process logs."""

    def __init__(self, out: Path, enabled: bool, cfg: Config | None = None, resume: bool = False):
        self.tb = self.wandb = None
        loggers = list(cfg.train.loggers) if cfg is not None else ["tensorboard"]
        if not enabled:
            return
        if "tensorboard" in loggers:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out / "tb"))
            except ImportError:
                print("fastavts train: tensorboard is not installed; no TensorBoard logs "
                      "(pip install tensorboard)")
        if "wandb" in loggers:
            import wandb
            from omegaconf import OmegaConf
            id_file = out / "wandb_id"
            run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
            tc = cfg.train
            self.wandb = wandb.init(
                project=tc.wandb_project, entity=tc.wandb_entity or None, dir=str(out),
                name=out.name, id=run_id, resume="allow" if run_id else None,
                config=OmegaConf.to_container(OmegaConf.structured(cfg)))
            id_file.write_text(self.wandb.id + "\n")

    def scalars(self, step: int, values: dict) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log({k: float(v) for k, v in values.items()}, step=step)

    def close(self):
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


# --------------------------------------------------------------------------------------------
# the run


def train(cfg: Config, out: Path, resume: bool = False, progress: bool = True,
          stop_after_steps: int = 0) -> dict:
    """Train, evaluate, write metrics.json; returns the metrics. `stop_after_steps` ends the
    run early after writing a checkpoint (tests use it to interrupt and resume)."""
    from tqdm import tqdm

    # --- setup: device, processes, seeds
    rank, world, device = setup_distributed()
    cuda = device.type == "cuda"
    cfg = resolve_auto(cfg, cuda)
    tc = cfg.train
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    random.seed(tc.seed)
    is_main = rank == 0
    from .data.checks import check_dataset
    for key, root in (("train.data", tc.data), ("train.eval_data", tc.eval_data)):
        if root:
            for w in check_dataset(cfg, root, key):
                if is_main:
                    print(f"fastavts train: warning: {w}", file=sys.stderr)
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
    opt = make_optimizer(model.parameters(), tc)
    total = tc.epochs * len(loader)
    warmup = int(tc.warmup * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, max(1, warmup)))
    scaler = torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16")
    train_step = TrainStep(model, net, opt, scaler, sched, cfg, device, world)
    autocast = train_step.autocast

    # --- resume
    step, epoch0 = 0, 0
    ckpt_dir = out / "checkpoints"
    if resume:
        state, used, unreadable = newest_readable_checkpoint(ckpt_dir)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        # the loader's position, an epoch's end already moved to the next epoch's start
        step, epoch0 = state["step"], loader.sampler.epoch
        if is_main:
            for path, why in unreadable:
                print(f"fastavts train: {path} cannot be read ({why}); skipped", file=sys.stderr)
            print(f"fastavts train: resumed from {used} at step {step}"
                  + (" (the newest readable checkpoint)" if unreadable else ""))

    def checkpoint():
        if is_main:
            save_checkpoint(ckpt_dir, step, dict(
                model=model.state_dict(), optimizer=opt.state_dict(), schedule=sched.state_dict(),
                scaler=scaler.state_dict(), loader=loader.state_dict(), rng=rng_state(),
                step=step, config=to_yaml(cfg), command=_command()), tc.keep_last)

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
        train_step.range = rng_
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
    metrics = Metrics(out, is_main, cfg, resume)
    sync_check = _SyncCheck(tc.sync_check, cuda)
    detector = Detector(cfg, total)
    history: list[float] = []
    pending: list[torch.Tensor] = []   # losses on the device, read every log_every steps
    clips = 0
    t_start = time.perf_counter()
    wait_total = 0.0
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not (progress and is_main),
               dynamic_ncols=True)

    def read_back(batch) -> None:
        """The host looks at the device: losses since the last read, the skip counters, the
        collapse watch's statistics of the last step."""
        vals = torch.cat([torch.stack(pending).float(), train_step.stats]).tolist()
        history.extend(vals[:-4])
        pending.clear()
        said = detector.update(step, history[-1], vals[-4:])
        if said and is_main:
            print(said, flush=True)
        metrics.scalars(step, {f"collapse/{k}": x for k, x in detector.last.items()})
        run, run_max = int(train_step.bad_run.item()), int(train_step.bad_run_max.item())
        elapsed = time.perf_counter() - t_start
        bar.set_postfix(loss=f"{history[-1]:.4f}", clips_s=f"{clips / elapsed:.1f}",
                        wait=f"{wait_total / elapsed:.0%}", refresh=False)
        metrics.scalars(step, {"loss": history[-1], "lr": sched.get_last_lr()[0],
                               "clips_per_s": clips / elapsed,
                               "data_wait_share": wait_total / elapsed,
                               "hard_share": batch["hard_share"],
                               "skipped_nonfinite": float(train_step.bad_total.item()),
                               "faults": sum(loader.faults.values())})
        if monitor is not None:
            metrics.scalars(step, {f"gpu/{k}": x for k, x in monitor.latest().items()})
        if run and is_main:
            print(f"fastavts train: step {step}: {run} non-finite step(s) in a row skipped")
        if max(run, run_max) >= tc.max_nonfinite:
            checkpoint()
            raise RuntimeError(f"{max(run, run_max)} non-finite losses in a row by step {step}: "
                               f"lower train.lr or use train.precision=fp32; the last checkpoint "
                               f"is {ckpt_dir / 'last.pt'}")

    def finish_early():
        bar.close()
        loader.close()
        metrics.close()
        if prof is not None:
            prof.stop()
        if monitor is not None:
            monitor.stop()

    model.train()
    for epoch in range(epoch0, tc.epochs):
        batches = loader.epoch(epoch)
        while True:
            with sync_check.step(step):
                t0 = time.perf_counter()
                with rng_("data"):   # decode + audio features (the loader's pipelines)
                    batch = next(batches, None)
                if batch is None:
                    break
                t_data = time.perf_counter() - t0
                pending.append(train_step(batch))
            last = batch
            if prof is not None:
                prof.step()
            step += 1
            clips += len(batch["clip_video"]) * world
            wait_total += t_data
            bar.update()
            if step % tc.log_every == 0 or step == stop_after_steps:
                read_back(last)
            if step % tc.ckpt_every == 0 or step == stop_after_steps:
                checkpoint()
            if step == stop_after_steps:
                finish_early()
                return dict(stopped_at=step, losses=history)
    if pending:
        read_back(last)
    if cuda:
        torch.cuda.synchronize()   # the queued steps count in the wall time
    bar.close()
    wall = time.perf_counter() - t_start
    if prof is not None:
        prof.stop()
        print(f"fastavts train: profiler trace in {out / 'profile'} (tensorboard --logdir "
              f"{out / 'profile'}, or open the .json in https://ui.perfetto.dev)")
    gpu = monitor.stop() if monitor is not None else {}
    checkpoint()
    loader.close()
    finite = [x for x in history if math.isfinite(x)]

    # --- evaluation on held-out videos
    result = dict(steps=step, epochs=tc.epochs, clips_per_s=round(clips / wall, 2),
                  wall_s=round(wall, 1), data_wait_share=round(wait_total / wall, 3),
                  final_loss=round(float(np.mean(finite[-20:])), 5) if finite else None,
                  skipped_nonfinite=int(train_step.bad_total.item()), faults=dict(loader.faults),
                  model=f"{cfg.model.video}+{cfg.model.audio}", loss=cfg.loss.kind,
                  pairs=cfg.sampler.pairs, world_size=world,
                  negatives_from_ranks=world if train_step.group is not None else 1,
                  collapse=detector.summary(), **gpu)
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
