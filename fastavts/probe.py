"""`fastavts probe-audio CHECKPOINT --dataset esc50|dcase2014|synth ROOT`: a linear probe of the
pretrained audio network on sound classification.

    recordings (official layout, data/audio_sets.py) -> mono at the checkpoint's sample rate
    -> windows of the pretraining audio window (1.28 s by default), hop half a window
    -> log-mel (data/features.py, as in training) -> audio network, layer --layer
    -> average over frequency and time -> (windows, C) -> mean over a recording's windows
    -> standardise -> linear SVM (scikit-learn LinearSVC) on the official folds

Layers of the audio net: stage1..stage4 (the output of each conv stage, before its pooling),
`features` (what the projection sees; with time bins their concatenation), `embedding` (the
projection, normalised as in training). Features are computed in batches on the GPU when there
is one and cached (under --cache, keyed by checkpoint, layer, dataset files and window), so
trying other SVM settings is instant. `--scratch` probes a randomly initialised network of the
same architecture (the baseline pretraining must beat).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from .data.audio_sets import Item, LayoutError, load_audio, read_audio_set

LAYERS = ("stage1", "stage2", "stage3", "stage4", "features", "embedding")


def default_cache() -> Path:
    return Path(os.environ.get("FASTAVTS_CACHE", Path.home() / ".cache" / "fastavts")) / "probe"


def _stage_ends(audio_net) -> list:
    """The ReLU closing each conv stage of AudioNet.features (two convs per stage)."""
    from torch import nn

    relus = [m for m in audio_net.features if isinstance(m, nn.ReLU)]
    return relus[1::2]


class AudioFeatures:
    """(N, 1, n_mels, frames) log-mel -> (N, C) pooled activations of one layer."""

    def __init__(self, model, layer: str):
        if layer not in LAYERS:
            raise ValueError(f"unknown layer {layer!r}; choose one of {', '.join(LAYERS)}")
        self.model, self.layer = model, layer
        self._out = None
        if layer.startswith("stage"):
            ends = _stage_ends(model.audio_net)
            k = int(layer[-1]) - 1
            if k >= len(ends):
                raise ValueError(f"the audio net has {len(ends)} stages; no {layer}")
            ends[k].register_forward_hook(self._keep)

    def _keep(self, module, inp, out):
        self._out = out.float().mean(dim=(2, 3))       # (N, C, F, T) -> (N, C)

    def __call__(self, logmel):
        import torch

        with torch.no_grad():
            if self.layer == "embedding":
                return self.model.embed_audio(logmel)[0].float()
            f = self.model.audio_net(logmel)
            return f.float() if self.layer == "features" else self._out


def windows_of(wave: np.ndarray, geo, hop: int) -> np.ndarray:
    """(n, geo.length) float32 windows starting every `hop` samples, each with the STFT context
    of training (data/features.py: audio_window) and zeros past the ends; a recording shorter
    than one window gives one."""
    span = geo.frames * geo.hop
    n = max(1, 1 + (len(wave) - span) // hop)
    padded = np.zeros(geo.context + (n - 1) * hop + geo.length, np.float32)
    m = min(len(wave), len(padded) - geo.context)
    padded[geo.context:geo.context + m] = wave[:m]
    return np.stack([padded[k * hop:k * hop + geo.length] for k in range(n)])


def _cache_key(checkpoint, scratch, layer, dataset, items, cfg) -> str:
    h = hashlib.sha1()
    from .checkpoint import weights_file
    w = weights_file(checkpoint)       # a checkpoint file, or an export's model.safetensors
    st = w.stat()
    h.update(json.dumps([str(w.resolve()), st.st_size, st.st_mtime_ns, scratch,
                         layer, dataset, cfg.data.sample_rate, cfg.data.clip_frames,
                         cfg.data.frame_stride, cfg.data.fps, cfg.data.n_mels]).encode())
    for it in items:
        p = it.path.split("::")[0]
        s = Path(p).stat() if os.path.exists(p) else None
        h.update(f"{it.path}|{it.label}|{it.fold}|{s and s.st_size}|{s and s.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def recording_wave(item: Item, sr: int, cache: dict) -> np.ndarray:
    if "::" in item.path:              # a video of a prepared (synthetic) set
        from .data.dataset import Dataset
        root, vid = item.path.split("::")
        ds = cache.get(root) or cache.setdefault(root, Dataset.open(root))
        v = ds.by_id[vid]
        if ds.sample_rate != sr:
            raise LayoutError(f"{root}: audio bank at {ds.sample_rate} Hz, the checkpoint wants "
                              f"{sr} Hz")
        return ds.audio(vid, 0.0, v["duration"])
    return load_audio(item.path, sr)


def extract(model, cfg, items: list[Item], layer: str, device, batch_size: int = 256,
            progress: bool = True) -> np.ndarray:
    """(recordings, C) features: the mean over each recording's windows."""
    import torch
    from tqdm import tqdm

    from .data.features import AudioGeometry, LogMel

    geo = AudioGeometry(cfg.data)
    logmel = LogMel(geo, device)
    feats = AudioFeatures(model, layer)
    hop = geo.frames * geo.hop // 2
    cuda = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else \
        (lambda: torch.autocast("cpu", enabled=False))
    out, buf, owners, opened = [], [], [], {}
    sums: dict[int, torch.Tensor] = {}
    counts = np.zeros(len(items), int)

    def flush():
        if not buf:
            return
        x = torch.from_numpy(np.concatenate(buf)).to(device)
        with autocast():
            f = feats(logmel(x))                                   # (n, C)
        own = np.concatenate(owners)
        for r in np.unique(own):
            s = f[torch.from_numpy(own == r).to(device)].sum(0).cpu()
            sums[r] = sums[r] + s if r in sums else s
            counts[r] += int((own == r).sum())
        buf.clear()
        owners.clear()

    pending = 0
    for r, it in enumerate(tqdm(items, desc="features", unit="rec", disable=not progress)):
        w = windows_of(recording_wave(it, geo.sr, opened), geo, hop)
        buf.append(w)
        owners.append(np.full(len(w), r))
        pending += len(w)
        if pending >= batch_size:
            flush()
            pending = 0
    flush()
    for r in range(len(items)):
        out.append((sums[r] / counts[r]).numpy())
    return np.stack(out).astype(np.float32)


