"""Event detectors on *decoded* media, independent of the generator: where objects touch the
floor in the picture, and where sounds start in the audio."""
from __future__ import annotations

import av
import numpy as np


def decode_all(path):
    """(frames uint8 (N, H, W, 3), frame times (N,), audio float32 mono, sample rate)."""
    with av.open(str(path)) as c:
        frames, times = [], []
        for f in c.decode(video=0):
            frames.append(f.to_ndarray(format="rgb24"))
            times.append(f.time)
    with av.open(str(path)) as c:
        chunks, sr, t0 = [], None, None
        for f in c.decode(audio=0):
            if t0 is None:
                t0, sr = f.time, f.sample_rate
            x = f.to_ndarray()
            if np.issubdtype(x.dtype, np.integer):   # PCM (synth.codec=mjpeg): to [-1, 1)
                x = x / float(np.iinfo(x.dtype).max + 1)
            chunks.append(x.mean(0))
    audio = np.concatenate(chunks).astype(np.float32)
    if t0 and t0 > 0:  # place sample 0 at time 0
        audio = np.concatenate([np.zeros(int(round(t0 * sr)), np.float32), audio])
    return np.stack(frames), np.asarray(times), audio, sr


def floor_contacts(frames, colour, floor_y, tol=60, near=0.35):
    """Frames where the object of `colour` is at its lowest point of a bounce (a local maximum
    of its bottom edge's row) and within `near` x height of the floor."""
    H = frames.shape[1]
    diff = np.abs(frames.astype(np.int16) - np.asarray(colour, np.int16)).max(-1)
    mask = diff < tol                                   # (N, H, W)
    rows = mask.sum(-1) >= 2                            # (N, H) rows holding the object
    bottom = np.where(rows.any(-1), H - 1 - np.argmax(rows[:, ::-1], axis=-1), -1).astype(float)
    out = []
    for k in range(2, len(bottom) - 2):
        b = bottom[k]
        if b < floor_y - near * H or min(bottom[k - 2:k + 3]) < 0:
            continue
        # a V: falling before, rising after (a plateau of two frames at the bottom is allowed)
        if b >= bottom[k - 1] and b >= bottom[k + 1] and b > bottom[k - 2] and b > bottom[k + 2]:
            if not out or k - out[-1] > 2:
                out.append(k)
    return out


def sound_onsets(audio, sr, hop_s=0.002, rise=3.0, min_gap=0.05):
    """Times where the short-time energy jumps by `rise` x over the 10-30 ms before."""
    hop = max(1, int(hop_s * sr))
    n = len(audio) // hop
    e = np.sqrt((audio[: n * hop].reshape(n, hop) ** 2).mean(1)) + 1e-6
    floor = np.percentile(e, 10)  # the background between events
    out, last = [], -1e9
    for k in range(15, n):
        before = e[k - 15:k - 5].max()
        if e[k] > rise * before and e[k] > 3 * floor and (k * hop / sr - last) > min_gap:
            # refine: first sample of this hop window above half the hop's peak
            seg = np.abs(audio[(k - 1) * hop:(k + 1) * hop])
            i = int(np.argmax(seg > 0.5 * seg.max()))
            t = ((k - 1) * hop + i) / sr
            out.append(t)
            last = t
    return out
