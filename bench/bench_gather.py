"""Negatives across ranks: what gathering every rank's audio windows costs against the local loss.

    python bench/bench_gather.py                              # CPU: gloo, 2, 3 and 4 processes
    torchrun --nproc-per-node 8 bench/bench_gather.py         # GPUs: NCCL, one rank per GPU

Each rank holds B clips and B(1+k) audio windows (the demo's batch by default: B 32, k 1,
D 128; embeddings as the towers give them, fp32, normalised) and times, forward + backward, the
loss on its own batch (group=None) and the loss with every rank's windows gathered
(group=WORLD: the all-gather of the windows with gradients, its backward, the all-reduce of
the counts and of the loss value), --repeats times after --warmup, with a barrier before each
call. Rows (one per loss and world size: the median over calls of the slowest rank, p20/p80,
and the extra time of gathering) go to bench/results/gather.jsonl. The target of docs/design.md
section 5 is for 8 GPUs: the gathered loss's fwd+bwd at most 10 % of a training step more
than the local loss.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from common import HERE, Rows, context, quantile


def inputs(rank, B, k, D, device, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed + rank)
    v = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1)
    a = torch.nn.functional.normalize(torch.randn(B * (1 + k), D, generator=g), dim=1)
    cv = torch.randint(0, 1000, (B,), generator=g) + 1000 * rank
    ct = torch.rand(B, generator=g) * 8
    av = cv.repeat_interleave(1 + k)
    at = (ct[:, None] + torch.arange(1 + k) * 1.5).reshape(-1)
    return [t.to(device) for t in (v, a, cv, ct, av, at)]


def measure(rank, world, args, device):
    """{(loss, 'local'|'gathered'): [ms per call]} on this rank."""
    import torch
    import torch.distributed as dist

    from fastavts.kernels.contrastive import inbatch_contrastive_loss
    from fastavts.kernels.infonce import inbatch_infonce_loss

    fns = {"contrastive": lambda *x, **kw: inbatch_contrastive_loss(*x, **kw),
           "infonce": lambda *x, **kw: inbatch_infonce_loss(*x, **kw)}
    v0, a0, *ids = inputs(rank, args.batch, args.k, args.dim, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {}
    for loss in args.loss:
        for mode in ("local", "gathered"):
            kw = dict(impl=args.impl)
            if mode == "gathered":
                kw.update(group=dist.group.WORLD, gather_capacity=args.batch * (1 + args.k))
            times = []
            for i in range(args.warmup + args.repeats):
                v, a = v0.clone().requires_grad_(True), a0.clone().requires_grad_(True)
                dist.barrier()
                sync()
                t = time.perf_counter()
                fns[loss](v, a, *ids, **kw).backward()
                sync()
                if i >= args.warmup:
                    times.append((time.perf_counter() - t) * 1e3)
            out[(loss, mode)] = times
    return out


def worker(rank, world, store, args, result_path):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    res = measure(rank, world, args, torch.device("cpu"))
    everyone = [None] * world
    dist.all_gather_object(everyone, res)
    if rank == 0:
        torch.save(everyone, result_path)
    dist.destroy_process_group()


def summarise(per_rank: list[dict], world: int, args, ctx, backend: str, rows: Rows) -> None:
    for loss in args.loss:
        r = {}
        for mode in ("local", "gathered"):
            # per call, the slowest rank sets the pace
            calls = [max(pr[(loss, mode)][i] for pr in per_rank)
                     for i in range(len(per_rank[0][(loss, mode)]))]
            r[mode] = dict(median_ms=round(statistics.median(calls), 4),
                           p20_ms=round(quantile(calls, 0.2), 4),
                           p80_ms=round(quantile(calls, 0.8), 4))
        extra = r["gathered"]["median_ms"] - r["local"]["median_ms"]
        row = rows.add(dict(ctx, bench="gather", backend=backend, world=world, loss=loss,
                            impl=args.impl, B=args.batch, M=args.batch * (1 + args.k),
                            M_gathered=world * args.batch * (1 + args.k), D=args.dim,
                            repeats=args.repeats, local=r["local"], gathered=r["gathered"],
                            extra_ms=round(extra, 4)))
        print(f"{backend} x{world} {loss:>11}: local {r['local']['median_ms']:.3f} ms, gathered "
              f"{r['gathered']['median_ms']:.3f} ms (+{extra:.3f} ms; p20-p80 "
              f"{r['gathered']['p20_ms']:.3f}-{r['gathered']['p80_ms']:.3f}), M "
              f"{row['M']} -> {row['M_gathered']}")


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 3, 4],
                   help="world sizes to spawn on this machine (gloo; ignored under torchrun)")
    p.add_argument("--loss", nargs="+", choices=["contrastive", "infonce"],
                   default=["contrastive", "infonce"])
    p.add_argument("--impl", choices=["reference", "triton", "auto"], default="auto")
    p.add_argument("--batch", type=int, default=32, help="clips per rank (the demo's 32)")
    p.add_argument("--k", type=int, default=1, help="hard windows per clip")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default=str(HERE / "results" / "gather.jsonl"))
    args = p.parse_args(argv)
    ctx = context()
    print(f"machine: {ctx['machine']}\nversions: {ctx['versions']}\ngit: {ctx['git']}")
    if "WORLD_SIZE" in os.environ:   # under torchrun: this process is one rank
        import torch.distributed as dist

        cuda = torch.cuda.is_available()
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        rank, world = dist.get_rank(), dist.get_world_size()
        res = measure(rank, world, args, device)
        everyone = [None] * world
        dist.all_gather_object(everyone, res)
        if rank == 0:
            rows = Rows(args.out)
            summarise(everyone, world, args, ctx, "nccl" if cuda else "gloo", rows)
            rows.done()
        dist.destroy_process_group()
        return 0
    import torch.multiprocessing as mp

    if args.impl == "auto":
        args.impl = "reference"   # a CPU: the kernel only in Triton's (slow) interpreter
    rows = Rows(args.out)
    for world in args.ranks:
        with tempfile.TemporaryDirectory() as d:
            result = os.path.join(d, "r.pt")
            mp.spawn(worker, args=(world, os.path.join(d, "store"), args, result), nprocs=world,
                     join=True)
            summarise(torch.load(result, weights_only=False), world, args, ctx, "gloo", rows)
    rows.done()
    return 0


if __name__ == "__main__":
    sys.exit(main())