def svm_folds(x: np.ndarray, labels: list[str], folds: np.ndarray, c: float,
              train_test: bool) -> dict:
    """Accuracy per fold of a standardised linear SVM. train_test: fold 1 trains, 2 tests."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    y = np.asarray(labels)
    tests = [2] if train_test else sorted(set(folds.tolist()))
    acc = []
    for k in tests:
        tr, te = (folds == 1, folds == 2) if train_test else (folds != k, folds == k)
        clf = make_pipeline(StandardScaler(), LinearSVC(C=c, max_iter=20000))
        clf.fit(x[tr], y[tr])
        acc.append(float((clf.predict(x[te]) == y[te]).mean()))
    return dict(accuracy=round(float(np.mean(acc)), 4), fold_accuracy=[round(a, 4) for a in acc])


def probe_audio(checkpoint: str | Path, dataset: str, root: str | Path, *, layer: str = "stage4",
                c: float = 1.0, scratch: bool = False, cache_dir: str | Path | None = None,
                batch_size: int = 256, progress: bool = True) -> dict:
    import torch

    from .models.avts import load_model

    t0 = time.perf_counter()
    items = read_audio_set(dataset, root)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_model(checkpoint, device)
    if scratch:   # the same architecture as initialised before training (seeded)
        from .models.avts import AVTS
        torch.manual_seed(cfg.train.seed)
        model = AVTS.from_config(cfg).to(device)
    model.eval()
    cache = Path(cache_dir) if cache_dir else default_cache()
    key = _cache_key(checkpoint, scratch, layer, dataset, items, cfg)
    path = cache / f"{dataset}_{layer}_{key}.npy"
    cached = path.is_file()
    if cached:
        x = np.load(path)
    else:
        x = extract(model, cfg, items, layer, device, batch_size, progress)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npy")
        np.save(tmp, x)
        os.replace(tmp, path)
    folds = np.array([i.fold for i in items])
    res = svm_folds(x, [i.label for i in items], folds, c, train_test=dataset == "dcase2014")
    return dict(dataset=dataset, root=str(root), checkpoint=str(checkpoint), scratch=scratch,
                layer=layer, feature_dim=int(x.shape[1]), recordings=len(items),
                classes=len({i.label for i in items}), svm_c=c, **res,
                features_cached=cached, wall_s=round(time.perf_counter() - t0, 1))
