"""The `fastavts` command. Subcommands take positional arguments, a few flags, an optional
`--config FILE.yaml` and any number of `section.key=value` overrides, in that order of
precedence (overrides win). Only subcommands that work are listed."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .checkpoint import ExportError
from .config import ConfigError, build_config, describe
from .data.audio_sets import LayoutError

EPILOG_OVERRIDES = ("Any setting can be changed with section.key=value after the arguments, "
                    "e.g. prepare.workers=4 or data.fps=30; `fastavts info --config` lists them.")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", metavar="FILE.yaml",
                   help="YAML file with settings that differ from the defaults (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="settings overrides, applied last")


def _flags_to_tree(args, mapping: dict) -> dict:
    tree: dict = {}
    for attr, key in mapping.items():
        v = getattr(args, attr, None)
        if v is not None:
            section, name = key.split(".")
            tree.setdefault(section, {})[name] = v
    return tree


def _split_overrides(args) -> None:
    """argparse puts OUT-like words and overrides in one list for nargs='*': keep key=value."""
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"unexpected argument(s) {bad}: settings are given as "
                          f"section.key=value (for example prepare.workers=4)")


def add_synth(sub) -> None:
    p = sub.add_parser("synth", help="generate the synthetic audio-visual set",
                       description="Generate videos of bouncing objects whose floor impacts make "
                       "sounds (real VP9+Opus webm or H.264+AAC mp4 files, one JSON sidecar "
                       "each with labels and impact times). Same seed, same files.",
                       epilog=EPILOG_OVERRIDES)
    p.add_argument("out", help="output folder")
    p.add_argument("--videos", type=int, help="number of videos (default 64)")
    p.add_argument("--seed", type=int, help="seed (default 0)")
    p.add_argument("--codec", choices=("vp9", "h264", "mjpeg"),
                   help="vp9 (CPU decoding), h264 (GPU) or mjpeg (a near-lossless source for "
                        "prepare)")
    p.add_argument("--min-duration", type=float, help="shortest video in s (default 4)")
    p.add_argument("--max-duration", type=float, help="longest video in s (default 12)")
    p.add_argument("--workers", type=int, help="processes (default: one per core)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_common(p)
    p.set_defaults(func=cmd_synth)


def cmd_synth(args) -> int:
    from .data.synth import synthesize

    _split_overrides(args)
    cfg = build_config(args.config, args.overrides, _flags_to_tree(args, {
        "videos": "synth.videos", "seed": "synth.seed", "codec": "synth.codec",
        "workers": "synth.workers", "min_duration": "synth.min_duration",
        "max_duration": "synth.max_duration"}))
    s = synthesize(args.out, cfg, progress=not args.quiet)
    print(f"synth: {s['made']} videos made, {s['skipped']} already there, in {args.out} "
          f"({cfg.synth.codec}, {s['wall_s']:.1f} s)", file=sys.stderr)
    print(json.dumps(s))
    return 0


def _sigterm_as_interrupt() -> None:
    """A batch scheduler's SIGTERM stops a long job as cleanly as Ctrl-C does; and Ctrl-C
    (SIGINT) stops it even where the parent process left SIGINT ignored (Python then keeps it
    ignored: a job started by a process that ignores it could not be interrupted)."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="re-encode videos, build the audio bank and manifest",
                       description="Prepare SRC (a folder, searched recursively, or a CSV list) "
                       "into OUT: constant-fps re-encoded video with short keyframe intervals, "
                       "a 16 kHz mono audio bank, manifest.jsonl and rejected.jsonl. Rerunning "
                       "on the same OUT resumes.", epilog=EPILOG_OVERRIDES)
    p.add_argument("src", help="folder of videos, or a CSV list (column path or video, "
                   "optional label; or Kinetics' youtube_id,time_start,time_end)")
    p.add_argument("out", help="dataset folder to write")
    p.add_argument("--codec", choices=("auto", "h264", "vp9"),
                   help="output codec (auto: h264 with a CUDA GPU, else vp9)")
    p.add_argument("--workers", type=int, help="processes (default: one per core)")
    p.add_argument("--short-side", type=int, help="short side in pixels (default 128)")
    p.add_argument("--fps", type=float, help="output frame rate (default 25)")
    p.add_argument("--keyframe-interval", type=int, help="frames between keyframes (default 16)")
    p.add_argument("--segment-seconds", type=float, help="cut into segments (default 0: no)")
    p.add_argument("--retry-rejected", action="store_true",
                   help="try the inputs in rejected.jsonl again")
    p.add_argument("--shard", metavar="K/N", help="prepare only the K-th of N shares of the "
                   "inputs (0 <= K < N; the same split on every machine), e.g. one per SLURM "
                   "array task; join the N shares with `fastavts merge`")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_common(p)
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args) -> int:
    from .data.prepare import prepare

    _split_overrides(args)
    cfg = build_config(args.config, args.overrides, _flags_to_tree(args, {
        "workers": "prepare.workers", "codec": "prepare.codec",
        "short_side": "prepare.short_side", "segment_seconds": "prepare.segment_seconds",
        "keyframe_interval": "prepare.keyframe_interval", "fps": "data.fps"}))
    command = "fastavts " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["prepare"] else ""
    _sigterm_as_interrupt()
    try:
        shard = None
        if args.shard:
            from .data.prepare import parse_shard
            shard = parse_shard(args.shard)
        s = prepare(args.src, args.out, cfg, progress=not args.quiet,
                    retry_rejected=args.retry_rejected, command=command, shard=shard)
    except KeyboardInterrupt as e:
        s = e.args[0] if e.args and isinstance(e.args[0], dict) else None
        done = f"{s['prepared']} prepared and {s['rejected']} rejected inputs are saved; " if s else ""
        print(f"\ninterrupted: {done}run the same command again to resume.", file=sys.stderr)
        return 130
    reasons = ", ".join(f"{n} {k}" for k, n in sorted(s["rejected_by_reason"].items()))
    print(f"prepare: {s['prepared']} of {s['inputs']} inputs usable, {s['rejected']} rejected"
          f"{' (' + reasons + ')' if reasons else ''}; "
          f"{s['processed_this_run']} processed in this run in {s['wall_s']:.1f} s "
          f"({s['videos_per_s'] or 0:.2f} videos/s, {s['audio_hours_per_s'] or 0:.4f} "
          f"audio-hours/s, {s['workers']} workers, codec {s['codec']}).", file=sys.stderr)
    if s["not_videos_ignored"]:
        print(f"prepare: {s['not_videos_ignored']} files without a video extension were not "
              f"inputs (e.g. {', '.join(s['ignored_examples'][:3])}); see "
              f"prepare.extensions.", file=sys.stderr)
    if s["rejected"]:
        print(f"prepare: reasons per file in {Path(args.out) / 'rejected.jsonl'}", file=sys.stderr)
    print(json.dumps(s))
    return 0


