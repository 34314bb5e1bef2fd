"""Run under torchrun by tests/test_ddp.py: `fastavts.train.train` for every loss kind x pair
mode x gather setting, 3 steps each, on the ranks of one launch. Writes each run's steps,
losses and a digest of this rank's final parameters to OUT/<setting>_<rank>.json."""
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import fastavts.train as tr
from fastavts.config import build_config
from fastavts.train import loop

out, data = Path(sys.argv[1]), sys.argv[2]
rank = int(os.environ["RANK"])
torch.set_num_threads(1)
FAST = ["data.crop=48", "data.clip_frames=8", "data.frame_stride=4", "model.video=tiny",
        "model.audio=tiny", "loader.batch_size=4", "loader.kind=memory", "loader.workers=0",
        "sampler.clips_per_video=4", "train.epochs=1", "train.log_every=1", "train.loggers=[]",
        "train.channels_last=false", "train.ckpt_every=1000", "synth.width=96",
        "synth.height=64", "prepare.short_side=64", f"train.data={data}"]
MATRIX = [(kind, pairs, gather) for kind in ("contrastive", "infonce", "ce")
          for pairs in ("paired", "inbatch") for gather in ("off", "on")
          if not (kind == "ce" and (pairs == "inbatch" or gather == "on"))
          and not (kind == "contrastive" and pairs == "paired" and gather == "on")]
seen, digest = [], {}
# one process group for every run of the matrix: train() would end it after each
destroy, dist.destroy_process_group = dist.destroy_process_group, lambda *a, **k: None
real_checkpoint = loop.Run.checkpoint


def checkpoint(self):
    """The trainer's checkpoint, and on every rank a digest of its parameters (DDP keeps
    them equal; BatchNorm's running statistics are each rank's own)."""
    real_checkpoint(self)
    h = hashlib.sha256()
    for n, p in sorted(self.model.named_parameters()):
        h.update(n.encode() + p.detach().contiguous().numpy().tobytes())
    digest[self.out.name] = h.hexdigest()


loop.Run.checkpoint = checkpoint
for kind, pairs, gather in MATRIX:
    name = f"{kind}_{pairs}_gather_{gather}"
    cfg = build_config(overrides=[*FAST, f"loss.kind={kind}", f"sampler.pairs={pairs}",
                                  f"loss.gather_negatives={gather}", "sampler.k=1"])
    r = tr.train(cfg, out / name, progress=False)
    (out / f"{name}_{rank}.json").write_text(json.dumps(dict(
        steps=r["steps"], losses=r["losses"], negatives_from_ranks=r["negatives_from_ranks"],
        params=digest[name])))
    seen.append(name)
print("ran", seen)
dist.barrier()     # every rank done before gloo is torn down (a race aborts a rank on exit)
destroy()
