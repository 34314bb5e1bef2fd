"""The GPU checks, in two parts that each fit one command on a lent GPU machine (docs/design.md
section 4: 15 minutes of device time in all, at most 10 minutes a command, at most 8 files
back, Python 3.12 with torch 2.11 and triton 3.6 but no DALI, PyAV or OmegaConf, perhaps no
NVDEC library in its sandbox).

    python bench/gpu_checks.py core   # needs only: pip install --no-deps --no-build-isolation -e .
        env         GPU, driver, versions, NVDEC library present or not
        tests       tests/test_kernel_contrastive.py and test_kernel_infonce.py compiled (fp32,
                    fp16, bf16) and tests/test_models.py (torchvision's weights load into our
                    nets, same outputs), in 8 pytest processes at once (the kernels compile
                    side by side)
        bench_model R(2+1)D-18 16x112x112 + audio net, bf16, channels_last, batch 64 and 32
                    (target: MFU >= 35 %)
        bench_loss  margin loss then InfoNCE: eager vs torch.compile vs Triton, fwd+bwd,
                    B 1024 and 8192, D 128, fp32 (target: Triton <= 1/3 eager, <= 2/3
                    compiled; its loss error vs eager)
    python bench/gpu_checks.py dali   # needs DALI, PyAV and OmegaConf carried in (README)
        env         as above, plus the imports; without NVDEC the mixed-decoder steps are left
                    out and the summary says so
        data        a synthetic H.264 set (48 videos x 10 s) prepared for NVDEC
        tests       the GPU tests of tests/test_loaders.py and tests/test_train.py: mixed decoder
                    on H.264 vs PyAV (1 and 3 pipelines), prepare's codec=auto, and training
                    steps under torch.cuda.set_sync_debug_mode("error") (0 host syncs)
        bench_data  DALI with 1 and 7 video pipelines vs the PyAV DataLoader on all cores,
                    NVML SM and NVDEC utilisation (targets: >= 5x PyAV, >= 2x model-only)
        bench_train end to end vs model-only, DALI and PyAV (targets: ratio >= 0.9, SM > 90 %)
    python bench/gpu_checks.py decoders   # DALI and PyAV carried in as for `dali`; SPDL and
                                          # torchcodec where carried in too (else a row says so)
        env         as above, plus spdl.io and torchcodec
        curve       bench/bench_decoder_curve.py: decoded frames/s of DALI mixed, SPDL's NVDEC
                    decoder, torchcodec's CUDA decoder and PyAV (CPU) at 128, 256 and 1080 px,
                    1 to 14 decodes at once (an H100 or H200 has 7 NVDEC engines)

Every step runs as its own process group under its time limit (CORE_STEPS, DALI_STEPS,
DECODER_STEPS), and the limits are cut so that the whole part ends within --budget seconds
(default: their sum, core 390, dali 300 and decoders 280, each inside a 10-minute command; core
and dali with the DALI staging and the machine's start fill one task's 15 minutes of device
time, decoders goes to the next lent task); a
step out of time gets SIGINT first (pytest then still writes its junit file and names the test
it was in), SIGKILL 15 s later. Each step logs to <work>/<part>/<step>.log and its benchmark
rows go, row by row as they are measured, to <work>/<part>/results/<bench>.jsonl; a step that
fails or runs out of time does not stop the next. The work folder (--work, default in /tmp)
and the data cache lie outside $OUT; after every step everything but the data is packed
again into ONE file, $OUT/gpu_checks_<part>.tar.gz (with summary.json: each step's exit code,
seconds and whether it timed out), so $OUT holds one small file however the command ends (the
device returns at most 8 files of at most 16 MiB). The command exits 1 when a step failed.
Back here: `python bench/gpu_checks.py merge TARBALL` appends its rows to bench/results/.

`--dry-run` runs the same steps at toy sizes on a CPU (the Triton kernel in its interpreter,
DALI's CPU pipeline on VP9); the test suite does, so the script is known to run before a GPU
is lent.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
# test names printed as they run, and a stuck test's stack after 60 s (pytest's own faulthandler)
PYTEST = [PY, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider", "-o",
          "faulthandler_timeout=60"]


def nvdec_library() -> str | None:
    """Where the NVIDIA video decoder library is, or None (a sandbox may lack it)."""
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=20).stdout
        for line in out.splitlines():
            if "libnvcuvid.so" in line:
                return line.split("=>")[-1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    for d in ("/usr/local/nvidia/lib64", "/usr/local/nvidia/lib", "/usr/lib/x86_64-linux-gnu",
              "/usr/lib64", "/usr/lib/wsl/lib"):
        for p in Path(d).glob("libnvcuvid.so*") if Path(d).is_dir() else []:
            return str(p)
    return None


ENV_SCRIPT = r"""
import json, subprocess, sys
sys.path.insert(0, sys.argv[1])
from fastavts.machine import machine_info, versions
info = dict(machine=machine_info(), versions=versions(), nvdec_library=sys.argv[2] or None)
try:
    import torch
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = dict(name=p.name, sms=p.multi_processor_count,
                           memory_gib=round(p.total_memory / 2**30, 1),
                           capability=f"{p.major}.{p.minor}",
                           cudnn=torch.backends.cudnn.version())
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
             "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except Exception as e:
    info["error"] = repr(e)
