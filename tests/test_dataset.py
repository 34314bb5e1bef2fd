"""The Dataset API reads back exactly what prepare wrote."""
import av
import numpy as np
import pytest

from fastavts.data import Dataset  # the public path


def all_frames(path):
    """Independent reference: decode the whole file from the start, in order."""
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_frames_match_a_sequential_decode(prepared):
    ds = Dataset.open(prepared)
    rng = np.random.default_rng(0)
    for v in ds.videos:
        ref = all_frames(prepared / v["segments"][0]["path"])
        assert len(ref) == v["num_frames"]
        idx = rng.integers(0, v["num_frames"], size=9)
        idx = np.concatenate([idx, idx[:2], [v["num_frames"] - 1, 0, 17, 16, 15]])  # repeats
        got = ds.frames(v["id"], idx)
        assert got.dtype == np.uint8 and got.shape == (len(idx), v["height"], v["width"], 3)
        np.testing.assert_array_equal(got, ref[idx])


def test_audio_windows_follow_video_time(prepared):
    ds = Dataset.open(prepared)
    v = ds.videos[0]
    sr = ds.sample_rate
    raw = np.fromfile(prepared / "audio_bank.s16", dtype="<i2")
    track = raw[v["audio_offset"]:v["audio_offset"] + v["audio_samples"]] / 32768.0
    a = ds.audio(v["id"], 1.0, 1.28)
    assert a.dtype == np.float32 and len(a) == int(round(1.28 * sr))
    start = int(round((1.0 - v["audio_start"]) * sr))
    np.testing.assert_allclose(a, track[start:start + len(a)], rtol=0, atol=1e-7)
    # windows reaching outside the recorded sound are zero there, not shorter
    before = ds.audio(v["id"], -0.5, 1.0)
    assert len(before) == sr and not before[: sr // 2 - 1].any()
    np.testing.assert_allclose(before[sr // 2 + 1:], track[1:sr // 2], atol=1e-7)
    after = ds.audio(v["id"], v["duration"] - 0.25, 0.5)
    assert len(after) == sr // 2 and not after[sr // 4 + 1:].any()


def test_clear_errors(prepared, tmp_path):
    ds = Dataset.open(prepared)
    v = ds.videos[0]
    with pytest.raises(IndexError, match=r"\[0, "):
        ds.frames(v["id"], [v["num_frames"]])
    with pytest.raises(KeyError, match="no video 'nope'"):
        ds.audio("nope", 0, 1)
    with pytest.raises(FileNotFoundError, match="fastavts prepare"):
        Dataset.open(tmp_path)


def test_dali_cpu_decoder_reads_prepared_vp9_at_the_same_frame_indices(prepared):
    """The prepared files are made for DALI's decoder (the GPU path); its CPU variant reads
    VP9. Frames it returns for a start index must be the frames Dataset.frames returns."""
    from nvidia.dali import fn, pipeline_def, types

    ds = Dataset.open(prepared)
    v = max(ds.videos, key=lambda r: r["num_frames"])
    data = np.fromfile(prepared / v["segments"][0]["path"], np.uint8)
    starts = [0, 17, v["num_frames"] - 8]

    @pipeline_def(batch_size=len(starts), num_threads=1, device_id=None)
    def pipe():
        enc = fn.external_source(source=lambda: [data] * len(starts), batch=True,
                                 dtype=types.UINT8)
        start = fn.external_source(source=lambda: [np.array(s, np.int32) for s in starts],
                                   batch=True)
        return fn.decoders.video(enc, device="cpu", start_frame=start, sequence_length=8)

    p = pipe()
    p.build()
    (out,) = p.run()
    for i, s in enumerate(starts):
        got = np.array(out[i]).astype(int)
        ref = ds.frames(v["id"], range(s, s + 8)).astype(int)
        err = np.abs(got - ref).mean()
        shifted = [np.abs(got[k] - ds.frames(v["id"], [s + k + d])[0]).mean()
                   for k in range(8) for d in (-1, 1) if 0 <= s + k + d < v["num_frames"]]
        print(s, "mean |dali - pyav|", err, "vs neighbours >=", min(shifted))
        assert got.shape == ref.shape and err < 3       # colour conversion rounding only
        assert err < min(shifted)
