"""Typed configuration: schemas with defaults, YAML diffs, command-line overrides.

Every setting lives in one dataclass below. A run's config is built in three layers, later
ones winning:

    defaults (these dataclasses)  <-  YAML file (only its differences)  <-  key=value overrides

and is then validated as a whole. Anything wrong is refused with a `ConfigError` that names the
key and says what is allowed: an unknown key (with the closest valid spelling), a value of the
wrong type, a value outside its choices or range, or an impossible combination of values.

OmegaConf does the merging and the type coercion ("64" -> 64 for an int field); this module
adds the checks and messages that OmegaConf does not have.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError, write_failure
from .files import atomic_write_text


def _f(default, help: str, choices: Sequence | None = None, min: float | None = None,
       max: float | None = None):
    """A dataclass field carrying its help text and its allowed values."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "min": min, "max": max}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


VIDEO_EXTENSIONS = [".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts",
                    ".mts", ".m2ts", ".flv", ".wmv", ".3gp", ".ogv", ".vob", ".mxf"]


@dataclass
class DataConfig:
    """What one training example is (docs/design.md section 1). `prepare` uses it to reject videos
    too short for one clip and to resample every video to `fps`."""
    fps: float = _f(25.0, "constant frame rate every prepared video is resampled to", min=1, max=240)
    clip_frames: int = _f(16, "frames per clip (T)", min=1, max=512)
    frame_stride: int = _f(2, "take every n-th frame of the resampled video", min=1, max=64)
    sample_rate: int = _f(16000, "audio bank sample rate in Hz (mono int16)",
                          choices=(8000, 16000, 22050, 24000, 32000, 44100, 48000))
    crop: int = _f(112, "square crop fed to the video net (random in train, centre in eval)",
                   min=8, max=1024)
    flip: bool = _f(True, "random horizontal flips in train mode")
    mean: list = _f([0.43216, 0.394666, 0.37645], "RGB mean subtracted after scaling to [0, 1]")
    std: list = _f([0.22803, 0.22145, 0.216989], "RGB std divided by after the mean")
    n_mels: int = _f(64, "mel bands of the log-mel spectrogram", min=8, max=256)
    win_ms: float = _f(25.0, "STFT window length in ms (periodic Hann)", min=1.0)
    hop_ms: float = _f(10.0, "STFT hop in ms (4 audio frames per video frame at 25 fps)",
                       min=1.0, max=1000.0)
    n_fft: int = _f(512, "FFT size (>= the window in samples)", min=16)
    fmin: float = _f(0.0, "lowest mel frequency in Hz", min=0.0)
    fmax: float = _f(0.0, "highest mel frequency in Hz; 0 = sample_rate / 2", min=0.0)
    log_floor_db: float = _f(-100.0, "log-mel floor in dB (10 log10 of power)", max=0.0)

    @property
    def clip_seconds(self) -> float:
        return self.clip_frames * self.frame_stride / self.fps


@dataclass
class SynthConfig:
    """The synthetic audio-visual set (`fastavts synth`): bouncing objects whose floor impacts
    sound with a timbre of their own, silent distractors, background noise."""
    videos: int = _f(64, "number of videos", min=1)
    seed: int = _f(0, "base seed; video i depends only on (seed, i)", min=0)
    codec: str = _f("vp9", "vp9: webm VP9+Opus (DALI decodes it on the CPU); "
                    "h264: mp4 H.264+AAC (GPU decoding); mjpeg: mkv MJPEG+PCM, near-lossless "
                    "and fastest to write and read: a source for prepare (the CPU demo's)",
                    choices=("vp9", "h264", "mjpeg"))
    fps: float = _f(25.0, "frame rate of the generated videos", min=1, max=120)
    width: int = _f(128, "frame width in pixels (even); square frames keep every sounding "
                    "object inside a square training crop", min=32, max=1920)
    height: int = _f(128, "frame height in pixels (even)", min=32, max=1080)
    min_duration: float = _f(4.0, "shortest video in seconds", min=0.5)
    max_duration: float = _f(12.0, "longest video in seconds", min=0.5, max=3600.0)
    sample_rate: int = _f(48000, "audio sample rate of the generated files",
                          choices=(16000, 24000, 48000))
    min_objects: int = _f(1, "fewest sounding objects per video", min=1, max=6)
    max_objects: int = _f(3, "most sounding objects per video (each of a different kind)",
                          min=1, max=6)
    max_distractors: int = _f(2, "most silent distractor objects per video", min=0, max=6)
    min_interval: float = _f(0.35, "shortest time between two impacts of one object (s)", min=0.05)
    max_interval: float = _f(1.2, "longest time between two impacts of one object (s)", min=0.05,
                             max=60.0)
    min_event_gap: float = _f(0.08, "shortest time between impacts of different objects (s)",
                              min=0.0)
    noise_db: list = _f([-45.0, -32.0], "background noise level range in dBFS [low, high]")
    workers: int = _f(0, "parallel processes; 0 = one per CPU core", min=0)


