"""fastavts export and AVTS.from_pretrained: the folder's layout, the weights read back by the
safetensors library itself, identical outputs against the model rebuilt from the training
checkpoint, each tower alone, the folder accepted where a checkpoint is, and clear refusals."""
import json

import pytest
import torch
import yaml

import fastavts
from fastavts.cli import main as cli
from fastavts.config import build_config, to_yaml
from fastavts.export import export
from fastavts.models.avts import AVTS

from conftest import TINY


def _randomised(model: torch.nn.Module, seed: int) -> dict:
    """Every parameter and buffer (BatchNorm running statistics included) set to values that
    no initialisation gives, so a weight or buffer lost on the way changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in model.state_dict().items():
        if v.dtype.is_floating_point:
            x = torch.randn(v.shape, generator=g) * 0.3
            if k.endswith("running_var"):
                x = x.abs() + 0.5
            state[k] = x
        else:
            state[k] = torch.full_like(v, 7)
    return state


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as the trainer leaves it: checkpoints/last.pt and metrics.json."""
    cfg = build_config(overrides=[*TINY, "model.embed_bn=true", "model.dim=24"])
    model = AVTS.from_config(cfg)
    state = _randomised(model, 3)
    run = tmp_path_factory.mktemp("run")
    (run / "checkpoints").mkdir()
    torch.save(dict(model=state, config=to_yaml(cfg), step=1234, optimizer={"x": 1},
                    command="fastavts train train.data=/data/set model.video=tiny"),
               run / "checkpoints" / "last.pt")
    (run / "metrics.json").write_text(json.dumps(dict(
        sync_acc_easy=0.9731, sync_acc_hard=0.8876, auc_easy=0.9912, auc_hard=0.9345,
        eval_pairs=1024, steps=1234, losses=[1, 2])))
    return run


def _reference(run_dir):
    """The model rebuilt straight from the checkpoint, without the export path."""
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    cfg = build_config(None, (), extra=yaml.safe_load(state["config"]))
    model = AVTS.from_config(cfg)
    model.load_state_dict(state["model"])
    return model.eval(), state


def _inputs(seed=0, b=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 8, 48, 48, generator=g), torch.randn(5, 1, 64, 128, generator=g)


def test_export_layout_weights_and_model_card(run_dir, tmp_path, capsys):
    out = tmp_path / "hub"
    assert cli(["export", str(run_dir / "checkpoints" / "last.pt"), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    # the weights as the safetensors library reads them equal the checkpoint's, every buffer
    from safetensors import safe_open
    _, state = _reference(run_dir)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(state["model"])
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), state["model"][k]), k
    assert "optimizer" not in (out / "model.safetensors").read_bytes()[:4096].decode("latin-1")
    conf = json.loads((out / "config.json").read_text())
    assert conf["model"]["video"] == "tiny" and conf["model"]["dim"] == 24
    assert conf["model"]["embed_bn"] is True and conf["model"]["time_bins"] == 4
    assert conf["inputs"]["clip_frames"] == 8 and conf["inputs"]["crop"] == 48
    assert conf["inputs"]["n_mels"] == 64 and conf["inputs"]["sample_rate"] == 16000
    assert conf["step"] == 1234 and conf["metrics"]["auc_hard"] == 0.9345
    assert "losses" not in conf["metrics"]
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])          # the hub's YAML front matter
    assert front["library_name"] == "fastavts"
    assert "0.9345" in card and "0.8876" in card
    assert "fastavts train train.data=/data/set model.video=tiny" in card
    assert "from_pretrained" in card


def test_from_pretrained_gives_identical_outputs(run_dir, tmp_path):
    out = tmp_path / "m"
    export(run_dir / "checkpoints" / "last.pt", out)
    ref, _ = _reference(run_dir)
    model = fastavts.AVTS.from_pretrained(out)
    assert not model.training and model.config.model.embed_bn
    clip, logmel = _inputs()
    with torch.no_grad():
        for got, want in zip(model(clip, logmel), ref(clip, logmel)):
            assert torch.equal(got, want)
    # an export of an export's source is the same file: the writer is deterministic
    export(run_dir / "checkpoints" / "last.pt", tmp_path / "m2")
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "m2" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("tower", ["audio", "video"])
def test_each_tower_alone(run_dir, tmp_path, tower):
    out = tmp_path / "m"
    export(run_dir / "checkpoints" / "last.pt", out)
    ref, _ = _reference(run_dir)
    model = fastavts.AVTS.from_pretrained(out, towers=(tower,))
    other = "video" if tower == "audio" else "audio"
    assert model.parts() == {f"{tower}_net", f"{tower}_proj"}
    n_ref = sum(p.numel() for n, p in ref.named_parameters() if n.startswith(tower))
    assert sum(p.numel() for p in model.parameters()) == n_ref
    clip, logmel = _inputs(1)
    with torch.no_grad():
        if tower == "audio":
            assert torch.equal(model.embed_audio(logmel)[0], ref.embed_audio(logmel)[0])
        else:
            assert torch.equal(model.embed_video(clip)[0], ref.embed_video(clip)[0])
    with pytest.raises(RuntimeError, match=f"without its {other} tower"):
        (model.embed_video(clip) if other == "video" else model.embed_audio(logmel))
    with pytest.raises(ValueError, match="towers="):
        fastavts.AVTS.from_pretrained(out, towers=("audo",))


