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
checkpoint (eval-sync, offset, probe-audio, finetune) also takes such a folder. Both formats
are read and written in fastavts/checkpoint.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .checkpoint import (  # noqa: F401 (the names this module had before fastavts.checkpoint)
    CARD,
    CONFIG,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS,
    ExportError,
    is_exported,
    model_card,
    read_checkpoint,
    weights_file,
)
from .models.avts import load_exported, load_model  # noqa: F401


def export(checkpoint: str | os.PathLike, out_dir: str | os.PathLike,
           metrics: str | os.PathLike | None = None) -> Path:
    """Write OUT_DIR/{model.safetensors, config.json, README.md} from a training checkpoint."""
    from .checkpoint import checkpoint_config, write_export
    from .models.avts import AVTS

    ckpt = Path(checkpoint)
    state = read_checkpoint(ckpt)
    cfg = checkpoint_config(state)
    model = AVTS.from_config(cfg)
    try:   # the weights match the config they came with, unless either was edited
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        detail = " ".join(str(e).split("\n\t")[1:2])[:200] or str(e)[:200]
        raise ExportError(f"the weights in {ckpt} do not match the config saved with them "
                          f"({detail}); use an unedited checkpoint of the run") from None
    # BatchNorm's num_batches_tracked is an int64 scalar: safetensors keeps it as it is
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if metrics is None:
        guess = ckpt.parent.parent / "metrics.json"
        metrics = guess if guess.is_file() else None
    m = json.loads(Path(metrics).read_text()) if metrics else {}
    return write_export(Path(out_dir), tensors, cfg, state, m)
