"""GPU counters during training and benchmarks, sampled by a thread through NVML.

NVML comes from `nvidia-ml-py` (NVIDIA's maintained binding, imported as `pynvml`; not the
deprecated `pynvml` package). Every `interval_s` the thread records, for one GPU:

  sm_util       % of the last sample period in which a kernel was running (NVML "gpu"
                utilisation: a busy-time share, not how many SMs were busy)
  mem_bw_util   % of the period in which device memory was read or written
  mem_used_mb   device memory in use (all processes)
  power_w       board power draw
  sm_clock_mhz, mem_clock_mhz

`summary()` gives the median and the 10th percentile of each (`gpu_sm_util_median`,
`gpu_sm_util_p10`, ...). Without a GPU, NVML or the package, the monitor says why once and
does nothing else: `summary()` is then `{}`.
"""
from __future__ import annotations

import threading

import numpy as np

FIELDS = ("sm_util", "mem_bw_util", "mem_used_mb", "power_w", "sm_clock_mhz", "mem_clock_mhz")
_WARNED: set[str] = set()


def _say_once(msg: str, quiet: bool) -> None:
    if msg not in _WARNED and not quiet:
        print(f"fastavts: GPU counters off: {msg}", flush=True)
    _WARNED.add(msg)


class GpuMonitor:
    def __init__(self, device_index: int | None = None, interval_s: float = 0.5,
                 quiet: bool = False, nvml=None):
        self.interval_s = interval_s
        self.samples: list[tuple] = []
        self.reason: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = nvml
        self._handle = None
        if self._nvml is None:
            try:
                import pynvml
                self._nvml = pynvml
            except ImportError:
                self.reason = "the nvidia-ml-py package is not installed (pip install nvidia-ml-py)"
        if self._nvml is not None:
            try:
                self._nvml.nvmlInit()
                if device_index is None:
                    device_index = _current_cuda_index()
                if self._nvml.nvmlDeviceGetCount() <= device_index:
                    self.reason = "no NVIDIA GPU visible to NVML"
                else:
                    self._handle = self._nvml.nvmlDeviceGetHandleByIndex(device_index)
            except Exception as e:   # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
                self.reason = f"NVML unavailable ({type(e).__name__}: {e})"
        if self.reason:
            _say_once(self.reason, quiet)

    @property
    def active(self) -> bool:
        return self._handle is not None

    def sample(self) -> tuple | None:
        if not self.active:
            return None
        n, h = self._nvml, self._handle
        try:
            u = n.nvmlDeviceGetUtilizationRates(h)
            mem = n.nvmlDeviceGetMemoryInfo(h)
            power = n.nvmlDeviceGetPowerUsage(h) / 1000.0
            smc = n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM)
            memc = n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_MEM)
        except Exception as e:  # a counter this GPU does not expose: stop quietly, say why
            self.reason = f"reading counters failed ({type(e).__name__}: {e})"
            _say_once(self.reason, False)
            self._handle = None
            return None
        s = (float(u.gpu), float(u.memory), mem.used / 2**20, power, float(smc), float(memc))
        self.samples.append(s)
        return s

    def latest(self) -> dict:
        return dict(zip(FIELDS, self.samples[-1])) if self.samples else {}

    def _run(self):
        while not self._stop.wait(self.interval_s):
            if self.sample() is None:
                break

    def start(self) -> "GpuMonitor":
        if self.active and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fastavts-nvml", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval_s + 1)
            self._thread = None
        return self.summary()

    def summary(self) -> dict:
        if not self.samples:
            return {}
        a = np.asarray(self.samples, dtype=float)
        out = {"gpu_samples": len(a)}
        for i, f in enumerate(FIELDS):
            out[f"gpu_{f}_median"] = round(float(np.median(a[:, i])), 1)
            out[f"gpu_{f}_p10"] = round(float(np.percentile(a[:, i], 10)), 1)
        return out

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _current_cuda_index() -> int:
    """NVML counts all GPUs; torch's current device under CUDA_VISIBLE_DEVICES maps to it."""
    import os
    try:
        import torch
        idx = torch.cuda.current_device() if torch.cuda.is_available() else 0
    except Exception:
        idx = 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if ids and idx < len(ids) and ids[idx].isdigit():
        return int(ids[idx])
    return idx

