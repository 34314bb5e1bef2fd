"""`fastavts train [CONFIG] [overrides]`: the AVTS training run, top to bottom.

    setup     processes (DDP under torchrun), "auto" settings resolved, seeds   (runtime.py)
    data      the loader of train.data (DALI, PyAV, in memory)                  (data/)
    model     AVTS, wrapped for the run; the objective of loss.kind; optimizer,
              schedule, scaler: one TrainStep                                   (step.py)
    resume    model, optimizer, schedule, scaler, loader position, RNG         (checkpoint.py)
    steps     epoch after epoch; the host reads the losses every log_every
              steps (telemetry.py) and checkpoints every ckpt_every steps
    end       a last checkpoint, sync evaluation on train.eval_data, metrics.json and the
              returned metrics (the CLI prints them as one JSON line)

A step (TrainStep): next batch (the wait is the data-wait share) -> forward under autocast ->
loss -> backward -> clip -> fused optimizer step, skipped on every rank when any rank's loss
(or the gradient norm) is not finite, decided on the device. Between reads the host never waits
for the GPU. Whatever ends a run, its loader, loggers, profiler and GPU monitor are released
once, in `finally`.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import runtime
from ..checkpoint import (
    atomic_write_text,
    command_line,
    newest_readable_checkpoint,
    rng_state,
    save_checkpoint,
)
from ..checkpoint import set_rng_state as restore_rng
from ..config import Config, save_config, to_yaml
from ..data.loader import make_loader
from ..models.avts import AVTS
from . import lifecycle
from .step import TrainStep, build_step
from .telemetry import Telemetry


@dataclass
class Run:
    """What one training run holds: the resolved config, where it writes, its process, its
    loader and step, and where it stands."""
    cfg: Config
    out: Path
    rank: int
    world: int
    device: torch.device
    loader: object
    model: AVTS
    step_fn: TrainStep
    total: int
    data: dict | None = None     # the datasets' fingerprints (lifecycle.data_record)
    last_path: Path | None = None   # the newest checkpoint this process wrote
    step: int = 0
    epoch0: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def checkpoint(self) -> Path | None:
        """The whole state at this step (the main process writes it, atomically; its path).
        Every rank must call it: each rank's loader position and RNG states are gathered to
        rank 0 (`ranks`), so that each rank resumes its own."""
        mine = dict(loader=self.loader.state_dict(), rng=rng_state())
        ranks = [mine]
        if self.world > 1:
            ranks = [None] * self.world if self.is_main else None
            torch.distributed.gather_object(mine, ranks, dst=0)
        if not self.is_main:
            return None
        s = self.step_fn
        return save_checkpoint(self.ckpt_dir, self.step, dict(
            model=self.model.state_dict(), optimizer=s.opt.state_dict(),
            schedule=s.sched.state_dict(), scaler=s.scaler.state_dict(),
            loader=mine["loader"], rng=mine["rng"], ranks=ranks, step=self.step,
            config=to_yaml(self.cfg), command=command_line(), data=self.data),
            self.cfg.train.keep_last)

    def restore(self) -> None:
        """Continue from the newest readable checkpoint in <out>/checkpoints."""
        state, used, unreadable = newest_readable_checkpoint(self.ckpt_dir)
        lifecycle.check_data(state.get("data"), self.cfg, self.is_main)
        s = self.step_fn
        self.model.load_state_dict(state["model"])
        s.opt.load_state_dict(state["optimizer"])
        s.sched.load_state_dict(state["schedule"])
        s.scaler.load_state_dict(state["scaler"])
        # this rank's own position and RNGs (checkpoints before `ranks` held rank 0's alone)
        ranks = state.get("ranks")
        mine = ranks[self.rank] if ranks and len(ranks) == self.world else state
        self.loader.load_state_dict(mine["loader"])
        restore_rng(mine["rng"])
        # the loader's position, an epoch's end already moved to the next epoch's start
        self.step, self.epoch0 = state["step"], self.loader.sampler.epoch
        if self.is_main:
            for path, why in unreadable:
                print(f"fastavts train: {path} cannot be read ({why}); skipped", file=sys.stderr)
            print(f"fastavts train: resumed from {used} at step {self.step}"
                  + (" (the newest readable checkpoint)" if unreadable else ""))


def start(cfg: Config, out: Path) -> Run:
    """Processes, resolved settings, seeds, the run folder's config.yaml, the loader, the model
    and its step (in this order: the loader is built before the model draws its weights)."""
    from ..data.checks import check_dataset

    rank, world, device = runtime.setup_distributed()
    cfg = runtime.resolve(cfg, runtime.Machine.here(device), world)
    tc = cfg.train
    # recorded by absolute path: a resume from another directory reads the same sets
    tc.data, tc.eval_data = (str(Path(p).resolve()) if p else p for p in (tc.data, tc.eval_data))
    runtime.seed_everything(tc.seed)
    for key, root in (("train.data", tc.data), ("train.eval_data", tc.eval_data)):
        if root:
            for w in check_dataset(cfg, root, key):
                if rank == 0:
                    print(f"fastavts train: warning: {w}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        save_config(cfg, out / "config.yaml", header=f"# resolved config of: fastavts train --out {out}")
    loader = make_loader(cfg, tc.data, mode="train", rank=rank, world_size=world,
                         total_epochs=tc.epochs)
    model = AVTS.from_config(cfg).to(device)
    total = tc.epochs * len(loader)
    step_fn = build_step(model, cfg, device, world, total, video_net=model.video_net)
    return Run(cfg, out, rank, world, device, loader, model, step_fn, total,
               data=lifecycle.data_record(cfg))


def fit(run: Run, tel: Telemetry, stop_after_steps: int = 0,
        signals: lifecycle.Signals | None = None) -> int:
    """The epochs of steps from where the run stands. Returns 0 when they are done, -1 when
    stopped at stop_after_steps, or the signal that stopped the run (a checkpoint written)."""
    tc, loader, step_fn = run.cfg.train, run.loader, run.step_fn
    last = None
    run.model.train()
    for epoch in range(run.epoch0, tc.epochs):
        batches = loader.epoch(epoch)
        while True:
            with tel.sync_check.step(run.step):
                t0 = time.perf_counter()
                with tel.range("data"):   # decode + audio features (the loader's pipelines)
                    batch = next(batches, None)
                if batch is None:
                    break
                t_data = time.perf_counter() - t0
                loss = step_fn(batch)
            last = batch
            run.step += 1
            tel.stepped(loss, len(batch["clip_video"]) * run.world, t_data)
            stop = run.step == stop_after_steps
            signum, save = signals.poll() if signals is not None else (0, False)
            if run.step % tc.log_every == 0 or stop or signum:
                read_back(run, tel, last)
            if run.step % tc.ckpt_every == 0 or stop or signum or save:
                path = run.checkpoint()
                if run.world > 1:   # written before any rank moves on (or leaves)
                    torch.distributed.barrier()
                if save and not signum and run.is_main:
                    print(f"fastavts train: checkpoint {path} at step {run.step} (asked by "
                          f"SIG{tc.checkpoint_signal})", file=sys.stderr, flush=True)
                run.last_path = path
            if signum:
                return signum
            if stop:
                return -1
    if tel.pending:
        read_back(run, tel, last)
    return 0


def read_back(run: Run, tel: Telemetry, batch: dict) -> None:
    """The periodic look at the device; too many non-finite losses in a row: checkpoint, stop."""
    run_now, run_max = tel.read_back(run.step, batch, run.step_fn, run.loader,
                                     run.step_fn.sched.get_last_lr()[0])
    worst = max(run_now, run_max)
    if worst >= run.cfg.train.max_nonfinite:
        run.checkpoint()
        raise RuntimeError(f"{worst} non-finite losses in a row by step {run.step}: "
                           f"lower train.lr or use train.precision=fp32; the last checkpoint "
                           f"is {run.ckpt_dir / 'last.pt'}")


def summary(run: Run, tel: Telemetry, wall: float) -> dict:
    """The run's metrics (before the held-out evaluation)."""
    cfg = run.cfg
    return dict(steps=run.step, epochs=cfg.train.epochs, clips_per_s=round(tel.clips / wall, 2),
                wall_s=round(wall, 1), data_wait_share=round(tel.wait_total / wall, 3),
                final_loss=tel.final_loss(),
                skipped_nonfinite=int(run.step_fn.bad_total.item()),
                faults=dict(run.loader.faults),
                decoded_per_delivered=run.loader.decode_count.ratio,
                model=f"{cfg.model.video}+{cfg.model.audio}",
                loss=cfg.loss.kind, pairs=cfg.sampler.pairs, world_size=run.world,
                negatives_from_ranks=run.step_fn.objective.ranks_in_loss,
                collapse=tel.detector.summary(), **tel.gpu)


