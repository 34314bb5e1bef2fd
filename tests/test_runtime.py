"""fastavts/runtime.py: every "auto" setting resolved in one place, on a copy; and on a GPU a
rank's DALI threads and source processes fit its cores (machines described, not detected)."""
import pytest

from fastavts.config import build_config
from fastavts.demo import GPU_PRESET
from fastavts.runtime import Machine, resolve, resolve_loader

H100 = "NVIDIA H100 80GB HBM3"


def test_resolve_returns_a_resolved_copy_and_a_resolved_config_stays_as_it_is():
    cfg = build_config(overrides=["loader.kind=dali"])
    gpu = resolve(cfg, Machine(cuda=True, gpu_name=H100, cores=16), world=2)
    assert cfg.model.video == "auto" and cfg.loss.impl == "auto"        # not touched
    assert (gpu.model.video, gpu.model.audio, gpu.train.precision) == ("r2plus1d_18", "default", "bf16")
    assert (gpu.loader.device, gpu.loss.impl, gpu.prepare.codec) == ("gpu", "triton", "h264")
    assert gpu.loss.gather_negatives == "off"     # the default margin loss on paired pairs
    assert resolve(gpu, Machine(cuda=False, cores=2), world=2) == gpu   # resumed elsewhere
    cpu = resolve(build_config(overrides=["loss.kind=infonce", "sampler.pairs=inbatch"]),
                  Machine(cuda=False, cores=2), world=2)
    assert (cpu.model.video, cpu.train.precision, cpu.loss.impl) == ("tiny", "fp32", "reference")
    assert cpu.loss.gather_negatives == "on" and cpu.prepare.codec == "vp9"


# (cores of the rank, NVDEC engines' GPU): one H100 on 16 cores (the lent machine), 8 ranks on a
# 64- or 224-core node, 8 ranks on a 16-core node
RANKS = [(16, H100), (8, H100), (28, H100), (2, H100), (4, "NVIDIA A100-SXM4-80GB"),
         (3, "Tesla T4"), (64, "NVIDIA GH200 480GB")]


@pytest.mark.parametrize("cores,gpu", RANKS)
@pytest.mark.parametrize("preset", ["defaults", "gpu demo"])
def test_a_ranks_dali_threads_and_workers_never_exceed_its_cores(cores, gpu, preset):
    """loader.workers, threads and video_pipelines at their defaults or the GPU demo's preset:
    the rank's pipelines (video ones and the log-mel one) hold at most as many threads and
    source processes as the rank has cores, or the fewest that can run (one pipeline of each,
    one thread and one process each) where it has fewer than those."""
    cfg = build_config(overrides=["loader.kind=dali"], base=GPU_PRESET if preset != "defaults" else ())
    plan = resolve_loader(cfg.loader, Machine(cuda=True, gpu_name=gpu, cores=cores))
    total = plan.processes_and_threads()
    print(cores, gpu, preset, plan, total)
    assert plan.device == "gpu" and plan.video_pipelines >= 1
    assert plan.threads >= 1 and plan.workers >= 1
    assert total <= max(cores, 4)
    if cores >= 16:   # enough cores: every NVDEC engine gets its pipeline
        assert plan.video_pipelines == {"NVIDIA A100-SXM4-80GB": 5, "Tesla T4": 2}.get(gpu, 7)


def test_the_gpu_preset_once_started_64_processes_and_64_threads_on_16_cores():
    """What the rule replaced: 8 workers and 8 threads per pipeline for 7 + 1 pipelines."""
    cfg = build_config(overrides=["loader.kind=dali", "loader.workers=8", "loader.threads=8"])
    plan = resolve_loader(cfg.loader, Machine(cuda=True, gpu_name=H100, cores=16))
    assert plan.video_pipelines == 7 and plan.threads == 8    # explicit threads are kept
    auto = resolve_loader(build_config(overrides=["loader.kind=dali"], base=GPU_PRESET).loader,
                          Machine(cuda=True, gpu_name=H100, cores=16))
    assert (auto.video_pipelines, auto.threads, auto.workers) == (7, 1, 1)


def test_on_a_cpu_the_video_pipeline_decodes_on_every_core():
    plan = resolve_loader(build_config(overrides=["loader.kind=dali"]).loader,
                          Machine(cuda=False, cores=2))
    assert (plan.device, plan.video_pipelines, plan.threads, plan.audio_threads) == ("cpu", 1, 2, 1)
    assert plan.workers == 2     # loader.workers per pipeline, as before
