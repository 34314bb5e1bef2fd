"""`fastavts prepare SRC OUT`: turn any pile of videos into a dataset built for fast random access.

    SRC (folder, recursive; or CSV list)                                      inputs.py
      |  one worker process per input (PyAV): pick the video and audio       worker.py
      |  streams, decode both in one demux pass, resample the picture to
      |  constant fps (nearest frame in time), rotate by the display matrix,
      |  resize to the short side, re-encode with a short keyframe interval   encoder.py
      |  (optionally in segments); downmix + resample the sound to mono
      |  int16 at data.sample_rate, measuring where it starts relative to    audio_track.py
      |  the first frame; a worker that dies or hangs is isolated            pool.py
      v
    OUT/videos/<id>.mp4|webm   OUT/audio_bank.s16 (+ .json)   OUT/manifest.jsonl
    OUT/rejected.jsonl         OUT/config.yaml                 OUT/summary.json

Only the parent process (run.py) writes the bank and the lists, in this order for each video:
move the encoded files into place, append the audio (fsync), append the manifest row (fsync).
An interrupted run therefore loses nothing it had finished, and a rerun on the same OUT skips
every input already in manifest.jsonl or rejected.jsonl. Every input ends up in exactly one of
the two lists; a worker that dies inside FFmpeg is retried alone, then rejected.
"""
from ...runtime import resolve_codec  # noqa: F401 (its import path before fastavts.runtime)
from .inputs import SHARD, assign_ids, inputs_fingerprint, list_inputs, parse_shard, shard_of  # noqa: F401
from .run import FROZEN, SUMMARY, WORK, prepare  # noqa: F401
from .worker import DEFAULT_CRF, Reject, process_one  # noqa: F401