for mod in sys.argv[3:]:
    try:
        m = __import__(mod, fromlist=["x"])
        info.setdefault("imports", {})[mod] = getattr(m, "__version__", "ok")
    except Exception as e:
        info.setdefault("imports", {})[mod] = f"MISSING: {e!r}"
print(json.dumps(info, indent=1))
"""


MAX_FILES, MAX_BYTES = 8, 16 * 2**20   # what a lent device machine returns from $OUT
GRACE_S = 15                           # SIGINT, then SIGKILL this much later


class Runner:
    def __init__(self, part: str, out: Path, budget: float, dry: bool, work: Path):
        self.part, self.dry, self.out = part, dry, out
        self.dir = work / part
        shutil.rmtree(self.dir, ignore_errors=True)
        (self.dir / "results").mkdir(parents=True)
        out.mkdir(parents=True, exist_ok=True)
        self.cache = work / "cache"     # prepared data: outside $OUT and never packed
        self.t0, self.budget = time.monotonic(), budget
        self.summary: list[dict] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO)] + [p for p in self.env.get("PYTHONPATH", "").split(os.pathsep) if p])
        if dry:   # the kernel in Triton's interpreter; nothing touches a GPU
            self.env["TRITON_INTERPRET"] = "1"
            self.env["CUDA_VISIBLE_DEVICES"] = ""

    def results(self, name: str) -> str:
        return str(self.dir / "results" / f"{name}.jsonl")

    def step(self, name: str, cmd: list[str], limit: float) -> dict:
        left = self.budget - (time.monotonic() - self.t0)
        limit = min(limit, left - 5)
        row = dict(step=name, cmd=" ".join(cmd), limit_s=round(limit, 1))
        if limit < 10:
            row.update(rc=None, skipped="no time left in the budget")
            print(f"=== {name}: skipped, no time left", flush=True)
            self.summary.append(row)
            return row
        print(f"=== {name} (limit {limit:.0f} s): {' '.join(cmd)}", flush=True)
        t = time.monotonic()
        with open(self.dir / f"{name}.log", "w") as log:
            p = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
            rc, timed_out = stop_in_time(p, limit)
        row.update(rc=rc, timed_out=timed_out, seconds=round(time.monotonic() - t, 1))
        tail = (self.dir / f"{name}.log").read_text(errors="replace").splitlines()[-12:]
        print("\n".join("    " + x for x in tail), flush=True)
        print(f"--- {name}: exit {rc}{' (TIMED OUT)' if timed_out else ''}, "
              f"{row['seconds']} s", flush=True)
        self.summary.append(row)
        self.pack({})
        return row

    def pack(self, extra: dict) -> Path:
        """summary.json and ONE tarball of the work folder in $OUT (written to a temporary
        name and renamed: a kill leaves the last whole one)."""
        summary = dict(part=self.part, dry_run=self.dry, steps=self.summary,
                       wall_s=round(time.monotonic() - self.t0, 1), **extra)
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=1))
        tar = self.out / f"gpu_checks_{self.part}.tar.gz"
        tmp = self.out / f".{tar.name}.tmp"
        with tarfile.open(tmp, "w:gz") as tf:
            tf.add(self.dir, arcname=self.part,
                   filter=lambda m: None if "/blocker" in m.name else m)
        os.replace(tmp, tar)
        return tar

    def finish(self, extra: dict) -> Path:
        tar = self.pack(extra)
        passed = sum(r.get("rc") == 0 for r in self.summary)
        wall = round(time.monotonic() - self.t0, 1)
        print(f"=== {self.part}: {passed} of {len(self.summary)} steps passed, {wall} s; "
              f"everything in {tar}")
        return tar

    def failed(self) -> bool:
        return any(r.get("rc") != 0 for r in self.summary)


def stop_in_time(p: subprocess.Popen, limit: float) -> tuple[int, bool]:
    """(exit code, timed out) of a step started in its own session: past `limit`, SIGINT to
    its group (pytest writes its junit file and names the test it was in), SIGKILL after
    GRACE_S."""
    try:
        return p.wait(timeout=limit), False
    except subprocess.TimeoutExpired:
        pass
    os.killpg(p.pid, signal.SIGINT)
    try:
        p.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)   # the step and its workers
        p.wait()
    try:
        os.killpg(p.pid, signal.SIGKILL)   # workers it left behind
    except ProcessLookupError:
        pass
    return p.returncode, True


BLOCKER = r"""
# written by bench/gpu_checks.py --dry-run: these packages are not on the GPU machine
import sys
BLOCKED = {blocked!r}
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED or name in BLOCKED:
            raise ImportError(f"{{name}} is not installed on the GPU machine (gpu_checks dry run)")
        return None
