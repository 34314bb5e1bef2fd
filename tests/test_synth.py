"""The synthetic set: deterministic, real media files, sound and picture events that coincide
when measured from the *decoded* files."""
import hashlib
import json
from pathlib import Path

import av
import numpy as np
import pytest

from fastavts.config import build_config
from fastavts.data.synth import KINDS, encode, generate_video, synthesize

from av_events import decode_all, floor_contacts, sound_onsets
from conftest import small_cfg


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.suffix in (".webm", ".mp4", ".mkv", ".json")}


def test_same_seed_same_files_other_seed_other_files(tmp_path, synth_dir):
    cfg = small_cfg("synth.videos=3", "synth.seed=7", "synth.workers=1")
    synthesize(tmp_path / "a", cfg, progress=False)
    a, ref = digest(tmp_path / "a"), digest(synth_dir)
    # Video i depends only on (seed, i): the 6-video set made with 2 workers starts the same.
    assert a and all(ref[k] == v for k, v in a.items())
    synthesize(tmp_path / "b", small_cfg("synth.videos=3", "synth.seed=8"), progress=False)
    b = digest(tmp_path / "b")
    assert all(a[k] != b[k] for k in a)


def test_rerun_keeps_complete_files(tmp_path):
    cfg = small_cfg("synth.videos=2")
    synthesize(tmp_path, cfg, progress=False)
    s = synthesize(tmp_path, cfg, progress=False)
    assert s["made"] == 0 and s["skipped"] == 2


def test_files_are_real_media_with_labels(synth_dir):
    cfg = small_cfg()
    for side in sorted(synth_dir.glob("*.json")):
        meta = json.loads(side.read_text())
        with av.open(str(synth_dir / meta["file"])) as c:
            v, a = c.streams.video[0], c.streams.audio[0]
            assert (v.codec_context.name, a.codec_context.name) == ("vp9", "opus")
            assert float(v.average_rate) == 25
            n = sum(1 for _ in c.decode(v))
        assert n == meta["num_frames"]
        assert cfg.synth.min_duration - 0.04 <= n / 25 <= cfg.synth.max_duration + 0.04
        assert meta["label"] == "+".join(sorted(meta["kinds"]))
        assert set(meta["kinds"]) <= set(KINDS)
        assert {o["kind"] for o in meta["objects"]} == set(meta["kinds"])


def test_mjpeg_source_holds_the_generated_picture_and_samples(tmp_path):
    """synth.codec=mjpeg (the CPU demo's source for prepare): Matroska with MJPEG and 16-bit PCM;
    decoded, the sound is the generator's to the 16-bit step and the picture as close to the
    generator's frames as the VP9 file synth makes of the same video (within 0.5 dB PSNR)."""
    cfg = small_cfg("synth.videos=2", "synth.codec=mjpeg", "synth.workers=1", "synth.seed=3")
    synthesize(tmp_path, cfg, progress=False)
    for i in range(2):
        meta = json.loads((tmp_path / f"synth_{i:06d}.json").read_text())
        assert meta["file"].endswith(".mkv")
        frames_ref, audio_ref, _ = generate_video(i, cfg.synth)
        with av.open(str(tmp_path / meta["file"])) as c:
            assert (c.streams.video[0].codec_context.name,
                    c.streams.audio[0].codec_context.name) == ("mjpeg", "pcm_s16le")
            assert c.streams.audio[0].sample_rate == cfg.synth.sample_rate
        frames, _, audio, sr = decode_all(tmp_path / meta["file"])
        assert sr == cfg.synth.sample_rate and frames.shape == frames_ref.shape
        assert len(audio) == len(audio_ref)
        assert np.abs(audio - audio_ref).max() <= 1 / 32768 + 1e-7
        encode(tmp_path / "vp9.webm", frames_ref, audio_ref, cfg.synth.fps,
               cfg.synth.sample_rate, "vp9")

        psnr = [10 * np.log10(255 ** 2 / np.mean((x.astype(np.float64) - frames_ref) ** 2))
                for x in (frames, decode_all(tmp_path / "vp9.webm")[0])]
        assert psnr[0] > psnr[1] - 0.5 > 25


