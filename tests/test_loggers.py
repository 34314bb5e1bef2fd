"""train.loggers: TensorBoard and Weights & Biases (offline mode: no network) get the same
scalars and the resolved config; a resumed run continues the same wandb run; a logger asked
for and missing is a clear configuration error before anything runs."""
import importlib.util
import json

import pytest

from fastavts.config import ConfigError
from fastavts.train import train

from conftest import small_cfg
from test_train import FAST


def _run_file(out, run_id):
    runs = list((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert runs, sorted(p.name for p in (out / "wandb").iterdir())
    return b"".join(p.read_bytes() for p in runs)


def _tb_scalars(out, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    vals = {}
    for d in [out / "tb"]:
        acc = EventAccumulator(str(d))
        acc.Reload()
        vals.update({e.step: e.value for e in acc.Scalars(tag)})
    return vals


def test_wandb_offline_gets_the_scalars_and_config_and_resume_continues_the_run(
        prepared, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is an optional extra (pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    extra = [*FAST, f"train.data={prepared}", "train.epochs=2", "train.lr=0.00123",
             "train.loggers=[tensorboard,wandb]", "train.wandb_project=fastavts-test"]
    out = tmp_path / "run"
    first = train(small_cfg(*extra), out, progress=False, stop_after_steps=2)
    run_id = (out / "wandb_id").read_text().strip()
    rest = train(small_cfg(*extra), out, resume=True, progress=False)
    assert (out / "wandb_id").read_text().strip() == run_id      # the same wandb run
    log = _run_file(out, run_id)
    # the resolved config went with the run (a value set only here), and the scalars: each
    # logged loss as its JSON text, as TensorBoard got them (float32 there)
    assert b"0.00123" in log and b"fastavts-test" in log and b"hard_share_as" in log
    losses = first["losses"] + rest["losses"]
    found = [json.dumps(float(x)).encode() in log for x in losses]
    assert sum(found) >= len(losses) - 1, (found, losses)
    tb = _tb_scalars(out, "loss")
    assert len(tb) >= len(losses) - 1
    for step, v in tb.items():
        assert abs(v - losses[step - 1]) <= 1e-6 * max(1.0, abs(v))


def test_a_logger_asked_for_and_missing_is_a_config_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="wandb is not installed: pip install wandb"):
        small_cfg("train.loggers=[tensorboard,wandb]")
    with pytest.raises(ConfigError, match="train.loggers"):
        small_cfg("train.loggers=[tensorbord]")
    with pytest.raises(ConfigError, match="distinct"):
        small_cfg("train.loggers=[tensorboard,tensorboard]")
    assert list(small_cfg("train.loggers=[]").train.loggers) == []