sys.meta_path.insert(0, _Block())
"""


def shards(nodeids: list[str], n: int) -> list[list[str]]:
    """Tests dealt in turn to n pytest processes (a GPU machine's cores compile the kernels of
    several tests at once; one process compiles one kernel at a time)."""
    return [nodeids[i::n] for i in range(n) if nodeids[i::n]]


SHARD_SCRIPT = r"""
import subprocess, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from gpu_checks import shards
n, out, args = int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
py = sys.executable
listed = subprocess.run([py, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                         *args], capture_output=True, text=True).stdout.splitlines()
ids = [x for x in listed if "::" in x]
print(f"{len(ids)} tests in {min(n, len(ids))} processes", flush=True)
procs = []
for i, part in enumerate(shards(ids, n)):
    cmd = [py, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider", "-o",
           "faulthandler_timeout=60", "--junitxml", str(out / f"tests_{i}.xml"), *part]
    procs.append(subprocess.Popen(cmd, stdout=open(out / f"tests_{i}.log", "w"),
                                  stderr=subprocess.STDOUT))
codes = [p.wait() for p in procs]
for i, c in enumerate(codes):
    tail = (out / f"tests_{i}.log").read_text(errors="replace").splitlines()[-1:]
    print(f"process {i}: exit {c}: {tail[0] if tail else ''}", flush=True)
