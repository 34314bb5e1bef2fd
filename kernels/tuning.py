"""One autotuning for all ranks: the fused kernels' tile choices made once, before training.

Triton autotunes a kernel the first time it meets a new key (here rows, columns, D and the
argument dtypes): it compiles and times every config, which takes seconds to minutes. Left to
the first training step, every rank does it at once, each on its own, while the ranks that
finish first wait in the step's first collective; the ranks may even choose different tiles.

`agree(warm)` runs `warm()` (launches of the kernels at the run's shapes: Objective.warm_up)
on rank 0 alone first, sends its choices to every rank (one broadcast of a few bytes, before
the first step, never inside one), and then lets the other ranks run `warm()` with the choices
adopted: they compile the chosen tile only, which rank 0's compile left in Triton's cache when
the ranks share a machine. Where Triton offers it, the choices are also kept on disk
(`cache_results`, under TRITON_CACHE_DIR), so a resumed or requeued run does not time them
again.
"""
from __future__ import annotations

import inspect

try:
    import triton
except ImportError:  # pragma: no cover
    triton = None

# the choices kept on disk where this Triton can (>= 3.2)
DISK = ({"cache_results": True}
        if triton is not None and "cache_results" in inspect.signature(triton.autotune).parameters
        else {})
_TUNERS: dict = {}


def autotune(configs, key, **kw):
    """triton.autotune (choices kept on disk where Triton can), its autotuner known to agree()
    as "<kernel file>.<kernel name>"."""
    def decorate(jitted):
        tuner = triton.autotune(configs=configs, key=key, **DISK, **kw)(jitted)
        fn = getattr(jitted, "fn", jitted)
        _TUNERS[f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"] = tuner
        return tuner
    return decorate


def autotuners() -> dict:
    """{name: Autotuner} of the fused kernels imported so far (empty without Triton)."""
    return dict(_TUNERS)


def choices() -> dict:
    """{kernel name: {key: Config}}: what each kernel chose for the keys it has met."""
    return {name: dict(t.cache) for name, t in autotuners().items() if t.cache}


def adopt(chosen: dict) -> int:
    """Take `chosen` (from choices(), maybe of another rank) as this process's choices, for the
    keys it has not chosen itself; returns how many were taken."""
    tuners, n = autotuners(), 0
    for name, keys in chosen.items():
        tuner = tuners.get(name)
        if tuner is None:
            continue
        for key, config in keys.items():
            if key not in tuner.cache:
                tuner.cache[key] = config
                n += 1
    return n


def agree(warm, world: int = 1) -> None:
    """Run `warm()` on every rank so that only rank 0 autotunes (module docstring). Every rank
    of the default process group must call it (it holds one broadcast)."""
    if world == 1:
        warm()
        return
    import torch.distributed as dist

    rank = dist.get_rank()
    if rank == 0:
        warm()
    box = [choices() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    if rank != 0:
        adopt(box[0])
        warm()
