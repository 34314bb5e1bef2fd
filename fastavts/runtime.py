"""Where a run stands: its machine, its processes, its seeds, and every "auto" setting resolved
for them, in one place.

    rank, world, device = setup_distributed()       # torchrun's environment, or one process
    seed_everything(cfg.train.seed)
    cfg = resolve(cfg, Machine.here(device), world)  # a resolved copy; cfg is left as it was

The resolved config is what a run records (config.yaml, the checkpoints), so a reader sees the
towers, precision, loader and loss implementation the run really used. Resolving a resolved
config changes nothing (a resumed run keeps what it started with).

    setting                  auto means
    model.video / audio      r2plus1d_18 / default on a GPU, tiny / tiny on a CPU
    train.precision          bf16 on a GPU, fp32 on a CPU
    loader.device            gpu where one is visible, else cpu
    loader.video_pipelines   (DALI) one per NVDEC engine of the GPU (fewer where the rank has
                             under 2 cores a pipeline), 1 on a CPU
    loader.threads           (DALI) on a GPU what the source processes leave of the rank's
                             cores, over its pipelines; on a CPU every core
    loss.impl                the objective's fused kernel on a GPU, else the reference
    loss.gather_negatives    on where the objective shares negatives across ranks (world > 1)
    prepare.codec            h264 where a GPU is visible, else vp9
"""
from __future__ import annotations

import copy
import functools
import os
import random
from dataclasses import dataclass

from .errors import ConfigError

# NVDEC engines per GPU (NVIDIA Video Codec SDK support matrix); one video pipeline each.
NVDEC_ENGINES = {"H200": 7, "H100": 7, "GH200": 7, "B200": 7, "A100": 5, "A30": 4, "L40S": 3,
                 "L40": 3, "L4": 4, "A10": 1, "T4": 2}


