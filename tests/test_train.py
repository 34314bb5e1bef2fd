"""The trainer: exact resume, non-finite losses, a short convergence run, the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastavts.train import train

from conftest import small_cfg

FAST = ["data.crop=48", "data.clip_frames=8", "data.frame_stride=4", "model.video=tiny",
        "model.audio=tiny", "loader.batch_size=4", "loader.workers=0", "loader.device=cpu",
        "sampler.clips_per_video=2", "train.log_every=1", "train.ckpt_every=1000"]


def cfg_for(prepared, *extra):
    return small_cfg(*FAST, f"train.data={prepared}", *extra)


@pytest.mark.parametrize("kind", ["dali", "pyav", "memory"])
@pytest.mark.parametrize("cut", [3, 4], ids=["at_an_epoch_end", "mid_epoch"])
def test_resume_gives_the_losses_of_an_uninterrupted_run(prepared, tmp_path, kind, cut):
    """3 epochs of 3 steps, cut after step 3 (the checkpoint lands right after an epoch's last
    batch: the saved position is batch 3 of 3) or 4, resumed: the same 9 losses, bit for bit
    on the CPU, with every loader. Paired pairs with a loss of labels and kinds, so batches
    from the wrong plan would show."""
    extra = ["sampler.pairs=paired", "train.epochs=3", f"loader.kind={kind}"]
    full = train(cfg_for(prepared, *extra), tmp_path / "full", progress=False)["losses"]
    assert len(full) == 9
    first = train(cfg_for(prepared, *extra), tmp_path / "cut", progress=False,
                  stop_after_steps=cut)["losses"]
    assert first == full[:cut]
    rest = train(cfg_for(prepared, *extra), tmp_path / "cut", resume=True, progress=False)
    print(kind, cut, full, first + rest["losses"])
    assert rest["losses"] == full[cut:]
    assert rest["steps"] == 9


def test_resume_inbatch_infonce(prepared, tmp_path):
    extra = ["sampler.pairs=inbatch", "loss.kind=infonce", "train.epochs=2"]
    full = train(cfg_for(prepared, *extra), tmp_path / "full", progress=False)["losses"]
    train(cfg_for(prepared, *extra), tmp_path / "cut", progress=False, stop_after_steps=2)
    rest = train(cfg_for(prepared, *extra), tmp_path / "cut", resume=True, progress=False)
    assert rest["losses"] == full[2:]


def _params(state):
    """The learned parameters (BatchNorm's running statistics move with every forward, a
    skipped step's too, as in any trainer)."""
    return {k: v for k, v in state["model"].items() if v.is_floating_point()
            and not k.endswith(("running_mean", "running_var"))}


def test_non_finite_losses_are_skipped_then_stop_with_a_checkpoint(prepared, tmp_path,
                                                                   monkeypatch):
    """Calls 2, 4, 5, 6 give NaN: their updates are skipped on the device (parameters, Adam's
    moments and step count untouched), the third in a row stops the run with a checkpoint."""
    from fastavts.objectives import Contrastive

    real = Contrastive.loss
    calls = {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        loss = real(self, *a, **k)
        return loss * float("nan") if calls["n"] in (2,) or calls["n"] >= 4 else loss

    monkeypatch.setattr(Contrastive, "loss", flaky)
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row"):
        train(cfg_for(prepared, "train.epochs=3", "train.max_nonfinite=3", "train.ckpt_every=3",
                      "train.keep_last=5"), tmp_path, progress=False)
    ckpt = tmp_path / "checkpoints"
    last = torch.load(ckpt / "last.pt", weights_only=False)
    at3 = torch.load(ckpt / "ckpt_00000003.pt", weights_only=False)
    assert last["step"] == 6   # skipped steps count as steps (the schedule moved on)
    p3, p6 = _params(at3), _params(last)
    assert all(torch.equal(p3[k], p6[k]) for k in p3)      # steps 4-6: nothing applied
    assert all(torch.isfinite(v).all() for v in p6.values())
    o3, o6 = at3["optimizer"]["state"], last["optimizer"]["state"]
    assert all(torch.equal(o3[i][k], o6[i][k]) for i in o3 for k in o3[i])
    assert int(o6[0]["step"]) == 2                          # Adam's count: calls 1 and 3


def test_a_short_run_learns(prepared, tmp_path):
    cfg = cfg_for(prepared, "train.epochs=12", "loss.kind=infonce", "sampler.pairs=inbatch",
                  "train.lr=0.003", f"train.eval_data={prepared}")
    r = train(cfg, tmp_path, progress=False)
    losses = np.array(r["losses"])
    print(losses[:5], losses[-5:], {k: r[k] for k in ("auc_easy", "auc_hard", "sync_acc_easy")})
    assert losses[-6:].mean() < 0.8 * losses[:6].mean()
    assert r["auc_easy"] > 0.6  # on its own training videos: above chance after 36 steps
    assert r["collapse"]["first_step"] is None and not r["collapse"]["collapsed_at_end"]
    for f in ("config.yaml", "metrics.json", "checkpoints/last.pt"):
        assert (tmp_path / f).exists()
    assert list((tmp_path / "tb").glob("events.*"))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert {"sync_acc_easy", "sync_acc_hard", "clips_per_s", "wall_s"} <= saved.keys()


def test_cli_trains_prints_one_json_line_and_evaluates_a_checkpoint(prepared, synth_dir,
                                                                      tmp_path):
    cmd = [sys.executable, "-m", "fastavts", "train", "--out", str(tmp_path / "run"), "-q",
           *FAST, f"train.data={prepared}", f"train.eval_data={prepared}", "train.epochs=1",
           "prepare.short_side=64"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"sync_acc_easy", "sync_acc_hard", "clips_per_s", "wall_s"} <= last.keys()
    r = subprocess.run([sys.executable, "-m", "fastavts", "eval-sync",
                        str(tmp_path / "run" / "checkpoints" / "last.pt"), str(prepared), "--json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 0 <= json.loads(r.stdout.strip().splitlines()[-1])["auc_hard"] <= 1
    # offset detection on raw files (any container prepare reads), JSON fields as documented
    files = [str(p) for p in sorted(synth_dir.glob("*.webm"))[:2]]
    r = subprocess.run([sys.executable, "-m", "fastavts", "offset",
                        str(tmp_path / "run" / "checkpoints" / "last.pt"), *files,
                        str(tmp_path / "missing.mp4"), "--max-shift", "3", "--clips", "2",
                        "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert [x["file"] for x in rows[:2]] == files
    for x in rows[:2]:
        assert {"offset_frames", "offset_s", "confidence"} <= x.keys()
        assert -3 <= x["offset_frames"] <= 3 and x["offset_s"] == x["offset_frames"] / 25
    assert "file not found" in rows[2]["error"]


@pytest.mark.parametrize("pairs", ["paired", "inbatch"])
def test_the_fused_kernel_trains_like_the_reference(prepared, tmp_path, pairs):
    """loss.impl=triton (the interpreter here, the GPU there) gives the reference's losses."""
    extra = [f"sampler.pairs={pairs}", "loss.kind=contrastive", "train.epochs=2"]
    ref = train(cfg_for(prepared, *extra, "loss.impl=reference"), tmp_path / "ref",
                progress=False)["losses"]
    tri = train(cfg_for(prepared, *extra, "loss.impl=triton"), tmp_path / "tri",
                progress=False)["losses"]
    print(ref, tri)
    assert len(ref) == len(tri) == 6
    # the first step's loss agrees to fp32 rounding; Adam then amplifies gradient differences
    # of 1e-7 in near-zero components, so later steps drift apart slowly (0.2 % by step 6)
    assert tri[0] == pytest.approx(ref[0], rel=1e-5)
    assert np.allclose(tri, ref, rtol=1e-2)


def test_impl_triton_refused_without_gpu_or_interpreter(prepared, tmp_path, monkeypatch):
    from fastavts.config import ConfigError
    from fastavts.kernels import contrastive

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    monkeypatch.setattr(contrastive, "INTERPRET", False)
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        train(cfg_for(prepared, "loss.kind=contrastive", "loss.impl=triton"), tmp_path,
              progress=False)
    with pytest.raises(ConfigError, match="fused kernels compute loss.kind=contrastive and infonce"):
        cfg_for(prepared, "loss.kind=ce", "loss.impl=triton")


@pytest.mark.parametrize("kind", ["dali", "memory"])
def test_profile_writes_a_trace_with_the_named_ranges(prepared, tmp_path, kind):
    r = train(cfg_for(prepared, "train.epochs=2", "train.profile=true", f"loader.kind={kind}",
                      "train.profile_steps=[1,1,2]"), tmp_path, progress=False)
    traces = list((tmp_path / "profile").glob("*.json*"))
    assert r["steps"] >= 4 and len(traces) == 1
    text = traces[0].read_text()
    for name in ("data", "decode", "audio_features", "forward", "loss", "backward",
                 "optimizer"):
        assert f'"name": "{name}"' in text, name


def test_a_non_finite_loss_on_one_of_two_ranks_is_skipped_by_both(prepared, tmp_path):
    """2 gloo ranks under torchrun, rank 1's loss NaN at its 2nd step: every rank skips that
    update (the decision is all-reduced on the device), none waits forever in DDP's all-reduce,
    and the run finishes with finite parameters (before: no progress in 120 s)."""
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", "29531", str(Path(__file__).parent / "ddp_nonfinite_run.py"),
           str(tmp_path), *FAST, f"train.data={prepared}", "train.epochs=3",
           "loss.kind=infonce", "sampler.pairs=inbatch", "loader.kind=memory"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    print(p.stdout[-2000:], p.stderr[-3000:])
    assert p.returncode == 0
    r = [json.loads((tmp_path / f"result_{k}.json").read_text()) for k in (0, 1)]
    assert r[0]["steps"] == r[1]["steps"] == 3
    assert r[0]["skipped_nonfinite"] == r[1]["skipped_nonfinite"] == 1   # rank 0 skipped too
    assert np.isfinite(r[0]["losses"]).all() and np.isnan(r[1]["losses"][1])
    params = torch.load(tmp_path / "params_0.pt")
    assert all(torch.isfinite(v).all() for v in params.values() if v.is_floating_point())


class _OnTheGpu:
    """Stands for an RNG state that torch.load(map_location='cuda') put on the GPU:
    torch.set_rng_state refuses it; `.cpu()` brings the bytes back."""

    def __init__(self, t):
        self._t, self.device = t, torch.device("cuda", 0)

    def cpu(self):
        return self._t.clone()


def test_rng_states_restore_from_a_checkpoint_whose_tensors_were_moved_to_a_gpu(monkeypatch):
    from fastavts.train import rng_state, set_rng_state

    saved = rng_state()
    want = torch.rand(4)                      # what the restored torch RNG must give
    got_cuda = []

    def strict_cuda_set(states):              # torch.cuda.set_rng_state_all's own rule
        assert all(type(t) is torch.Tensor and t.device.type == "cpu" and t.dtype == torch.uint8
                   for t in states)
        got_cuda.extend(states)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", strict_cuda_set)
    moved = dict(saved, torch=_OnTheGpu(saved["torch"]),
                 cuda=[_OnTheGpu(saved["torch"]), _OnTheGpu(saved["torch"])])  # 2-GPU machine
    torch.rand(100)                           # move the RNG on
    set_rng_state(moved)
    assert torch.equal(torch.rand(4), want)
    assert len(got_cuda) == 1 and torch.equal(got_cuda[0], saved["torch"])


def test_a_checkpoint_written_on_a_gpu_loads_here(tmp_path, monkeypatch):
    """Every tensor of a GPU run's checkpoint is tagged cuda:0; the trainer loads it onto the
    CPU (the model and optimizer then copy what they need to their own device)."""
    import torch.serialization as ser

    from fastavts.train import load_checkpoint, rng_state

    state = dict(model={"w": torch.randn(3)}, rng=rng_state())
    with monkeypatch.context() as m:
        m.setattr(ser, "location_tag", lambda storage: "cuda:0")
        torch.save(state, tmp_path / "gpu.pt")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "gpu.pt", weights_only=False)   # the file does say cuda:0
    back = load_checkpoint(tmp_path / "gpu.pt")
    assert back["model"]["w"].device.type == "cpu" and torch.equal(back["model"]["w"], state["model"]["w"])
    assert back["rng"]["torch"].device.type == "cpu"


@pytest.fixture(scope="module")
def h264_prepared(synth_dir, tmp_path_factory):
    """The small synthetic set prepared as H.264 (NVDEC's codec), once for the module."""
    from fastavts.data.prepare import prepare

    out = tmp_path_factory.mktemp("h264")
    prepare(synth_dir, out, small_cfg("prepare.codec=h264"), progress=False)
    return out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind,loss", [("dali", "contrastive"), ("memory", "infonce"),
                                       ("pyav", "infonce")])
def test_a_steady_state_gpu_step_never_waits_for_the_host(h264_prepared, tmp_path, kind, loss):
    """train.sync_check=3: from the 4th step on, any host-device synchronisation inside a step
    (data included) raises (torch.cuda.set_sync_debug_mode('error')); 9 steps over 3 epochs,
    the fused kernel (contrastive) or InfoNCE, DALI on NVDEC, the in-memory loader (uint8
    video normalised in the step) or the PyAV loader (int16 sound made into log-mel in the step
    too)."""
    cfg = cfg_for(h264_prepared, "loader.device=gpu", f"loader.kind={kind}", "sampler.pairs=inbatch",
                  f"loss.kind={loss}", "train.epochs=3", "train.sync_check=3",
                  "train.log_every=1000", "train.precision=bf16")
    r = train(cfg, tmp_path, progress=False)
    assert r["steps"] == 9 and np.isfinite(r["losses"]).all()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_torchrun_nodes_on_localhost_train_with_gathered_negatives(prepared, tmp_path):
    """Multi-node as users launch it: two torchrun agents (`--nnodes 2`, one process each)
    meeting through a c10d rendezvous on localhost, the fused InfoNCE (interpreter) with every
    rank's windows as negatives; both finish, rank 0 reports."""
    import os

    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "t2n",
           "-m", "fastavts.cli", "train", "--out", str(tmp_path / "run"), "-q", *FAST,
           f"train.data={prepared}", "train.epochs=2", "loss.kind=infonce", "loss.impl=triton",
           "sampler.pairs=inbatch", "loader.kind=memory", "loader.batch_size=3"]
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    outs = [n.communicate(timeout=300) for n in nodes]
    for n, (o, e) in zip(nodes, outs):
        print(o[-1500:], e[-2500:])
        assert n.returncode == 0
    reports = [json.loads(line) for o, _ in outs for line in o.splitlines()
               if line.startswith("{")]
    assert len(reports) == 1                                # rank 0 only
    r = reports[0]
    assert r["world_size"] == 2 and r["negatives_from_ranks"] == 2
    assert r["steps"] == 4 and (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_the_collapse_watch_fires_on_a_collapsed_run(prepared, tmp_path, monkeypatch, capsys):
    """Towers whose outputs ignore their inputs (every clip at one point, every sound 0.5 away:
    the margin loss's label-blind optimum, m^2/4) are reported in the console, TensorBoard and
    metrics.json."""
    import math

    from fastavts.models.avts import AVTS

    theta = 2 * math.asin(0.25)                # unit vectors 0.5 apart

    def blind(self, clip, logmel):
        z = sum(p.sum() for p in self.parameters()) * 0    # keeps the graph, zero gradients
        v = torch.tensor([1.0, 0.0]).repeat(clip.shape[0], 1) + z
        a = torch.tensor([math.cos(theta), math.sin(theta)]).repeat(logmel.shape[0], 1) + z
        return v, a, v, a

    monkeypatch.setattr(AVTS, "forward", blind)
    r = train(cfg_for(prepared, "sampler.pairs=paired", "loss.kind=contrastive",
                      "train.epochs=3", f"train.eval_data={prepared}"), tmp_path, progress=False)
    out = capsys.readouterr().out
    assert "collapse: the loss sits at its label-blind value" in out and "loss.margin" in out
    c = r["collapse"]
    assert c["collapsed_at_end"] and c["first_step"] is not None
    assert c["blind_loss"] == pytest.approx(0.25) and c["loss"] == pytest.approx(0.25, abs=1e-4)
    assert json.loads((tmp_path / "metrics.json").read_text())["collapse"]["collapsed_at_end"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(tmp_path / "tb"))
    ev.Reload()
    assert "collapse/spread" in ev.Tags()["scalars"]


def test_the_collapse_watch_judges_by_the_numbers():
    from fastavts.collapse import Detector
    from fastavts.config import build_config

    d = Detector(build_config(overrides=["loss.kind=contrastive", "loss.margin=1.0"]), 100)
    assert d.collapsed(0.2501, 0.50, 0.50, 0.01, 0.25)          # at m^2/4, pairs alike
    assert not d.collapsed(0.2501, 0.30, 0.70, 0.20, 0.25)      # separated
    assert not d.collapsed(0.10, 0.50, 0.50, 0.01, 0.25)        # not at the blind value
    assert not d.collapsed(float("nan"), 0.5, 0.5, 0.0, 0.25)
    says = [d.update(s, 0.25, [0.5, 0.5, 0.0, 0.25]) for s in range(0, 30, 2)]
    first = next(i for i, x in enumerate(says) if x)
    assert 2 * first >= 10 and "step" in says[first]             # not before a tenth of training
    assert "out of the collapse" in d.update(40, 0.1, [0.2, 0.9, 0.4, 0.25])


def test_a_run_that_fails_mid_step_releases_its_loader_and_loggers(prepared, tmp_path,
                                                                   monkeypatch):
    """Whatever ends a run, its teardown runs once (the loop's finally): here the loss raises
    at the third step; the loader was closed and the TensorBoard writer flushed and closed."""
    from fastavts.data.memory_loader import MemoryLoader
    from fastavts.objectives import Contrastive
    from fastavts.train.telemetry import Metrics

    closed = {"loader": 0, "metrics": 0}
    real_close, real_metrics_close, real_loss = MemoryLoader.close, Metrics.close, Contrastive.loss
    calls = {"n": 0}

    def loss(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise ValueError("a bug in a loss")
        return real_loss(self, *a, **k)

    def close_loader(self):
        closed["loader"] += 1
        return real_close(self)

    def close_metrics(self):
        closed["metrics"] += self.tb is not None
        return real_metrics_close(self)

    monkeypatch.setattr(Contrastive, "loss", loss)
    monkeypatch.setattr(MemoryLoader, "close", close_loader)
    monkeypatch.setattr(Metrics, "close", close_metrics)
    with pytest.raises(ValueError, match="a bug in a loss"):
        train(cfg_for(prepared, "loader.kind=memory", "train.epochs=2"), tmp_path, progress=False)
    assert closed["loader"] >= 1 and closed["metrics"] == 1
    assert list((tmp_path / "tb").glob("events.*"))