@pytest.fixture(scope="module", params=["vp9", "h264", "mjpeg"])
def one_object_set(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"one_{request.param}")
    cfg = build_config(overrides=[
        f"synth.codec={request.param}", "synth.videos=3", "synth.min_duration=5",
        "synth.max_duration=6", "synth.min_objects=1", "synth.max_objects=1",
        "synth.max_distractors=2", "synth.seed=1", "synth.workers=2"])
    synthesize(out, cfg, progress=False)
    return out


def _match(a, b, tol):
    """Share of the times in a that have a time of b within tol."""
    if not a:
        return 0.0
    return float(np.mean([bool(b) and min(abs(x - y) for y in b) <= tol for x in a]))


def test_sound_and_picture_events_coincide_in_decoded_files(one_object_set):
    """One sounding object: every floor contact seen in the decoded picture has an onset in the
    decoded sound within one frame, and the other way round."""
    for side in sorted(one_object_set.glob("*.json")):
        meta = json.loads(side.read_text())
        frames, _, audio, sr = decode_all(one_object_set / meta["file"])
        fps = meta["fps"]
        contacts = [k / fps for k in floor_contacts(frames, meta["objects"][0]["colour"],
                                                    meta["floor_y"])]
        onsets = sound_onsets(audio, sr)
        tol = 1 / fps + 0.005
        print(side.name, "contacts", np.round(contacts, 3), "onsets", np.round(onsets, 3))
        assert len(contacts) >= 4 and len(onsets) >= 4
        assert _match(contacts, onsets, tol) >= 0.85
        assert _match(onsets, contacts, tol) >= 0.85
        # and both agree with what the generator says it did
        truth = [e["t"] for e in meta["events"]]
        assert _match(onsets, truth, 0.005) >= 0.85
        assert _match(contacts, truth, tol) == 1.0


def test_several_objects_sound_only_at_their_contacts(tmp_path):
    cfg = build_config(overrides=["synth.videos=2", "synth.min_duration=5",
                                  "synth.max_duration=6", "synth.min_objects=3",
                                  "synth.max_objects=3", "synth.seed=2", "synth.workers=2"])
    synthesize(tmp_path, cfg, progress=False)
    for side in sorted(tmp_path.glob("*.json")):
        meta = json.loads(side.read_text())
        frames, _, audio, sr = decode_all(tmp_path / meta["file"])
        fps = meta["fps"]
        contacts = sorted(k / fps for o in meta["objects"]
                          for k in floor_contacts(frames, o["colour"], meta["floor_y"]))
        onsets = sound_onsets(audio, sr)
        tol = 1 / fps + 0.005
        print(side.name, len(meta["events"]), "events", len(contacts), "contacts",
              len(onsets), "onsets")
        # occlusions hide some contacts and overlapping sounds some onsets, but what is found
        # on one side is found on the other
        assert len(contacts) >= 0.8 * len(meta["events"])
        assert len(onsets) >= 0.4 * len(meta["events"])
        assert _match(onsets, contacts, tol) >= 0.85
        assert _match(contacts, [e["t"] for e in meta["events"]], tol) >= 0.9


def test_every_clip_window_holds_every_object_and_its_sound(synth_dir):
    """What makes a 0.5 s shift undetectable from one frame or the overall spectrum: each
    sounding object is on screen in every frame and sounds in every 1.28 s window."""
    for side in sorted(synth_dir.glob("*.json")):
        meta = json.loads(side.read_text())
        frames, _, _, _ = decode_all(synth_dir / meta["file"])
        for j, o in enumerate(meta["objects"]):
            seen = (np.abs(frames.astype(int) - o["colour"]).max(-1) < 60).any((1, 2))
            assert seen.mean() > 0.9, (side.name, o["kind"])  # < 1: occlusions
            assert seen[:3].any() and seen[-3:].any()
            times = np.array([e["t"] for e in meta["events"] if e["object"] == j])
            for t0 in np.arange(0, meta["duration"] - 1.28, 0.1):
                assert ((times >= t0) & (times < t0 + 1.28)).any(), (side.name, o["kind"], t0)
