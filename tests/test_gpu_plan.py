"""The GPU checks' compile budget, worked out here: the kernel tests' launch signatures (each a
separate compilation on a GPU), dealt to the pytest processes as bench/gpu_checks.py deals them,
times the cold compile time of a kernel for sm_90 measured here, fit their step's limit."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_checks  # noqa: E402

COLD_COMPILE = r"""
import os, sys, time
import torch
from fastavts.kernels import contrastive as C, infonce as I
t32 = ("fp32", torch.float32)
jobs = [C.inbatch_jobs(C._inbatch_fwd_kernel.fn, C._inbatch_bwd_kernel.fn, *t32, "margin",
                       "inbatch", {"COEF": "*fp32"})[i] for i in (0, len(C.FWD_TILES))]
jobs += [C.inbatch_jobs(I._infonce_fwd_kernel.fn, I._infonce_bwd_kernel.fn, *t32, "inv_t",
                        "infonce", {"STATS": "*fp32"}, ({"STATS_ON_ROWS": True},),
                        I._precisions, (I.FWD_TILES, I.BWD_TILES))[len(I.FWD_TILES)]]
times = []
for job in jobs:
    t = time.perf_counter()
    C.compile_report([job])
    times.append(time.perf_counter() - t)
print("SECONDS", max(times))
"""


def test_the_kernel_tests_compile_within_their_step_on_the_gpu(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", FASTAVTS_RECORD_LAUNCHES=str(tmp_path / "l.json"),
               PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    args = [*gpu_checks.KERNEL_TESTS, "-k", "not hopper"]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                        "launch_recorder", *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:]
    launches = json.loads((tmp_path / "l.json").read_text())
    listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                             "no:cacheprovider", *gpu_checks.KERNEL_TESTS], cwd=REPO, env=env,
                            capture_output=True, text=True).stdout.splitlines()
    ids = [x for x in listed if "::" in x]
    every = {s for sigs in launches.values() for s in sigs}
    per_process = [len({s for i in part for s in launches.get(i, [])})
                   for part in gpu_checks.shards(ids, gpu_checks.TEST_PROCESSES)]
    cold = subprocess.run([sys.executable, "-c", COLD_COMPILE], cwd=REPO, capture_output=True,
                          text=True, timeout=600,
                          env={**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
                               "TRITON_CACHE_DIR": str(tmp_path / "cache")})
    assert cold.returncode == 0, cold.stderr[-2000:]
    seconds = float(cold.stdout.split("SECONDS")[-1])
    # on the GPU the tests also run at bf16: half as many again (fp32, fp16 here)
    worst = max(per_process) * 1.5 * seconds
    limit = gpu_checks.CORE_STEPS["tests"]
    print(f"{len(every)} signatures ({len(every) * 1.5:.0f} with bf16) in {len(ids)} tests; "
          f"per process {per_process}; a cold compile here {seconds:.2f} s; the busiest "
          f"process compiles for ~{worst:.0f} s of the step's {limit} s")
    assert 60 <= len(every) <= 200     # the recorder saw the kernels
    assert worst <= 0.6 * limit, (
        f"the kernel tests' compilations (~{worst:.0f} s in the busiest of "
        f"{gpu_checks.TEST_PROCESSES} processes) do not fit the tests step ({limit} s)")
    # one process compiling everything, as before, would not have fitted
    assert len(every) * 1.5 * seconds > 0.6 * limit