sys.exit(max(codes, default=0))
"""


def sharded_tests(r: Runner, files: list[str], n: int) -> list[str]:
    """The command of a step that runs `files`' tests in n pytest processes at once (each with
    its own log and junit file in the work folder); its exit code is the worst of theirs."""
    return [PY, "-c", SHARD_SCRIPT, str(HERE), str(n), str(r.dir), *files]


def block_imports(r: Runner, names: list[str]) -> None:
    """Dry run of `core`: make the packages the GPU machine lacks fail to import, so the part
    is shown to need nothing but the project (a sitecustomize on PYTHONPATH)."""
    d = r.dir / "blocker"
    d.mkdir()
    (d / "sitecustomize.py").write_text(BLOCKER.format(blocked=set(names)))
    r.env["PYTHONPATH"] = os.pathsep.join([str(d), r.env["PYTHONPATH"]])


def env_step(r: Runner, modules: list[str], limit: float) -> dict:
    lib = nvdec_library()
    r.step("env", [PY, "-c", ENV_SCRIPT, str(REPO), lib or "", *modules], max(limit, 30))
    return dict(nvdec_library=lib)


# Seconds each step of a part may take on the lent GPU machine (the step's own limit), in
# order. Both parts and the DALI staging fit one task's 15 minutes of device time together with
# the machine's start (README, "GPU checks still open", has the arithmetic).
CORE_STEPS = {"env": 30, "tests": 150, "bench_model": 90, "bench_loss": 120}
DALI_STEPS = {"env": 20, "data": 60, "tests": 60, "bench_data": 80, "bench_train": 80}
DECODER_STEPS = {"env": 20, "curve": 260}
TEST_PROCESSES = 8   # pytest processes compiling kernels side by side (16 cores)
KERNEL_TESTS = ["tests/test_kernel_contrastive.py", "tests/test_kernel_infonce.py"]


def core(r: Runner) -> Path:
    lim = CORE_STEPS
    if r.dry:
        block_imports(r, ["omegaconf", "av", "nvidia"])
    extra = env_step(r, ["torch", "triton", "torchvision", "omegaconf", "fastavts.kernels"],
                     lim["env"])
    if r.dry:
        r.step("tests", sharded_tests(r, [*KERNEL_TESTS, "tests/test_models.py", "-k",
                                          "1-7-64 or hand_computed or tiny or definition"], 2),
               240)
        r.step("bench_model", [PY, "bench/bench_model.py", "--models", "tiny", "audio_tiny",
                               "--batch-sizes", "2", "--frames", "8", "--size", "32",
                               "--channels-last", "off", "--repeats", "2", "--warmup", "1",
                               "--out", r.results("model")], 120)
        r.step("bench_loss", [PY, "bench/bench_loss.py", "--sizes", "16", "--dims", "8",
                              "--impl", "eager", "triton", "--passes", "fwd+bwd",
                              "--repeats", "2", "--warmup", "1",
                              "--out", r.results("loss")], 120)
    else:
        # the kernel tests compile ~110 kernels (fp32, fp16, bf16): in 8 processes at once
        r.step("tests", sharded_tests(r, [*KERNEL_TESTS, "tests/test_models.py"],
                                      TEST_PROCESSES), lim["tests"])
        r.step("bench_model", [PY, "bench/bench_model.py", "--models", "r2plus1d_18", "audio",
                               "--batch-sizes", "64", "32", "--precision", "bf16",
                               "--channels-last", "on", "--compile", "off", "--repeats", "15",
                               "--warmup", "5", "--out", r.results("model")], lim["bench_model"])
        # the margin loss, then InfoNCE, at the ends of the target's batch range (dim 128): 4
        # inductor compilations and 5 + 8 autotuned kernels; rows land as they are timed
        r.step("bench_loss", [PY, "bench/bench_loss.py", "--loss", "contrastive", "infonce",
                              "--sizes", "1024", "8192", "--dims", "128",
                              "--dtype", "fp32", "--passes", "fwd+bwd",
                              "--impl", "eager", "compiled", "triton", "--repeats", "20",
                              "--warmup", "3", "--out", r.results("loss")], lim["bench_loss"])
    return r.finish(extra)


def dali(r: Runner) -> Path:
    lim = DALI_STEPS
    extra = env_step(r, ["torch", "nvidia.dali", "av", "omegaconf", "fastavts.kernels"],
                     lim["env"])
    nvdec = bool(extra["nvdec_library"]) or r.dry
    extra["nvdec_steps"] = "run" if nvdec else "left out: no libnvcuvid.so on this machine"
    device = "cpu" if r.dry else "gpu"
    cache = str(r.cache)
    if r.dry:
        data = [PY, "bench/bench_data.py", "--prepare-only", "--device", "cpu", "--videos", "6",
                "--seconds", "4", "--cache", cache]
    else:
        data = [PY, "bench/bench_data.py", "--prepare-only", "--device", "gpu", "--videos", "48",
                "--seconds", "10", "--cache", cache]
    r.step("data", data, 90 if r.dry else lim["data"])
    log = (r.dir / "data.log").read_text(errors="replace")
    sets = [x.split("prepared set: ", 1)[1].strip() for x in log.splitlines()
            if x.startswith("prepared set: ")]
    if not sets:
        return r.finish(dict(extra, error="no prepared set; see data.log"))
    root = sets[-1]
    pytest = PYTEST + ["--junitxml", str(r.dir / "tests.xml")]
    if r.dry:
        r.step("tests", pytest + ["tests/test_loaders.py", "-k", "only_decode"], 240)
    else:
        sel = "gpu" if nvdec else "gpu and not dali and not mixed"
        r.step("tests", pytest + ["tests/test_loaders.py", "tests/test_train.py", "-k", sel],
               lim["tests"])
    loaders = ["dali", "pyav"] if nvdec else ["pyav"]
    if r.dry:
        r.step("bench_data", [PY, "bench/bench_data.py", "--device", device, "--data", root,
                              "--loader", *loaders, "--batch-size", "4", "--workers", "1",
                              "--pyav-workers", "1", "--pipelines", "1", "2",
                              "--clips-per-video", "4", "--batches", "2", "--repeats", "2",
                              "--warmup", "1", "--out", r.results("data")], 180)
        r.step("bench_train", [PY, "bench/bench_train.py", "--data", root, "--loader", "dali",
                               "memory", "--batch-size", "4", "--workers", "1", "--steps", "2",
                               "--warmup", "1", "--clips-per-video", "4",
                               "--out", r.results("train")], 180)
    else:
        r.step("bench_data", [PY, "bench/bench_data.py", "--device", device, "--data", root,
                              "--loader", *loaders, "--batch-size", "64", "--workers", "2",
                              "--pipelines", "1", "7", "--batches", "10",
                              "--repeats", "3", "--warmup", "3",
                              "--out", r.results("data")], lim["bench_data"])
        r.step("bench_train", [PY, "bench/bench_train.py", "--data", root, "--loader",
                               *(loaders if nvdec else ["pyav", "memory"]),
                               "--batch-size", "64", "--steps", "30", "--warmup", "8",
                               "--out", r.results("train")], lim["bench_train"])
    return r.finish(extra)


def decoders(r: Runner) -> Path:
    """The decoder curve (bench/bench_decoder_curve.py): DALI mixed, SPDL's NVDEC decoder,
    torchcodec's CUDA decoder and PyAV on the CPU, decoded frames/s at 128, 256 and 1080 px
    against 1 to 14 decodes at once."""
    lim = DECODER_STEPS
    extra = env_step(r, ["torch", "nvidia.dali", "av", "spdl.io", "torchcodec",
                         "fastavts.kernels"], lim["env"])
    try:   # SPDL loads FFmpeg by soname when its process starts: PyAV's, where it has them
        from fastavts.data.spdl_loader import pyav_ffmpeg_libs
        libs = pyav_ffmpeg_libs()
        r.env["LD_LIBRARY_PATH"] = os.pathsep.join(
            [libs] + [p for p in r.env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
        extra["ffmpeg_libs"] = libs
    except Exception as e:
        extra["ffmpeg_libs"] = f"none: {type(e).__name__}: {e}"
    cmd = [PY, "bench/bench_decoder_curve.py", "--cache", str(r.cache),
           "--out", r.results("decoder_curve")]
    if r.dry:
        r.step("curve", cmd + ["--device", "cpu", "--sizes", "32", "64", "--concurrency", "1",
                               "2", "--seconds", "1", "--files", "4", "--cell-seconds", "2",
                               "--budget", "120"], 180)
    else:   # rows go out cell by cell; the run stops itself inside the step's limit
        r.step("curve", cmd + ["--device", "gpu", "--budget", str(lim["curve"] - 60)],
               lim["curve"])
    return r.finish(extra)


def merge(tarball: str) -> int:
    """Append the rows of a returned tarball to bench/results/<bench>.jsonl."""
    with tarfile.open(tarball) as tf:
        for m in tf.getmembers():
            if m.isfile() and "/results/" in m.name and m.name.endswith(".jsonl"):
                rows = tf.extractfile(m).read().decode()
                dest = HERE / "results" / Path(m.name).name
                with open(dest, "a") as fh:
                    fh.write(rows)
                print(f"{len(rows.splitlines())} row(s) -> {dest}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["core", "dali", "decoders", "merge"])
    ap.add_argument("tarball", nargs="?", help="merge: the tarball a GPU run returned")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_checks"),
                    help="where the logs and the tarball go (default $OUT)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds the whole part may take (steps' limits are cut to fit); "
                         "default: the sum of the part's step limits (core 390, dali 300, "
                         "decoders 280)")
    ap.add_argument("--dry-run", action="store_true",
                    help="the same steps at toy sizes on a CPU")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "fastavts_gpu_checks"),
                    help="logs, rows and the data cache (outside --out: only the tarball goes "
                         "there)")
    args = ap.parse_args(argv)
    if args.part == "merge":
        if not args.tarball:
            ap.error("merge needs the tarball")
        return merge(args.tarball)
    steps = dict(core=CORE_STEPS, dali=DALI_STEPS, decoders=DECODER_STEPS)[args.part]
    budget = args.budget or sum(steps.values())
    if args.dry_run:
        budget = max(budget, 900)   # toy sizes on 2 CPU cores, with the interpreter
    r = Runner(args.part, Path(args.out), budget, args.dry_run, Path(args.work))
    dict(core=core, dali=dali, decoders=decoders)[args.part](r)
    return 1 if r.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