def add_merge(sub) -> None:
    p = sub.add_parser("merge", help="join the shares of a sharded prepare into one dataset",
                       description="Join the N shares made by `fastavts prepare SRC DIR_k "
                       "--shard k/N` into one dataset: one audio bank, one manifest, one rejected "
                       "list, the video files hard-linked (or copied). Equals a single prepare of "
                       "the same inputs. Shares of other inputs or settings, overlapping, missing "
                       "or unfinished shares are refused. Run it again to finish an interrupted "
                       "merge.")
    p.add_argument("shares", nargs="+", metavar="SHARE_DIR", help="the share folders")
    p.add_argument("--out", required=True, help="the dataset folder to make")
    p.add_argument("--copy", action="store_true", help="copy the video files (default: hard "
                   "links where the filesystem allows, else copies)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_merge)


def cmd_merge(args) -> int:
    from .data.merge import merge

    s = merge(args.shares, args.out, copy=args.copy, progress=not args.quiet)
    print(f"merge: {s['shares']} shares -> {s['out']}: {s['prepared']} of {s['inputs']} inputs "
          f"usable, {s['rejected']} rejected", file=sys.stderr)
    print(json.dumps(s))
    return 0


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train the audio and video nets (no data: the demo)",
                       description="Train AVTS on a prepared set (train.data=DIR). With no data "
                       "it runs the demo: makes the synthetic set if missing, prepares it, trains "
                       "(tiny nets on a CPU, R(2+1)D-18 on a GPU) and evaluates sync on held-out "
                       "videos. Ends with one JSON line of final metrics (also metrics.json).",
                       epilog=EPILOG_OVERRIDES)
    p.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="settings file (configs/)")
    p.add_argument("-c", "--config-file", dest="config_file", metavar="CONFIG.yaml",
                   help="the same, as an option (fastavts train -c configs/avts_paper_cpu.yaml)")
    p.add_argument("--out", help="run directory (default runs/<date-time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its "
                   "last checkpoint (CONFIG and overrides, if given, change its settings; "
                   "a finished run is left as it is)")
    p.add_argument("--auto-resume", action="store_true", help="continue the run in --out "
                   "if it has a checkpoint, start it otherwise (for job scripts that are "
                   "requeued: docs/cluster.md)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    import time

    import torch

    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides, args.config = [args.config, *args.overrides], None  # no CONFIG given
    if args.config_file:
        if args.config:
            raise ConfigError(f"two config files given ({args.config} and -c "
                              f"{args.config_file}); give one")
        args.config = args.config_file
    _split_overrides(args)
    if (args.resume or args.auto_resume) and not args.out:   # train.out=... given instead
        args.out = build_config(args.config, args.overrides).train.out or None
    if args.auto_resume:
        from .checkpoint import checkpoint_candidates
        args.resume = bool(args.out) and bool(checkpoint_candidates(Path(args.out) /
                                                                    "checkpoints"))
    if args.resume:
        return _resume(args)
    cfg = build_config(args.config, args.overrides)
    demo = not cfg.train.data
    if demo:  # the synthetic demo: a preset for this machine under the user's own settings
        from .demo import prepare_demo_data, preset
        cfg = build_config(args.config, args.overrides, base=preset(torch.cuda.is_available()))
    out = Path(args.out or cfg.train.out or f"runs/{'demo-' if demo else ''}{time.strftime('%Y%m%d-%H%M%S')}")
    if demo:
        cfg = prepare_demo_data(cfg, progress=not args.quiet,
                                local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    if not cfg.train.data:
        raise ConfigError("train.data is empty: give a prepared dataset (train.data=DIR)")
    return _run_train(cfg, out, False, args)


def _resume(args) -> int:
    """--resume: the run's saved settings, with CONFIG and the overrides on top (each change
    said); its folder checked by the trainer (lifecycle.claim)."""
    from .config import changed_settings, load_yaml

    if not args.out:
        raise ConfigError("--resume needs the run's folder: --out RUN")
    out = Path(args.out)
    if not (out / "config.yaml").is_file():
        raise ConfigError(f"--resume: {out} is not a run folder (no config.yaml); give the "
                          f"run's folder with --out")
    saved = load_yaml(out / "config.yaml")
    before = build_config(None, [], extra=saved)
    extra = saved
    if args.config:   # applied as overrides are: on top of the run's settings
        from omegaconf import OmegaConf
        extra = OmegaConf.to_container(OmegaConf.merge(saved, load_yaml(args.config)))
    cfg = build_config(None, args.overrides, extra=extra)
    if int(os.environ.get("RANK", 0)) == 0:
        for key, was, now in changed_settings(before, cfg):
            print(f"fastavts train: --resume changes {key}: {was!r} -> {now!r}",
                  file=sys.stderr)
    return _run_train(cfg, out, True, args)


def _run_train(cfg, out: Path, resume: bool, args) -> int:
    """Train into `out`; the metrics as one JSON line, or the line of a run stopped by a signal
    (its exit code: lifecycle.EXIT_SIGTERM / EXIT_SIGINT)."""
    import time

    from .train import train
    from .train.lifecycle import EXIT_CODES, stopped_line

    t0 = time.perf_counter()
    result = train(cfg, out, resume=resume, progress=not args.quiet)
    result.pop("losses", None)
    main = int(os.environ.get("RANK", 0)) == 0   # under torchrun: rank 0 reports
    if "stopped_by" in result:
        if main:
            print(stopped_line(result["stopped_by"], result["stopped_at"],
                               result.get("checkpoint"), out), file=sys.stderr, flush=True)
        return EXIT_CODES.get(result["stopped_by"], 1)
    if not main:
        return 0
    if result.pop("finished_before", False):
        print(f"fastavts train: the run in {out} had finished (step {result.get('steps')}); "
              f"nothing was rerun, its results stay in {out / 'metrics.json'}", file=sys.stderr)
    else:
        result["command_wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"fastavts train: run directory {out}", file=sys.stderr)
    print(json.dumps(result))
    return 0


def add_eval_sync(sub) -> None:
    p = sub.add_parser("eval-sync", help="sync accuracy and ROC AUC of a checkpoint on a dataset",
                       description="Score fixed (clip, audio) pairs of a prepared dataset: "
                       "positives, easy and hard negatives. The threshold is chosen on half of the "
                       "videos (reported) and applied to the other half.")
    p.add_argument("checkpoint", help="a checkpoint (runs/.../checkpoints/last.pt) or a folder made by fastavts export")
    p.add_argument("dataset", help="a prepared dataset")
    p.add_argument("--clips-per-video", type=int, default=None,
                   help="clips per video (default: the checkpoint's train.eval_clips, 32)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.set_defaults(func=cmd_eval_sync)


def cmd_eval_sync(args) -> int:
    import torch

    from .evaluate import evaluate_sync
    from .models.avts import load_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_model(args.checkpoint, device)
    if args.overrides:
        _split_overrides(args)
        import yaml

        from .config import to_yaml
        cfg = build_config(None, args.overrides, extra=yaml.safe_load(to_yaml(cfg)))
    if cfg.loader.device == "gpu" and not torch.cuda.is_available():
        cfg.loader.device = "cpu"
    r = evaluate_sync(model, cfg, args.dataset, device,
                      clips_per_video=args.clips_per_video or cfg.train.eval_clips)
    if args.json:
        print(json.dumps(r))
    else:
        for k, v in r.items():
            print(f"{k:14s} {v}")
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export", help="a checkpoint's model as a shareable folder (safetensors)",
                       description="Write OUT_DIR/model.safetensors (the weights only), "
                       "config.json (what rebuilds the model and its inputs) and README.md (a "
                       "model card: data, held-out metrics from the run's metrics.json, the "
                       "command that made it, how to load it). The folder is a Hugging Face "
                       "model repository's layout; fastavts.AVTS.from_pretrained(OUT_DIR) loads "
                       "it, and every command that takes a checkpoint takes the folder.")
    p.add_argument("checkpoint", help="a training checkpoint (runs/.../checkpoints/last.pt)")
    p.add_argument("out_dir", help="the folder to write (new, empty, or an earlier export)")
    p.add_argument("--metrics", help="metrics.json for the model card (default: the run's, "
                   "next to checkpoints/)")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from .export import export

    out = export(args.checkpoint, args.out_dir, metrics=args.metrics)
    print(f"fastavts export: {out}/model.safetensors, config.json, README.md", file=sys.stderr)
    print(json.dumps({"out": str(out)}))
    return 0


def add_offset(sub) -> None:
    p = sub.add_parser("offset", help="find how far the sound is from the picture in videos",
                       description="For each video (any container and codec prepare accepts), "
                       "score audio shifts of -N..+N frames against several clips and report the "
                       "offset (positive: the audio lags the picture) and a confidence (median "
                       "distance minus minimum, as SyncNet).")
    p.add_argument("checkpoint", help="a checkpoint (runs/.../checkpoints/last.pt) or a folder made by fastavts export")
    p.add_argument("videos", nargs="+", help="video files")
    p.add_argument("--max-shift", type=int, default=15, help="largest shift tried, in frames")
    p.add_argument("--clips", type=int, default=8, help="clips per video")
    p.add_argument("--workers", type=int, default=0, help="prepare processes (0: one per core)")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=cmd_offset)


def cmd_offset(args) -> int:
    from .offset import detect_offsets

    rows = detect_offsets(args.checkpoint, args.videos, max_shift=args.max_shift,
                          clips=args.clips, workers=args.workers)
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            if "error" in r:
                print(f"{r['file']}: {r['error']}")
            else:
                print(f"{r['file']}: offset {r['offset_frames']:+d} frames ({r['offset_s']:+.3f} s), "
                      f"confidence {r['confidence']:.4f} over {r['clips']} clips")
    failed = sum("error" in r for r in rows)
    if rows and failed == len(rows):
        print(f"fastavts offset: error: none of the {failed} video(s) could be measured (see "
              f"above)", file=sys.stderr)
        return 2
    return 0


def add_probe_audio(sub) -> None:
    p = sub.add_parser("probe-audio", help="linear SVM probe of the audio net (ESC-50, DCASE2014)",
                       description="Features of the checkpoint's audio network (a layer's "
                       "activations averaged over frequency, time and a recording's windows) and "
                       "a linear SVM on the dataset's official folds: ESC-50 (ROOT/audio, "
                       "ROOT/meta/esc50.csv; 5 folds), DCASE2014 scenes (ROOT/scenes_stereo, "
                       "ROOT/scenes_stereo_testset; train/test), synth (a prepared synthetic set "
                       "with one sounding object per video; 5 folds).")
    p.add_argument("checkpoint", help="a checkpoint (runs/.../checkpoints/last.pt) or a folder made by fastavts export")
    p.add_argument("--dataset", required=True, choices=["esc50", "dcase2014", "synth"])
    p.add_argument("root", help="the dataset's folder in its official layout")
    p.add_argument("--layer", default="stage4", choices=["stage1", "stage2", "stage3", "stage4",
                                                         "features", "embedding"],
                   help="which activations (default stage4, the last conv stage)")
    p.add_argument("--C", type=float, default=1.0, help="the SVM's regularisation constant")
    p.add_argument("--scratch", action="store_true",
                   help="probe a randomly initialised net of the same architecture instead")
    p.add_argument("--cache", default=None,
                   help="feature cache folder (default $FASTAVTS_CACHE/probe or ~/.cache/fastavts/probe)")
    p.add_argument("--batch-size", type=int, default=256, help="windows per forward pass")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_probe_audio)


def cmd_probe_audio(args) -> int:
    from .probe import probe_audio

    r = probe_audio(args.checkpoint, args.dataset, args.root, layer=args.layer, c=args.C,
                    scratch=args.scratch, cache_dir=args.cache, batch_size=args.batch_size,
                    progress=not args.json)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['dataset']}: accuracy {100 * r['accuracy']:.1f} % (per fold "
              f"{', '.join(f'{100 * a:.1f}' for a in r['fold_accuracy'])}), layer {r['layer']} "
              f"({r['feature_dim']} features), {r['recordings']} recordings, {r['classes']} "
              f"classes{', features from the cache' if r['features_cached'] else ''}")
    return 0


