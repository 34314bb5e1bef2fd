"""DALI (CPU pipeline, VP9) and PyAV loaders: same plan, same batch; windows hold the impacts
the clips show; damaged files are skipped and counted; a resumed loader continues exactly."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fastavts.config import ConfigError, build_config
from fastavts.data import Dataset
from fastavts.data.loader import make_loader
from fastavts.data.prepare import prepare
from fastavts.data.sampler import HARD, POSITIVE
from fastavts.data.synth import synthesize

from av_events import floor_contacts

BASE = ["loader.device=cpu", "loader.workers=0", "loader.batch_size=6",
        "sampler.clips_per_video=2", "prepare.codec=vp9", "prepare.workers=2",
        "synth.workers=2"]


@pytest.fixture(scope="module")
def one_object(tmp_path_factory):
    """6 videos of 6-8 s, one sounding object each, 128x128, prepared at short side 128."""
    root = tmp_path_factory.mktemp("loaders")
    cfg = build_config(overrides=BASE + [
        "synth.videos=6", "synth.min_duration=6", "synth.max_duration=8",
        "synth.min_objects=1", "synth.max_objects=1", "synth.seed=3"])
    synthesize(root / "synth", cfg, progress=False)
    prepare(root / "synth", root / "prepared", cfg, progress=False)
    return root / "prepared"


@pytest.fixture(scope="module")
def segmented(one_object):
    """The same videos cut into 2.56 s segments (64 frames, 4 keyframe intervals)."""
    out = one_object.parent / "segmented"
    prepare(one_object.parent / "synth", out,
            build_config(overrides=BASE + ["prepare.segment_seconds=2.56"]), progress=False)
    return out


def loader(root, kind, *overrides, **kw):
    return make_loader(build_config(overrides=BASE + [f"loader.kind={kind}", *overrides]),
                       root, **kw)


def damaged_copy(one_object, tmp_path, which: int, seed: int):
    """A copy of the set with video `which`'s file overwritten by random bytes: (root, its
    record)."""
    root = tmp_path / "prepared"
    shutil.copytree(one_object, root)
    victim = Dataset.open(root).videos[which]
    path = root / victim["segments"][0]["path"]
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, path.stat().st_size,
                                                           dtype=np.uint8).tobytes())
    return root, victim


def assert_same_crop(x, y):
    """(B, 3, T, c, c) clips of two decoders: the planned crop, to the pixel (each frame closer
    to the other decoder's than the same crop one pixel right or down, or left or up)."""
    H, W = x.shape[-2:]
    for dx, dy in ((1, 0), (0, 1)):
        moved = (x[..., dy:, dx:] - y[..., :H - dy, :W - dx]).abs().mean(dim=(1, 3, 4))
        same = (x[..., dy:, dx:] - y[..., dy:, dx:]).abs().mean(dim=(1, 3, 4))
        assert (same < moved).float().mean() > 0.95
        moved = (x[..., :H - dy, :W - dx] - y[..., dy:, dx:]).abs().mean(dim=(1, 3, 4))
        same = (x[..., :H - dy, :W - dx] - y[..., :H - dy, :W - dx]).abs().mean(dim=(1, 3, 4))
        assert (same < moved).float().mean() > 0.95


META = ["label", "role", "clip_video", "clip_t0", "audio_video", "audio_t0", "audio_owner"]


def nv(batch) -> torch.Tensor:
    """A batch's video as the model takes it: the CPU loaders' uint8 crops normalised as the
    step does (features.ModelInputs), DALI's float video as it is."""
    from fastavts.data.features import ModelInputs
    return ModelInputs(build_config().data)(dict(video=batch["video"]))["video"]


def na(batch) -> torch.Tensor:
    """A batch's audio as the model takes it: the CPU loaders' int16 windows made into the
    log-mel as the step does (features.ModelInputs), a float log-mel as it is."""
    from fastavts.data.features import ModelInputs
    return ModelInputs(build_config().data)(dict(audio=batch["audio"]))["audio"]


@pytest.mark.parametrize("pairs", ["pairs=paired", "pairs=inbatch", "paired_windows=2"])
def test_dali_and_pyav_give_the_same_batches(one_object, pairs):
    extra = [f"sampler.{pairs}", "sampler.k=2", "sampler.curriculum=[[0,0.5]]"]
    dali, pyav = loader(one_object, "dali", *extra), loader(one_object, "pyav", *extra)
    n = 0
    for a, b in zip(dali.epoch(1), pyav.epoch(1)):
        n += 1
        for k in META:
            assert torch.equal(a[k], b[k]), k
        B, M = len(a["clip_video"]), len(a["role"])
        assert a["video"].shape == b["video"].shape == (B, 3, 16, 112, 112)
        # DALI normalises in its pipeline; PyAV hands uint8 over, normalised by the step
        assert a["video"].dtype == torch.float32 and b["video"].dtype == torch.uint8
        # DALI makes the log-mel in its pipeline; PyAV hands the windows over as int16
        assert b["audio"].dtype == torch.int16 and b["audio"].shape == (M, 127 * 160 + 400)
        assert a["audio"].shape == na(b).shape == (M, 1, 64, 128)
        assert M == {"pairs=inbatch": 3 * B, "paired_windows=2": 2 * B}.get(pairs, B)
        # frames: the two decoders differ only by YUV->RGB rounding (~1.5 of 255)
        va, vb = a["video"], nv(b)
        err = (va - vb).abs().mean(dim=(1, 3, 4))     # (B, T)
        shifted = (va[:, :, 1:] - vb[:, :, :-1]).abs().mean(dim=(1, 3, 4))
        print("video err", err.mean().item(), "vs one frame off", shifted.mean().item())
        assert err.max() < 0.06                    # in normalised units (1/255/0.22 = 0.018)
        assert (err[:, 1:] < shifted).float().mean() > 0.95
        assert_same_crop(va, vb)
        # log-mel: the same float32 arithmetic on both sides, to a few thousandths of a dB
        loud = na(b) > -60
        aerr = (a["audio"] - na(b)).abs()
        print("audio err dB max", aerr[loud].max().item())
        assert aerr[loud].max() < 0.02 and loud.float().mean() > 0.5
    assert n == len(dali) == len(pyav) > 0


def logmel_onsets(lm: np.ndarray, rise_db: float = 8.0) -> list[float]:
    """Seconds from the window start where the total power jumps by rise_db over 10-50 ms."""
    e = 10 * np.log10((10 ** (lm / 10)).sum(0))
    out = []
    for k in range(4, len(e)):
        if e[k] - e[max(0, k - 6):k - 1].max() > rise_db and (not out or k - out[-1] > 6):
            out.append(k)
    return [k * 0.01 for k in out]


def share_matched(a, b, tol):
    return np.mean([min((abs(x - y) for y in b), default=9) <= tol for x in a]) if a else 1.0


@pytest.mark.parametrize("kind", ["dali", "pyav"])
def test_positive_windows_sound_where_the_clip_shows_impacts(one_object, kind):
    """Contacts are found in the prepared video at full frame rate over the clip's span; the
    sounds are found in the loader's log-mel of the pair's window."""
    L = loader(one_object, kind, "sampler.curriculum=[[0,1.0]]", "sampler.clips_per_video=4")
    ds = Dataset.open(one_object)
    tol = 0.04 + 0.012  # one video frame, plus half a 25 ms analysis window
    pos, hard = [], []
    for b in L.epoch(0):
        logmel = na(b)
        for i in range(len(b["clip_video"])):
            v = L.sampler.videos[int(b["clip_video"][i])]
            t0 = float(b["clip_t0"][i])
            f0 = int(round(t0 * v["fps"]))
            frames = ds.frames(v["id"], range(f0, f0 + 32))
            meta = ds.by_id[v["id"]]["meta"]   # the sampler keeps only what plans read
            contacts = [k / v["fps"] for k in floor_contacts(
                frames, meta["objects"][0]["colour"], meta["floor_y"])]
            onsets = logmel_onsets(logmel[i, 0].numpy())
            if not contacts:
                continue
            row = (share_matched(contacts, onsets, tol), share_matched(onsets, contacts, tol))
            {POSITIVE: pos, HARD: hard}[int(b["role"][i])].append(row)
    pos, hard = np.array(pos), np.array(hard)
    print(kind, "positives", pos.mean(0), len(pos), "hard", hard.mean(0), len(hard))
    assert len(pos) >= 8 and len(hard) >= 8
    assert pos.mean(0).min() > 0.9            # every contact heard, every sound seen
    assert hard[:, 0].mean() < 0.5            # shifted >= 0.5 s: coincidences only


@pytest.mark.parametrize("kind", ["dali", "pyav", "memory"])
def test_a_damaged_file_mid_epoch_is_skipped_and_counted(one_object, tmp_path, kind):
    root = tmp_path / "prepared"
    shutil.copytree(one_object, root)
    ds = Dataset.open(root)
    victim = ds.videos[2]
    path = root / victim["segments"][0]["path"]
    path.write_bytes(np.random.default_rng(0).integers(0, 256, path.stat().st_size,
                                                        dtype=np.uint8).tobytes())
    L = loader(root, kind, "sampler.clips_per_video=4")
    bad = L.video_ids.index(victim["id"])
    batches = list(L.epoch(0))
    assert len(batches) == len(L)                      # the epoch went on to its end
    assert all(bad not in b["clip_video"].tolist() for b in batches)  # replaced
    assert L.faults[victim["id"]] >= 1                  # and counted
    assert sum(b["faults"] for b in batches) >= 1
    assert L.fault_log[0]["video"] == victim["id"] and "Invalid data" in L.fault_log[0]["error"]


@pytest.mark.parametrize("kind", ["dali", "pyav", "memory"])
def test_a_resumed_loader_continues_with_the_same_batches(one_object, kind):
    L = loader(one_object, kind)
    it = L.epoch(2)
    next(it)
    state = L.state_dict()
    rest = list(it)
    R = loader(one_object, kind)
    R.load_state_dict(state)
    again = list(R.epoch(2))
    assert len(again) == len(rest) == len(L) - 1
    for a, b in zip(rest, again):
        for k in META:
            assert torch.equal(a[k], b[k]), k
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["audio"], b["audio"])


