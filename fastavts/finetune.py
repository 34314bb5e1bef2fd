"""`fastavts finetune CHECKPOINT --dataset ucf101|hmdb51|synth ROOT --prepared DIR --split N`:
the pretrained video network, a new classifier, trained on an action recognition split.

    split files (official format, data/action_sets.py) -> video ids of the prepared set
    -> the trainer's loader (loader.kind: DALI / PyAV / memory; train mode: random clip starts,
       crops, flips) -> video net from the checkpoint (or freshly initialised: --scratch)
       -> dropout -> linear classifier -> cross-entropy
    -> the trainer's step (fastavts/train/step.py): train.optimizer, warm-up + cosine,
       train.precision (bf16 autocast on a GPU), channels_last_3d, DDP under torchrun, gradient
       clipping, non-finite steps skipped on the device; an atomic checkpoint at the end
       (<out>/checkpoints/last.pt)
    -> test videos: `eval_clips` evenly spaced centre-cropped clips each; clip accuracy, and
       video accuracy from the mean of each video's clip softmaxes

The clip geometry (frames, stride, crop) is the checkpoint's: the network was built for it.
The loader also cuts the audio windows of its pair plans; fine-tuning ignores them.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np


def finetune(checkpoint: str | Path, dataset: str, root: str | Path, prepared: str | Path,
             split: int = 1, *, scratch: bool = False, epochs: int = 10, lr: float = 1e-3,
             batch_size: int | None = None, clips_per_video: int = 4, eval_clips: int = 10,
             out: str | Path | None = None, overrides=(), progress: bool = True) -> dict:
    import torch
    from tqdm import tqdm

    from . import runtime
    from .checkpoint import save_checkpoint
    from .config import save_config, to_yaml
    from .data.action_sets import match_prepared, read_split
    from .data.loader import make_loader
    from .models.avts import AVTS, load_model
    from .train.step import build_step

    t_start = time.perf_counter()
    split_def = read_split(dataset, root, split, prepared)
    ids = match_prepared(split_def, prepared)
    # the rank's CUDA device is set before the process group starts (and handed to it)
    rank, world, device = runtime.setup_distributed()
    pre, ckpt_cfg = load_model(checkpoint, "cpu")
    cfg = _config(ckpt_cfg, epochs, lr, batch_size, clips_per_video, overrides, device, world)
    tc = cfg.train
    torch.manual_seed(tc.seed)
    # scratch: a fresh network of the same architecture, initialised as pretraining does
    video_net = AVTS.from_config(cfg).video_net if scratch else pre.video_net
    model = _classifier(video_net, len(split_def.classes)).to(device)

    train_ids = [v for v, _ in ids["train"]]
    label_of = dict(ids["train"] + ids["test"])
    loader = make_loader(cfg, prepared, mode="train", rank=rank, world_size=world,
                         total_epochs=epochs, videos=train_ids)
    labels = torch.tensor([label_of[v["id"]] for v in loader.sampler.videos]).to(device)
    total = epochs * len(loader)
    step_fn = build_step(model, cfg, device, world, total, video_net=video_net,
                         loss_fn=lambda net, b: torch.nn.functional.cross_entropy(
                             net(b["video"]).float(), labels[b["clip_video"]]))
    run = Path(out) if out else Path("runs") / f"finetune-{dataset}-s{split}-" \
        f"{'scratch' if scratch else 'pretrained'}-{time.strftime('%Y%m%d-%H%M%S')}"
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / "config.yaml",
                    header=f"# resolved config of: fastavts finetune {checkpoint} --dataset "
                           f"{dataset} --split {split}{' --scratch' if scratch else ''}")

    bar = tqdm(total=total, desc="finetune", unit="step", disable=not (progress and rank == 0))
    losses, pending, clips, step = [], [], 0, 0
    t0 = time.perf_counter()
    model.train()
    try:
        for epoch in range(epochs):
            for batch in loader.epoch(epoch):
                pending.append(step_fn(batch))
                step += 1
                clips += len(batch["clip_video"]) * world
                bar.update()
                if step % tc.log_every == 0:   # the host reads the losses now and then
                    losses.extend(torch.stack(pending).tolist())
                    pending.clear()
                    bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if pending:
            losses.extend(torch.stack(pending).tolist())
    finally:
        bar.close()
        loader.close()
    train_s = time.perf_counter() - t0
    if world > 1:   # the last collective: no rank leaves while another still talks
        torch.distributed.barrier()
    if rank == 0:
        save_checkpoint(run / "checkpoints", step, dict(
            model=model.state_dict(), classes=split_def.classes, config=to_yaml(cfg),
            pretrained_from=None if scratch else str(checkpoint), step=step), tc.keep_last)

    result = dict(dataset=dataset, split=split, scratch=scratch, checkpoint=str(checkpoint),
                  classes=len(split_def.classes), train_videos=len(train_ids),
                  test_videos=len(ids["test"]), left_out=len(ids["left_out"]), epochs=epochs,
                  steps=step, skipped_nonfinite=int(step_fn.bad_total.item()),
                  final_loss=round(float(np.mean(losses[-10:])), 4) if losses else None,
                  clips_per_s=round(clips / train_s, 1) if train_s else None)
    if rank == 0:
        result.update(evaluate_clips(model, cfg, prepared, [v for v, _ in ids["test"]], label_of,
                                     device, step_fn.autocast, eval_clips))
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
        (run / "metrics.json").write_text(json.dumps(result, indent=1))
        result["run"] = str(run)
    if world > 1:
        torch.distributed.destroy_process_group()
    return result


def _config(ckpt_cfg, epochs, lr, batch_size, clips_per_video, overrides, device, world):
    """The checkpoint's config with fine-tuning's sampling (every clip its own example) and the
    command's settings, resolved for this machine (a checkpoint made on a GPU runs on a CPU)."""
    import yaml

    from . import runtime
    from .config import build_config, to_yaml

    over = ["sampler.pairs=paired", "sampler.curriculum=[[0.0,0.0]]",
            "sampler.curriculum_unit=step", f"sampler.clips_per_video={clips_per_video}",
            f"train.epochs={epochs}", f"train.lr={lr}", *overrides]
    if batch_size:
        over.append(f"loader.batch_size={batch_size}")
    cfg = build_config(None, over, extra=yaml.safe_load(to_yaml(ckpt_cfg)))
    cuda = device.type == "cuda"
    if cfg.loader.device == "gpu" and not cuda:
        cfg.loader.device = "cpu"
    return runtime.resolve(cfg, runtime.Machine.here(device), world)


