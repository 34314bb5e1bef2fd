"""What fastavts keeps on disk for a model, both formats, read and written here only.

Training checkpoint (`<run>/checkpoints/ckpt_<step>.pt` and `last.pt`, torch.save of a dict):

    model      the AVTS state dict (fine-tuning: the classifier's model)
    optimizer, schedule, scaler, loader   their state dicts (the loader's: its sampler position)
    rng        torch / numpy / python (/ cuda) RNG states
    step       steps taken
    config     the resolved config, as YAML text
    command    the command line that made it (for the model card)

`model` and `config` are what a model needs; the rest is what `--resume` needs (RESUME_KEYS).
Written to a temporary file, fsynced and renamed: a crash leaves the previous one whole.

Export folder (`fastavts export CHECKPOINT OUT_DIR`; a Hugging Face model repository's layout):

    OUT_DIR/model.safetensors   the weights only
    OUT_DIR/config.json         format, format_version, the model and input keys, the whole
                                resolved training config under "training_config", metrics
    OUT_DIR/README.md           a model card

`read_weights(path)` reads either into (config, state dict); `fastavts.AVTS.from_pretrained`
and `fastavts.models.avts.load_model` build the model from that.
"""
from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

from .errors import ConfigError, write_failure
from .files import _readable, atomic_write, atomic_write_text  # noqa: F401

FORMAT = "fastavts-avts"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
RESUME_KEYS = ("model", "optimizer", "schedule", "scaler", "loader", "rng", "step")
# what the model and its inputs depend on, copied to config.json's top level for readers
MODEL_KEYS = ("video", "audio", "dim", "tiny_width", "tiny_stem_stride", "tiny_stem_time_stride",
              "time_bins", "normalize", "embed_bn")
INPUT_KEYS = ("fps", "clip_frames", "frame_stride", "crop", "mean", "std", "sample_rate",
              "n_mels", "win_ms", "hop_ms", "n_fft", "fmin", "fmax", "log_floor_db")


class ExportError(ValueError):
    """A checkpoint or exported folder that cannot be read, with what to do (exit code 2)."""


# --------------------------------------------------------------------------------------------
# files


def _first_line(e: BaseException, width: int) -> str:
    return str(e).splitlines()[0][:width] if str(e) else ""


# --------------------------------------------------------------------------------------------
# training checkpoints


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's contents with every tensor on the CPU: the model and optimizer copy them
    to their devices as they load, and the RNG states must stay CPU tensors."""
    import torch
    return torch.load(path, map_location="cpu", weights_only=False)


def save_checkpoint(ckpt_dir: Path, step: int, state: dict, keep_last: int) -> Path:
    """ckpt_<step>.pt written to a temporary file and renamed (atomic), last.pt a second name
    of it (a hard link, renamed into place; a copy where links are refused). Checkpoints after
    `step` (an abandoned future of the run) and the oldest beyond keep_last are removed. A
    failed write leaves no temporary file and raises a DiskError naming the file and cause;
    the checkpoints already there stay whole."""
    import torch

    path = ckpt_dir / f"ckpt_{step:08d}.pt"
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _second_name(path, ckpt_dir / "last.pt")
    except (OSError, RuntimeError) as e:   # torch.save says RuntimeError for a failed write
        err = write_failure(path, e)       # read the disk before the temporary file goes
        tmp.unlink(missing_ok=True)
        raise err from None
    ckpts = sorted(ckpt_dir.glob("ckpt_*.pt"))
    later = [p for p in ckpts if p.name > path.name]
    kept = [p for p in ckpts if p.name <= path.name]
    for old in later + kept[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def _second_name(path: Path, name: Path) -> None:
    """`name` made another name of `path`, atomically."""
    import shutil

    tmp = name.with_name(f".{name.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, name)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def checkpoint_candidates(ckpt_dir: Path) -> list[Path]:
    """last.pt, then ckpt_<step>.pt newest first."""
    return [p for p in [ckpt_dir / "last.pt", *sorted(ckpt_dir.glob("ckpt_*.pt"), reverse=True)]
            if p.is_file()]


def newest_readable_checkpoint(ckpt_dir: Path) -> tuple[dict, Path, list[tuple[Path, str]]]:
    """(state, its path, [(unreadable path, why)]): last.pt, or where it is truncated or
    damaged, the newest ckpt_<step>.pt that reads whole. A ConfigError when none does."""
    unreadable = []
    for path in checkpoint_candidates(ckpt_dir):
        try:
            state = load_checkpoint(path)
        except Exception as e:  # a torn or truncated zip, not a torch file, ...
            unreadable.append((path, f"{type(e).__name__}: {_first_line(e, 120)}"))
            continue
        missing = [k for k in RESUME_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            unreadable.append((path, f"not a full training checkpoint: no {', '.join(missing)}"))
            continue
        return state, path, unreadable
    listed = "; ".join(f"{p.name}: {w}" for p, w in unreadable) or "no checkpoint files"
    raise ConfigError(f"--resume: no readable checkpoint in {ckpt_dir} ({listed}); start the "
                      f"run again without --resume (or in another --out)")


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A training checkpoint's contents on the CPU, or an ExportError that names the file."""
    p = Path(path)
    if p.is_dir() and (p / CONFIG).is_file():
        raise ExportError(f"{p} is a folder made by fastavts export, not a training "
                          f"checkpoint: it is exported already (use it as it is), or give the "
                          f"run's checkpoint (runs/.../checkpoints/last.pt)")
    if p.is_dir():
        raise ExportError(f"{p} is a folder without {CONFIG}: give a checkpoint file "
                          f"(runs/.../checkpoints/last.pt) or a folder made by fastavts export")
    if not p.is_file():
        raise ExportError(f"checkpoint {p} does not exist")
    try:
        state = load_checkpoint(p)
    except Exception as e:  # truncated zip, not a torch file, ...
        raise ExportError(f"checkpoint {p} cannot be read ({type(e).__name__}: "
                          f"{_first_line(e, 200) or 'no detail'}); it may "
                          f"be truncated: use another ckpt_*.pt of the same run") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ExportError(f"{p} is not a fastavts training checkpoint (no model weights and "
                          f"config in it)")
    return state