@dataclass
class PrepareConfig:
    """`fastavts prepare`: re-encode for random access, build the audio bank and the manifest."""
    codec: str = _f("auto", "output video codec: h264 (GPU decoding with DALI mixed), vp9 "
                    "(DALI's CPU decoder), auto = h264 if a CUDA GPU is visible, else vp9",
                    choices=("auto", "h264", "vp9"))
    short_side: int = _f(128, "resize so the shorter side has this many pixels (even)",
                         min=16, max=2160)
    keyframe_interval: int = _f(16, "a keyframe every n frames (random access cost)", min=1,
                                max=600)
    crf: int = _f(-1, "quality (constant rate factor); -1 = codec default (h264 20, vp9 32)",
                  min=-1, max=63)
    segment_seconds: float = _f(0.0, "cut videos into segments of this length; 0 = one file",
                                min=0.0)
    workers: int = _f(0, "parallel processes; 0 = one per CPU core", min=0)
    timeout_s: float = _f(900.0, "give up on one input after this many seconds", min=1.0)
    min_audio_peak_db: float = _f(-60.0, "reject audio tracks whose peak is below this (dBFS)",
                                  max=0.0)
    require_audio: bool = _f(True, "reject videos without usable sound (sync learning needs "
                             "it); false keeps them, silent, for fine-tuning sets (UCF101, "
                             "HMDB51 have many)")
    label_from: str = _f("auto", "where labels come from: auto (CSV column, else sidecar "
                         "<video>.json), csv, sidecar, folder (parent folder name), none",
                         choices=("auto", "csv", "sidecar", "folder", "none"))
    video_root: str = _f("", "CSV input: folder the CSV's paths are relative to "
                         "(default: the CSV's folder)")
    extensions: list = _f(VIDEO_EXTENSIONS, "file extensions taken as videos in a folder input")


@dataclass
class SamplerConfig:
    """Which clips and audio windows make a batch (docs/design.md section 1)."""
    pairs: str = _f("paired", "paired: one (clip, audio, label) per element; inbatch: each clip "
                    "brings its aligned and k hard windows, all B x B(1+k) pairs count",
                    choices=("paired", "inbatch"))
    k: int = _f(1, "inbatch: hard-negative windows per clip", min=0, max=16)
    positive_share: float = _f(0.5, "paired: share of positives in a batch", min=0.0, max=1.0)
    paired_windows: int = _f(1, "paired: audio windows per clip: 1 = every example its own "
                             "clip (positive_share of them with their aligned window); 2 = "
                             "every clip with its aligned window and one negative (half "
                             "positives; each step compares a clip's own sound with a wrong "
                             "one)", choices=(1, 2))
    hard_min_shift: float = _f(0.5, "a hard negative is shifted by at least this (s)", min=0.0)
    superhard_share: float = _f(0.0, "paired: share of negatives that are super-hard (same "
                                "video, shifted less than hard_min_shift); 0 = off",
                                min=0.0, max=1.0)
    superhard_min_shift: float = _f(0.08, "a super-hard negative is shifted by at least this",
                                    min=0.0)
    curriculum: list = _f([[0.0, 0.0], [0.333, 0.25]], "hard-negative share among negatives: "
                          "[[at, share], ...], piecewise constant from each `at` on")
    curriculum_unit: str = _f("fraction", "unit of the curriculum's `at`",
                              choices=("fraction", "epoch", "step"))
    hard_share_as: str = _f("sample", "what the curriculum's hard share means: sample = the "
                            "share of sampled negatives that are hard, every negative pair "
                            "weighing the same (the paper's curriculum; inbatch: each of a clip's "
                            "k extra windows is hard with that probability, else a window of "
                            "another video); loss_weight = inbatch: all k extra windows hard, "
                            "the hard pairs' mean weighted by the share in the loss (each hard "
                            "pair then weighs ~20x an easy one at batch 32)",
                            choices=("sample", "loss_weight"))
    clips_per_video: int = _f(1, "clips drawn from each video per epoch", min=1)
    group_clips: bool = _f(False, "train: a video's clips_per_video clips go into the same "
                           "batch (videos are permuted, not clips), so in inbatch mode each "
                           "clip's sound is a hard negative for the video's other clips (those "
                           "shifted by >= hard_min_shift) at no extra audio window")
    seed: int = _f(0, "sampling seed: plans depend on (seed, epoch, batch, rank, world)", min=0)


