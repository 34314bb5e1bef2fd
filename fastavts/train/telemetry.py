"""What a run tells while it trains: the progress bar, the loggers (TensorBoard, Weights &
Biases), named ranges for the torch profiler and Nsight Systems, the GPU counters, the host's
periodic read-back of the losses (every train.log_every steps; in between nothing waits for the
GPU) with the non-finite check and the collapse watch, and the steady-state sync check.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from ..collapse import Detector


class NvtxRange:
    """A range seen by both the torch profiler and Nsight Systems (NVTX)."""

    def __init__(self, name: str):
        self.rf = torch.profiler.record_function(name)
        self.name = name

    def __enter__(self):
        torch.cuda.nvtx.range_push(self.name)
        self.rf.__enter__()

    def __exit__(self, *exc):
        self.rf.__exit__(*exc)
        torch.cuda.nvtx.range_pop()


def range_maker(tc, cuda: bool):
    """name -> a context: a profiler range (train.profile), also NVTX on a GPU (train.nvtx),
    or nothing."""
    def make(name):
        if not (tc.profile or tc.nvtx):
            return nullcontext()
        if cuda and tc.nvtx:
            return NvtxRange(name)
        return torch.profiler.record_function(name)
    return make


class SyncCheck:
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

    def __init__(self, out: Path, enabled: bool, cfg=None, resume: bool = False):
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


class Telemetry:
    """A run's bar, loggers, profiler, GPU monitor and collapse watch; the losses it has read.

    `stepped` after every step (no device read), `read_back` every train.log_every steps,
    `close` once (the loop's `finally`: every path out of a run, an error's too)."""

    def __init__(self, cfg, out: Path, *, is_main: bool, cuda: bool, resume: bool,
                 total: int, step: int, progress: bool):
        from tqdm import tqdm

        tc = cfg.train
        self.cfg, self.out, self.is_main = cfg, out, is_main
        self.range = range_maker(tc, cuda)
        self.prof = self._profiler(tc, out, cuda) if tc.profile and is_main else None
        self.monitor = None
        if tc.gpu_counters and is_main and cuda:
            from ..gpu_monitor import GpuMonitor
            self.monitor = GpuMonitor().start()
        self.metrics = Metrics(out, is_main, cfg, resume)
        self.sync_check = SyncCheck(tc.sync_check, cuda)
        self.detector = Detector(cfg, total)
        self.history: list[float] = []
        self.pending: list[torch.Tensor] = []   # losses on the device, read every log_every
        self.clips, self.wait_total = 0, 0.0
        self.t_start = time.perf_counter()
        self.bar = tqdm(total=total, initial=step, desc="train", unit="step",
                        disable=not (progress and is_main), dynamic_ncols=True)
        self.gpu: dict = {}

    @staticmethod
    def _profiler(tc, out: Path, cuda: bool):
        w, wu, act = (int(x) for x in tc.profile_steps)
        acts = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        prof = torch.profiler.profile(
            activities=acts, schedule=torch.profiler.schedule(wait=w, warmup=wu, active=act,
                                                              repeat=1),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(str(out / "profile")),
            record_shapes=True, with_stack=False)
        prof.start()
        return prof

    def stepped(self, loss: torch.Tensor, clips: int, t_data: float) -> None:
        """After a step: its loss (on the device, unread), clips over all ranks, data wait."""
        self.pending.append(loss)
        if self.prof is not None:
            self.prof.step()
        self.clips += clips
        self.wait_total += t_data
        self.bar.update()

    def read_back(self, step: int, batch: dict, train_step, loader, lr: float) -> tuple[int, int]:
        """The host looks at the device: losses since the last read, the skip counters, the
        collapse watch's statistics of the last step. Returns (skipped in a row now, most in
        a row so far)."""
        vals = torch.cat([torch.stack(self.pending).float(), train_step.stats]).tolist()
        self.history.extend(vals[:-4])
        self.pending.clear()
        said = self.detector.update(step, self.history[-1], vals[-4:])
        if said and self.is_main:
            print(said, flush=True)
        self.metrics.scalars(step, {f"collapse/{k}": x for k, x in self.detector.last.items()})
        run, run_max = int(train_step.bad_run.item()), int(train_step.bad_run_max.item())
        elapsed = time.perf_counter() - self.t_start
        self.bar.set_postfix(loss=f"{self.history[-1]:.4f}", clips_s=f"{self.clips / elapsed:.1f}",
                             wait=f"{self.wait_total / elapsed:.0%}", refresh=False)
        self.metrics.scalars(step, {"loss": self.history[-1], "lr": lr,
                                    "clips_per_s": self.clips / elapsed,
                                    "data_wait_share": self.wait_total / elapsed,
                                    "hard_share": batch["hard_share"],
                                    "skipped_nonfinite": float(train_step.bad_total.item()),
                                    "faults": sum(loader.faults.values())})
        if self.monitor is not None:
            self.metrics.scalars(step, {f"gpu/{k}": x for k, x in self.monitor.latest().items()})
        if run and self.is_main:
            print(f"fastavts train: step {step}: {run} non-finite step(s) in a row skipped")
        return run, run_max

    def end_training(self, cuda: bool) -> float:
        """The training wall time (the device's queued steps included); stops the bar, the
        profiler and the GPU monitor (its summary in `gpu`)."""
        if cuda:
            torch.cuda.synchronize()   # the queued steps count in the wall time
        self.bar.close()
        wall = time.perf_counter() - self.t_start
        self._stop_sampling(report=True)
        return wall

    def _stop_sampling(self, report: bool) -> None:
        """Stop the profiler (saying where its trace is) and the GPU monitor (its summary
        into `gpu`), where they run."""
        if self.prof is not None:
            self.prof.stop()
            self.prof = None
            if report:
                print(f"fastavts train: profiler trace in {self.out / 'profile'} (tensorboard "
                      f"--logdir {self.out / 'profile'}, or open the .json in "
                      f"https://ui.perfetto.dev)")
        if self.monitor is not None:
            self.gpu = self.monitor.stop()
            self.monitor = None

    def final_loss(self) -> float | None:
        """The mean of the last 20 finite losses read."""
        finite = [x for x in self.history if math.isfinite(x)]
        return round(float(np.mean(finite[-20:])), 5) if finite else None

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()
        self._stop_sampling(report=False)
