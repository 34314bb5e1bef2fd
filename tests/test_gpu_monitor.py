"""The NVML sampler: degrades cleanly without a GPU; samples and summarises with one."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastavts.gpu_monitor import FIELDS, GpuMonitor


class FakeNvml:
    """Just the calls GpuMonitor makes, with values that change per sample."""
    NVML_CLOCK_SM, NVML_CLOCK_MEM = 1, 2

    def __init__(self, count=1, fail_after=None):
        self.count, self.n, self.fail_after = count, 0, fail_after

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("gpu", i)

    def nvmlDeviceGetUtilizationRates(self, h):
        self.n += 1
        if self.fail_after is not None and self.n > self.fail_after:
            raise RuntimeError("not supported")
        return SimpleNamespace(gpu=10 * self.n, memory=5 * self.n)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=self.n * 2**30)

    def nvmlDeviceGetPowerUsage(self, h):
        return 100_000 * self.n          # mW

    def nvmlDeviceGetClockInfo(self, h, which):
        return 1500 if which == self.NVML_CLOCK_SM else 2600


def test_without_nvml_it_says_so_once_and_stays_out_of_the_way(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    m = GpuMonitor(interval_s=0.01)
    assert not m.active and m.reason
    m2 = GpuMonitor(interval_s=0.01)
    with m:
        pass
    assert m.summary() == {} and m2.stop() == {} and m.sample() is None
    assert capsys.readouterr().out.count("GPU counters off") == 1


def test_samples_and_summary_against_numpy():
    nv = FakeNvml()
    m = GpuMonitor(device_index=0, nvml=nv, quiet=True)
    for _ in range(10):
        m.sample()
    s = m.summary()
    sm = 10.0 * np.arange(1, 11)
    assert s["gpu_samples"] == 10
    assert s["gpu_sm_util_median"] == pytest.approx(np.median(sm))
    assert s["gpu_sm_util_p10"] == pytest.approx(np.percentile(sm, 10), abs=0.05)
    assert s["gpu_mem_used_mb_median"] == pytest.approx(np.median(np.arange(1, 11) * 1024.0))
    assert s["gpu_power_w_median"] == pytest.approx(np.median(np.arange(1, 11) * 100.0))
    assert s["gpu_sm_clock_mhz_p10"] == 1500 and set(m.latest()) == set(FIELDS)


def test_thread_samples_then_stops_and_a_failing_counter_ends_it_quietly():
    m = GpuMonitor(device_index=0, nvml=FakeNvml(), interval_s=0.01, quiet=True).start()
    import time
    time.sleep(0.2)
    s = m.stop()
    assert s["gpu_samples"] >= 3
    bad = GpuMonitor(device_index=0, nvml=FakeNvml(fail_after=2), interval_s=0.01, quiet=True)
    bad.start()
    time.sleep(0.2)
    assert bad.stop()["gpu_samples"] == 2 and "reading counters failed" in bad.reason
    assert GpuMonitor(device_index=3, nvml=FakeNvml(count=1), quiet=True).reason.startswith("no")


class FakeMachine(FakeNvml):
    """Four GPUs in NVML's (PCI) order with their UUIDs."""
    UUIDS = ["GPU-aaaa1111-0000", "GPU-bbbb2222-0000", "GPU-cccc3333-0000", "GPU-aaaa9999-0000"]

    def __init__(self):
        super().__init__(count=4)

    def nvmlDeviceGetUUID(self, h):
        return self.UUIDS[h[1]].encode()     # older bindings give bytes

    def nvmlDeviceGetDecoderUtilization(self, h):
        return (7 * self.n, 167000)


@pytest.mark.parametrize("visible,torch_index,torch_uuid,want", [
    ("", 2, None, 2),                                     # no CUDA_VISIBLE_DEVICES
    ("3,1", 1, None, 1),                                  # indices
    ("GPU-cccc3333-0000,GPU-bbbb2222-0000", 0, None, 2),  # full UUIDs
    ("GPU-bbbb,GPU-aaaa9", 1, None, 3),                   # UUID prefixes, as CUDA takes them
    ("1,0", 0, "bbbb2222-0000", 1),                       # torch's UUID settles it
    ("", 0, "GPU-aaaa9999-0000", 3),
])
def test_the_monitored_gpu_is_the_one_torch_uses(visible, torch_index, torch_uuid, want):
    from fastavts.gpu_monitor import nvml_handle

    h, why = nvml_handle(FakeMachine(), torch_index, torch_uuid, visible)
    assert why is None and h == ("gpu", want)


@pytest.mark.parametrize("visible,torch_uuid,why", [
    ("MIG-5f4c2a1e-0000-1111", None, "MIG instance"),
    ("", "MIG-77777777-0000", "MIG instance"),            # torch's UUID is a MIG instance's
    ("GPU-aaaa", None, "matches 2 of the machine's 4"),   # an ambiguous prefix
    ("GPU-ffff", None, "matches 0"),
])
def test_gpus_that_cannot_be_monitored_say_why(visible, torch_uuid, why):
    from fastavts.gpu_monitor import nvml_handle

    h, reason = nvml_handle(FakeMachine(), 0, torch_uuid, visible)
    assert h is None and why in reason


def test_nvdec_utilisation_is_sampled_and_absent_counters_stay_out():
    m = GpuMonitor(device_index=1, nvml=FakeMachine(), quiet=True)
    for _ in range(4):
        m.sample()
    s = m.summary()
    assert s["gpu_nvdec_util_median"] == pytest.approx(np.median([7, 14, 21, 28]))
    nodec = GpuMonitor(device_index=0, nvml=FakeNvml(), quiet=True)   # no decoder counter
    nodec.sample()
    assert "gpu_nvdec_util_median" not in nodec.summary() and nodec.active
