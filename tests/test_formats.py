"""What older fastavts wrote, today's reads: a training checkpoint and an export folder made by
commit 9632637 (tests/fixtures/format_9632637/, see make.py there) load with the same outputs,
resume with the losses that code computed, and export to the same folder."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from fastavts.checkpoint import read_weights
from fastavts.models.avts import AVTS, load_model

OLD = Path(__file__).parent / "fixtures" / "format_9632637"
EXPECTED = json.loads((OLD / "expected.json").read_text())


def _seeded_input(cfg):
    """The input make.py embedded (its own function: same seed, same shapes)."""
    spec = importlib.util.spec_from_file_location("make_9632637", OLD / "make.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    return make.seeded_input(cfg)


@pytest.mark.parametrize("what", ["last.pt", "export"])
def test_an_old_checkpoint_and_export_load_with_the_same_outputs(what):
    model, cfg = load_model(OLD / what)
    with torch.no_grad():
        v, a, _, _ = model(*_seeded_input(cfg))
    # same weights, same arithmetic: the outputs of the code that wrote them (up to the
    # CPU's own summation order: another machine may round the last bits differently)
    torch.testing.assert_close(v, torch.tensor(EXPECTED["v"]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a, torch.tensor(EXPECTED["a"]), rtol=1e-4, atol=1e-5)
    audio = AVTS.from_pretrained(OLD / what, towers=("audio",))
    assert audio.video_net is None and audio.config.model.tiny_width == 2


def test_an_old_checkpoint_resumes_with_the_losses_the_old_code_computed(prepared, tmp_path):
    """make.py stopped a 9-step run after step 4 and resumed it with the old code; today's
    code resumes the same checkpoint on the same data (the test suite's `prepared` set, made
    the same way) to the same 5 losses."""
    from fastavts.config import build_config, to_yaml
    from fastavts.train import train

    cfg, _, _ = read_weights(OLD / "last.pt")
    cfg = build_config(None, [f"train.data={prepared}"], extra=yaml.safe_load(to_yaml(cfg)))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(OLD / "last.pt", run / "checkpoints" / "last.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as make.py ran
    try:
        r = train(cfg, run, resume=True, progress=False)
    finally:
        torch.set_num_threads(threads)
    print(r["losses"], EXPECTED["resumed_losses"])
    assert r["steps"] == 9
    assert r["losses"] == pytest.approx(EXPECTED["resumed_losses"], rel=1e-3)


def test_an_old_checkpoint_exports_to_the_old_export(tmp_path):
    from safetensors.torch import load_file

    from fastavts.export import export

    out = export(OLD / "last.pt", tmp_path / "export")
    conf = json.loads((out / "config.json").read_text())
    old = json.loads((OLD / "export" / "config.json").read_text())
    assert conf["model"] == EXPECTED["export_model"] == old["model"]
    assert {k: v for k, v in conf.items() if k != "fastavts_version"} == \
        {k: v for k, v in old.items() if k != "fastavts_version"}
    new_w, old_w = load_file(out / "model.safetensors"), load_file(OLD / "export" / "model.safetensors")
    assert new_w.keys() == old_w.keys()
    assert all(torch.equal(new_w[k], old_w[k]) for k in old_w)
    assert (out / "README.md").read_text() == (OLD / "export" / "README.md").read_text()
