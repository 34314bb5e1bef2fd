"""The machine and the versions a run or a benchmark row was made with. Imports nothing beyond
the standard library and (lazily) torch, so the GPU checks can call it where the project's
other dependencies are not installed."""
from __future__ import annotations

import os
import platform

PACKAGES = ("fastavts", "torch", "triton", "numpy", "av", "nvidia-dali-cuda130", "omegaconf",
            "tqdm", "nvidia-ml-py", "torchvision")


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def machine_info() -> dict:
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
            "cpu": platform.processor() or platform.machine()}
    try:
        import torch
        info["cuda"] = torch.cuda.is_available()
        if info["cuda"]:
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda_version"] = torch.version.cuda
    except ImportError:
        info["cuda"] = False
    return info
