"""One training step, and what it is built from: the model wrapped for the run (channels-last,
DDP, torch.compile), the optimizer, the warm-up + cosine schedule, autocast and the grad scaler.
`fastavts train`, `fastavts finetune` and bench/bench_train.py all build their step here, so a
benchmark times the trainer's own step and fine-tuning honours the same train.* settings.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(params, tc) -> torch.optim.Optimizer:
    """Fused AdamW or SGD (on CPU too, torch >= 2.4): the fused kernels take a `found_inf`
    flag on the device, which is how a non-finite step is skipped without the host looking."""
    params = list(params)
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=True)
    return torch.optim.SGD(params, lr=tc.lr, momentum=0.9, weight_decay=tc.weight_decay,
                           fused=True)


def make_schedule(opt, total: int, warmup_share: float):
    """train.warmup of `total` steps warming up linearly (at least one), then a cosine to 0."""
    warmup = max(1, int(warmup_share * total))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))


def make_autocast(precision: str, device: torch.device):
    """A context factory: autocast to bf16/fp16 on `device`, or nothing (fp32)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext


def wrap_model(model, tc, world: int, video_net=None, idle_parts=()):
    """The module a step calls: `model` with `idle_parts` (names of submodules its loss never
    reaches) frozen, `video_net` in channels_last_3d where train.channels_last (NDHWC: cuDNN's
    fast 3D layout), under DDP on several ranks, compiled where train.compile."""
    for name in idle_parts:   # DDP would wait for their gradients for ever
        for p in getattr(model, name).parameters():
            p.requires_grad_(False)
    if tc.channels_last and video_net is not None:
        video_net.to(memory_format=torch.channels_last_3d)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    return torch.compile(net) if tc.compile else net