def test_commands_take_the_folder_like_the_checkpoint(run_dir, prepared, tmp_path, capsys):
    ckpt = run_dir / "checkpoints" / "last.pt"
    out = tmp_path / "m"
    assert cli(["export", str(ckpt), str(out)]) == 0
    capsys.readouterr()
    res = []
    for src in (ckpt, out):
        assert cli(["eval-sync", str(src), str(prepared), "--clips-per-video", "4", "--json"]) == 0
        res.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    res[0].pop("wall_s", None), res[1].pop("wall_s", None)
    assert res[0] == res[1]
    # the probe's feature cache keys on the weights file inside the folder
    from fastavts.export import weights_file
    assert weights_file(out) == out / "model.safetensors" and weights_file(ckpt) == ckpt


def test_refusals_name_the_file(run_dir, tmp_path, capsys):
    ckpt = run_dir / "checkpoints" / "last.pt"
    bad = tmp_path / "bad.pt"
    bad.write_bytes(ckpt.read_bytes()[:1000])
    assert cli(["export", str(bad), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "bad.pt" in err and "truncated" in err and "Traceback" not in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert cli(["export", str(ckpt), str(busy)]) == 2
    assert "holds other files" in capsys.readouterr().err
    out = tmp_path / "m"
    assert cli(["export", str(ckpt), str(out)]) == 0
    w = out / "model.safetensors"
    w.write_bytes(w.read_bytes()[:500])
    assert cli(["eval-sync", str(out), str(tmp_path), "--json"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "export the checkpoint again" in err
    conf = json.loads((out / "config.json").read_text())
    conf["format"] = "something-else"
    (out / "config.json").write_text(json.dumps(conf))
    assert cli(["eval-sync", str(out), str(tmp_path), "--json"]) == 2
    assert "not a fastavts export" in capsys.readouterr().err


def test_more_refusals_are_one_line_naming_the_file(run_dir, prepared, tmp_path, capsys):
    """Issue 24's cases: an export folder given to export, a tensor of another shape in the
    weights, an edited training_config, export and train targets under a file, offset on a
    folder and on inputs that all fail."""
    from safetensors.torch import load_file, save_file

    ckpt = run_dir / "checkpoints" / "last.pt"
    out = tmp_path / "m"
    assert cli(["export", str(ckpt), str(out)]) == 0
    capsys.readouterr()

    def refused(*args, says: str):
        assert cli(list(args)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0] and "Traceback" not in err[0], err

    refused("export", str(out), str(tmp_path / "again"), says="made by fastavts export")
    w = out / "model.safetensors"
    t = load_file(w)
    key = next(k for k in t if k.endswith("weight") and t[k].dim() == 2)
    t[key] = t[key][:, :-1].contiguous()
    save_file(t, str(w), metadata={"format": "pt"})
    refused("eval-sync", str(out), str(prepared), "--json",
            says="model.safetensors does not match its config.json")
    assert cli(["export", str(ckpt), str(out)]) == 0          # whole again
    conf = json.loads((out / "config.json").read_text())
    conf["training_config"]["model"]["dim"] += 8
    (out / "config.json").write_text(json.dumps(conf))
    capsys.readouterr()
    refused("eval-sync", str(out), str(prepared), "--json", says="does not match its config")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    refused("export", str(ckpt), str(a_file / "m"), says=f"cannot write {a_file / 'm'}")
    refused("train", "--out", str(a_file / "run"), f"train.data={prepared}",
            says=f"cannot write {a_file / 'run'}")
    not_video = tmp_path / "x.mp4"
    not_video.write_bytes(b"not a video at all")
    assert cli(["offset", str(ckpt), str(tmp_path), str(not_video)]) == 2
    cap = capsys.readouterr()
    assert f"{tmp_path}: a folder; offset takes video files" in cap.out
    assert "none of the 2 video(s) could be measured" in cap.err

