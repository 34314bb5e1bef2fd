"""Benchmark plumbing: a short run writes well-formed rows (the figures come from the GPU)."""
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))


def test_bench_loss_writes_rows(tmp_path, capsys):
    import bench_loss

    out = tmp_path / "loss.jsonl"
    assert bench_loss.main(["--sizes", "24", "--dims", "8", "--impl", "eager", "triton",
                            "--repeats", "3", "--warmup", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8   # 2 losses x 2 implementations x (fwd, fwd+bwd)
    assert {r["loss"] for r in rows} == {"contrastive", "infonce"}
    for r in rows:
        assert r["B"] == 24 and r["M"] == 48 and r["D"] == 8 and r["median_ms"] > 0
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["repeats"] == 3
        assert r["machine"] and r["versions"]["torch"] and r["git"]
        assert r["tflops"] > 0 and r["flop_count"]
    tri = [r for r in rows if r["impl"] == "triton"]
    assert all(r["vs_eager"] > 0 for r in tri)
    assert all(r["loss_rel_err_vs_eager"] < 1e-5 for r in tri)   # the kernels' loss is eager's
    assert "median ms" in capsys.readouterr().out


def test_bench_model_writes_rows_with_a_flop_count(tmp_path):
    import bench_model

    out = tmp_path / "model.jsonl"
    assert bench_model.main(["--models", "tiny", "audio_tiny", "--batch-sizes", "2",
                             "--frames", "8", "--size", "32", "--repeats", "2", "--warmup", "1",
                             "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["model"] for r in rows] == ["tiny", "tiny", "audio_tiny"]   # channels_last on/off
    for r in rows:
        assert r["flops_per_step"] > 0 and r["clips_per_s"] > 0 and r["ms_per_step"] > 0
        assert r["p20_ms"] <= r["ms_per_step"] <= r["p80_ms"]
        assert r["mfu"] is None and r["machine"]["cuda"] is False
    # forward+backward FLOPs of the tiny net: about 3x the forward's conv FLOPs, counted
    # independently from the layer shapes
    import torch

    from fastavts.models.video import VIDEO_NETS
    net = VIDEO_NETS["tiny"](time_bins=4)
    x = torch.randn(2, 3, 8, 32, 32)
    fwd = 0

    def hook(m, inp, outp):
        nonlocal fwd
        k = m.weight.shape
        fwd += 2 * outp.numel() * k[1] * k[2] * k[3] * k[4]
    hs = [m.register_forward_hook(hook) for m in net.modules()
          if isinstance(m, torch.nn.Conv3d)]
    net(x)
    for h in hs:
        h.remove()
    tiny = rows[0]["flops_per_step"]
    assert 2.5 * fwd < tiny < 3.5 * fwd, (tiny, fwd)


def test_bench_train_end_to_end_and_model_only_rows(prepared, tmp_path):
    import bench_train

    out = tmp_path / "train.jsonl"
    assert bench_train.main(["--data", str(prepared), "--batch-size", "4", "--workers", "1",
                             "--steps", "3", "--warmup", "1", "--out", str(out),
                             "--loader", "dali", "pyav", "train.grad_clip=0.5"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["loader"] for r in rows] == ["dali", "pyav"]
    for r in rows:
        assert r["steps"] == 3 and r["clips_per_s"] > 0 and r["model_only_clips_per_s"] > 0
        assert 0 <= r["data_wait_share"] < 1
        # the ratio comes from the unrounded rates; the rows keep one decimal of each
        e2e, alone = r["clips_per_s"], r["model_only_clips_per_s"]
        slack = (e2e / alone) * (0.05 / e2e + 0.05 / alone) + 0.001
        assert abs(r["ratio_to_model_only"] - e2e / alone) <= slack
        assert "gpu_sm_util_median" not in r          # no GPU here: no counters, no crash


def test_plot_draws_one_chart_per_kind_and_machine(tmp_path, capsys):
    import bench_loss
    import bench_model
    import plot

    res = tmp_path / "results"
    assert bench_model.main(["--models", "audio_tiny", "--batch-sizes", "2", "3", "--repeats",
                             "2", "--warmup", "1", "--out", str(res / "model.jsonl")]) == 0
    assert bench_loss.main(["--sizes", "8", "16", "--dims", "4", "--impl", "eager", "--repeats",
                            "2", "--warmup", "1", "--out", str(res / "loss.jsonl")]) == 0
    # loader rows of two machines (a GPU one as bench_data.py writes it) and a damaged line
    gpu = {"cuda": True, "gpu": "NVIDIA H100 80GB HBM3", "cpu_count": 16}
    import os
    cpu = {"cuda": False, "cpu_count": os.cpu_count()}
    rows = [dict(bench="data", loader=k, device=d, batch_size=8, workers=2, pairs="paired",
                 clips_per_s_median=m, clips_per_s_min=m - 1, clips_per_s_max=m + 1,
                 machine=mach, date="2026-11-26 10:00:00")
            for k, d, m, mach in [("dali", "gpu", 900.0, gpu), ("pyav", "cpu", 90.0, gpu),
                                  ("dali", "cpu", 150.0, cpu)]]
    (res / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{oops\n")
    assert plot.main(["--results", str(res), "--out", str(tmp_path / "plots")]) == 0
    made = sorted(p.name for p in (tmp_path / "plots").iterdir())
    here = f"cpu_{os.cpu_count()}_cores"
    assert made == [f"loaders_{here}.png", "loaders_nvidia_h100_80gb_hbm3.png",
                    f"loss_{here}.png", f"model_{here}.png"], made
    import matplotlib.image
    for name in made:
        img = matplotlib.image.imread(tmp_path / "plots" / name)
        assert img.shape[0] > 200 and img.shape[1] > 400 and img.std() > 0.01  # not blank
    assert "not JSON" in capsys.readouterr().err


def test_gpu_check_parts_run_end_to_end_as_dry_runs(tmp_path):
    """bench/gpu_checks.py core and dali at toy sizes on this CPU: every step passes, `core`
    with OmegaConf, PyAV and DALI made unimportable (the GPU machine lacks them), and what a
    lent device returns fits it: each part leaves ONE tarball in a fresh $OUT (at most 8 files
    of at most 16 MiB come back), holding its logs, rows and summary and none of the prepared
    data (that stays in the work folder outside $OUT); `merge` takes its rows."""
    import subprocess
    import tarfile

    import gpu_checks

    out, work = tmp_path / "out", tmp_path / "work"
    for part in ("core", "dali"):
        r = subprocess.run([sys.executable, str(BENCH / "gpu_checks.py"), part, "--dry-run",
                            "--out", str(out), "--work", str(work)],
                           capture_output=True, text=True, timeout=600)
        print(r.stdout[-3000:], r.stderr[-2000:])
        assert r.returncode == 0
        files = [f for f in out.rglob("*") if f.is_file()]
        assert sorted(f.name for f in files) == sorted(
            f"gpu_checks_{x}.tar.gz" for x in ("core", "dali")[:1 + (part == "dali")])
        assert len(files) <= gpu_checks.MAX_FILES
        assert all(f.stat().st_size <= gpu_checks.MAX_BYTES for f in files)
        with tarfile.open(out / f"gpu_checks_{part}.tar.gz") as tf:
            names = tf.getnames()
            summary = json.loads(tf.extractfile(f"{part}/summary.json").read())
        assert [s["rc"] for s in summary["steps"]] == [0] * len(summary["steps"])
        assert len(summary["steps"]) == {"core": 4, "dali": 5}[part]
        junit = {"core": [f"core/tests_{i}.xml" for i in (0, 1)], "dali": ["dali/tests.xml"]}
        assert f"{part}/results" in names and set(junit[part]) <= set(names)
        assert not [n for n in names if n.endswith((".webm", ".mp4", ".mkv", ".s16", ".pt"))]
        assert not [n for n in names if "/blocker" in n]
    assert list((work / "cache").rglob("*.webm"))      # the data was made, outside $OUT
    env = json.loads((work / "core" / "env.log").read_text())
    assert env["imports"]["omegaconf"].startswith("MISSING")     # core ran without it
    assert env["imports"]["fastavts.kernels"] != "" and "MISSING" not in env["imports"]["fastavts.kernels"]
    rows = (work / "dali" / "results" / "data.jsonl").read_text().splitlines()
    assert {json.loads(x)["loader"] for x in rows} == {"dali", "pyav"}
    assert [json.loads(x).get("video_pipelines") for x in rows] == [1, 2, None]


def test_gpu_check_decoders_part_runs_as_a_dry_run(tmp_path):
    """bench/gpu_checks.py decoders at toy sizes on this CPU (DALI's CPU decoder, SPDL on
    PyAV's FFmpeg, PyAV): ONE tarball back, a row per decoder, size and concurrency, and one
    row saying why for a decoder that cannot run here."""
    import subprocess
    import tarfile

    out, work = tmp_path / "out", tmp_path / "work"
    r = subprocess.run([sys.executable, str(BENCH / "gpu_checks.py"), "decoders", "--dry-run",
                        "--out", str(out), "--work", str(work)],
                       capture_output=True, text=True, timeout=600)
    print(r.stdout[-3000:], r.stderr[-2000:])
    assert r.returncode == 0
    assert [f.name for f in out.iterdir()] == ["gpu_checks_decoders.tar.gz"]
    with tarfile.open(out / "gpu_checks_decoders.tar.gz") as tf:
        rows = [json.loads(x) for x in tf.extractfile(
            "decoders/results/decoder_curve.jsonl").read().decode().splitlines()]
        summary = json.loads(tf.extractfile("decoders/summary.json").read())
        assert not [n for n in tf.getnames() if n.endswith((".webm", ".mp4"))]
    assert [s["rc"] for s in summary["steps"]] == [0, 0]
    measured = {(x["decoder"], x["size"], x["concurrency"]) for x in rows if "frames_per_s" in x}
    for dec in ("dali", "pyav"):
        assert {(dec, s, n) for s in (32, 64) for n in (1, 2)} <= measured
    for x in rows:
        assert ("error" in x) != ("frames_per_s" in x)
        if "frames_per_s" in x:   # every frame of every file decoded: 25 a file here
            assert x["frames"] == 25 * x["files"] and x["frames_per_s"] > 0
    names = {x["decoder"] for x in rows}
    assert names == {"dali", "spdl", "torchcodec", "pyav"}


def test_a_gpu_check_step_past_its_limit_is_interrupted_then_killed_and_fails_the_part(tmp_path):
    """A step that outlives its limit gets SIGINT (so pytest can still write its junit file),
    then SIGKILL; it counts as failed and the part exits 1, its tarball already in $OUT."""
    import time

    import gpu_checks

    r = gpu_checks.Runner("core", tmp_path / "out", budget=60, dry=True, work=tmp_path / "w")
    script = ("import signal, sys, time\n"
              "signal.signal(signal.SIGINT, lambda *a: (print('interrupted', flush=True), "
              "sys.exit(3)))\n"
              "time.sleep(60)\n")
    row = r.step("slow", [sys.executable, "-c", script], limit=11)
    assert row["timed_out"] and row["rc"] == 3
    assert "interrupted" in (tmp_path / "w" / "core" / "slow.log").read_text()
    assert r.failed() and (tmp_path / "out" / "gpu_checks_core.tar.gz").is_file()
    stubborn = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)\n"
    gpu_checks.GRACE_S = 1
    t = time.monotonic()
    row = r.step("stubborn", [sys.executable, "-c", stubborn], limit=11)
    assert row["timed_out"] and row["rc"] == -9 and time.monotonic() - t < 20


def test_ablation_table_gives_mean_spread_and_range_over_seeds():
    import ablate

    rows = [dict(variant="paper", seed=s, auc_easy=e, auc_hard=h, sync_acc_easy=0.9,
                 sync_acc_hard=0.8, final_loss=0.7, wall_s=100.0,
                 collapse=dict(blind_loss=1.0, collapsed_at_end=c))
            for s, (e, h, c) in enumerate([(0.9, 0.6, False), (0.8, 0.5, False), (0.7, 0.4, True)])]
    t = ablate.table(rows, ["paper", "easy_only"])
    line = t.splitlines()[2]
    assert line.startswith("| paper | 3 | 0.800 ± 0.100 (0.700-0.900) | 0.500 ± 0.100 (0.400-0.600)")
    assert "| 1 |" in line and len(t.splitlines()) == 3      # one collapsed; no easy_only rows
    assert set(ablate.VARIANTS) >= {"paper", "hard_from_start", "easy_only", "paired_ce",
                                    "inbatch", "inbatch_lossweight"}


def test_profile_demo_accounts_for_the_training_time(tmp_path):
    import json

    import profile_demo
    out = tmp_path / "rows.jsonl"
    assert profile_demo.main(["--dir", str(tmp_path / "w"), "--out", str(out),
                              "train.demo_videos=4", "train.demo_heldout=4",
                              "synth.min_duration=2.0", "synth.max_duration=2.5",
                              "synth.workers=1", "train.epochs=3", "loader.batch_size=4"]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["steps"] == 3 * 2 and row["epochs"] == 3
    for k in ("synth_train_s", "prepare_train_s", "synth_heldout_s", "prepare_heldout_s"):
        assert row[k] > 0
    # every step's ranges were timed, in both phases, and they fit inside the training wall
    ranges = {k: v for k, v in row.items() if k.startswith(("first_epoch/", "later_epochs/"))}
    for phase in ("first_epoch", "later_epochs"):
        for name in ("data", "forward", "loss", "backward", "optimizer", "decode"):
            assert f"{phase}/{name}_s" in ranges
    outer = sum(v for k, v in ranges.items() if k.split("/")[1] in
                ("data_s", "forward_s", "loss_s", "backward_s", "optimizer_s"))
    assert 0 < outer <= row["train_wall_s"] + 0.05
    assert row["video_fwd_bwd_ms"] > 0 and row["audio_batch"] == 4
    assert 0 <= row["sync_acc_easy"] <= 1
    import torch

    import fastavts.train.loop
    assert not isinstance(torch.profiler.record_function, profile_demo.Ranges)   # put back
    assert fastavts.train.loop.make_loader.__module__ == "fastavts.data.loader"


def test_bench_demo_step_times_both_ways_and_puts_the_rewrites_back(tmp_path):
    import bench_demo_step
    from torch import nn

    from fastavts.models.audio import AudioNet
    from fastavts.models.video import FactorConv3d
    before = (FactorConv3d.forward, AudioNet.forward)
    out = tmp_path / "rows.jsonl"
    assert bench_demo_step.main(["--rounds", "2", "--steps", "1", "--out", str(out),
                                 "loader.batch_size=4", "data.clip_frames=8"]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["bench"] == "demo_step" and row["batch"] == 4
    for k in ("step", "video_tower", "audio_tower"):
        for mode in ("plain", "rewritten"):
            s = row[f"{k}_{mode}_ms"]
            assert 0 < s["min"] <= s["median"] <= s["max"]
    assert row["video_cut_per_clip_ms"]["median"] > 0 and row["video_cut_batch_ms"]["median"] > 0
    assert (FactorConv3d.forward, AudioNet.forward) == before
    assert FactorConv3d.forward is not nn.Conv3d.forward


def test_sync_errors_counts_agree_with_the_evaluation(tiny_checkpoint, prepared, tmp_path):
    """The listed errors are the evaluation's errors: positives rejected plus easy accepted
    over the positive and easy test pairs is 1 - sync_acc_easy (and likewise for hard)."""
    import sync_errors

    out = tmp_path / "rows.jsonl"
    assert sync_errors.main([str(tiny_checkpoint), str(prepared), "--out", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    n = row["eval_pairs"]
    for neg in ("easy", "hard"):
        errors = row["positive_rejected"] + row[f"{neg}_accepted"]
        assert abs(1 - errors / (n["positive"] + n[neg]) - row[f"sync_acc_{neg}"]) < 1e-4
    assert 0 <= row["hard_accepted_same_pattern"] <= row["hard_accepted"]


def test_sync_errors_same_pattern_needs_every_impact_within_tol():
    import sync_errors

    clip = [(0.40, "ball"), (1.10, "ball")]
    assert sync_errors.same_pattern(clip, [(0.44, "ball"), (1.13, "ball")], 0.05)
    assert not sync_errors.same_pattern(clip, [(0.44, "ball"), (1.17, "ball")], 0.05)
    assert not sync_errors.same_pattern(clip, [(0.41, "ball")], 0.05)
    meta = {"events": [{"t": 2.0, "kind": "bell"}, {"t": 3.2, "kind": "drum"},
                       {"t": 3.3, "kind": "bell"}]}
    assert sync_errors.impacts(meta, 2.0, 1.28) == [(0.0, "bell"), (1.2, "drum")]


def test_bench_decoders_rows_on_the_same_clips(prepared, tmp_path):
    """Each decoder in its own process on the sampler's clips: PyAV's decoded frames counted
    equal the seeking reader's model, DALI returns the same frames (its colour conversion
    differs by a grey level or two), a decoder that cannot run is a row saying why."""
    import bench_decoders

    out = tmp_path / "dec.jsonl"
    assert bench_decoders.main(["--data", str(prepared), "--decoders", "pyav", "dali",
                                "torchcodec", "--clips", "16", "--rounds", "2", "--threads",
                                "1", "--check", "--out", str(out), "data.crop=48",
                                "data.clip_frames=8", "data.frame_stride=4"]) == 0
    rows = {r["decoder"]: r for r in map(json.loads, out.read_text().splitlines())}
    pyav, dali = rows["pyav"], rows["dali"]
    assert pyav["decoded_counted"] and not dali["decoded_counted"]
    assert pyav["decoded_per_delivered"] == dali["decoded_per_delivered"] > 1
    assert pyav["rounds"] == dali["rounds"] == 2 and pyav["shapes_ok"] and dali["shapes_ok"]
    assert pyav["mean_abs_diff_vs_pyav"] == 0 and dali["mean_abs_diff_vs_pyav"] < 3
    assert "clips_per_s_median" in rows["torchcodec"] or rows["torchcodec"]["error"]


def test_bench_sampler_rows_at_a_small_scale(tmp_path):
    import bench_sampler

    out = tmp_path / "sampler.jsonl"
    assert bench_sampler.main(["--videos", "3000", "--out", str(out)]) == 0
    (r,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert r["videos"] == 3000 and r["build_s"] > 0 and 0 < r["plan_ms_median"] <= r["plan_ms_p99"]
    # the videos travel as a folder of shared arrays: the pickle and the worker's own memory
    # stay small, its resident set grows by the pages it read
    assert r["pickled_mb"] < 1 and r["worker_anon_after_plans_mb"] < 50
    assert r["worker_rss_after_plans_mb"] > 0


def test_rows_name_the_commit_of_the_code_imported(tmp_path, monkeypatch):
    """A row's `git` is the commit of the checkout fastavts was imported from, "+dirty" where
    its package files were changed (not the bench script's folder, which an editable install
    does not follow); "unknown" outside a checkout."""
    import subprocess

    import fastavts

    import common

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              cwd=tmp_path, check=True, capture_output=True,
                              text=True).stdout.strip()
    (tmp_path / "fastavts").mkdir()
    (tmp_path / "fastavts" / "__init__.py").write_text("x = 1\n")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "results.jsonl").write_text("{}\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "one")
    sha = git("rev-parse", "--short", "HEAD")
    monkeypatch.setattr(fastavts, "__file__", str(tmp_path / "fastavts" / "__init__.py"))
    assert common.git_sha() == sha
    (tmp_path / "bench" / "results.jsonl").write_text("{}\n{}\n")   # rows appended: clean
    assert common.git_sha() == sha
    (tmp_path / "fastavts" / "__init__.py").write_text("x = 2\n")
    assert common.git_sha() == sha + "+dirty"
    elsewhere = tmp_path.parent / f"{tmp_path.name}_plain" / "fastavts"
    elsewhere.mkdir(parents=True)
    monkeypatch.setattr(fastavts, "__file__", str(elsewhere / "__init__.py"))
    assert common.git_sha() == "unknown"