def evaluate(run: Run, tel: Telemetry, result: dict) -> None:
    """Sync accuracy on train.eval_data (the main process), into `result` and the loggers."""
    from ..evaluate import evaluate_sync

    t = time.perf_counter()
    result.update(evaluate_sync(run.model, run.cfg, run.cfg.train.eval_data, run.device,
                                run.step_fn.autocast, clips_per_video=run.cfg.train.eval_clips))
    result["eval_s"] = round(time.perf_counter() - t, 1)
    tel.metrics.scalars(run.step, {k: result[k] for k in ("sync_acc_easy", "sync_acc_hard",
                                                          "auc_easy", "auc_hard")})


def train(cfg: Config, out: Path, resume: bool = False, progress: bool = True,
          stop_after_steps: int = 0) -> dict:
    """Train, evaluate, write metrics.json; returns the metrics. The run folder is claimed
    first (lifecycle.claim: one writer; a finished run's metrics are returned as they are,
    with finished_before). A run stopped by a signal returns stopped_at and stopped_by after
    its checkpoint. `stop_after_steps` ends the run early after writing a checkpoint (tests
    use it to interrupt and resume)."""
    out = Path(out)
    rank, world, _ = runtime.setup_distributed()
    held = lifecycle.claim(out, resume, rank, world)
    if held.finished is not None:
        held.release()
        if world > 1:
            torch.distributed.destroy_process_group()
        return dict(held.finished, finished_before=True, losses=[])
    run = tel = signals = None
    try:
        run = start(cfg, out)
        if resume:
            run.restore()
        tel = Telemetry(run.cfg, run.out, is_main=run.is_main, cuda=run.device.type == "cuda",
                        resume=resume, total=run.total, step=run.step, progress=progress)
        if run.cfg.train.profile or run.cfg.train.nvtx:
            run.loader.range = tel.range   # "decode" and "audio_features" inside "data"
            run.step_fn.range = tel.range
        signals = lifecycle.Signals(run.cfg.train.checkpoint_signal, run.world, run.device)
        ended = fit(run, tel, stop_after_steps, signals)
        signals.restore()
        if ended:
            out_ = dict(stopped_at=run.step, losses=tel.history, checkpoint=run.last_path)
            if ended > 0:
                out_["stopped_by"] = int(ended)
            return out_
        return finish(run, tel)
    finally:
        if signals is not None:
            signals.restore()
        if run is not None:
            run.loader.close()
        if tel is not None:
            tel.close()
        held.release()


def finish(run: Run, tel: Telemetry) -> dict:
    """A run's end: the last checkpoint, the held-out evaluation, metrics.json."""
    wall = tel.end_training(run.device.type == "cuda")
    run.checkpoint()
    if run.world > 1:   # the last collective: no rank leaves while another still talks
        torch.distributed.barrier()
    run.loader.close()   # its pipelines and workers, before the evaluation's own
    result = summary(run, tel, wall)
    if tel.gpu:
        tel.metrics.scalars(run.step, {f"gpu_summary/{k}": x for k, x in tel.gpu.items()})
    if run.is_main and run.cfg.train.eval_data:
        evaluate(run, tel, result)
    tel.close()
    result["losses"] = tel.history
    if run.is_main:
        atomic_write_text(run.out / "metrics.json", json.dumps(
            {k: v for k, v in result.items() if k != "losses"}, indent=1))
    if run.world > 1:
        torch.distributed.destroy_process_group()
    return result
