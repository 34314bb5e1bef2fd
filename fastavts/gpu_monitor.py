"""GPU counters during training and benchmarks, sampled by a thread through NVML.

NVML comes from `nvidia-ml-py` (NVIDIA's maintained binding, imported as `pynvml`; not the
deprecated `pynvml` package). Every `interval_s` the thread records, for one GPU:

  sm_util       % of the last sample period in which a kernel was running (NVML "gpu"
                utilisation: a busy-time share, not how many SMs were busy)
  mem_bw_util   % of the period in which device memory was read or written
  mem_used_mb   device memory in use (all processes)
  power_w       board power draw
  sm_clock_mhz, mem_clock_mhz
  nvdec_util    % of the period the video decoders (NVDEC) were busy (NaN where NVML does
                not report it)

The GPU is the one torch uses (its UUID, so CUDA_VISIBLE_DEVICES given as indices, UUIDs or
prefixes of them, and any CUDA_DEVICE_ORDER, all name the right NVML device). A MIG instance
has no utilisation counters in NVML: the monitor says so and stays off.

`summary()` gives the median and the 10th percentile of each (`gpu_sm_util_median`,
`gpu_sm_util_p10`, ...). Without a GPU, NVML or the package, the monitor says why once and
does nothing else: `summary()` is then `{}`.
"""
from __future__ import annotations

import threading

import numpy as np

FIELDS = ("sm_util", "mem_bw_util", "mem_used_mb", "power_w", "sm_clock_mhz", "mem_clock_mhz",
          "nvdec_util")
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
                if device_index is not None:     # an NVML index, given by the caller
                    if self._nvml.nvmlDeviceGetCount() <= device_index:
                        self.reason = "no NVIDIA GPU visible to NVML"
                    else:
                        self._handle = self._nvml.nvmlDeviceGetHandleByIndex(device_index)
                else:
                    self._handle, self.reason = nvml_handle(self._nvml, *_torch_device())
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
        try:   # not every GPU, driver or sandbox reports the decoders: NaN, not the end
            dec = float(n.nvmlDeviceGetDecoderUtilization(h)[0])
        except Exception:
            dec = float("nan")
        s = (float(u.gpu), float(u.memory), mem.used / 2**20, power, float(smc), float(memc), dec)
        self.samples.append(s)
        return s

    def latest(self) -> dict:
        return dict(zip(FIELDS, self.samples[-1])) if self.samples else {}

    def _run(self):
        while not self._stop.wait(self.interval_s):
            if self.sample() is None:
                break

    def start(self) -> GpuMonitor:
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
            col = a[:, i][np.isfinite(a[:, i])]
            if len(col):
                out[f"gpu_{f}_median"] = round(float(np.median(col)), 1)
                out[f"gpu_{f}_p10"] = round(float(np.percentile(col, 10)), 1)
        return out

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _torch_device() -> tuple[int, str | None]:
    """(torch's current CUDA index, its UUID as NVML writes it or None)."""
    try:
        import torch
        if not torch.cuda.is_available():
            return 0, None
        idx = torch.cuda.current_device()
        uuid = getattr(torch.cuda.get_device_properties(idx), "uuid", None)
        return idx, (str(uuid) if uuid is not None else None)
    except Exception:
        return 0, None


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def nvml_handle(nvml, torch_index: int, torch_uuid: str | None = None,
                visible: str | None = None):
    """(NVML handle, None) of the GPU torch calls `torch_index`, or (None, why not).

    NVML counts every GPU of the machine in PCI order; torch counts the ones
    CUDA_VISIBLE_DEVICES names, in CUDA's order. The UUID torch reports settles it; without one,
    the CUDA_VISIBLE_DEVICES entry at torch's index: a number (NVML's index where CUDA's
    order is the PCI order), a UUID `GPU-...` or a prefix of one, or a MIG instance."""
    import os

    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "") if visible is None else visible
    entries = [v.strip() for v in visible.split(",") if v.strip()]
    entry = entries[torch_index] if torch_index < len(entries) else None
    mig_msg = ("MIG instance {}: NVML reports no utilisation counters per MIG instance "
               "(only for the whole GPU, other tenants included)")
    if entry and entry.startswith("MIG-"):
        return None, mig_msg.format(entry)
    count = nvml.nvmlDeviceGetCount()
    uuids = [_text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i)))
             for i in range(count)]
    if torch_uuid:
        bare = torch_uuid.lower().removeprefix("gpu-").removeprefix("mig-")
        for i, u in enumerate(uuids):
            if u.lower().removeprefix("gpu-") == bare:
                return nvml.nvmlDeviceGetHandleByIndex(i), None
        return None, mig_msg.format(torch_uuid) if count else "no NVIDIA GPU visible to NVML"
    if entry is None:
        index = torch_index
    elif entry.isdigit():   # CUDA's order; the same as NVML's for identical GPUs
        index = int(entry)
    else:
        hits = [i for i, u in enumerate(uuids) if u.lower().startswith(entry.lower())]
        if len(hits) != 1:
            return None, (f"CUDA_VISIBLE_DEVICES entry {entry!r} matches {len(hits)} of the "
                          f"machine's {count} GPUs")
        index = hits[0]
    if index >= count:
        return None, "no NVIDIA GPU visible to NVML"
    return nvml.nvmlDeviceGetHandleByIndex(index), None
