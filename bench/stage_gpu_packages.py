"""Stage the packages the GPU checks' `dali` part needs (DALI, PyAV, OmegaConf and what they
import) for a GPU machine without a package index that receives files in transfers of limited
size: as few parts as possible.

    python bench/stage_gpu_packages.py                 # Python 3.12 (the lent machines'), x86-64
    # -> .gpu_stage/p00 ... pNN, each at most --part-mb; carry them in, one call each, then:
    python .gpu_stage/p00/install_stage.py && export PYTHONPATH=/tmp/site:$PYTHONPATH

Lean: the wheels are unpacked here and only what the target Python imports is kept (DALI
ships bindings for every CPython from 3.10 to 3.15 and its C++ headers: gone), then packed as
one xz-compressed tar (the target's Python reads it with the standard library) and split.
.gpu_stage/ is ignored by git: name its parts in the device call's `carry`."""
from __future__ import annotations

import argparse
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGES = ["nvidia-dali-cuda130==2.4.0", "astunparse", "gast", "optree", "makefun", "nvtx",
            "libcst", "av>=15,<20", "omegaconf>=2.4,<2.5",   # 2.4 needs no antlr4 wheel
            "PyYAML", "six", "typing-extensions", "packaging"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_5_x86_64",
             "manylinux1_x86_64"]

INSTALL = r'''"""Reassemble the staged parts (.gpu_stage/pNN/part.NN) into /tmp/site (or argv[1])."""
import lzma, sys, tarfile
from pathlib import Path
here = Path(__file__).resolve().parent.parent
site = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/site")
parts = sorted(here.glob("p*/part.*"), key=lambda p: int(p.suffix[1:]))
class Joined:
    def __init__(self, files):
        self.files, self.fh = list(files), None
    def read(self, n=-1):
        out = b""
        while n < 0 or len(out) < n:
            if self.fh is None:
                if not self.files:
                    break
                self.fh = open(self.files.pop(0), "rb")
            chunk = self.fh.read(-1 if n < 0 else n - len(out))
            if not chunk:
                self.fh.close()
                self.fh = None
                continue
            out += chunk
        return out
print(f"{len(parts)} parts -> {site}", flush=True)
with tarfile.open(fileobj=lzma.LZMAFile(Joined(parts)), mode="r|") as tf:
    tf.extractall(site)
print("installed:", ", ".join(sorted(p.name for p in site.iterdir() if p.suffix == ".dist-info")))
'''


def download(dest: Path, python: str, packages: list[str]) -> list[Path]:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd + packages, check=True)
    return sorted(dest.glob("*.whl"))


def unpack(wheel: Path, site: Path) -> None:
    """A wheel's files into `site` as pip would put them (its .data/purelib|platlib merged)."""
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    for data in site.glob("*.data"):
        for sub in ("purelib", "platlib"):
            if (data / sub).is_dir():
                shutil.copytree(data / sub, site, dirs_exist_ok=True)
        shutil.rmtree(data)


def lean(site: Path, python: str) -> int:
    """Drop what the target Python never imports: other CPythons' bindings, C++ headers,
    static libraries. Returns the bytes dropped."""
    tag = "cpython-" + python.replace(".", "")
    dropped = 0
    for f in list(site.rglob("*")):
        if not f.exists():
            continue
        other_python = re.search(r"\.cpython-3\d+t?-", f.name) and f".{tag}-" not in f.name
        header_dir = f.is_dir() and f.name == "include" and "dali" in f.parts
        if other_python or f.suffix in (".a",) or header_dir:
            size = (sum(x.stat().st_size for x in f.rglob("*") if x.is_file()) if f.is_dir()
                    else f.stat().st_size)
            shutil.rmtree(f) if f.is_dir() else f.unlink()
            dropped += size
    return dropped


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default="3.12", help="the GPU machine's Python (default 3.12)")
    ap.add_argument("--out", default=".gpu_stage", help="where the parts go (default .gpu_stage)")
    ap.add_argument("--part-mb", type=int, default=55, help="largest part in MB (default 55)")
    ap.add_argument("--wheels", help="a folder of wheels to use instead of downloading")
    ap.add_argument("packages", nargs="*", default=PACKAGES)
    args = ap.parse_args(argv)
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wheels = sorted(Path(args.wheels).glob("*.whl")) if args.wheels else \
            download(tmp / "wheels", args.python, args.packages)
        site = tmp / "site"
        for w in wheels:
            unpack(w, site)
        full = sum(f.stat().st_size for f in site.rglob("*") if f.is_file())
        dropped = lean(site, args.python)
        packed = tmp / "stage.tar.xz"
        with lzma.open(packed, "wb", preset=6) as fh, tarfile.open(fileobj=fh, mode="w|") as tf:
            for f in sorted(site.iterdir()):
                tf.add(f, arcname=f.name)
        shutil.rmtree(out, ignore_errors=True)
        size, n = packed.stat().st_size, 0
        with open(packed, "rb") as fh:
            while chunk := fh.read(args.part_mb * 10**6):
                d = out / f"p{n:02d}"
                d.mkdir(parents=True)
                (d / f"part.{n:02d}").write_bytes(chunk)
                n += 1
    (out / "p00" / "install_stage.py").write_text(INSTALL)
    print(f"{len(wheels)} wheels, {full / 1e6:.0f} MB unpacked, {dropped / 1e6:.0f} MB dropped "
          f"(other Pythons, headers), {size / 1e6:.0f} MB packed in {n} part(s) of at most "
          f"{args.part_mb} MB under {out}/")
    print(f"on the GPU machine: python {out}/p00/install_stage.py && export "
          f"PYTHONPATH=/tmp/site:$PYTHONPATH")
    return 0


if __name__ == "__main__":
    sys.exit(main())
