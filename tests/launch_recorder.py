"""A pytest plugin (`-p launch_recorder`, with FASTAVTS_RECORD_LAUNCHES=FILE): records, per
test, the launch signatures of the Triton kernels it runs in the interpreter, as a GPU would
key its compiled kernels (kernel, argument dtypes and pointer alignment, integer
specialisations (== 1, divisible by 16), constexprs, warps, stages), and writes them to FILE
as JSON {test id: [signature, ...]} at the end. tests/test_gpu_plan.py turns them into the
compile time of the GPU checks' kernel tests."""
from __future__ import annotations

import json
import os

import pytest

_current: list[str] = [""]
_seen: dict[str, list[str]] = {}


def _spec(a) -> str:
    import torch

    if torch.is_tensor(a):
        return f"{a.dtype}{'' if a.data_ptr() % 16 else '/16'}"
    if isinstance(a, bool):
        return f"b{int(a)}"
    if isinstance(a, int):
        return "i1" if a == 1 else ("i16" if a % 16 == 0 else "i")
    if isinstance(a, float):
        return "f"
    return type(a).__name__


def pytest_configure(config):
    path = os.environ.get("FASTAVTS_RECORD_LAUNCHES")
    if not path:
        return
    from triton.runtime.interpreter import InterpretedFunction

    real = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        name = getattr(self.fn, "__name__", str(self.fn))
        key = "|".join([name, *map(_spec, args),
                        *(f"{k}={v}" for k, v in sorted(kwargs.items()))])
        seen = _seen.setdefault(_current[0], [])
        if key not in seen:
            seen.append(key)
        return real(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    config._launch_record = path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    _current[0] = item.nodeid
    yield
    _current[0] = ""


def pytest_unconfigure(config):
    path = getattr(config, "_launch_record", None)
    if path:
        with open(path, "w") as fh:
            json.dump(_seen, fh, indent=0)