def checkpoint_config(state: dict):
    """The resolved config a training checkpoint was written with."""
    import yaml

    from .config import build_config
    return build_config(None, (), extra=yaml.safe_load(state["config"]))


def rng_state() -> dict:
    """Every RNG a run draws from, for the checkpoint."""
    import numpy as np
    import torch
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _cpu_bytes(t):
    """An RNG state as torch wants it: a CPU uint8 tensor (a checkpoint loaded with
    map_location='cuda' holds them on the GPU, and set_rng_state refuses those)."""
    import torch
    return t.cpu().to(torch.uint8) if hasattr(t, "cpu") else torch.as_tensor(t, dtype=torch.uint8)


def set_rng_state(s: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(_cpu_bytes(s["torch"]))
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        states = [_cpu_bytes(t) for t in s["cuda"]]
        n = torch.cuda.device_count()
        # a checkpoint from a machine with more GPUs: restore the ones this one has
        torch.cuda.set_rng_state_all(states[:n])


def command_line() -> str:
    """The command line that runs this process (for the exported model card)."""
    import shlex
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("fastavts", "__main__.py", "cli.py"):
        argv[0] = "fastavts"
    elif argv and argv[0].endswith(".py"):
        argv = ["python", *argv]
    return shlex.join(argv)


# --------------------------------------------------------------------------------------------
# export folders


def is_exported(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def weights_file(path: str | os.PathLike) -> Path:
    """The file whose identity stands for the weights (caches key on it)."""
    p = Path(path)
    return p / WEIGHTS if p.is_dir() else p


def write_export(out: Path, tensors: dict, cfg, state: dict, metrics: dict) -> Path:
    """OUT/{model.safetensors, config.json, README.md}: `tensors` the model's state dict (on
    the CPU), `cfg` and `state` the training checkpoint's config and contents."""
    import yaml
    from safetensors.torch import save_file

    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder; give a new or empty folder")
    if out.is_dir() and any(p.name not in (WEIGHTS, CONFIG, CARD, ".gitattributes")
                            for p in out.iterdir()):
        raise ExportError(f"{out} holds other files; give a new or empty folder (or one made "
                          f"by fastavts export, which is overwritten)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_failure(out, e) from None
    conf = dict(
        format=FORMAT, format_version=FORMAT_VERSION, library_name="fastavts",
        fastavts_version=_version(), step=int(state.get("step", 0)),
        model={k: getattr(cfg.model, k) for k in MODEL_KEYS} | {
            "classifier": any(k.startswith("classifier.") for k in tensors)},
        inputs={k: getattr(cfg.data, k) for k in INPUT_KEYS} | {
            "clip_seconds": cfg.data.clip_seconds, "layout": {
                "video": "(B, 3, clip_frames, crop, crop) float, RGB scaled to [0, 1] then "
                         "(x - mean) / std",
                "audio": "(M, 1, n_mels, frames) log-mel in dB (fastavts.data.features.LogMel)"}},
        training_config=yaml.safe_load(state["config"]), command=state.get("command", ""),
        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})
    tmp = out / f".{WEIGHTS}.tmp"
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})  # one key: a fixed header
        _readable(tmp)
        os.replace(tmp, out / WEIGHTS)
    except (OSError, RuntimeError) as e:
        err = write_failure(out / WEIGHTS, e)
        tmp.unlink(missing_ok=True)
        raise err from None
    atomic_write(out / CONFIG, (json.dumps(conf, indent=2, default=str) + "\n").encode())
    atomic_write(out / CARD, model_card(conf, cfg).encode())
    return out


def _version() -> str:
    from ._version import __version__
    return __version__


def read_export(path: str | os.PathLike) -> tuple[object, dict, dict]:
    """(config, state dict, config.json) of a folder made by `fastavts export`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .config import build_config

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
    try:
        state = load_file(str(p / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise ExportError(f"{p / WEIGHTS} cannot be read ({e}); export the checkpoint "
                          f"again") from None
    return cfg, state, conf


def read_weights(path: str | os.PathLike) -> tuple[object, dict, bool]:
    """(config, model state dict, whether it is an export folder) of a training checkpoint
    or an export folder."""
    if is_exported(path):
        cfg, state, _ = read_export(path)
        return cfg, state, True
    state = read_checkpoint(path)
    return checkpoint_config(state), state["model"], False


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