def test_dali_parallel_source_workers_give_the_same_batches(one_object):
    a = next(loader(one_object, "dali", "loader.workers=2").epoch(0))
    b = next(loader(one_object, "dali").epoch(0))
    assert torch.equal(a["video"], b["video"]) and torch.equal(a["audio"], b["audio"])


def test_dali_cpu_refuses_h264(one_object, tmp_path):
    cfg = build_config(overrides=BASE + ["loader.kind=dali"])
    import json
    rows = [json.loads(line) for line in (one_object / "manifest.jsonl").read_text().splitlines()]
    shutil.copytree(one_object, tmp_path / "p")
    (tmp_path / "p" / "manifest.jsonl").write_text(
        "".join(json.dumps(dict(r, codec="h264")) + "\n" for r in rows))
    with pytest.raises(ValueError, match="VP8/VP9/MJPEG"):
        make_loader(cfg, tmp_path / "p")


def test_ranks_from_the_torchrun_environment_get_disjoint_shards(one_object, monkeypatch):
    seen = []
    for r in range(2):
        monkeypatch.setenv("RANK", str(r))
        monkeypatch.setenv("WORLD_SIZE", "2")
        L = loader(one_object, "pyav", "loader.batch_size=3")
        assert (L.sampler.rank, L.sampler.world_size) == (r, 2)
        seen.append(set(L.sampler.shard(0).tolist()))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 12


