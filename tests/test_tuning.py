"""The CPU twin of "the fused kernels autotune once, before the first step, on rank 0 for every
rank" (kernels/tuning.py). On a GPU each autotuner times several tile configs the first time it
meets a key; here (Triton's interpreter runs one config) each gets a second config and a
benchmark that records every tuning, and where it happened (while the run was set up, or
inside a step).

  * one process, every fused setting: the run's set-up tunes every key its steps meet, so no
    step tunes (the warm-up launches at the shapes and dtypes of the real step);
  * 2 gloo ranks with gathered negatives: rank 1 times nothing, rank 0 times each key once, and
    both launch with the same tiles (the benchmark makes each rank prefer another config)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import small_cfg, spawn_ranks

FAST = ["data.crop=48", "data.clip_frames=8", "data.frame_stride=4", "model.video=tiny",
        "model.audio=tiny", "loader.batch_size=4", "loader.kind=memory",
        "sampler.clips_per_video=4", "train.log_every=1000", "train.ckpt_every=1000",
        "train.loggers=[]", "train.channels_last=false", "train.epochs=2", "loss.impl=triton",
        "sampler.pairs=inbatch", "sampler.k=1"]
SETTINGS = {
    "contrastive": ["loss.kind=contrastive"],
    "contrastive_lossweight": ["loss.kind=contrastive", "sampler.hard_share_as=loss_weight"],
    "infonce": ["loss.kind=infonce"],
    "infonce_symmetric": ["loss.kind=infonce", "loss.symmetric=true"],
    # embeddings not normalised come out of autocast as fp16: another key
    "contrastive_fp16_raw": ["loss.kind=contrastive", "model.normalize=false",
                             "train.precision=fp16", "loss.margin=1.0"],
}


class Tunings:
    """Gives every fused kernel's autotuner two configs and a benchmark that records, and
    records each tuning as (kernel, key, phase)."""

    def __init__(self, rank: int = 0):
        import triton

        from fastavts.kernels import contrastive, infonce, tuning  # noqa: F401 (registered)

        self.rank, self.phase, self.seen, self.saved = rank, "setup", [], []
        for name, tuner in tuning.autotuners().items():
            c = tuner.configs[0]
            self.saved.append((tuner, tuner.configs, dict(tuner.cache)))
            tuner.configs = [c, triton.Config(dict(c.kwargs), num_warps=max(1, c.num_warps // 2),
                                              num_stages=c.num_stages)]
            tuner.cache.clear()
            tuner.do_bench = self._bench(name, tuner)

    def _bench(self, name, tuner):
        """The timing of the n-th config a tuner tries: configs alternate, rank 0 prefers the
        first, rank 1 the second (nothing is launched). Each tuning is recorded once."""
        calls = iter(range(10 ** 9))

        def do_bench(kernel_call, quantiles):
            n = next(calls)
            if n % 2 == 0:
                a = tuner.nargs
                key = (a["Bn"], a["Mn"], a["D"], str(a["X"].dtype))
                self.seen.append((name, str(key), self.phase))
            return [float((n + self.rank) % 2)] * 3
        return do_bench

    def chosen(self) -> dict:
        from fastavts.kernels import tuning
        return {name: {str(k): str(c) for k, c in keys.items()}
                for name, keys in tuning.choices().items()}

    def restore(self):
        for tuner, configs, cache in self.saved:
            tuner.configs = configs
            tuner.cache.clear()
            tuner.cache.update(cache)
            tuner.__dict__.pop("do_bench", None)


def _run(cfg, out, tunings: Tunings, steps: int = 2):
    from fastavts.train.loop import start

    run = start(cfg, out)
    try:
        tunings.phase = "step"
        batches = run.loader.epoch(0)
        for _ in range(steps):
            run.step_fn(next(batches))
    finally:
        run.loader.close()


@pytest.fixture
def tunings():
    t = Tunings()
    yield t
    t.restore()


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_no_step_autotunes_the_set_up_did_it(prepared, tmp_path, tunings, setting):
    cfg = small_cfg(*FAST, f"train.data={prepared}", *SETTINGS[setting])
    _run(cfg, tmp_path / "run", tunings)
    in_steps = [s for s in tunings.seen if s[2] == "step"]
    assert in_steps == [], f"tuned inside a step (a key the warm-up missed): {in_steps}"
    kernels = {s[0] for s in tunings.seen}
    want = {"infonce._infonce_fwd_kernel", "infonce._infonce_bwd_kernel"} \
        if "infonce" in setting else \
        {"contrastive._inbatch_fwd_kernel", "contrastive._inbatch_bwd_kernel"}
    assert kernels == want, tunings.seen


def test_a_run_without_the_fused_kernels_launches_nothing_to_warm_up(prepared, tmp_path,
                                                                        tunings):
    cfg = small_cfg(*FAST, f"train.data={prepared}", "loss.kind=infonce",
                    "loss.impl=reference")
    _run(cfg, tmp_path / "run", tunings)
    assert tunings.seen == []


def _ranks_worker(rank, world, store, prepared, out):
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    t = Tunings(rank)
    try:
        cfg = small_cfg(*FAST, f"train.data={prepared}", *SETTINGS["infonce_symmetric"],
                        "loss.gather_negatives=on")
        _run(cfg, out / f"run{rank}", t)
        (out / f"rank{rank}.json").write_text(json.dumps(dict(seen=t.seen, chosen=t.chosen())))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_rank_0_tunes_for_every_rank(prepared, tmp_path):
    files = [tmp_path / f"rank{r}.json" for r in range(2)]
    spawn_ranks(_ranks_worker, (2, str(tmp_path / "store"), prepared, tmp_path), 2,
                lambda: all(f.is_file() for f in files))
    r0, r1 = (json.loads(f.read_text()) for f in files)
    assert r1["seen"] == [], f"rank 1 autotuned: {r1['seen']}"
    assert [s[2] for s in r0["seen"]] == ["setup"] * len(r0["seen"]) and r0["seen"]
    # each key once: clips x every rank's windows, and the symmetric reading (the backward
    # kernel runs for both sides of each)
    keys = [(s[0], s[1]) for s in r0["seen"]]
    assert len(keys) == len(set(keys)) == 5, keys
    assert r0["chosen"] == r1["chosen"]
