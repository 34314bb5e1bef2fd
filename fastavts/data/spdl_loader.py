"""`loader.kind=spdl`: the PyAV loader's worker processes, each video's frames decoded with
Meta's SPDL (`spdl.io`) instead of PyAV: the fastest CPU decoder measured on this project's
sets (bench/bench_decoders.py). Plans, crops, flips and audio windows are the PyAV loader's
(`build_batch`), and the frames are the same pixels as PyAV's (tests/test_loaders.py),
so the batches are the PyAV loader's, bit for bit.

SPDL is pip-installable (`pip install 'fastavts[spdl]'`) but loads FFmpeg's shared libraries
(libavcodec.so.N, FFmpeg 4 to 8) at run time, which pip does not install:

    sudo apt install libavcodec-dev libavformat-dev libavfilter-dev libavdevice-dev  # Debian
    conda install -c conda-forge 'ffmpeg<9'                                           # conda

`loader.ffmpeg_libs` names a folder of them for the loader's workers (it is put on their
LD_LIBRARY_PATH), or `pyav`: the FFmpeg libraries PyAV's wheel carries, linked under their
plain names in a folder of the temp dir, so that nothing beyond pip is needed. The dynamic
linker reads LD_LIBRARY_PATH when a process starts, so that folder reaches worker processes
(loader.pool=processes, loader.workers >= 1); to decode in the training process
(loader.pool=threads, the faster on a CPU, or loader.workers=0) start python with the folder
on LD_LIBRARY_PATH, or have the system's libraries. With loader.pool=auto on a CPU the loader
takes threads where FFmpeg's libraries load in this process, else worker processes.

A batch's clips of one video are read together (decode_cost.decode_runs): one window demuxed
and decoded per pass, from the keyframe before its first frame, as Dataset.frames does, so the
decode count is the PyAV loader's model.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .decode_cost import decode_runs
from .pyav_loader import PyAVLoader

INSTALL = ("pip install 'fastavts[spdl]' for SPDL itself; for FFmpeg's shared libraries "
           "(4 to 8): apt install libavcodec-dev libavformat-dev libavfilter-dev "
           "libavdevice-dev, or conda install -c conda-forge 'ffmpeg<9', or "
           "loader.ffmpeg_libs=pyav (those PyAV's wheel carries)")


def pyav_ffmpeg_libs() -> str:
    """A folder holding PyAV's bundled FFmpeg libraries under their plain sonames
    (libavcodec.so.62 -> libavcodec-1a2b3c4d.so.62), for readers that load FFmpeg by soname.
    Made once per PyAV build in the temp dir."""
    import av

    libs = Path(av.__file__).resolve().parent.parent / "av.libs"
    if not libs.is_dir():
        raise ConfigError(f"loader.ffmpeg_libs=pyav: PyAV's wheel carries no FFmpeg libraries "
                          f"here (no {libs}); {INSTALL}")
    out = Path(tempfile.gettempdir()) / f"fastavts_ffmpeg_libs_av{av.__version__}"
    out.mkdir(exist_ok=True)
    for f in libs.iterdir():   # every library under its own name (they load each other)
        names = [f.name]
        m = re.match(r"(lib(?:av|sw)\w+)-[0-9a-f]+\.so\.(\d+)(?:\.\d+)*$", f.name)
        if m:                     # and FFmpeg's under the names SPDL asks for
            names.append(f"{m.group(1)}.so.{m.group(2)}")
        for name in names:
            link = out / name
            if not link.is_symlink():
                try:
                    link.symlink_to(f)
                except FileExistsError:   # another process made it meanwhile
                    pass
    return str(out)


def worker_env(ffmpeg_libs: str) -> dict:
    """The environment a worker needs to load SPDL with `loader.ffmpeg_libs`."""
    env = dict(os.environ)
    if ffmpeg_libs:
        folder = pyav_ffmpeg_libs() if ffmpeg_libs == "pyav" else ffmpeg_libs
        if not Path(folder).is_dir():
            raise ConfigError(f"loader.ffmpeg_libs={ffmpeg_libs}: no such folder; give the "
                              f"folder of libavcodec.so.N, or pyav")
        env["LD_LIBRARY_PATH"] = folder + os.pathsep + env.get("LD_LIBRARY_PATH", "")
    return env


def probe(path: str, ffmpeg_libs: str) -> None:
    """Demux a moment of `path` with SPDL in a process started as the workers will be;
    a ConfigError saying what to install where it cannot."""
    code = ("import sys, spdl.io\n"
            "p = spdl.io.demux_video(sys.argv[1], timestamp=(0.0, 0.1))\n"
            "spdl.io.decode_packets(p)\n")
    r = subprocess.run([sys.executable, "-c", code, path], env=worker_env(ffmpeg_libs),
                       capture_output=True, text=True, timeout=120)
    if r.returncode:
        said = (r.stderr.strip().splitlines() or ["(nothing said)"])[-1]
        if "No module named 'spdl" in said:
            raise ConfigError(f"loader.kind=spdl but SPDL is not installed: {INSTALL}.")
        raise ConfigError(f"loader.kind=spdl cannot decode {path}: {said[:400]}. It needs "
                          f"FFmpeg's shared libraries: {INSTALL}.")


class SpdlFrames:
    """`frames(video_id, indices)` like Dataset.frames (uint8 (T, H, W, 3) RGB), decoded by
    SPDL; `.bank` is the dataset's audio bank."""

    shares_spans = True   # a video's clips asked together are read in shared passes

    def __init__(self, ds):
        import spdl.io

        self.ds, self.bank, self.root = ds, ds.bank, Path(ds.root)
        self.keyframe_interval = ds.keyframe_interval
        self._io = spdl.io

    def frames(self, video, indices) -> np.ndarray:
        """`video`: its record or its id."""
        v, idx, out = self.ds.frame_request(video, indices)
        fps = v["fps"]
        for seg in v["segments"]:
            lo, n = seg["start_frame"], seg["num_frames"]
            sel = np.nonzero((idx >= lo) & (idx < lo + n))[0]
            if not sel.size:
                continue
            need = np.unique(idx[sel])
            got: dict[int, np.ndarray] = {}
            with self._io.Demuxer(str(self.root / seg["path"])) as dm:
                for run in decode_runs(need.tolist(), lo, self.keyframe_interval):
                    a, b = run[0] - lo, run[-1] - lo
                    # the window's frames are a..b: SPDL seeks to the keyframe before it,
                    # decodes, and its filter keeps the frames whose time lies inside
                    packets = dm.demux_video(window=((a - 0.5) / fps, (b + 0.5) / fps))
                    arr = self._io.to_numpy(self._io.convert_frames(
                        self._io.decode_packets(packets)))
                    if arr.shape != (b - a + 1, v["height"], v["width"], 3):
                        raise RuntimeError(
                            f"SPDL decoded {arr.shape[0]} frames of {arr.shape[2]}x"
                            f"{arr.shape[1]} for frames {a}..{b} of {seg['path']}, where the "
                            f"manifest says {b - a + 1} of {v['width']}x{v['height']}")
                    for f in run:
                        got[f] = arr[f - lo - a]
            for pos in sel:
                out[pos] = got[int(idx[pos])]
        return out