@dataclass
class LoaderConfig:
    """How batches are decoded: DALI (on a GPU; its CPU decoder on request), SPDL or PyAV
    (the CPU default: SPDL where its FFmpeg loads, else PyAV), decord, or from frames decoded
    once and kept in memory (small sets on a CPU)."""
    kind: str = _f("auto", "auto: dali where it decodes on a GPU (loader.device=gpu, or auto "
                   "with one visible), else spdl where it is installed and FFmpeg's libraries "
                   "load in this process, else pyav (the same batches); "
                   "dali: fn.decoders.video + DALI log-mel; pyav: workers decoding with "
                   "PyAV, log-mel in PyTorch in the step; memory: each video decoded once (PyAV) and kept in RAM, batches cut from it in the training process "
                   "(small sets on a CPU, where decoding would take the cores the model needs); "
                   "decord: the pyav loader decoding with decord (a benchmark baseline; "
                   "pip install decord); spdl: the pyav loader decoding with SPDL, the "
                   "fastest CPU decoder here (pip install 'fastavts[spdl]'; FFmpeg's shared "
                   "libraries: loader.ffmpeg_libs)",
                   choices=("auto", "dali", "pyav", "memory", "decord", "spdl"))
    device: str = _f("auto", "where DALI runs: gpu (mixed decoding, needs H.264/HEVC/VP9 and a "
                     "GPU), cpu (VP8/VP9/MJPEG only), auto = gpu if one is visible",
                     choices=("auto", "gpu", "cpu"))
    batch_size: int = _f(32, "clips per batch on each rank", min=1)
    workers: int = _f(2, "processes preparing batches: PyAV/SPDL/decord workers (threads "
                      "with loader.pool=threads); DALI source workers (per "
                      "pipeline on a CPU; on a GPU the rank's total, at least one per "
                      "pipeline)", min=0)
    threads: int = _f(0, "DALI CPU threads per pipeline; 0 = auto: on a GPU what the source "
                      "workers leave of this rank's cores, over its pipelines; on a CPU all its "
                      "cores for the video pipeline, one for the log-mel pipeline", min=0)
    video_pipelines: int = _f(0, "DALI video pipelines per rank, taking batches in turn (one "
                              "pipeline drives one NVDEC engine); 0 = auto: one per NVDEC "
                              "engine of the GPU (7 on H100/H200; fewer where the rank has under "
                              "2 cores a pipeline), 1 on a CPU", min=0, max=64)
    pool: str = _f("auto", "pyav, spdl, decord: the workers as processes (a DataLoader: a "
                   "crash inside a decoder stays in its worker) or threads of the training "
                   "process (no hand-over of the batches, the faster on a CPU: docs/data.md; the "
                   "decoders run without the GIL); auto = threads on a CPU, processes beside "
                   "a GPU", choices=("auto", "processes", "threads"))
    ffmpeg_libs: str = _f("", "loader.kind=spdl: folder of FFmpeg's shared libraries "
                          "(libavcodec.so.N) for the workers; pyav = those PyAV's wheel "
                          "carries; empty = the system's")
    prefetch: int = _f(2, "batches prepared ahead", min=1)
    max_faults: int = _f(100, "stop after this many undecodable samples in one epoch", min=0)
    memory_gb: float = _f(8.0, "loader.kind=memory: refuse sets whose decoded frames would "
                          "take more than this many GiB of RAM", min=0.0)


