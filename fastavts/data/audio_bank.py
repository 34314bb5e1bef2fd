"""The audio bank: every video's sound track as mono int16 at one sample rate, in one file.

Layout: `audio_bank.s16` holds the tracks back to back (little-endian int16); `audio_bank.json`
says the format. The index lives in the manifest rows: `audio_offset` and `audio_samples`
(in samples) place a video's track in the file, and `audio_start` (seconds) is the time of the
track's first sample measured from the video's first frame (it may be negative: audio that
starts before the picture). Reading maps the file into memory, so workers share pages and a
window costs one slice.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import ConfigError

BANK = "audio_bank.s16"
HEADER = "audio_bank.json"


class AudioBankWriter:
    """Appends tracks; the caller writes the manifest row *after* `append` returned, so a
    row never points past the durable end of the bank."""

    def __init__(self, root: Path, sample_rate: int, valid_samples: int):
        self.path = root / BANK
        header = dict(format="int16le", channels=1, sample_rate=sample_rate, file=BANK)
        hp = root / HEADER
        if hp.exists():
            old = json.loads(hp.read_text())
            if old.get("sample_rate") != sample_rate:
                raise ValueError(f"{root} holds an audio bank at {old.get('sample_rate')} Hz but "
                                 f"data.sample_rate={sample_rate}; prepare into a new folder")
        else:
            hp.write_text(json.dumps(header, indent=1))
        # Drop bytes past the last committed track (an append the manifest never recorded).
        self.fh = open(self.path, "ab")
        if self.fh.tell() > 2 * valid_samples:
            self.fh.truncate(2 * valid_samples)
        elif self.fh.tell() < 2 * valid_samples:
            raise ValueError(f"{self.path} is shorter ({self.fh.tell() // 2} samples) than the "
                             f"manifest says ({valid_samples}); the bank is damaged: prepare "
                             f"into a new folder")
        self.fh.seek(0, os.SEEK_END)
        self.samples = valid_samples

    def append(self, pcm: np.ndarray) -> int:
        """Append int16 samples durably; returns their offset (in samples)."""
        off = self.samples
        self.fh.write(np.ascontiguousarray(pcm, dtype="<i2").tobytes())
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.samples += len(pcm)
        return off

    def close(self):
        self.fh.close()


class AudioBank:
    """Read side: `window(offset, samples, audio_start, start_s, duration_s)`."""

    def __init__(self, root: str | os.PathLike):
        root = Path(root)
        try:
            header = json.loads((root / HEADER).read_text())
            self.sample_rate = int(header["sample_rate"])
            path = root / header["file"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{root / HEADER}: cannot be read ({type(e).__name__}: "
                              f"{str(e)[:120]}); the audio bank's header is damaged or missing: "
                              f"restore it or prepare into a new folder") from None
        try:
            size = path.stat().st_size
        except OSError as e:
            raise ConfigError(f"{path}: {e.strerror}; the audio bank is missing: restore it or "
                              f"prepare into a new folder") from None
        self.path = path
        # a torn odd byte at the end is not a sample
        self.pcm = (np.memmap(path, dtype="<i2", mode="r", shape=(size // 2,)) if size > 1
                    else np.zeros(0, "<i2"))

    def window(self, offset: int, samples: int, audio_start: float, start_s: float,
               duration_s: float) -> np.ndarray:
        """float32 samples of [start_s, start_s + duration_s) in video time; zeros where the
        window lies outside the track."""
        sr = self.sample_rate
        n = int(round(duration_s * sr))
        first = int(round((start_s - audio_start) * sr))  # first sample index in the track
        out = np.zeros(n, np.float32)
        lo, hi = max(first, 0), min(first + n, samples)
        if hi > lo:
            out[lo - first:hi - first] = self.pcm[offset + lo:offset + hi] * (1.0 / 32768.0)
        return out