class TrainStep:
    """One training step that never waits for the host:

        batch to the device (pinned, non-blocking) -> forward under autocast -> loss
        -> bad = loss is not finite, max over all ranks (all_reduce on the device)
        -> backward (every rank: DDP needs all of them) -> unscale + clip
        -> optimizer step with found_inf = bad or the gradient norm not finite: the fused
           optimizer leaves parameters, moments and its step count as they were
        -> schedule step

    A skipped update still counts as a step (the schedule moves on), as with torch.amp's
    skipped fp16 steps. With fp16 the GradScaler makes the same decision from the gradients.
    Counters on the device: `bad_total` (skipped updates), `bad_run` (skipped in a row) and
    `bad_run_max`; the trainer reads them every `train.log_every` steps.

    The loss comes from `objective` (fastavts/objectives.py: the AVTS towers' forward, the
    loss and the collapse watch's pair statistics in `stats`), or from `loss_fn(net, batch)`
    for another task (fine-tuning's classifier)."""

    def __init__(self, model, net, opt, scaler, sched, cfg, device, world: int = 1, *,
                 objective=None, loss_fn=None):
        self.model, self.net, self.opt, self.scaler, self.sched = model, net, opt, scaler, sched
        self.cfg, self.device, self.world = cfg, device, world
        if (objective is None) == (loss_fn is None):
            raise ValueError("TrainStep takes an objective or a loss_fn (build_step makes it)")
        self.objective, self.loss_fn = objective, loss_fn
        self.autocast = make_autocast(cfg.train.precision, device)
        self.range = lambda name: nullcontext()
        z = lambda: torch.zeros((), dtype=torch.float32, device=device)
        self.bad_total, self.bad_run, self.bad_run_max = z(), z(), z()
        self.stats = torch.zeros(4, device=device)   # the objective's pair_stats, last step
        self.group = objective.group if objective is not None else None
        from ..data.features import ModelInputs
        # the CPU loaders' uint8 video and int16 sound become the model's inputs here, on the
        # device; its constants are made now, not in a step
        self.inputs = ModelInputs(cfg.data)
        self.inputs.prepare(device)

    def warm_up(self) -> None:
        """The objective's fused kernels compiled and autotuned before the first step, timed by
        rank 0 alone and its choices taken by every rank (kernels/tuning.py)."""
        if self.objective is None or not self.objective.launches_kernels:
            return
        from ..kernels.tuning import agree

        with self.autocast():
            dtype = self.model.embedding_dtype()
        agree(lambda: self.objective.warm_up(self.device, dtype), self.world)

    def to_device(self, batch: dict) -> dict:
        """Every tensor of the batch on the device (asynchronous from pinned memory), made
        there into what the model takes where a loader handed over uint8 video and int16 sound
        (features.ModelInputs)."""
        out = dict(batch)
        for k, t in batch.items():
            if torch.is_tensor(t) and t.device != self.device:
                out[k] = t.to(self.device, non_blocking=True)
        return self.inputs(out)

    def forward_loss(self, b: dict) -> torch.Tensor:
        """The loss of a batch already on the device (inside autocast)."""
        video = b["video"]
        if self.cfg.train.channels_last:
            video = video.contiguous(memory_format=torch.channels_last_3d)
        if self.loss_fn is not None:
            with self.range("forward"):
                return self.loss_fn(self.net, dict(b, video=video))
        with self.range("forward"):
            v, a, fv, fa = self.net(video, b["audio"])
        with self.range("loss"):
            loss = self.objective.loss(self.model, b, v, a, fv, fa)
            # collapse watch (fastavts/collapse.py): device-side, read with the loss
            self.stats = self.objective.pair_stats(self.model, b, v, a, fv, fa)
        return loss

    def __call__(self, batch: dict) -> torch.Tensor:
        """One step on `batch`; returns the loss (a 0-d tensor on the device, detached)."""
        b = self.to_device(batch)
        with self.autocast():
            loss = self.forward_loss(b)
        bad = (~torch.isfinite(loss.detach())).to(torch.float32)
        if self.world > 1:   # one rank's NaN skips the step on every rank
            dist = torch.distributed
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.opt.zero_grad(set_to_none=True)
        with self.range("backward"):
            self.scaler.scale(loss).backward()
        with self.range("optimizer"):
            skip = self._update(bad)
            self.sched.step()
        self.bad_total += skip
        self.bad_run.add_(1).mul_(skip)
        torch.maximum(self.bad_run_max, self.bad_run, out=self.bad_run_max)
        return loss.detach()

    def _update(self, bad: torch.Tensor) -> torch.Tensor:
        """Clip and step the optimizer unless `bad`; returns the skip flag (0-d, device)."""
        clip = self.cfg.train.grad_clip
        if self.scaler.is_enabled():   # fp16: the scaler skips non-finite gradients itself
            if clip:
                self.scaler.unscale_(self.opt)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.scaler.step(self.opt)
            self.scaler.update()
            return bad
        found_inf = bad
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            found_inf = torch.maximum(bad, (~torch.isfinite(norm)).to(torch.float32))
        self.opt.grad_scale, self.opt.found_inf = None, found_inf
        try:
            self.opt.step()
        finally:
            del self.opt.grad_scale, self.opt.found_inf
        return found_inf


def build_step(model, cfg, device, world: int, total_steps: int, *, objective=None,
               loss_fn=None, video_net=None) -> TrainStep:
    """The step of a run of `total_steps`: `model` wrapped (wrap_model; idle parts are the
    objective's), the optimizer of train.optimizer, the schedule, the grad scaler."""
    tc = cfg.train
    if objective is None and loss_fn is None:
        from ..objectives import objective as make_objective
        objective = make_objective(cfg, world)
    idle = objective.idle_parts if objective is not None else ()
    net = wrap_model(model, tc, world, video_net=video_net, idle_parts=idle)
    opt = make_optimizer(model.parameters(), tc)
    sched = make_schedule(opt, total_steps, tc.warmup)
    scaler = torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16")
    step = TrainStep(model, net, opt, scaler, sched, cfg, device, world, objective=objective,
                     loss_fn=loss_fn)
    step.warm_up()
    return step
