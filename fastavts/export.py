"""`fastavts export CHECKPOINT OUT_DIR`: the trained model as a folder people can share.

    OUT_DIR/model.safetensors   the weights only (no optimizer, RNG or loader state)
    OUT_DIR/config.json         what rebuilds the model and its inputs: towers, sizes, time
                                bins, clip geometry, normalisation, the audio front end (and
                                the whole resolved training config under "training_config")
    OUT_DIR/README.md           a model card: the data, the held-out metrics (metrics.json of
                                the run), the command that made it, how to load it

The layout is a Hugging Face model repository's (README.md with YAML front matter,
config.json, model.safetensors at the top), so `huggingface_hub.upload_folder` takes it as it
is. `fastavts.AVTS.from_pretrained(OUT_DIR)` rebuilds the model with identical outputs;
`towers=("audio",)` builds and loads the audio tower alone. Every command that takes a
checkpoint (eval-sync, offset, probe-audio, finetune) also takes such a folder.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

FORMAT = "fastavts-avts"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
# what the model and its inputs depend on, copied to config.json's top level for readers
_MODEL_KEYS = ("video", "audio", "dim", "tiny_width", "tiny_stem_stride", "tiny_stem_time_stride",
               "time_bins", "normalize", "embed_bn")
_INPUT_KEYS = ("fps", "clip_frames", "frame_stride", "crop", "mean", "std", "sample_rate",
               "n_mels", "win_ms", "hop_ms", "n_fft", "fmin", "fmax", "log_floor_db")


class ExportError(ValueError):
    """A checkpoint or exported folder that cannot be read, with what to do (exit code 2)."""


def is_exported(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def weights_file(path: str | os.PathLike) -> Path:
    """The file whose identity stands for the weights (caches key on it)."""
    p = Path(path)
    return p / WEIGHTS if p.is_dir() else p


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    _readable(tmp)
    os.replace(tmp, path)


def _readable(path) -> None:
    """The umask's permissions (mkstemp makes 0600 files: a shared folder must be readable)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A training checkpoint's contents on the CPU, or an ExportError that names the file."""
    import torch

    p = Path(path)
    if p.is_dir():
        raise ExportError(f"{p} is a folder without {CONFIG}: give a checkpoint file "
                          f"(runs/.../checkpoints/last.pt) or a folder made by fastavts export")
    if not p.is_file():
        raise ExportError(f"checkpoint {p} does not exist")
    try:
        state = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, not a torch file, ...
        raise ExportError(f"checkpoint {p} cannot be read ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else 'no detail'}); it may "
                          f"be truncated: use another ckpt_*.pt of the same run") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ExportError(f"{p} is not a fastavts training checkpoint (no model weights and "
                          f"config in it)")
    return state


def export(checkpoint: str | os.PathLike, out_dir: str | os.PathLike,
           metrics: str | os.PathLike | None = None) -> Path:
    """Write OUT_DIR/{model.safetensors, config.json, README.md} from a training checkpoint."""
    import yaml
    from safetensors.torch import save_file

    from .config import build_config
    from .models.avts import AVTS

    ckpt = Path(checkpoint)
    state = read_checkpoint(ckpt)
    tree = yaml.safe_load(state["config"])
    cfg = build_config(None, (), extra=tree)
    model = AVTS.from_config(cfg)
    model.load_state_dict(state["model"])       # the weights match the config they came with
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder; give a new or empty folder")
    if out.is_dir() and any(p.name not in (WEIGHTS, CONFIG, CARD, ".gitattributes")
                            for p in out.iterdir()):
        raise ExportError(f"{out} holds other files; give a new or empty folder (or one made "
                          f"by fastavts export, which is overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    # BatchNorm's num_batches_tracked is an int64 scalar: safetensors keeps it as it is
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if metrics is None:
        guess = ckpt.parent.parent / "metrics.json"
        metrics = guess if guess.is_file() else None
    m = json.loads(Path(metrics).read_text()) if metrics else {}
    conf = dict(
        format=FORMAT, format_version=FORMAT_VERSION, library_name="fastavts",
        fastavts_version=_version(), step=int(state.get("step", 0)),
        model={k: getattr(cfg.model, k) for k in _MODEL_KEYS} | {
            "classifier": cfg.loss.kind == "ce"},
        inputs={k: getattr(cfg.data, k) for k in _INPUT_KEYS} | {
            "clip_seconds": cfg.data.clip_seconds, "layout": {
                "video": "(B, 3, clip_frames, crop, crop) float, RGB scaled to [0, 1] then "
                         "(x - mean) / std",
                "audio": "(M, 1, n_mels, frames) log-mel in dB (fastavts.data.features.LogMel)"}},
        training_config=tree, command=state.get("command", ""),
        metrics={k: v for k, v in m.items() if isinstance(v, (int, float, str))})
    save_file(tensors, str(out / f".{WEIGHTS}.tmp"), metadata={"format": "pt"})  # one key: a deterministic header
    _readable(out / f".{WEIGHTS}.tmp")
    os.replace(out / f".{WEIGHTS}.tmp", out / WEIGHTS)
    _atomic_write(out / CONFIG, (json.dumps(conf, indent=2, default=str) + "\n").encode())
    _atomic_write(out / CARD, model_card(conf, cfg).encode())
    return out


def _version() -> str:
    from . import __version__
    return __version__


def model_card(conf: dict, cfg) -> str:
    mc, m = conf["model"], conf["metrics"]
    t = cfg.train
    data = t.data or "the synthetic demo set (fastavts synth)"
    rows = [f"| {k} | {m[k]} |" for k in ("sync_acc_easy", "sync_acc_hard", "auc_easy",
                                            "auc_hard", "eval_pairs", "final_loss", "steps",
                                            "clips_per_s") if k in m]
    metrics = ("| metric | value |\n|---|---|\n" + "\n".join(rows)) if rows else \
        "No metrics.json was found next to the checkpoint: no held-out metrics recorded."
    return f"""---
