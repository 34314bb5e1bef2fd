"""The AVTS model: two towers, each ending in a projection to a `dim`-sized embedding.

    clip  (B, 3, T, H, W) -> video tower -> (B, Cv) -> projection -> v (B, dim)
    audio (M, 1, n_mels, F) -> audio tower -> (M, Ca) -> projection -> a (M, dim)

With loss.kind=ce a sync classifier scores (clip features, audio features) pairs instead of
distances (the paper's baseline). Embeddings are L2-normalised when model.normalize is set, so
distances lie in [0, 2] and a margin of 1 means "farther than orthogonal".
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .audio import AUDIO_NETS
from .video import VIDEO_NETS


def projection(c_in: int, dim: int, batchnorm: bool = False) -> nn.Module:
    """Two-layer head to the embedding; `batchnorm` ends it in BatchNorm without affine
    parameters, so the embeddings are centred over the batch: a tower cannot answer every
    input with the same point (the collapse of the paired margin loss, docs/training.md)."""
    layers = [nn.Linear(c_in, c_in), nn.ReLU(inplace=True), nn.Linear(c_in, dim)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(dim, affine=False))
    return nn.Sequential(*layers)


class AVTS(nn.Module):
    def __init__(self, video: str = "r2plus1d_18", audio: str = "default", dim: int = 128,
                 normalize: bool = True, classifier: bool = False, tiny_width: int = 8,
                 time_bins: int = 0, embed_bn: bool = False, tiny_stem_stride: int = 2,
                 tiny_stem_time_stride: int = 1):
        super().__init__()
        if video not in VIDEO_NETS:
            raise ValueError(f"unknown video net {video!r}; choose one of {', '.join(VIDEO_NETS)}")
        if audio not in AUDIO_NETS:
            raise ValueError(f"unknown audio net {audio!r}; choose one of {', '.join(AUDIO_NETS)}")
        widths = tuple(tiny_width * k for k in (1, 2, 4, 8))
        self.video_net = (VIDEO_NETS[video](widths=widths, time_bins=time_bins,
                                            stem_stride=tiny_stem_stride,
                                            stem_time_stride=tiny_stem_time_stride)
                          if video == "tiny"
                          else VIDEO_NETS[video](time_bins=time_bins))
        self.audio_net = (AUDIO_NETS[audio](widths, time_bins=time_bins) if audio == "tiny"
                          else AUDIO_NETS[audio](time_bins=time_bins))
        self.video_proj = projection(self.video_net.out_dim, dim, embed_bn)
        self.audio_proj = projection(self.audio_net.out_dim, dim, embed_bn)
        self.normalize = normalize
        c = self.video_net.out_dim + self.audio_net.out_dim
        self.classifier = nn.Sequential(nn.Linear(c, 512), nn.ReLU(inplace=True),
                                        nn.Linear(512, 2)) if classifier else None

    TOWERS = {"video": ("video_net", "video_proj"), "audio": ("audio_net", "audio_proj")}

    def keep_towers(self, towers=("video", "audio")) -> AVTS:
        """Drop the towers not named (and the classifier, which needs both): an audio tower
        alone for sound classification, a video tower alone for action recognition."""
        towers = tuple(towers)
        bad = [t for t in towers if t not in self.TOWERS]
        if bad or not towers:
            raise ValueError(f"towers={towers!r}: name one or both of 'video', 'audio'")
        for name, parts in self.TOWERS.items():
            if name not in towers:
                for part in parts:
                    setattr(self, part, None)
        if len(towers) < 2:
            self.classifier = None
        return self

    def parts(self) -> set[str]:
        """Names of the submodules this model has (state-dict key prefixes)."""
        return {name for name, m in self.named_children() if m is not None}

    @classmethod
    def from_pretrained(cls, path, towers=("video", "audio"), device="cpu") -> AVTS:
        """A model exported by `fastavts export` (or a training checkpoint), in eval mode, its
        config at `.config`. `towers=("audio",)` builds and loads the audio tower alone."""
        model, cfg = load_model(path, device=device, towers=towers)
        model.config = cfg
        return model

    @classmethod
    def from_config(cls, cfg, towers=("video", "audio")) -> AVTS:
        """The model a resolved config describes (cfg.model; the sync classifier where the
        loss kind needs one)."""
        from ..objectives import Objective

        m = cfg.model
        model = cls(m.video, m.audio, m.dim, m.normalize,
                    classifier=Objective.named(cfg.loss.kind).needs_classifier,
                    tiny_width=m.tiny_width, time_bins=m.time_bins, embed_bn=m.embed_bn,
                    tiny_stem_stride=m.tiny_stem_stride,
                    tiny_stem_time_stride=m.tiny_stem_time_stride)
        steps = model.video_net.time_steps(cfg.data.clip_frames)
        if m.time_bins > steps:
            raise ConfigError(
                f"model.time_bins={m.time_bins}: {m.video} keeps {steps} time step(s) of a "
                f"{cfg.data.clip_frames}-frame clip (it strides in time), so at most {steps} "
                f"bins can differ; use model.time_bins<={steps}, more data.clip_frames, or a "
                f"net that keeps every frame (mc3_18, tiny)")
        return model.keep_towers(towers)

    def _need(self, tower: str):
        if getattr(self, self.TOWERS[tower][0]) is None:
            raise RuntimeError(f"this model was loaded without its {tower} tower; load it with "
                               f"towers=(..., {tower!r})")

    def embed_video(self, clip):
        self._need("video")
        f = self.video_net(clip)
        v = self.video_proj(f)
        return (F.normalize(v.float(), dim=1) if self.normalize else v), f

    def embed_audio(self, logmel):
        self._need("audio")
        f = self.audio_net(logmel)
        a = self.audio_proj(f)
        return (F.normalize(a.float(), dim=1) if self.normalize else a), f

    def embedding_dtype(self) -> torch.dtype:
        """The dtype of the embeddings forward gives here (inside autocast or not)."""
        if self.normalize:
            return torch.float32
        p = next(self.video_proj.parameters())
        if torch.is_autocast_enabled(p.device.type):
            return torch.get_autocast_dtype(p.device.type)
        return p.dtype

    def forward(self, clip, logmel):
        """(v (B, dim), a (M, dim), clip features (B, Cv), audio features (M, Ca))."""
        v, fv = self.embed_video(clip)
        a, fa = self.embed_audio(logmel)
        return v, a, fv, fa

    def sync_logits(self, fv, fa):
        """Paired (clip i, audio i) -> 2 logits (not in sync, in sync)."""
        return self.classifier(torch.cat([fv, fa], dim=1))


def load_model(path, device="cpu", towers=("video", "audio")) -> tuple[AVTS, object]:
    """(model in eval mode, its config) from a training checkpoint or a folder made by
    `fastavts export` (both read by fastavts/checkpoint.py); `towers` builds and loads only
    the towers named."""
    from ..checkpoint import WEIGHTS, ExportError, read_weights

    cfg, state, exported = read_weights(path)
    model = AVTS.from_config(cfg, towers=towers)
    keep = {k: v for k, v in state.items() if k.split(".")[0] in model.parts()}
    where = (f"{Path(path) / WEIGHTS} does not match its config.json" if exported else
             f"the weights in {path} do not match the config saved with them")
    try:
        missing, unexpected = model.load_state_dict(keep, strict=not exported)
    except RuntimeError as e:   # a tensor of another shape, a key missing or extra
        detail = " ".join(str(e).split("\n\t")[1:2])[:200] or str(e)[:200]
        raise ExportError(f"{where} ({detail}); the file or its config was edited or mixed up "
                          f"with another run's: " + ("export the checkpoint again" if exported
                                                     else "use another checkpoint")) from None
    if missing or unexpected:
        raise ExportError(f"{where} (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                          f"export the checkpoint again")
    return model.to(device).eval(), cfg


def load_exported(path, towers=("video", "audio"), device="cpu") -> tuple[AVTS, object]:
    """(model, cfg) from a folder made by `fastavts export`."""
    from ..checkpoint import ExportError, is_exported
    if not is_exported(path):
        raise ExportError(f"{path} is not a folder made by fastavts export (no config.json)")
    return load_model(path, device=device, towers=towers)
