"""The CPU twin of "a steady-state training step never waits for the host" (docs/design.md
section 2): the trainer's own step, for every loss setting, run under a torch function mode
that records every call which, on a GPU, would make the host wait for the device:

    reading a tensor on the host      item, tolist, bool / int / float / index of a tensor,
                                      numpy, cpu
    a tensor made from host data      torch.tensor / as_tensor / asarray given a device (a
                                      blocking copy from pageable memory)
    a shape that depends on data      nonzero, masked_select, unique, argwhere, bincount,
                                      one-argument where, boolean-mask indexing,
                                      repeat_interleave without output_size

Three steps warm up (the optimizer makes its state on the first), the next two are traced:
none of those calls may happen. Calls made inside Triton's CPU interpreter are its way of
running a kernel, not the launcher's, and are left out. Gathered negatives run on 2 gloo
ranks."""
from __future__ import annotations

import os
import sys
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import small_cfg, spawn_ranks

READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"}
DATA_SHAPED = {"nonzero", "masked_select", "unique", "unique_consecutive", "argwhere",
               "bincount", "nonzero_static"}
FROM_HOST = {"tensor", "as_tensor", "asarray"}
FAST = ["data.crop=48", "data.clip_frames=8", "data.frame_stride=4", "model.video=tiny",
        "model.audio=tiny", "loader.batch_size=4", "loader.kind=memory",
        "sampler.clips_per_video=4", "train.log_every=1000", "train.ckpt_every=1000",
        "train.loggers=[]", "train.channels_last=false", "train.epochs=2"]
SETTINGS = {
    "infonce_inbatch": ["loss.kind=infonce", "sampler.pairs=inbatch", "sampler.k=1"],
    "infonce_symmetric": ["loss.kind=infonce", "sampler.pairs=inbatch", "sampler.k=1",
                          "loss.symmetric=true"],
    "contrastive_inbatch": ["loss.kind=contrastive", "sampler.pairs=inbatch", "sampler.k=1"],
    "contrastive_inbatch_lossweight": ["loss.kind=contrastive", "sampler.pairs=inbatch",
                                       "sampler.k=1", "sampler.hard_share_as=loss_weight"],
    "contrastive_paired": ["loss.kind=contrastive", "sampler.pairs=paired"],
    "ce_paired": ["loss.kind=ce", "sampler.pairs=paired", "sampler.paired_windows=2"],
    "infonce_triton": ["loss.kind=infonce", "sampler.pairs=inbatch", "sampler.k=1",
                       "loss.impl=triton"],
    "contrastive_triton": ["loss.kind=contrastive", "sampler.pairs=inbatch", "sampler.k=1",
                           "loss.impl=triton"],
    "fp16_scaler": ["loss.kind=infonce", "sampler.pairs=inbatch", "sampler.k=1",
                    "train.precision=fp16"],
    # uint8 video and int16 sound windows, made into the model's inputs in the step
    "pyav_inputs_in_the_step": ["loss.kind=infonce", "sampler.pairs=inbatch", "sampler.k=1",
                                "loader.kind=pyav", "loader.workers=0"],
}


def _in_triton_interpreter() -> bool:
    f = sys._getframe(2)
    while f is not None:
        if f"{os.sep}triton{os.sep}" in f.f_code.co_filename:
            return True
        f = f.f_back
    return False


class HostSyncs(TorchFunctionMode):
    """Records (call, where) for every call above made while the mode is on."""

    def __init__(self):
        super().__init__()
        self.found: list[tuple[str, str]] = []

    def _why(self, func, args, kwargs) -> str | None:
        name = getattr(func, "__name__", "")
        qual = getattr(func, "__qualname__", "")
        method = qual.startswith(("TensorBase.", "Tensor."))
        if method and name in READS:
            return f"Tensor.{name}"
        if name in DATA_SHAPED:
            return name
        if name in FROM_HOST and not method and kwargs.get("device") is not None:
            return f"torch.{name}(..., device=...)"
        if name == "where" and len(args) + len(kwargs) == 1:
            return "torch.where(condition)"
        if name == "repeat_interleave" and "output_size" not in kwargs and any(
                torch.is_tensor(a) and a.dim() > 0 for a in args[1:2]):
            return "repeat_interleave(tensor repeats)"
        if name == "__getitem__" and method:
            index = args[1] if len(args) > 1 else None
            parts = index if isinstance(index, tuple) else (index,)
            if any(torch.is_tensor(p) and p.dtype == torch.bool for p in parts):
                return "boolean-mask indexing"
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = self._why(func, args, kwargs)
        if why and not _in_triton_interpreter():
            where = "".join(traceback.format_stack(limit=6)[:-1])
            self.found.append((why, where))
        return func(*args, **kwargs)


def traced_steps(cfg, out, warm: int = 3, traced: int = 2) -> list[tuple[str, str]]:
    """The trainer's run set up as `fastavts train` does; `warm` steps, then `traced`
    steps under HostSyncs. Returns what it found."""
    from fastavts.train.loop import start

    run = start(cfg, out)

    def epochs():
        e = 0
        while True:
            yield from run.loader.epoch(e)
            e += 1
    try:
        batches = epochs()
        for _ in range(warm):
            run.step_fn(next(batches))
        mode = HostSyncs()
        for _ in range(traced):
            batch = next(batches)       # the loader is the host's side: not traced
            with mode:
                run.step_fn(batch)
        return mode.found
    finally:
        run.loader.close()


def _report(found) -> str:
    return "\n".join(f"{why} at\n{where}" for why, where in found[:5])


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_a_steady_state_step_never_waits_for_the_host(prepared, tmp_path, setting):
    cfg = small_cfg(*FAST, f"train.data={prepared}", *SETTINGS[setting])
    found = traced_steps(cfg, tmp_path / "run")
    assert not found, f"{len(found)} host syncs in two steps of {setting}:\n{_report(found)}"


def test_the_tracer_sees_what_a_gpu_would_wait_for():
    """The mode itself: each kind of call is caught, ordinary device work is not."""
    x = torch.arange(6.0)
    mode = HostSyncs()
    with mode:
        (x * 2).sum()
        torch.full((), 2.0)
        torch.tensor([1.0, 2.0])            # a CPU tensor: no copy to a device by itself
        torch.where(x > 2, x, 0.0)
    assert mode.found == []
    with mode:
        x[2].item()
        bool(x[1] > 0)
        torch.tensor(0.5, device=x.device)
        x[x > 2]
        torch.nonzero(x)
        x.tolist()
    assert [w for w, _ in mode.found] == ["Tensor.item", "Tensor.__bool__",
                                         "torch.tensor(..., device=...)",
                                         "boolean-mask indexing", "nonzero", "Tensor.tolist"]


def _gathered_worker(rank, world, store, prepared, setting, out):
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        cfg = small_cfg(*FAST, f"train.data={prepared}", *SETTINGS[setting],
                        "loss.gather_negatives=on")
        found = traced_steps(cfg, out / f"run{rank}")
        (out / f"found_{rank}.txt").write_text(_report(found) if found else "")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("setting", ["infonce_inbatch", "contrastive_inbatch"])
def test_a_step_with_negatives_gathered_from_two_ranks_never_waits_for_the_host(
        prepared, tmp_path, setting):
    spawn_ranks(_gathered_worker, (2, str(tmp_path / "store"), prepared, setting, tmp_path), 2,
                lambda: all((tmp_path / f"found_{k}.txt").is_file() for k in (0, 1)))
    for rank in (0, 1):
        text = (tmp_path / f"found_{rank}.txt").read_text()
        assert not text, f"rank {rank}, {setting} gathered:\n{text}"