def add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune the video net on UCF101 / HMDB51 splits",
                       description="Initialise the video network from a checkpoint (or from "
                       "scratch), add a classifier and train it on an official split: UCF101 "
                       "(ROOT/ucfTrainTestlist: classInd.txt, trainlist0N.txt, testlist0N.txt), "
                       "HMDB51 (ROOT/testTrainMulti_7030_splits/*_test_splitN.txt), synth (a "
                       "prepared synthetic set with one sounding object per video). The videos "
                       "are read from a set prepared with `fastavts prepare` (--prepared; "
                       "prepare.require_audio=false keeps the silent ones). Reports clip and "
                       "video accuracy on the split's test videos.")
    p.add_argument("checkpoint", help="a pretraining checkpoint (runs/.../checkpoints/last.pt) or a folder made by fastavts export")
    p.add_argument("--dataset", required=True, choices=["ucf101", "hmdb51", "synth"])
    p.add_argument("root", help="the folder holding the official split files (synth: the "
                   "prepared set)")
    p.add_argument("--prepared", help="the prepared videos (default: ROOT)")
    p.add_argument("--split", type=int, default=1, choices=[1, 2, 3])
    p.add_argument("--scratch", action="store_true", help="random initialisation (baseline)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--clips-per-video", type=int, default=4, help="training clips per video "
                   "and epoch")
    p.add_argument("--eval-clips", type=int, default=10, help="test clips per video")
    p.add_argument("--out", help="run directory (default runs/finetune-...)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args) -> int:
    from .finetune import finetune

    _split_overrides(args)
    r = finetune(args.checkpoint, args.dataset, args.root, args.prepared or args.root,
                 args.split, scratch=args.scratch, epochs=args.epochs, lr=args.lr,
                 batch_size=args.batch_size, clips_per_video=args.clips_per_video,
                 eval_clips=args.eval_clips, out=args.out, overrides=args.overrides,
                 progress=not args.json)
    if int(os.environ.get("RANK", 0)) != 0:   # under torchrun: rank 0 reports
        return 0
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['dataset']} split {r['split']} ({'scratch' if r['scratch'] else 'pretrained'}): "
              f"clip accuracy {100 * r['clip_accuracy']:.1f} %, video accuracy "
              f"{100 * r['video_accuracy']:.1f} % on {r['test_videos']} test videos "
              f"({r['left_out']} left out by prepare); run {r['run']}")
    return 0