@dataclass(frozen=True)
class Machine:
    """What the "auto" settings depend on."""
    cuda: bool = False
    gpu_name: str | None = None
    cores: int = 1            # this rank's share of the CPU cores

    @classmethod
    def here(cls, device=None) -> Machine:
        """This process's machine; `device` (a torch.device) says whether the run uses a GPU
        (default: whether one is visible)."""
        import torch

        cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        name = None
        if cuda and torch.cuda.is_available():
            index = device.index if device is not None and device.index is not None \
                else int(os.environ.get("LOCAL_RANK", 0))
            name = torch.cuda.get_device_name(index)
        return cls(cuda=cuda, gpu_name=name, cores=max(1, (os.cpu_count() or 2) // max(1, local)))


# --------------------------------------------------------------------------------------------
# processes and seeds


def setup_distributed():
    """(rank, world size, device) of this process. Under torchrun the CUDA device of
    LOCAL_RANK is made current *before* the process group starts, and the group is given it
    (NCCL binds its communicators to a device: without this every rank's first collective
    lands on cuda:0). gloo on a CPU."""
    import torch

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


_WATCHED: set[int] = set()


def die_with_parent(parent: int | None = None, poll_s: float = 0.25) -> None:
    """In a worker process: exit as soon as the process that started it is gone, however it
    went (kill -9 included: no handler of the parent runs then). A daemon thread compares the
    parent pid every `poll_s` seconds (an orphan is handed to another parent). `parent`: the
    starting process's pid as it passed it (a pool's initargs=(os.getpid(),)): a worker still
    importing its modules when the parent died would otherwise take its new parent for it."""
    import threading
    import time

    parent = os.getppid() if parent is None else parent
    if parent in _WATCHED:
        return
    _WATCHED.add(parent)

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)
    threading.Thread(target=watch, name="fastavts-parent-watch", daemon=True).start()


def seed_everything(seed: int) -> None:
    """torch (every device), numpy's and Python's global RNGs, in that order."""
    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


# --------------------------------------------------------------------------------------------
# "auto" settings


def default_video_pipelines(gpu_name: str | None) -> int:
    """loader.video_pipelines=0 (auto): one per NVDEC engine of the GPU, 4 for GPUs not in
    the table, 1 on a CPU (the CPU decoder uses the pipeline's threads instead)."""
    if not gpu_name:
        return 1
    for key in sorted(NVDEC_ENGINES, key=len, reverse=True):   # "GH200" before "H200"
        if key in gpu_name.split() or f" {key}" in f" {gpu_name}":
            return NVDEC_ENGINES[key]
    return 4


def default_threads(pipelines: int, gpu: bool, cores: int | None = None) -> int:
    """loader.threads=0 (auto): this rank's share of the cores split over its pipelines, at
    least 2 (the CPU decoder and the mixed decoder's demuxing run on these threads)."""
    if cores is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        cores = max(1, (os.cpu_count() or 2) // max(1, local))
    return max(2, cores // max(1, pipelines)) if gpu else max(1, cores)


def resolve_codec(codec: str, cuda: bool | None = None) -> str:
    """prepare.codec=auto: H.264 for GPU decoding where a GPU is visible, else VP9."""
    if codec != "auto":
        return codec
    if cuda is None:
        try:
            import torch
            cuda = torch.cuda.is_available()
        except ImportError:
            cuda = False
    return "h264" if cuda else "vp9"


@dataclass(frozen=True)
class LoaderPlan:
    """How a DALI loader runs on one rank: K video pipelines taking batches in turn, one audio
    pipeline, each with `threads` DALI CPU threads (the audio one `audio_threads`) and
    `workers` source processes (0: the sources run in the pipeline's own thread)."""
    device: str
    video_pipelines: int
    threads: int
    audio_threads: int
    workers: int

    def processes_and_threads(self) -> int:
        """Threads and worker processes of all the rank's pipelines."""
        return (self.video_pipelines * (self.threads + self.workers)
                + self.audio_threads + self.workers)


def resolve_loader(lc, machine: Machine) -> LoaderPlan:
    """A DALI loader config's plan on `machine` (one rank). On a GPU (decoding on NVDEC, the
    cores only demux, slice and feed) a rank's threads and source processes fit its cores:
    loader.workers is the rank's total of source processes, at least one per pipeline;
    threads=0 splits what is left of the cores over the pipelines; auto pipelines stop where
    two cores a pipeline would not be left. On a CPU (decoding is the cores' work) the video
    pipeline gets every core, the log-mel pipeline one thread, and each pipeline
    loader.workers source processes."""
    device = lc.device if lc.device != "auto" else ("gpu" if machine.cuda else "cpu")
    if device != "gpu":
        pipelines = lc.video_pipelines or 1
        threads = lc.threads or default_threads(pipelines, False, machine.cores)
        return LoaderPlan(device, pipelines, threads, lc.threads or 1, lc.workers)
    pipelines = lc.video_pipelines or max(1, min(default_video_pipelines(machine.gpu_name),
                                                 machine.cores // 2 - 1))
    n = pipelines + 1                                   # the video pipelines and the audio one
    # source processes: as many as asked, within what leaves each pipeline a thread; one each
    # at least (0: the sources run in the pipelines' own threads)
    workers = max(1, min(lc.workers, machine.cores - n) // n) if lc.workers else 0
    threads = lc.threads or max(1, (machine.cores - workers * n) // n)
    return LoaderPlan(device, pipelines, threads, threads, workers)


@functools.cache
def spdl_loads_here() -> bool:
    """SPDL is installed and FFmpeg's shared libraries load in this process (the dynamic
    linker found them when python started): the SPDL loader can decode in its threads."""
    import importlib.util
    if importlib.util.find_spec("spdl") is None:
        return False
    try:
        import spdl.io
        spdl.io.demux_config()   # loads libspdl, which loads FFmpeg's libraries
        return True
    except Exception:   # not installed whole, or no FFmpeg on the library path
        return False


def loader_choice(lc, cuda: bool) -> tuple[str, str]:
    """(loader.kind, loader.pool) with "auto" resolved: DALI where it decodes on a GPU
    (loader.device=gpu, or auto with one visible); else the fastest CPU loader that runs here
    (docs/data.md): SPDL where it is installed and FFmpeg's libraries load in this process,
    else PyAV (pip alone installs it); the two give the same batches, bit for bit. Their
    batches are made in threads of the training process on a CPU (no hand-over between
    processes), in worker processes beside a GPU (the training loop keeps the interpreter to
    itself)."""
    gpu_dali = lc.device == "gpu" or (lc.device == "auto" and cuda)
    kind = lc.kind
    if kind == "auto":
        kind = "dali" if gpu_dali else "spdl" if spdl_loads_here() else "pyav"
    pool = lc.pool if lc.pool != "auto" else ("processes" if cuda else "threads")
    return kind, pool


def resolve(cfg, machine: Machine, world: int = 1):
    """A copy of `cfg` with every "auto" setting resolved for `machine` and `world` ranks."""
    from .objectives import Objective

    cfg = copy.deepcopy(cfg)
    m, tc, lc, loss = cfg.model, cfg.train, cfg.loader, cfg.loss
    cuda = machine.cuda
    if m.video == "auto":
        m.video = "r2plus1d_18" if cuda else "tiny"
    if m.audio == "auto":
        m.audio = "default" if cuda else "tiny"
    if tc.precision == "auto":
        tc.precision = "bf16" if cuda else "fp32"
    lc.kind = loader_choice(lc, cuda)[0]   # loader.pool=auto: the PyAV loader decides
    if lc.device == "auto":
        lc.device = "gpu" if cuda else "cpu"
    if lc.kind == "dali":
        plan = resolve_loader(lc, machine)
        lc.video_pipelines, lc.threads = plan.video_pipelines, plan.threads
    objective = Objective.named(loss.kind)
    if loss.impl == "auto":
        loss.impl = objective.default_impl(cuda)
    elif loss.impl == "triton" and not cuda:
        from .kernels.contrastive import INTERPRET
        if not INTERPRET:
            raise ConfigError("loss.impl=triton needs a CUDA GPU (or TRITON_INTERPRET=1 set "
                              "before starting, to run the kernel in Triton's slow interpreter); "
                              "use loss.impl=auto or reference on this machine.")
    if loss.gather_negatives == "auto":
        loss.gather_negatives = "on" if objective.gathers(cfg, world) else "off"
    cfg.prepare.codec = resolve_codec(cfg.prepare.codec, cuda)
    return cfg


def resolve_auto(cfg, cuda: bool):
    """resolve() on this machine with a GPU or not, one process (the older entry point)."""
    import torch
    return resolve(cfg, Machine.here(torch.device("cuda" if cuda else "cpu")))
