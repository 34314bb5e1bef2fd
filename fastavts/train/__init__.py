"""The trainer, one module per concern:

    loop.py       the run, top to bottom: setup, data, model, resume, steps, end (`train`)
    step.py       one training step and what it is built from: model wrapping, optimizer,
                  schedule, autocast, scaler (TrainStep; fine-tuning and bench_train use it)
    telemetry.py  progress bar, loggers, profiler / NVTX ranges, GPU counters, the periodic
                  read-back of the losses, the collapse watch, the sync check

and, shared with the other commands: fastavts/runtime.py (processes, seeds, "auto" settings),
fastavts/objectives.py (what each loss kind means), fastavts/checkpoint.py (what is on disk).
"""
from ..checkpoint import (  # noqa: F401 (import paths from before the package)
    RESUME_KEYS,
    checkpoint_candidates,
    load_checkpoint,
    newest_readable_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from ..runtime import resolve, resolve_auto, setup_distributed  # noqa: F401
from .loop import train  # noqa: F401
from .step import TrainStep, build_step, lr_factor, make_optimizer  # noqa: F401