def test_segmented_files_give_the_same_batches_in_both_loaders(segmented):
    dali, pyav = loader(segmented, "dali"), loader(segmented, "pyav")
    assert max(len(v["segments"]) for v in dali.sampler.videos) >= 3
    n = 0
    for a, b in zip(dali.epoch(0), pyav.epoch(0)):
        n += 1
        for k in META:
            assert torch.equal(a[k], b[k]), k
        # clips never straddle a segment boundary
        for vi, f0 in zip(a["clip_video"].tolist(), (a["clip_t0"] * 25).round().long().tolist()):
            segs = dali.sampler.videos[vi]["segments"]
            assert any(s["start_frame"] <= f0 and f0 + 32 <= s["start_frame"] + s["num_frames"]
                       for s in segs)
        assert (a["video"] - nv(b)).abs().mean() < 0.04  # YUV->RGB rounding only
        assert (a["audio"] - na(b)).abs().max() < 0.02
    assert n == len(dali)


@pytest.mark.parametrize("root", ["one_object", "segmented"])
def test_memory_loader_gives_the_pyav_batches(root, request):
    """Whole videos decoded once and sliced = each clip decoded from its keyframe (PyAV both),
    bit for bit; the log-mel cut from each video's whole-sound log-mel = window by window, to
    float rounding, both for windows on the grid (sliced) and off it (computed)."""
    root = request.getfixturevalue(root)
    extra = ["sampler.pairs=inbatch", "sampler.k=2", "sampler.curriculum=[[0,0.5]]"]
    mem, pyav = loader(root, "memory", *extra), loader(root, "pyav", *extra)
    positives = 0
    for epoch in (0, 3):
        n = 0
        for a, b in zip(mem.epoch(epoch), pyav.epoch(epoch)):
            n += 1
            positives += int((a["role"] == POSITIVE).sum())
            for k in META:
                assert torch.equal(a[k], b[k]), k
            assert a["video"].shape == (6, 3, 16, 112, 112)
            assert torch.equal(a["video"], b["video"])
            assert a["audio"].shape == na(b).shape
            # dB values (floor -100): equal to float32 rounding of the FFT and the mel product
            torch.testing.assert_close(a["audio"], na(b), rtol=0, atol=2e-4)
        assert n == len(mem) == len(pyav) > 0
    # each clip's own window is a slice; the hard negatives here are shifted by times off the
    # STFT grid and were computed window by window: both paths were compared above
    assert mem.audio.sliced >= positives > 0 and mem.audio.computed > 0
    # every video decoded once, then served from memory
    ds = Dataset.open(root)
    assert set(mem.cache.videos) == {v["id"] for v in ds.videos}
    assert mem.cache.nbytes == sum(v["num_frames"] * v["height"] * v["width"] * 3
                                   for v in ds.videos)