def _versions() -> dict:
    from .machine import versions
    return versions()


def machine_info() -> dict:
    from .machine import machine_info as info
    return info()


def add_info(sub) -> None:
    p = sub.add_parser("info", help="versions, machine, and a prepared dataset's summary",
                       description="Print library versions and the machine; with DATASET, a "
                       "summary of a prepared dataset; with --config, every setting.")
    p.add_argument("dataset", nargs="?", help="a prepared dataset folder")
    p.add_argument("--config", dest="config_schema", action="store_true",
                   help="list every setting with its default and meaning")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    if args.config_schema:
        import dataclasses

        from .config import Config
        for section in dataclasses.fields(Config):
            cls = type(getattr(Config(), section.name))
            section = section.name
            print(f"{section}:")
            for name, default, help in describe(cls):
                print(f"  {name} = {default!r}\n      {help}")
        return 0
    report = {"versions": _versions(), "machine": machine_info()}
    if args.dataset:
        from collections import Counter

        from .data.dataset import Dataset

        ds = Dataset.open(args.dataset)
        labels = Counter(v.get("label") for v in ds.videos)
        reasons = Counter(r["reason"].split(":")[0].split("(")[0].strip() for r in ds.rejected)
        report["dataset"] = {
            "path": str(args.dataset), "videos": len(ds.videos), "rejected": len(ds.rejected),
            "hours": round(sum(v["duration"] for v in ds.videos) / 3600, 4),
            "codecs": dict(Counter(v["codec"] for v in ds.videos)),
            "fps": sorted({v["fps"] for v in ds.videos}),
            "sizes": dict(Counter(f"{v['width']}x{v['height']}" for v in ds.videos)),
            "labels": {str(k): n for k, n in labels.most_common(20)},
            "rejected_by_reason": dict(reasons),
            "sample_rate": ds.sample_rate,
        }
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    for section, d in report.items():
        print(f"{section}:")
        for k, v in d.items():
            print(f"  {k}: {v}")
    return 0


# every subcommand, in the order `fastavts --help` lists them
COMMANDS = (add_synth, add_prepare, add_merge, add_train, add_eval_sync, add_offset,
            add_probe_audio, add_finetune, add_export, add_info)


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(
        prog="fastavts", description="Self-supervised audio-visual synchronization, fast.",
        epilog=EPILOG_OVERRIDES)
    parser.add_argument("--version", action="version", version=f"fastavts {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    # Overrides may stand before or after flags (`prepare A B -q x.y=1`): argparse leaves the
    # ones after a flag unparsed, so gather them here.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, LayoutError, ExportError) as e:
        print(f"fastavts {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