@dataclass
class ModelConfig:
    video: str = _f("auto", "video tower; auto = tiny on CPU, r2plus1d_18 on a GPU",
                    choices=("auto", "r2plus1d_18", "mc3_18", "r3d_18", "tiny"))
    audio: str = _f("auto", "audio tower; auto = tiny on CPU, default on a GPU",
                    choices=("auto", "default", "tiny"))
    dim: int = _f(128, "embedding size of both projections", min=2)
    tiny_width: int = _f(8, "tiny towers: width of the first stage (then x2, x4, x8)", min=2)
    tiny_stem_stride: int = _f(2, "tiny video tower: spatial stride of its stem (4 puts the "
                               "first stage at a quarter of the crop's side: the tower ~2.5x "
                               "cheaper on a CPU)", choices=(2, 4))
    tiny_stem_time_stride: int = _f(1, "tiny video tower: time stride of its stem's temporal "
                                    "convolution (2: clips of 2n frames taken twice as often "
                                    "cost about what n frames cost after the stem, their "
                                    "motion seen at the finer spacing)", choices=(1, 2))
    time_bins: int = _f(0, "keep this many time steps in both towers' features before the "
                        "projection (0 = global pooling); at most what the video net keeps "
                        "(R(2+1)D-18/R3D-18: clip_frames / 8; MC3-18, tiny: clip_frames)", min=0)
    normalize: bool = _f(True, "L2-normalise the embeddings (distances in [0, 2])")
    embed_bn: bool = _f(False, "end both projections in BatchNorm without affine parameters "
                        "(embeddings centred over the batch): a tower cannot map every input "
                        "to one point, the collapse of the paired margin loss")


@dataclass
class LossConfig:
    # the choices are the objectives there are (fastavts/objectives.py), checked in validate
    kind: str = _f("contrastive", "contrastive (AVTS), ce (sync classifier, paired pairs only) "
                   "or infonce")
    impl: str = _f("auto", "contrastive and InfoNCE implementation: triton (the fused kernels, "
                   "CUDA or TRITON_INTERPRET=1), reference (plain PyTorch), auto = triton on a "
                   "GPU", choices=("auto", "triton", "reference"))
    gather_negatives: str = _f("auto", "under DDP, every rank's audio windows become negatives "
                               "of every rank's clips (all-gathered with gradients; the loss and "
                               "DDP's gradients are those of one process on the whole batch): "
                               "on, off, auto = on for in-batch losses (contrastive with "
                               "sampler.pairs=inbatch, infonce)", choices=("auto", "on", "off"))
    margin: float = _f(1.0, "contrastive margin on the distance", min=0.0)
    temperature: float = _f(0.1, "InfoNCE temperature", min=1e-4, max=100.0)
    symmetric: bool = _f(False, "infonce: also each audio window against the batch's clips "
                         "(the same pairs read by column, CLIP-style); the loss is the mean of "
                         "both directions")
    sync_tol: float = _f(0.02, "inbatch: a window this close to the clip's start is aligned",
                         min=0.0)


@dataclass
class TrainConfig:
    data: str = _f("", "prepared training set; empty = the synthetic demo (made if missing)")
    eval_data: str = _f("", "prepared held-out set for the final sync evaluation")
    out: str = _f("", "run directory; empty = runs/<date-time>")
    epochs: int = _f(10, "passes over the training set", min=1)
    optimizer: str = _f("adamw", "adamw (fused on a GPU) or sgd (momentum 0.9)",
                        choices=("adamw", "sgd"))
    lr: float = _f(1e-3, "peak learning rate", min=0.0, max=10.0)
    weight_decay: float = _f(1e-4, "decoupled weight decay", min=0.0, max=1.0)
    warmup: float = _f(0.05, "share of training spent warming the learning rate up",
                       min=0.0, max=1.0)
    grad_clip: float = _f(1.0, "clip the gradient norm to this; 0 = off", min=0.0)
    precision: str = _f("auto", "auto = bf16 autocast on a GPU, fp32 on CPU; fp16 uses a "
                        "grad scaler", choices=("auto", "bf16", "fp16", "fp32"))
    channels_last: bool = _f(True, "channels_last_3d memory format for the video tower (cuDNN's "
                             "fast 3D layout; the CPU demo turns it off: slower for the tiny net "
                             "on a CPU)")
    compile: bool = _f(False, "torch.compile the model")
    ckpt_every: int = _f(200, "write a checkpoint every n steps (and at the end)", min=1)
    keep_last: int = _f(3, "checkpoints kept (last.pt always points at the newest)", min=1)
    checkpoint_signal: str = _f("USR1", "the signal that makes a run write a checkpoint at the "
                                "next step and go on (SLURM: --signal=USR1@120); SIGTERM and "
                                "SIGINT checkpoint and stop. none = leave it alone",
                                choices=("USR1", "USR2", "HUP", "none"))
    log_every: int = _f(10, "steps between reads of the loss on the host (progress bar, "
                        "TensorBoard scalars, the non-finite check); the steps in between never "
                        "wait for the GPU", min=1)
    sync_check: int = _f(0, "GPU: from this step on, any host-device synchronisation inside a "
                         "training step is an error (torch.cuda.set_sync_debug_mode('error'); "
                         "the log_every reads excepted); 0 = off", min=0)
    max_nonfinite: int = _f(20, "stop after this many non-finite losses in a row (each one's "
                            "update is skipped on every rank; counted on the device, checked "
                            "every log_every steps)", min=1)
    seed: int = _f(0, "seed of model init and torch RNGs", min=0)
    loggers: list = _f(["tensorboard"], "where scalars go: tensorboard (<run>/tb), wandb "
                       "(Weights & Biases: pip install wandb; WANDB_MODE=offline works "
                       "without a network); [] = metrics.json only")
    wandb_project: str = _f("fastavts", "wandb: the project runs are logged to")
    wandb_entity: str = _f("", "wandb: team or user; empty = wandb's default")
    profile: bool = _f(False, "write a torch.profiler trace of a few steps to <run>/profile "
                       "(TensorBoard / Perfetto), with named ranges for data, forward, loss, "
                       "backward and optimizer")
    profile_steps: list = _f([10, 3, 5], "profile: [wait, warmup, active] steps")
    nvtx: bool = _f(False, "emit NVTX ranges (data, forward, loss, backward, optimizer) for "
                    "Nsight Systems, without the torch profiler")
    gpu_counters: bool = _f(True, "sample NVML counters (SM and memory utilisation, memory, "
                            "power, clocks) during training; off without a GPU")
    eval_clips: int = _f(32, "final sync evaluation: clips per held-out video (half positives, "
                         "a quarter easy, a quarter hard negatives)", min=2)
    demo_videos: int = _f(160, "demo: synthetic training videos", min=4)
    demo_heldout: int = _f(64, "demo: held-out synthetic videos", min=4)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --------------------------------------------------------------------------------------------
