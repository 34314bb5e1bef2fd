"""fastavts: high-throughput self-supervised audio-visual synchronization (AVTS) training.

CPU install (development, CI), keeping pip on the CPU build of torch:
    pip install -c constraints-cpu.txt -e ".[test]"
GPU machines keep the CUDA torch (>= 2.11) they already have:
    pip install -e .
"""
import re

from setuptools import setup

VERSION = re.search(r'__version__ = "(.+)"', open("fastavts/_version.py").read()).group(1)

setup(
    name="fastavts",
    version=VERSION,
    description="High-throughput self-supervised audio-visual synchronization (AVTS) training",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `kernels/` is installed as `fastavts.kernels`: a top-level `kernels` would clash with an
    # existing PyPI package.
    packages=["fastavts", "fastavts.data", "fastavts.data.prepare", "fastavts.models",
              "fastavts.train", "fastavts.kernels"],
    package_dir={"fastavts.kernels": "kernels"},
    # Lower bounds of av, numpy, omegaconf and tqdm: the test suite passed on av 15.0.0,
    # numpy 1.26.4, omegaconf 2.3.0, tqdm 4.66.0 (and on the newest: av 18.1, numpy 2.4,
    # omegaconf 2.4, tqdm 4.70). av 14.0 lacks attributes prepare reads.
    install_requires=[
        "torch>=2.11",                 # CPU installs pin 2.13.0 through constraints-cpu.txt
        "numpy>=1.26,<3",
        "av>=15,<20",                  # PyAV (bundled FFmpeg); 15.0 is the oldest the tests pass on
        "nvidia-dali-cuda130>=2.2,<3",  # GPU video decoding; CPU pipelines where no GPU
        "triton>=3.6",                 # the fused loss kernel; TRITON_INTERPRET=1 on CPU
        "omegaconf>=2.3,<2.5",         # typed configs: schemas, YAML, dotted overrides
        "tqdm>=4.66,<5",               # progress bars
        "tensorboard>=2.14,<3",        # training scalars (torch.utils.tensorboard)
        "nvidia-ml-py>=12,<14",        # GPU counters (NVML), fastavts/gpu_monitor.py
        "scikit-learn>=1.3,<2",        # linear SVM probes (fastavts probe-audio)
        "safetensors>=0.4,<1",         # exported weights (fastavts export, from_pretrained)
    ],
    extras_require={"test": ["pytest>=8,<10", "matplotlib>=3.8,<4", "wandb>=0.16,<1",
                             "decord>=0.6,<0.7",   # loader.kind=decord, a benchmark baseline
                             "spdl-io>=0.8,<0.9", "spdl-core>=0.8,<0.9",   # loader.kind=spdl
                             "ruff>=0.17,<0.18"],  # .ci/run lints with ruff.toml
                    "bench": ["matplotlib>=3.8,<4"],    # bench/plot.py
                    "wandb": ["wandb>=0.16,<1"],        # train.loggers=[tensorboard,wandb]
                    "decord": ["decord>=0.6,<0.7"],     # loader.kind=decord (bench_data.py)
                    # loader.kind=spdl (it also needs FFmpeg's shared libraries: its docs)
                    "spdl": ["spdl-io>=0.8,<0.9", "spdl-core>=0.8,<0.9"],
                    # bench/bench_decoders.py's peers (SPDL also needs FFmpeg's shared libs)
                    "peers": ["decord>=0.6,<0.7", "spdl-io>=0.8,<0.9", "spdl-core>=0.8,<0.9"]},
    entry_points={"console_scripts": ["fastavts=fastavts.cli:main"]},
)
