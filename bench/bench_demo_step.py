"""The CPU demo's training step with and without its exact CPU rewrites, A against B.

    python bench/bench_demo_step.py                      # the CPU demo preset's shapes
    python bench/bench_demo_step.py data.clip_frames=8 data.frame_stride=4 model.tiny_stem_time_stride=1

The rewrites (issue 15, third pass) compute the same function: `FactorConv3d` runs (k, 1, 1)
and single-output-position spatial 3D convolutions as 2D ones on the CPU, and `AudioNet` folds
its input BN's affine step into the first convolution (no gradient of the log-mel). "plain"
swaps in nn.Conv3d.forward and the plain BN -> conv Sequential; "rewritten" is the code as it
is. Rounds alternate (plain, rewritten, rewritten, plain, ...) in one process so that the
machine's drift (its speed moves by tens of percent within an hour) falls on both alike:
each round times `--steps` training steps (both towers, InfoNCE on the embeddings, fused
AdamW) after two warm-up steps, then each tower's forward + backward alone. Also: a batch's
video cut clip by clip (`video_transform` per clip, then stacked) against `video_batch_transform`
on the whole batch, same alternation.

Prints machine, versions, median and range of each; appends one row to
bench/results/demo_step.jsonl.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from common import HERE, Rows, context


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("overrides", nargs="*", help="config overrides on top of the CPU demo preset")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=str(HERE / "results" / "demo_step.jsonl"))
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    from fastavts.config import build_config
    from fastavts.data.features import AudioGeometry, video_batch_transform, video_transform
    from fastavts.demo import preset
    from fastavts.models import audio as audio_mod
    from fastavts.models import video as video_mod
    from fastavts.models.avts import AVTS

    cfg = build_config(overrides=args.overrides, base=preset(False))
    d, B = cfg.data, cfg.loader.batch_size
    geo = AudioGeometry(d)
    torch.manual_seed(0)
    model = AVTS.from_config(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    xv = torch.randn(B, 3, d.clip_frames, d.crop, d.crop)
    xa = torch.randn(B, 1, geo.n_mels, geo.frames)
    rewritten = (video_mod.FactorConv3d.forward, audio_mod.AudioNet.forward)

    def plain_audio(self, x):
        return self.pool(self.features(x)).flatten(1)

    def use(mode):
        video_mod.FactorConv3d.forward = rewritten[0] if mode == "rewritten" else nn.Conv3d.forward
        audio_mod.AudioNet.forward = rewritten[1] if mode == "rewritten" else plain_audio

    def step():
        v, a, _, _ = model(xv, xa)
        loss = F.cross_entropy(v @ a.t() / cfg.loss.temperature, torch.arange(B))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def tower(net, x):
        net.zero_grad(set_to_none=True)
        net(x).square().mean().backward()

    def timed(fn, n):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return 1000 * (time.perf_counter() - t) / n

    # a batch of uint8 frames of the preset's shapes, cut both ways
    rng = np.random.default_rng(0)
    side = cfg.prepare.short_side
    frames = [rng.integers(0, 256, size=(d.clip_frames, side, side, 3), dtype=np.uint8)
              for _ in range(B)]
    cuts = [(int(rng.integers(0, side - d.crop + 1)), int(rng.integers(0, side - d.crop + 1)),
             bool(rng.random() < 0.5)) for _ in range(B)]

    def per_clip():
        torch.stack([video_transform(f, y, x, d.crop, fl, d.mean, d.std)
                     for f, (y, x, fl) in zip(frames, cuts)])

    def batch():
        crops = np.empty((B, d.clip_frames, d.crop, d.crop, 3), np.uint8)
        for i, (f, (y, x, fl)) in enumerate(zip(frames, cuts)):
            cut = f[:, y:y + d.crop, x:x + d.crop]
            crops[i] = cut[:, :, ::-1] if fl else cut
        video_batch_transform(crops, d.mean, d.std)

    ms = {k: {"plain": [], "rewritten": []} for k in ("step", "video_tower", "audio_tower")}
    cut_ms = {"per_clip": [], "batch": []}
    try:
        for r in range(args.rounds):
            for mode in (("plain", "rewritten") if r % 2 == 0 else ("rewritten", "plain")):
                use(mode)
                step()
                step()
                ms["step"][mode].append(timed(step, args.steps))
                ms["video_tower"][mode].append(timed(lambda: tower(model.video_net, xv),
                                                     args.steps))
                ms["audio_tower"][mode].append(timed(lambda: tower(model.audio_net, xa),
                                                     args.steps))
            for way, fn in ((("per_clip", per_clip), ("batch", batch)) if r % 2 == 0
                            else (("batch", batch), ("per_clip", per_clip))):
                fn()
                cut_ms[way].append(timed(fn, args.steps))
    finally:
        use("rewritten")

    ctx = context()
    print(f"machine: {ctx['machine']}")
    print(f"versions: {ctx['versions']}")
    print(f"{args.rounds} alternating rounds of {args.steps} calls; batch {B}, video "
          f"{d.clip_frames}x{d.crop}x{d.crop}, log-mel {geo.n_mels}x{geo.frames}")

    def stats(v):
        return dict(median=round(statistics.median(v), 2), min=round(min(v), 2),
                    max=round(max(v), 2))

    row = dict(bench="demo_step", overrides=args.overrides, rounds=args.rounds,
               steps=args.steps, batch=B, **ctx)
    for k, modes in ms.items():
        for mode, v in modes.items():
            row[f"{k}_{mode}_ms"] = stats(v)
        p, n = row[f"{k}_plain_ms"]["median"], row[f"{k}_rewritten_ms"]["median"]
        print(f"  {k:12s} plain {p:7.2f} ms  rewritten {n:7.2f} ms  "
              f"(ranges {row[f'{k}_plain_ms']['min']}-{row[f'{k}_plain_ms']['max']} / "
              f"{row[f'{k}_rewritten_ms']['min']}-{row[f'{k}_rewritten_ms']['max']})  "
              f"{100 * (1 - n / p):+.1f} % off")
    for way, v in cut_ms.items():
        row[f"video_cut_{way}_ms"] = stats(v)
    print(f"  video cut    per clip {row['video_cut_per_clip_ms']['median']:6.2f} ms  batch "
          f"{row['video_cut_batch_ms']['median']:6.2f} ms (ranges "
          f"{row['video_cut_per_clip_ms']['min']}-{row['video_cut_per_clip_ms']['max']} / "
          f"{row['video_cut_batch_ms']['min']}-{row['video_cut_batch_ms']['max']})")
    rows = Rows(args.out)
    rows.add(row)
    rows.done()
    return 0


if __name__ == "__main__":
    sys.exit(main())