# Building and checking


def _schema_keys(cls) -> dict:
    """{field name: field} of a dataclass."""
    return {f.name: f for f in dataclasses.fields(cls)}


def _check_keys(tree: Any, cls, where: str, prefix: str = "") -> None:
    """Refuse keys that are not in the schema, naming the allowed ones and the closest match."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or '<root>'}' must be a mapping of "
                          f"keys to values, got {type(tree).__name__} {tree!r}")
    fields = _schema_keys(cls)
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" Did you mean '{prefix}{near[0]}'?" if near else ""
            raise ConfigError(f"{where}: unknown key '{full}'.{hint} Allowed keys"
                              f"{' in ' + repr(prefix.rstrip('.')) if prefix else ''}: "
                              f"{', '.join(fields)}.")
        ftype = fields[key].type
        sub = _dataclass_of(ftype)
        if sub is not None:
            _check_keys(value, sub, where, prefix=f"{full}.")
        elif ftype in (list, "list") and not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {full}={value!r} must be a list, like "
                              f"{fields[key].metadata.get('help', '')!r} says "
                              f"(e.g. {full}=[...]).")
        elif ftype not in (list, "list") and isinstance(value, (dict, list, tuple)):
            t = ftype if isinstance(ftype, str) else getattr(ftype, "__name__", str(ftype))
            raise ConfigError(f"{where}: {full}={value!r} must be a single {t}, not a "
                              f"{'mapping' if isinstance(value, dict) else 'list'}.")
        elif ftype in (bool, "bool") and not (
                isinstance(value, bool) or value in (0, 1)
                or str(value).lower() in ("true", "false", "yes", "no", "on", "off")):
            # OmegaConf would take any number as a bool (-1 -> true)
            raise ConfigError(f"{where}: {full}={value!r} is not a boolean; use true or false.")


def _on_off_words(tree: dict, cls) -> None:
    """YAML reads on/off/yes/no as booleans; a text setting whose choices are on/off/... gets
    the word back (loss.gather_negatives=on, `gather_negatives: off` in a file)."""
    fields = _schema_keys(cls)
    for key, value in tree.items():
        f = fields[key]
        sub = _dataclass_of(f.type)
        if sub is not None and isinstance(value, dict):
            _on_off_words(value, sub)
        elif isinstance(value, bool) and {"on", "off"} <= set(f.metadata.get("choices") or ()):
            tree[key] = "on" if value else "off"


def _dataclass_of(ftype):
    if isinstance(ftype, str):
        ftype = {"DataConfig": DataConfig, "SynthConfig": SynthConfig,
                 "PrepareConfig": PrepareConfig, "SamplerConfig": SamplerConfig,
                 "LoaderConfig": LoaderConfig, "ModelConfig": ModelConfig,
                 "LossConfig": LossConfig, "TrainConfig": TrainConfig}.get(ftype)
    return ftype if dataclasses.is_dataclass(ftype) else None


def _parse_overrides(overrides: Sequence[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value "
                              f"(for example prepare.workers=4)")
        key, _, raw = item.partition("=")
        try:
            value = OmegaConf.to_container(OmegaConf.from_dotlist([f"x={raw}"]))["x"]
        except OmegaConfBaseException as e:
            raise ConfigError(f"override '{item}': cannot parse value '{raw}': {e}") from None
        node = tree
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override")
        node[parts[-1]] = value
    return tree


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        tree = OmegaConf.to_container(OmegaConf.load(path)) or {}
    except Exception as e:  # yaml.YAMLError and OmegaConf's own
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
    return tree


def build_config(yaml_path: str | os.PathLike | None = None,
                 overrides: Sequence[str] = (), extra: dict | None = None,
                 base: Sequence[str] = ()) -> Config:
    """Defaults <- `base` (a preset, as overrides) <- YAML file <- `extra` (command-line
    flags) <- key=value overrides."""
    layers = [(OmegaConf.structured(Config), "defaults")]
    if base:
        layers.append((_parse_overrides(base), "preset"))
    if yaml_path:
        layers.append((load_yaml(yaml_path), f"config file '{yaml_path}'"))
    if extra:
        layers.append((extra, "command-line flags"))
    if overrides:
        layers.append((_parse_overrides(overrides), "command-line overrides"))
    merged = layers[0][0]
    for tree, where in layers[1:]:
        _check_keys(tree, Config, where)
        _on_off_words(tree, Config)
        try:
            merged = OmegaConf.merge(merged, tree)
        except OmegaConfBaseException as e:
            raise ConfigError(_explain_omegaconf(e, where)) from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: a value of the wrong kind ({e}); `fastavts info "
                              f"--config` lists every setting with its type") from None
    cfg: Config = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def changed_settings(before: Config, after: Config) -> list[tuple[str, object, object]]:
    """(section.key, was, now) of every setting that differs between two configs."""
    a = OmegaConf.to_container(OmegaConf.structured(before))
    b = OmegaConf.to_container(OmegaConf.structured(after))
    return [(f"{sec}.{k}", a[sec][k], b[sec][k]) for sec in b for k in b[sec]
            if a.get(sec, {}).get(k) != b[sec][k]]


def _explain_omegaconf(e: OmegaConfBaseException, where: str) -> str:
    key = getattr(e, "full_key", None) or "?"
    fields = {}
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(_dataclass_of(section.type)):
            fields[f"{section.name}.{f.name}"] = f
    f = fields.get(key)
    expected = ""
    if f is not None:
        t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        expected = f" It must be of type {t} ({f.metadata.get('help')})."
    value = getattr(e, "value", None)
    return f"{where}: bad value {value!r} for '{key}'.{expected}"


LOGGERS = ("tensorboard", "wandb")


def _bounds(m) -> str:
    lo, hi = m.get("min"), m.get("max")
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    return f" >= {lo}" if lo is not None else (f" <= {hi}" if hi is not None else "")


def _flat(xs):
    for x in xs:
        if isinstance(x, (list, tuple)):
            yield from _flat(x)
        else:
            yield x


def validate(cfg: Config) -> None:
    """Every field against its choices and range, then each section's own rules, then the rules
    that join sections (among them what the loss kind refuses: fastavts/objectives.py)."""
    _check_fields(cfg)
    for check in (_check_synth, _check_prepare, _check_data, _check_sampler, _check_loader,
                  _check_train, _check_across):
        check(cfg)


def _check_fields(cfg: Config) -> None:
    """Each value is finite and inside its field's choices and range; loss.kind names an
    objective."""
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        for f in dataclasses.fields(sub):
            key, v = f"{section.name}.{f.name}", getattr(sub, f.name)
            m = f.metadata
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{key}={v} is not a finite number; give a number"
                                  f"{_bounds(m)} (default {f.default}).")
            if isinstance(v, list) and any(isinstance(x, float) and not math.isfinite(x)
                                           for x in _flat(v)):
                raise ConfigError(f"{key}={v} holds a value that is not a finite number.")
            if m.get("choices") and v not in m["choices"]:
                raise ConfigError(f"{key}={v!r} is not allowed; choose one of "
                                  f"{', '.join(map(str, m['choices']))}.")
            if m.get("min") is not None and v < m["min"]:
                raise ConfigError(f"{key}={v!r} is too small: the minimum is {m['min']}.")
            if m.get("max") is not None and v > m["max"]:
                raise ConfigError(f"{key}={v!r} is too large: the maximum is {m['max']}.")
    from .objectives import Objective
    Objective.named(cfg.loss.kind)   # the kinds are the objectives there are


def _check_synth(cfg: Config) -> None:
    s = cfg.synth
    if s.width % 2 or s.height % 2:
        raise ConfigError(f"synth.width and synth.height must be even (4:2:0 video), got "
                          f"{s.width}x{s.height}.")
    if s.min_duration > s.max_duration:
        raise ConfigError(f"synth.min_duration={s.min_duration} is greater than "
                          f"synth.max_duration={s.max_duration}; the allowed values satisfy "
                          f"min_duration <= max_duration.")
    if s.min_objects > s.max_objects:
        raise ConfigError(f"synth.min_objects={s.min_objects} is greater than "
                          f"synth.max_objects={s.max_objects}.")
    if s.min_interval > s.max_interval:
        raise ConfigError(f"synth.min_interval={s.min_interval} is greater than "
                          f"synth.max_interval={s.max_interval}.")
    if s.min_event_gap * s.max_objects >= s.min_interval:
        raise ConfigError(f"synth.min_event_gap={s.min_event_gap} is too large for "
                          f"synth.max_objects={s.max_objects} objects with impacts "
                          f"synth.min_interval={s.min_interval} s apart; lower min_event_gap "
                          f"below {s.min_interval / s.max_objects:.3f}.")
    if len(s.noise_db) != 2 or s.noise_db[0] > s.noise_db[1] or s.noise_db[1] > 0:
        raise ConfigError(f"synth.noise_db must be [low, high] in dBFS with low <= high <= 0, "
                          f"got {list(s.noise_db)}.")


def _check_prepare(cfg: Config) -> None:
    p = cfg.prepare
    if p.short_side % 2:
        raise ConfigError(f"prepare.short_side must be even (4:2:0 video), got {p.short_side}.")
    if not all(isinstance(e, str) and e.startswith(".") for e in p.extensions):
        raise ConfigError(f"prepare.extensions must be a list like ['.mp4', '.webm'], "
                          f"got {list(p.extensions)}.")


def _check_data(cfg: Config) -> None:
    d = cfg.data
    win = d.win_ms * d.sample_rate / 1000
    if d.n_fft < win:
        raise ConfigError(f"data.n_fft={d.n_fft} is shorter than the window data.win_ms="
                          f"{d.win_ms} ms = {win:g} samples at {d.sample_rate} Hz; raise n_fft.")
    if d.fmax and not d.fmin < d.fmax <= d.sample_rate / 2:
        raise ConfigError(f"data.fmax={d.fmax} must lie in (data.fmin={d.fmin}, "
                          f"{d.sample_rate / 2:g}] (half the sample rate), or be 0.")
    if d.fmin >= (d.fmax or d.sample_rate / 2):
        raise ConfigError(f"data.fmin={d.fmin} must be below the highest mel frequency "
                          f"({d.fmax or d.sample_rate / 2:g} Hz).")
    for name in ("mean", "std"):
        vals = getattr(d, name)
        if len(vals) != 3 or (name == "std" and min(vals) <= 0):
            raise ConfigError(f"data.{name} must be 3 numbers (R, G, B){', all > 0' if name == 'std' else ''}, "
                              f"got {list(vals)}.")


def _check_sampler(cfg: Config) -> None:
    sm = cfg.sampler
    try:
        pieces = [(float(a), float(b)) for a, b in sm.curriculum]
    except (TypeError, ValueError):
        raise ConfigError(f"sampler.curriculum must be a list of [at, share] pairs, got "
                          f"{sm.curriculum!r}.") from None
    if not pieces or any(not 0 <= b <= 1 or a < 0 for a, b in pieces):
        raise ConfigError(f"sampler.curriculum needs at least one [at, share] pair with at >= 0 "
                          f"and share in [0, 1], got {sm.curriculum!r}.")
    if sm.curriculum_unit == "fraction" and any(a > 1 for a, _ in pieces):
        raise ConfigError(f"sampler.curriculum: with curriculum_unit=fraction every `at` lies in "
                          f"[0, 1], got {sm.curriculum!r}.")
    if sm.pairs == "paired" and not 0 < sm.positive_share < 1:
        raise ConfigError(f"sampler.positive_share={sm.positive_share}: paired examples need both "
                          f"positives and negatives; use a share in (0, 1), the paper's 0.5.")
    if sm.superhard_share > 0 and sm.superhard_min_shift >= sm.hard_min_shift:
        raise ConfigError(f"sampler.superhard_min_shift={sm.superhard_min_shift} must be below "
                          f"sampler.hard_min_shift={sm.hard_min_shift} for super-hard negatives.")
    if sm.pairs == "inbatch" and sm.superhard_share > 0:
        raise ConfigError("sampler.superhard_share applies to pairs=paired only; with "
                          "pairs=inbatch the windows of a clip are its aligned one and k hard ones.")


def _check_loader(cfg: Config) -> None:
    if cfg.loader.kind == "decord":
        import importlib.util
        if importlib.util.find_spec("decord") is None:
            raise ConfigError("loader.kind=decord but decord is not installed: pip install "
                              "decord (or pip install 'fastavts[decord]'), or use loader.kind="
                              "pyav, memory or dali.")
    if cfg.loader.kind == "spdl":
        import importlib.util
        if importlib.util.find_spec("spdl") is None:
            raise ConfigError("loader.kind=spdl but SPDL is not installed: pip install "
                              "'fastavts[spdl]' (spdl-io, spdl-core), or use loader.kind=pyav, "
                              "memory or dali.")


def _check_train(cfg: Config) -> None:
    loggers = list(cfg.train.loggers)
    if not all(isinstance(x, str) and x in LOGGERS for x in loggers) or len(set(loggers)) < len(loggers):
        raise ConfigError(f"train.loggers={loggers}: give a list of distinct names from "
                          f"{', '.join(LOGGERS)} (e.g. train.loggers=[tensorboard,wandb]).")
    if "wandb" in loggers and not cfg.train.wandb_project.strip():
        raise ConfigError("train.wandb_project is empty: name the Weights & Biases project "
                          "(train.wandb_project=NAME).")
    if "wandb" in loggers:
        import importlib.util
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("train.loggers includes wandb but wandb is not installed: "
                              "pip install wandb (or pip install 'fastavts[wandb]'), or drop "
                              "wandb from train.loggers.")
    ps = cfg.train.profile_steps
    if len(ps) != 3 or not all(isinstance(x, int) and x >= 0 for x in ps) or ps[2] < 1:
        raise ConfigError(f"train.profile_steps must be [wait, warmup, active] whole numbers "
                          f"with active >= 1, got {list(ps)}.")


def _check_across(cfg: Config) -> None:
    """Rules that join sections: clip length and segments, the sync tolerance and the shifts,
    and what the loss kind refuses of the sampler, the model and the implementation."""
    p, d, sm, lc = cfg.prepare, cfg.data, cfg.sampler, cfg.loss
    if 0 < p.segment_seconds < d.clip_seconds:
        raise ConfigError(
            f"prepare.segment_seconds={p.segment_seconds} is shorter than one clip "
            f"({d.clip_frames} frames x stride {d.frame_stride} at {d.fps} fps = "
            f"{d.clip_seconds:.2f} s); use 0 (no segments) or at least {d.clip_seconds:.2f}.")
    if p.segment_seconds > 0:
        seg_frames = p.segment_seconds * d.fps
        if abs(seg_frames - round(seg_frames)) > 1e-6 or round(seg_frames) % p.keyframe_interval:
            raise ConfigError(
                f"prepare.segment_seconds={p.segment_seconds} at data.fps={d.fps} gives "
                f"{seg_frames:g} frames per segment, which must be a whole multiple of "
                f"prepare.keyframe_interval={p.keyframe_interval}.")
    if not 0 < lc.sync_tol < sm.hard_min_shift:
        raise ConfigError(f"loss.sync_tol={lc.sync_tol} must lie in (0, sampler.hard_min_shift="
                          f"{sm.hard_min_shift}): windows closer than sync_tol to the clip count "
                          f"as aligned, hard negatives are at least hard_min_shift away.")
    if sm.superhard_share > 0 and sm.superhard_min_shift <= lc.sync_tol:
        raise ConfigError(f"sampler.superhard_min_shift={sm.superhard_min_shift} must exceed "
                          f"loss.sync_tol={lc.sync_tol}: a super-hard negative that close to its "
                          f"clip is an aligned window.")
    from .objectives import Objective
    Objective.named(lc.kind).check(cfg)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | os.PathLike, header: str = "") -> None:
    """Write the resolved config atomically (tmp file + rename) next to the outputs it made."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_failure(path.parent, e) from None
    atomic_write_text(path, (header + "\n" if header else "") + to_yaml(cfg))


def describe(section_cls) -> list[tuple[str, Any, str]]:
    """(name, default, help) rows for --help texts."""
    out = []
    for f in dataclasses.fields(section_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append((f.name, default, f.metadata.get("help", "")))
    return out