def test_memory_loader_refuses_a_set_larger_than_its_limit(one_object):
    ds = Dataset.open(one_object)
    need = sum(v["num_frames"] * v["height"] * v["width"] * 3 for v in ds.videos) / 2**30
    with pytest.raises(ConfigError, match=r"loader.memory_gb=.*loader.kind=dali"):
        loader(one_object, "memory", f"loader.memory_gb={need * 0.9}")
    loader(one_object, "memory", f"loader.memory_gb={need * 1.1}")   # just fits: accepted


def _truncate_video(path, keep: int) -> None:
    """Re-encode a prepared VP9 file keeping only its first `keep` frames (the manifest still
    counts them all: a file that does not match its manifest)."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(keep), c.decode(s))]
        rate = s.average_rate
    tmp = path.with_name("tmp_" + path.name)
    with av.open(str(tmp), "w") as o:
        st = o.add_stream("libvpx-vp9", rate=rate)
        st.height, st.width = frames[0].shape[:2]
        st.pix_fmt = "yuv420p"
        for a in frames:
            for p in st.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                o.mux(p)
        for p in st.encode():
            o.mux(p)
    tmp.replace(path)


@pytest.mark.parametrize("kind", ["dali", "pyav", "memory"])
def test_frames_past_the_end_of_a_file_are_a_fault_not_black_frames(one_object, tmp_path, kind):
    """DALI's decoders.video pads indices past the end with black frames by default; the loader
    asks for pad_mode='none', so a manifest that promises frames the file lacks is a fault:
    reported, counted, the video left out, and no constant frame reaches a batch."""
    root = tmp_path / "prepared"
    shutil.copytree(one_object, root)
    victim = Dataset.open(root).videos[1]
    keep = victim["num_frames"] // 3
    _truncate_video(root / victim["segments"][0]["path"], keep=keep)
    L = loader(root, kind, "sampler.clips_per_video=4")
    bad = L.video_ids.index(victim["id"])
    n = 0
    for b in L.epoch(0):
        n += 1
        for vi, t0 in zip(b["clip_video"].tolist(), b["clip_t0"].tolist()):
            if vi == bad:   # a clip of the victim only where the file still has its frames
                assert round(t0 * 25) + 32 <= keep
        flat = nv(b).flatten(3).std(-1)                      # (B, 3, T): 0 for a constant frame
        assert (flat > 1e-3).all(), "a constant (padded) frame in the batch"
    assert n == len(L) and L.faults[victim["id"]] >= 1
    assert "could not be decoded" in L.fault_log[0]["error"]


def test_several_dali_pipelines_give_the_batches_of_one(one_object):
    """loader.video_pipelines=3 (taking batches in turn) = one pipeline, across epochs, and a
    resume at an epoch's end continues with the next epoch's first batch."""
    small = "loader.batch_size=3"   # 4 batches an epoch
    one = loader(one_object, "dali", small)
    three = loader(one_object, "dali", small, "loader.video_pipelines=3")
    assert three.video_pipelines == 3 and len(one) >= 3
    for epoch in (0, 1):
        pairs = list(zip(one.epoch(epoch), three.epoch(epoch)))
        assert len(pairs) == len(one)
        for a, b in pairs:
            for k in META:
                assert torch.equal(a[k], b[k]), k
            assert torch.equal(a["video"], b["video"]) and torch.equal(a["audio"], b["audio"])
    state = three.state_dict()              # right after epoch 1's last batch
    assert state["sampler"]["next_batch"] == len(three)
    R = loader(one_object, "dali", small, "loader.video_pipelines=3")
    R.load_state_dict(state)
    assert (R.sampler.epoch, R.sampler.next_batch) == (2, 0)
    got = list(R.epoch(2))
    want = list(one.epoch(2))
    assert len(got) == len(want) == len(one)
    for a, b in zip(got, want):
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["role"], b["role"])


def test_a_damaged_file_with_several_pipelines(one_object, tmp_path):
    root, victim = damaged_copy(one_object, tmp_path, 4, 1)
    L = loader(root, "dali", "sampler.clips_per_video=4", "loader.video_pipelines=2")
    batches = list(L.epoch(0))
    assert len(batches) == len(L) and L.faults[victim["id"]] >= 1
    assert [b["batch"] for b in batches] == list(range(len(L)))


@pytest.mark.parametrize("message,expect", [
    ("Critical error in pipeline: Error in MIXED operator `nvidia.dali.fn.decoders.video`: "
     "CUDA error: out of memory", "ran out of memory"),
    ("Error in MIXED operator `nvidia.dali.fn.decoders.video`: Assert on \"lib_handle_\" "
     "failed: Failed to load libnvcuvid.so", "needs NVDEC"),
    ("Error in CPU operator `nvidia.dali.fn.spectrogram`: something else", "not a decoding error"),
])
def test_only_decode_errors_are_faults(one_object, monkeypatch, message, expect):
    """Out of memory, a missing NVDEC library or any other pipeline error stops with a message
    that says what to do; nothing is decoded with PyAV and no video is blamed."""
    from fastavts.data import dali_loader

    L = loader(one_object, "dali")

    def fail(self, g):
        raise RuntimeError(message)

    def no_pyav(*a, **k):
        raise AssertionError("PyAV was asked to check the batch")

    monkeypatch.setattr(dali_loader.DALILoader, "_next_outputs", fail)
    monkeypatch.setattr(L.dataset, "frames", no_pyav)
    with pytest.raises(dali_loader.LoaderError, match=expect):
        next(L.epoch(0))
    assert not L.faults and not L.exclude


def test_each_plan_is_made_once_and_each_permutation_once_per_epoch(one_object, monkeypatch):
    from fastavts.data import sampler as S

    made, perms = [], []
    real_plan, real_items = S.Sampler._make_plan, S.Sampler.epoch_items
    monkeypatch.setattr(S.Sampler, "_make_plan",
                        lambda self, e, b: made.append((e, b)) or real_plan(self, e, b))
    monkeypatch.setattr(S.Sampler, "epoch_items",
                        lambda self, e: perms.append(e) or real_items(self, e))
    L = loader(one_object, "dali", "loader.video_pipelines=2")
    for epoch in (0, 1):
        assert len(list(L.epoch(epoch))) == len(L)
    assert len(made) == len(set(made)) and {(e, b) for e in (0, 1) for b in range(len(L))} <= set(made)
    assert len(perms) == len(set(perms))


# ------------------------------------------------------------------------------------------
# On a GPU (skipped elsewhere): the `mixed` decoder on H.264 against PyAV

GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def h264_set(one_object):
    """The one-object videos prepared as H.264 (what GPU runs decode on NVDEC)."""
    out = one_object.parent / "h264"
    prepare(one_object.parent / "synth", out,
            build_config(overrides=BASE + ["prepare.codec=h264"]), progress=False)
    return out


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (the mixed decoder runs on NVDEC)")
@pytest.mark.parametrize("pipes", [1, 3])
def test_gpu_mixed_decoder_on_h264_gives_the_pyav_batches(h264_set, pipes):
    extra = ["sampler.pairs=inbatch", "sampler.k=1", f"loader.video_pipelines={pipes}"]
    dali = loader(h264_set, "dali", "loader.device=gpu", *extra)
    pyav = loader(h264_set, "pyav", *extra)
    assert dali.device == "gpu"
    n = 0
    for a, b in zip(dali.epoch(0), pyav.epoch(0)):
        n += 1
        assert a["video"].is_cuda and a["audio"].is_cuda
        for k in META:
            assert torch.equal(a[k].cpu(), b[k]), k
        va, vb = a["video"].cpu(), nv(b)
        err = (va - vb).abs().mean(dim=(1, 3, 4))
        shifted = (va[:, :, 1:] - vb[:, :, :-1]).abs().mean(dim=(1, 3, 4))
        print("video err", err.mean().item(), "one frame off", shifted.mean().item())
        assert err.max() < 0.06 and (err[:, 1:] < shifted).float().mean() > 0.95
        assert_same_crop(va, vb)   # crop_mirror_normalize's per-sample crop on the GPU
        loud = na(b) > -60
        aerr = (a["audio"].cpu() - na(b)).abs()
        print("log-mel err dB", aerr[loud].max().item())
        assert aerr[loud].max() < 0.05
    assert n == len(dali)


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_prepare_codec_auto_is_h264_on_a_gpu():
    from fastavts.data.prepare import resolve_codec
    assert resolve_codec("auto") == "h264"


@pytest.mark.parametrize("root", ["one_object", "segmented"])
def test_decord_loader_gives_the_pyav_batches(root, request):
    """loader.kind=decord: the PyAV loader's plans and transforms, frames decoded by decord:
    the same metadata and log-mel bit for bit, frames within YUV->RGB rounding and closer to
    PyAV's than PyAV's own frame one step off (so no index is shifted)."""
    pytest.importorskip("decord", reason="decord is an optional extra (pip install decord)")
    root = request.getfixturevalue(root)
    extra = ["sampler.pairs=inbatch", "sampler.k=2", "sampler.curriculum=[[0,0.5]]"]
    dec, pyav = loader(root, "decord", *extra), loader(root, "pyav", *extra)
    n = 0
    for a, b in zip(dec.epoch(2), pyav.epoch(2)):
        n += 1
        for k in META:
            assert torch.equal(a[k], b[k]), k
        assert torch.equal(a["audio"], b["audio"])
        assert a["video"].shape == b["video"].shape
        va, vb = nv(a), nv(b)
        err = (va - vb).abs().mean(dim=(1, 3, 4))
        shifted = (vb[:, :, 1:] - vb[:, :, :-1]).abs().mean(dim=(1, 3, 4))
        assert err.max() < 0.06
        assert (err[:, 1:] < shifted).float().mean() > 0.95
        assert_same_crop(va, vb)
    assert n == len(dec) == len(pyav) > 0


def test_decord_loader_skips_and_counts_a_damaged_file(one_object, tmp_path):
    pytest.importorskip("decord", reason="decord is an optional extra (pip install decord)")
    root, victim = damaged_copy(one_object, tmp_path, 2, 0)
    L = loader(root, "decord", "sampler.clips_per_video=4")
    bad = L.video_ids.index(victim["id"])
    batches = list(L.epoch(0))
    assert len(batches) == len(L)
    assert all(bad not in b["clip_video"].tolist() for b in batches)
    assert L.faults[victim["id"]] >= 1 and L.fault_log[0]["video"] == victim["id"]


def test_pyav_loader_in_the_training_process_keeps_its_threads(one_object):
    # workers=0 reads batches in the training process: the per-worker thread limit must not
    # reach it (it once set torch to 1 thread for the rest of the run)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        next(loader(one_object, "pyav", "loader.workers=0").epoch(0))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_stopped_dali_loader_releases_its_source_processes_even_while_referenced(one_object):
    """close() shuts the pipelines and their source processes down at once, even where
    something still holds the iterators (an exception's frames after a decode fault, an
    evaluation's caller): left to the garbage collector, a restart held two sets. And every
    pipeline was started on construction (its prefetch filling side by side with the others',
    not when its first batch is due)."""
    import multiprocessing as mp
    import os
    import time

    L = loader(one_object, "dali", "loader.workers=2", "loader.video_pipelines=2",
               total_epochs=2)

    def children():
        return set(os.popen(f"pgrep -P {os.getpid()}").read().split())

    before = children()
    next(L.epoch(0))
    held = L._its                      # a reference the loader does not control
    assert all(it._ever_scheduled for it in [*held[0], held[1]])
    started = children() - before
    assert len(started) >= 3 * 2       # 2 video + 1 audio pipeline, 2 source processes each
    L.close()
    deadline = time.monotonic() + 20
    while children() & started and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not children() & started, "source processes outlived close()"
    del held
    assert mp.active_children() is not None


def _spdl_libs() -> str:
    """loader.ffmpeg_libs for this machine: the system's where SPDL loads them, else PyAV's."""
    import subprocess
    import sys
    ok = subprocess.run([sys.executable, "-c", "import spdl.io.lib as m; m._import_libspdl()"],
                        capture_output=True).returncode == 0
    return "" if ok else "pyav"


@pytest.mark.parametrize("root", ["one_object", "segmented"])
def test_spdl_loader_gives_the_pyav_batches(root, request):
    """loader.kind=spdl: the PyAV loader's plans and transforms, frames decoded by SPDL (in
    worker processes given FFmpeg's libraries): the same batches, video included, bit for
    bit, with grouped clips read in shared passes; and the same decode count."""
    pytest.importorskip("spdl", reason="SPDL is an optional extra (pip install 'fastavts[spdl]')")
    root = request.getfixturevalue(root)
    extra = ["sampler.pairs=inbatch", "sampler.k=1", "sampler.group_clips=true",
             "sampler.clips_per_video=3", "loader.workers=1",
             f"loader.ffmpeg_libs={_spdl_libs()}"]
    sp, pyav = loader(root, "spdl", *extra), loader(root, "pyav", *extra)
    n = 0
    for a, b in zip(sp.epoch(1), pyav.epoch(1)):
        n += 1
        for k in (*META, "audio", "video"):
            assert torch.equal(a[k], b[k]), k
    assert n == len(sp) == len(pyav) > 0
    assert sp.decode_count.decoded == pyav.decode_count.decoded > 0
    sp.close()
    pyav.close()


def test_spdl_loader_says_what_it_needs(one_object, monkeypatch):
    pytest.importorskip("spdl", reason="SPDL is an optional extra (pip install 'fastavts[spdl]')")
    from fastavts.errors import ConfigError
    if _spdl_libs() == "pyav":   # not loadable in this process: it says how to start python
        for pool in ("loader.workers=0", "loader.pool=threads"):
            with pytest.raises(ConfigError, match="decodes in this process.*LD_LIBRARY_PATH"):
                loader(one_object, "spdl", pool, "loader.workers=0" if "0" in pool
                       else "loader.workers=2", "loader.ffmpeg_libs=pyav")
    with pytest.raises(ConfigError, match="no such folder"):
        loader(one_object, "spdl", "loader.workers=1", "loader.ffmpeg_libs=/nonexistent")
    empty = one_object.parent / "no_ffmpeg_here"
    empty.mkdir(exist_ok=True)
    monkeypatch.setenv("LD_LIBRARY_PATH", "")
    if _spdl_libs() == "pyav":   # no system FFmpeg: the message says what to install
        with pytest.raises(ConfigError, match="apt install libavcodec-dev"):
            loader(one_object, "spdl", "loader.workers=1", f"loader.ffmpeg_libs={empty}")


def test_pyav_loader_threads_give_the_batches_of_processes(segmented):
    """loader.pool=threads: the same batches, bit for bit, as the DataLoader's worker
    processes and as the training process alone, across an epoch's end; a loader closed
    mid-epoch and started again at its position goes on with the same batches."""
    extra = ["sampler.pairs=inbatch", "sampler.k=1", "sampler.group_clips=true",
             "sampler.clips_per_video=3"]
    kw = dict(total_epochs=2)
    threads = loader(segmented, "pyav", *extra, "loader.workers=2", "loader.pool=threads", **kw)
    procs = loader(segmented, "pyav", *extra, "loader.workers=1", "loader.pool=processes",
                   **kw)
    alone = loader(segmented, "pyav", *extra, "loader.workers=0", **kw)
    got = [list(L.epoch(0)) + list(L.epoch(1)) for L in (threads, procs, alone)]
    assert len(got[0]) == 2 * len(threads) > 2
    for a, b, c in zip(*got):
        for k in (*META, "audio", "video"):
            assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]), k
    assert threads.decode_count.decoded == alone.decode_count.decoded
    threads.close()
    procs.close()
    # stopped after one batch, then resumed where it stood
    L = loader(segmented, "pyav", *extra, "loader.workers=2", "loader.pool=threads", **kw)
    it = L.epoch(0)
    first = next(it)
    L.close()
    state = L.state_dict()
    M = loader(segmented, "pyav", *extra, "loader.workers=2", "loader.pool=threads", **kw)
    M.load_state_dict(state)
    nxt = next(M.epoch(0))
    assert torch.equal(first["video"], got[2][0]["video"])
    assert torch.equal(nxt["video"], got[2][1]["video"])
    M.close()


@pytest.mark.parametrize("spdl", [False, True])
@pytest.mark.parametrize("device, cuda, kind, pool", [
    ("auto", False, "cpu", "threads"),        # a CPU machine: the CPU loader, in threads
    ("cpu", False, "cpu", "threads"),
    ("auto", True, "dali", "processes"),      # a GPU: DALI's mixed decoder
    ("gpu", True, "dali", "processes"),
    ("gpu", False, "dali", "threads"),        # asked for (and refused later without a GPU)
    ("cpu", True, "cpu", "processes"),        # DALI kept off the GPU: a CPU loader beside it
])
def test_auto_loader_choice(device, cuda, kind, pool, spdl, monkeypatch):
    """The CPU loader is SPDL where FFmpeg's libraries load in this process, else PyAV."""
    from fastavts import runtime
    monkeypatch.setattr(runtime, "spdl_loads_here", lambda: spdl)
    lc = build_config(overrides=[f"loader.device={device}"]).loader
    assert (lc.kind, lc.pool) == ("auto", "auto")      # the defaults
    if kind == "cpu":
        kind = "spdl" if spdl else "pyav"
    assert runtime.loader_choice(lc, cuda) == (kind, pool)
    for k, p in (("spdl", "processes"), ("dali", "threads"), ("memory", "auto"),
                 ("pyav", "auto")):
        lc.kind, lc.pool = k, p                          # what is asked is kept
        assert runtime.loader_choice(lc, cuda) == (k, pool if p == "auto" else p)


def test_spdl_loads_here_says_whether_ffmpeg_loads():
    """The probe behind loader.kind=auto against a fresh interpreter's own attempt."""
    import subprocess
    import sys

    from fastavts.runtime import spdl_loads_here
    code = "import spdl.io\nspdl.io.demux_config()"
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
    assert spdl_loads_here() is fresh


def test_default_loader_on_a_cpu_is_the_fastest_here_in_threads(one_object):
    """No loader.kind, no loader.pool, no GPU: the SPDL loader where its FFmpeg loads in this
    process, else the PyAV loader, making its batches in threads: the batches of an explicit
    PyAV loader in worker processes, bit for bit."""
    from fastavts.runtime import spdl_loads_here
    cfg = build_config(overrides=[b for b in BASE if b != "loader.workers=0"])
    L = make_loader(cfg, one_object)
    assert L.kind == ("spdl" if spdl_loads_here() else "pyav") and L.pool == "threads"
    assert cfg.loader.kind == "auto"   # the caller's config is left as it was
    P = loader(one_object, "pyav", "loader.pool=processes", "loader.workers=1")
    for a, b in zip(L.epoch(0), P.epoch(0)):
        for k in (*META, "audio", "video"):
            assert torch.equal(a[k], b[k]), k
    L.close()
    P.close()


def test_spdl_pool_auto_takes_processes_where_ffmpeg_does_not_load_here(one_object):
    """loader.kind=spdl with loader.pool=auto on a CPU: threads where FFmpeg's libraries load
    in this process, else worker processes given loader.ffmpeg_libs (no error)."""
    pytest.importorskip("spdl", reason="SPDL is an optional extra (pip install 'fastavts[spdl]')")
    libs = _spdl_libs()
    L = loader(one_object, "spdl", "loader.workers=1", f"loader.ffmpeg_libs={libs}")
    assert L.pool == ("processes" if libs == "pyav" else "threads")
    assert len(next(L.epoch(0))["clip_video"]) == 6
    L.close()


def test_pyav_loader_threads_skip_and_count_a_damaged_file(one_object, tmp_path):
    root, victim = damaged_copy(one_object, tmp_path, 2, 0)
    L = loader(root, "pyav", "sampler.clips_per_video=4", "loader.workers=2",
               "loader.pool=threads")
    bad = L.video_ids.index(victim["id"])
    batches = list(L.epoch(0))
    assert len(batches) == len(L)
    assert all(bad not in b["clip_video"].tolist() for b in batches)
    assert L.faults[victim["id"]] >= 1 and L.fault_log[0]["video"] == victim["id"]


SPDL_THREADS = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
from test_loaders import loader, META
root = sys.argv[1]
extra = ["sampler.pairs=inbatch", "sampler.k=1", "sampler.group_clips=true",
         "sampler.clips_per_video=3"]
sp = loader(root, "spdl", *extra, "loader.workers=2", "loader.pool=threads")
pyav = loader(root, "pyav", *extra)
auto = loader(root, "auto", *extra, "loader.workers=2")   # FFmpeg loads: the default is SPDL
assert (auto.kind, auto.pool) == ("spdl", "threads"), (auto.kind, auto.pool)
n = 0
for a, b, c in zip(sp.epoch(0), pyav.epoch(0), auto.epoch(0)):
    n += 1
    for k in (*META, "audio", "video"):
        assert torch.equal(a[k], b[k]) and torch.equal(c[k], b[k]), k
sp.close()
auto.close()
assert n == len(sp) > 0
print("SAME", n)
"""


def test_spdl_loader_in_threads_with_ffmpeg_on_the_library_path(segmented):
    """loader.kind=spdl loader.pool=threads in a process started with FFmpeg's libraries on
    LD_LIBRARY_PATH (PyAV's here, as docs/data.md says): the PyAV loader's batches."""
    pytest.importorskip("spdl", reason="SPDL is an optional extra (pip install 'fastavts[spdl]')")
    import os
    import subprocess
    import sys

    from fastavts.data.spdl_loader import pyav_ffmpeg_libs
    env = dict(os.environ, LD_LIBRARY_PATH=pyav_ffmpeg_libs())
    tests = str(Path(__file__).parent)
    r = subprocess.run([sys.executable, "-c", SPDL_THREADS, str(segmented), tests], env=env,
                       capture_output=True, text=True, timeout=600, cwd=tests)
    assert r.returncode == 0 and "SAME" in r.stdout, r.stderr[-3000:]