def _classifier(video_net, n_classes: int):
    """The video network, dropout, a linear layer to the classes."""
    from torch import nn
    return nn.Sequential(video_net, nn.Dropout(0.5), nn.Linear(video_net.out_dim, n_classes))


def evaluate_clips(model, cfg, prepared, test_ids: list[str], label_of: dict, device, autocast,
                   clips_per_video: int) -> dict:
    """Clip accuracy and video accuracy (mean softmax over a video's clips) on test videos."""
    import torch

    from .data.loader import make_loader

    c = copy.deepcopy(cfg)
    c.sampler.clips_per_video = clips_per_video
    loader = make_loader(c, prepared, mode="eval", rank=0, world_size=1, videos=test_ids)
    vids = [v["id"] for v in loader.sampler.videos]
    probs = {i: [] for i in range(len(vids))}
    correct = n = 0
    from .data.features import VideoNorm
    norm = VideoNorm(cfg.data.mean, cfg.data.std)   # uint8 video is normalised on the device
    model.eval()
    try:
        with torch.no_grad(), autocast():
            for b in loader.epoch(0):
                p = model(norm(b["video"].to(device))).float().softmax(1).cpu()
                for vi, row in zip(b["clip_video"].tolist(), p):
                    probs[vi].append(row)
                    correct += int(row.argmax()) == label_of[vids[vi]]
                    n += 1
    finally:
        loader.close()
        model.train()
    per_video = [int(torch.stack(ps).mean(0).argmax()) == label_of[vids[vi]]
                 for vi, ps in probs.items() if ps]
    return dict(clip_accuracy=round(correct / max(1, n), 4),
                video_accuracy=round(float(np.mean(per_video)), 4), test_clips=n)