class SpdlLoader(PyAVLoader):
    kind = "spdl"
    frame_reader = SpdlFrames
    shares_spans = True

    def __init__(self, cfg, root, **kw):
        super().__init__(cfg, root, **kw)
        lc = cfg.loader
        first = str(self.root / self.sampler.videos[0]["segments"][0]["path"])
        in_process = lc.workers == 0 or self.pool == "threads"
        if in_process:   # this process decodes: FFmpeg's libraries must load here
            try:
                import spdl.io
                spdl.io.decode_packets(spdl.io.demux_video(first, timestamp=(0.0, 0.1)))
            except Exception as e:
                if not (lc.pool == "auto" and lc.workers):
                    folder = ("$(python -c 'from fastavts.data.spdl_loader import "
                              "pyav_ffmpeg_libs; print(pyav_ffmpeg_libs())')"
                              if lc.ffmpeg_libs in ("", "pyav") else lc.ffmpeg_libs)
                    asked = "loader.workers=0" if lc.workers == 0 else "loader.pool=threads"
                    raise ConfigError(
                        f"loader.kind=spdl with {asked} decodes in this process, and SPDL "
                        f"cannot decode {first} here ({type(e).__name__}: {str(e)[:200]}). "
                        f"FFmpeg's libraries must load when python starts: "
                        f"{INSTALL.split('; ', 1)[1]}, then start with "
                        f"LD_LIBRARY_PATH={folder} (loader.ffmpeg_libs reaches worker "
                        f"processes only), or use loader.pool=processes.") from None
                # threads would be the faster, but only processes started with
                # loader.ffmpeg_libs on their library path can load FFmpeg here
                self._pool = "processes"   # (only where loader.pool=auto)
                in_process = False
        if not in_process:   # worker processes decode: they must load FFmpeg
            probe(first, lc.ffmpeg_libs)
        self._env = worker_env(lc.ffmpeg_libs)

    def _start(self, epoch: int, start: int) -> None:
        # spawned workers take the environment of the moment they start
        saved = os.environ.get("LD_LIBRARY_PATH")
        os.environ["LD_LIBRARY_PATH"] = self._env.get("LD_LIBRARY_PATH", "")
        try:
            super()._start(epoch, start)   # the DataLoader's iterator starts its workers
        finally:
            if saved is None:
                os.environ.pop("LD_LIBRARY_PATH", None)
            else:
                os.environ["LD_LIBRARY_PATH"] = saved