library_name: fastavts
tags:
- audio-visual
- self-supervised
- video
- audio
- avts
---

# AVTS model: {mc['video']} video tower, {mc['audio']} audio tower

Trained with fastavts (self-supervised audio-visual temporal
synchronization, Korbar, Tran and Torresani, NeurIPS 2018) for {conf['step']} steps.

- **Data**: `{data}` (held-out: `{t.eval_data or 'its held-out split'}`)
- **Loss**: {cfg.loss.kind}, pairs: {cfg.sampler.pairs}, curriculum {cfg.sampler.curriculum}
- **Embeddings**: {mc['dim']}-d, L2-normalised: {mc['normalize']}, time bins: {mc['time_bins']}
- **Inputs**: {cfg.data.clip_frames} frames every {cfg.data.frame_stride} at {cfg.data.fps} fps
  ({cfg.data.clip_seconds:.2f} s), {cfg.data.crop}x{cfg.data.crop} crops; log-mel
  {cfg.data.n_mels} bands at {cfg.data.sample_rate} Hz ({cfg.data.win_ms} ms windows every
  {cfg.data.hop_ms} ms). Everything is in `config.json`.
- **Made by**: `{conf['command'] or 'fastavts train (command not recorded)'}`

## Held-out sync evaluation (from the run's metrics.json)

{metrics}

## Load

```python
import fastavts
model = fastavts.AVTS.from_pretrained("PATH")                   # both towers, eval mode
audio = fastavts.AVTS.from_pretrained("PATH", towers=("audio",))  # the audio tower alone
v, features = model.embed_video(clip)       # clip: (B, 3, T, H, W), see config.json "inputs"
a, features = audio.embed_audio(logmel)     # logmel: (M, 1, n_mels, frames)
```

Or give this folder wherever fastavts takes a checkpoint:
`fastavts probe-audio PATH --dataset esc50 ROOT`, `fastavts finetune PATH ...`,
`fastavts eval-sync PATH DATA`, `fastavts offset PATH VIDEO`.
"""


def load_exported(path: str | os.PathLike, towers=("video", "audio"), device="cpu"):
    """(model, cfg) from a folder made by `fastavts export`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .config import build_config
    from .models.avts import AVTS

    p = Path(path)
    try:
        conf = json.loads((p / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{p / CONFIG} cannot be read ({e}); export the checkpoint again") from None
    if conf.get("format") != FORMAT:
        raise ExportError(f"{p / CONFIG} is not a fastavts export (format {conf.get('format')!r}, "
                          f"expected {FORMAT!r})")
    if int(conf.get("format_version", 0)) > FORMAT_VERSION:
        raise ExportError(f"{p} was exported by a newer fastavts (format version "
                          f"{conf['format_version']}); upgrade fastavts")
    if not (p / WEIGHTS).is_file():
        raise ExportError(f"{p / WEIGHTS} is missing; export the checkpoint again")
    cfg = build_config(None, (), extra=conf["training_config"])
    model = AVTS.from_config(cfg, towers=towers)
    try:
        state = load_file(str(p / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise ExportError(f"{p / WEIGHTS} cannot be read ({e}); export the checkpoint "
                          f"again") from None
    keep = {k: v for k, v in state.items() if k.split(".")[0] in model.parts()}
    missing, unexpected = model.load_state_dict(keep, strict=False)
    if missing or unexpected:
        raise ExportError(f"{p / WEIGHTS} does not match config.json (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); export the checkpoint again")
    return model.to(device).eval(), cfg


def load_model(path: str | os.PathLike, device="cpu", towers=("video", "audio")):
    """(model in eval mode, cfg) from a training checkpoint or an exported folder."""
    import yaml

    from .config import build_config
    from .models.avts import AVTS

    if is_exported(path):
        return load_exported(path, towers, device)
    state = read_checkpoint(path)
    cfg = build_config(None, (), extra=yaml.safe_load(state["config"]))
    model = AVTS.from_config(cfg, towers=towers)
    keep = {k: v for k, v in state["model"].items() if k.split(".")[0] in model.parts()}
    model.load_state_dict(keep)
    return model.to(device).eval(), cfg
