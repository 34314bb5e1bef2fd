"""fastavts probe-audio on tiny fake copies of the official ESC-50 and DCASE2014 layouts (files
generated here, named and listed exactly as the released sets), on a prepared synthetic set,
and the clear errors for malformed layouts."""
import csv
import json
import shutil
import wave

import numpy as np
import pytest
import torch

from fastavts.cli import main as cli
from fastavts.data.audio_sets import LayoutError, load_audio, read_audio_set

SR = 44100


def write_wav(path, x, sr=SR, channels=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = (np.clip(x, -1, 1) * 32767).astype("<i2")
    if channels == 2:
        pcm = np.stack([pcm, pcm], 1).reshape(-1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())


def sound(kind: str, seconds: float, rng) -> np.ndarray:
    """Three clearly different classes: low tone bursts, high tone bursts, noise bursts."""
    t = np.arange(int(seconds * SR)) / SR
    gate = (np.sin(2 * np.pi * rng.uniform(1.5, 3) * t + rng.uniform(0, 6)) > 0).astype(float)
    if kind == "noise":
        x = rng.standard_normal(len(t)) * 0.3
    else:
        f = {"low": 220.0, "high": 3000.0}[kind] * rng.uniform(0.95, 1.05)
        x = 0.5 * np.sin(2 * np.pi * f * t)
    return x * gate + 0.003 * rng.standard_normal(len(t))


CLASSES = ["low", "high", "noise"]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def esc50(tmp_path_factory):
    """ESC-50 layout: audio/{fold}-{src}-{take}-{target}.wav and meta/esc50.csv."""
    root = tmp_path_factory.mktemp("ESC-50-master")
    rng = np.random.default_rng(0)
    rows = []
    for fold in range(1, 6):
        for target, cat in enumerate(CLASSES):
            for take in "AB":
                src = int(rng.integers(10000, 999999))
                name = f"{fold}-{src}-{take}-{target}.wav"
                write_wav(root / "audio" / name, sound(cat, 5.0, rng))
                rows.append([name, fold, target, cat, "False", src, take])
    (root / "meta").mkdir()
    with open(root / "meta" / "esc50.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        w.writerows(rows)
    return root


@pytest.fixture(scope="module")
def dcase(tmp_path_factory):
    """DCASE2014 scenes layout (stereo, as released): scenes_stereo/<scene><NN>.wav and
    scenes_stereo_testset/<scene><NN>.wav, the zips unpacked in place."""
    root = tmp_path_factory.mktemp("dcase2014")
    rng = np.random.default_rng(1)
    for folder in ("scenes_stereo", "scenes_stereo_testset"):
        for scene in CLASSES:
            for k in rng.choice(np.arange(1, 99), 4, replace=False):
                write_wav(root / folder / f"{scene}{k:02d}.wav", sound(scene, 4.0, rng),
                          channels=2)
    return root


def probe(*args):
    return cli(["probe-audio", *map(str, args), "--json"])


def test_esc50_layout_end_to_end_with_cache(esc50, checkpoint, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert probe(checkpoint, "--dataset", "esc50", esc50, "--cache", cache) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    print(r)
    assert r["recordings"] == 30 and r["classes"] == 3 and len(r["fold_accuracy"]) == 5
    assert r["accuracy"] == pytest.approx(np.mean(r["fold_accuracy"]), abs=1e-3)
    # tones and noise are far apart even for random conv features: a linear SVM separates them
    assert r["accuracy"] >= 0.8 and not r["features_cached"]
    assert len(list(cache.iterdir())) == 1
    assert probe(checkpoint, "--dataset", "esc50", esc50, "--cache", cache) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["features_cached"] and again["fold_accuracy"] == r["fold_accuracy"]


@pytest.mark.parametrize("layer,dim", [("stage1", 8), ("stage2", 16), ("stage3", 32),
                                       ("stage4", 64), ("features", 256), ("embedding", 128)])
def test_dcase2014_layout_train_test_split_and_layers(dcase, checkpoint, tmp_path, capsys,
                                                      layer, dim):
    assert probe(checkpoint, "--dataset", "dcase2014", dcase, "--layer", layer,
                 "--cache", tmp_path) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["recordings"] == 24 and r["classes"] == 3 and len(r["fold_accuracy"]) == 1
    assert r["feature_dim"] == dim
    if layer == "stage4":
        assert r["accuracy"] >= 0.8


def test_features_are_the_mean_of_the_training_windows(dcase, checkpoint):
    """Independent path: windows cut by the training loaders' audio_window from a bank-like
    record of the file's samples, log-mel, audio_net, mean over windows."""
    from fastavts.data.features import AudioGeometry, LogMel, audio_window
    from fastavts.models.avts import load_model
    from fastavts.probe import extract

    model, cfg = load_model(checkpoint, torch.device("cpu"))
    items = read_audio_set("dcase2014", dcase)[:2]
    got = extract(model, cfg, items, "features", torch.device("cpu"), batch_size=5,
                  progress=False)
    geo = AudioGeometry(cfg.data)
    for row, it in zip(got, items):
        wave_ = load_audio(it.path, cfg.data.sample_rate).astype(np.float64)

        class Bank:
            pcm = wave_ * 32768

        rec = dict(audio_start=0.0, audio_samples=len(wave_), audio_offset=0)
        window_s = cfg.data.clip_frames * cfg.data.frame_stride / cfg.data.fps
        n = int((len(wave_) / geo.sr - window_s) // (window_s / 2)) + 1
        wins = np.stack([audio_window(Bank, rec, k * window_s / 2, geo) for k in range(n)])
        with torch.no_grad():
            want = model.audio_net(LogMel(geo)(torch.from_numpy(wins))).mean(0).numpy()
        err = np.abs(row - want).max()
        print("max error", err, "of", np.abs(want).max(), "windows", n)
        assert err < 1e-4 * max(1.0, np.abs(want).max())


def test_load_audio_resamples_and_downmixes(tmp_path):
    t = np.arange(SR) / SR
    write_wav(tmp_path / "a.wav", 0.5 * np.sin(2 * np.pi * 1000 * t), channels=2)
    x = load_audio(tmp_path / "a.wav", 16000)
    assert abs(len(x) - 16000) <= 32
    spec = np.abs(np.fft.rfft(x[:16000] * np.hanning(len(x[:16000]))))
    assert abs(np.argmax(spec) * 16000 / len(x[:16000]) - 1000) < 2      # still 1 kHz
    # one channel: FFmpeg's stereo -> mono matrix (the one prepare uses: each channel at -3 dB,
    # so two equal channels of 0.5 give 0.707), not a plain sum (1.0)
    assert 0.69 < np.abs(x[1000:-1000]).max() < 0.72


def test_malformed_layouts_name_the_file(esc50, dcase, checkpoint, tmp_path, capsys):
    import shutil

    # ESC-50 without its metadata file
    bad = tmp_path / "esc"
    shutil.copytree(esc50, bad)
    (bad / "meta" / "esc50.csv").unlink()
    assert probe(checkpoint, "--dataset", "esc50", bad) == 2
    assert "meta/esc50.csv not found" in capsys.readouterr().err
    # a listed file missing
    shutil.rmtree(bad)
    shutil.copytree(esc50, bad)
    victim = sorted((bad / "audio").iterdir())[3]
    victim.unlink()
    with pytest.raises(LayoutError, match=f"{victim.name}.*missing"):
        read_audio_set("esc50", bad)
    # unreadable audio: named, exit code 2
    victim.write_bytes(b"RIFF....WAVEfmt garbage" * 10)
    assert probe(checkpoint, "--dataset", "esc50", bad, "--cache", tmp_path / "c") == 2
    err = capsys.readouterr().err
    assert victim.name in err and "unreadable audio" in err
    # DCASE: a test scene that the training folder does not have
    d2 = tmp_path / "dcase"
    shutil.copytree(dcase, d2)
    write_wav(d2 / "scenes_stereo_testset" / "library01.wav", np.zeros(SR))
    with pytest.raises(LayoutError, match="library01.wav.*scene 'library'"):
        read_audio_set("dcase2014", d2)
    # DCASE: a test folder missing
    shutil.rmtree(d2 / "scenes_stereo_testset")
    assert probe(checkpoint, "--dataset", "dcase2014", d2) == 2
    assert "scenes_stereo_testset" in capsys.readouterr().err


def test_synth_task_folds_follow_ids_not_manifest_order(tmp_path, checkpoint, capsys):
    """The synthetic downstream task: kinds as labels, folds and splits by id order, so a
    manifest written in another order (prepare's workers finish as they may) gives the same."""
    from fastavts.data.action_sets import read_split
    from fastavts.data.prepare import prepare
    from fastavts.data.synth import synthesize

    from conftest import small_cfg

    cfg = small_cfg("synth.videos=10", "synth.seed=11", "synth.min_objects=1",
                    "synth.max_objects=1", "prepare.codec=vp9", "prepare.short_side=52")
    synthesize(tmp_path / "src", cfg, progress=False)
    prepare(tmp_path / "src", tmp_path / "a", cfg, progress=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    lines = (tmp_path / "a" / "manifest.jsonl").read_text().splitlines()
    (tmp_path / "b" / "manifest.jsonl").write_text("\n".join(lines[::-1]) + "\n")

    def folds(root):
        return {i.path.split("::")[1]: (i.label, i.fold) for i in read_audio_set("synth", root)}
    fa, fb = folds(tmp_path / "a"), folds(tmp_path / "b")
    assert fa == fb and sorted(f for _, f in fa.values()) == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    kinds = {json.loads(line)["id"]: json.loads(line)["meta"]["kinds"][0] for line in lines}
    assert {k: lab for k, (lab, _) in fa.items()} == kinds
    sa = read_split("synth", tmp_path / "a", 2, tmp_path / "a")
    sb = read_split("synth", tmp_path / "b", 2, tmp_path / "b")
    assert (sa.train, sa.test) == (sb.train, sb.test) and len(sa.test) == 2
    assert probe(checkpoint, "--dataset", "synth", tmp_path / "a", "--cache", tmp_path / "c") == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["recordings"] == 10 and len(r["fold_accuracy"]) == 5


def test_synth_task_needs_one_sounding_object(prepared):
    with pytest.raises(LayoutError, match="exactly one per video"):
        read_audio_set("synth", prepared)
