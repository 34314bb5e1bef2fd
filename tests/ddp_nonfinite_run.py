"""Run under torchrun by tests/test_train.py: `fastavts train` on 2 gloo ranks where rank 1's
loss is NaN at its 2nd step. Writes each rank's result and final parameters to OUT."""
import json
import os
import sys
from pathlib import Path

import torch

import fastavts.train as tr
from fastavts.config import build_config
from fastavts.objectives import Objective

out = Path(sys.argv[1])
rank = int(os.environ["RANK"])
torch.set_num_threads(1)
cfg = build_config(overrides=sys.argv[2:])
kind = Objective.named(cfg.loss.kind)
real, calls = kind.loss, {"n": 0}


def nan_on_rank1_step2(self, *a, **k):
    calls["n"] += 1
    loss = real(self, *a, **k)
    return loss * float("nan") if rank == 1 and calls["n"] == 2 else loss


kind.loss = nan_on_rank1_step2
r = tr.train(cfg, out / "run", progress=False)
if rank == 0:   # rank 0 wrote the checkpoint before train() returned
    state = torch.load(out / "run" / "checkpoints" / "last.pt", weights_only=False)
    torch.save(state["model"], out / "params_0.pt")
(out / f"result_{rank}.json").write_text(json.dumps(
    {k: v for k, v in r.items() if k in ("steps", "skipped_nonfinite", "losses")}))
