"""Negatives across ranks (`group=`): with 2 and 3 gloo ranks, each holding its own clips and
audio windows, the loss has the value of one process on the concatenated batch, and each
rank's gradients divided by world_size (its share of DDP's average) are that process's
gradients; for the
margin loss and InfoNCE, reference and kernel (Triton's interpreter here), with ranks of equal
and of unequal sizes (padding to a capacity, or sizes exchanged), and through the AVTS model
under DistributedDataParallel."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from fastavts.kernels.contrastive import inbatch_contrastive_loss
from fastavts.kernels.infonce import inbatch_infonce_loss

from conftest import spawn_ranks

B, K, D = 5, 1, 16        # clips per rank, hard windows per clip, embedding size


def loss_fn(kind):
    if kind == "contrastive":
        return lambda *a, **kw: inbatch_contrastive_loss(*a, margin=1.0, hard_share=0.3,
                                                         hard_min_shift=0.5, sync_tol=0.02, **kw)
    return lambda *a, **kw: inbatch_infonce_loss(*a, temperature=0.2, hard_min_shift=0.5,
                                                 sync_tol=0.02, **kw)


def layout(world: int, uneven: bool):
    """Row and column ranges of each rank: B clips and B(1+K) windows, the last rank one clip
    (and its windows) short when uneven (an evaluation's last batch)."""
    rows, cols, r0, c0 = [], [], 0, 0
    for r in range(world):
        n = B - (1 if uneven and r == world - 1 else 0)
        rows.append(slice(r0, r0 + n))
        cols.append(slice(c0, c0 + n * (1 + K)))
        r0, c0 = r0 + n, c0 + n * (1 + K)
    return rows, cols


def make_batch(world: int, uneven: bool, seed: int = 0):
    """Clips of 4 videos spread over the ranks (so positives and hard pairs cross ranks); each
    clip's aligned window and K windows of its video 1-3 s away, like the in-batch sampler."""
    rows, cols = layout(world, uneven)
    n = rows[-1].stop
    g = torch.Generator().manual_seed(seed)
    cv = torch.randint(0, 4, (n,), generator=g)
    ct = torch.randint(0, 16, (n,), generator=g).float() * 0.25
    av = cv.repeat_interleave(1 + K)
    shift = torch.zeros(n, 1 + K)
    shift[:, 1:] = 1 + 2 * torch.rand(n, K, generator=g)
    at = (ct[:, None] + shift).reshape(-1)
    v = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=1)
    a = torch.nn.functional.normalize(torch.randn(n * (1 + K), D, generator=g), dim=1)
    a[:: 1 + K] = torch.nn.functional.normalize(0.5 * a[:: 1 + K] + 0.5 * v, dim=1)
    return rows, cols, v, a, cv, ct, av, at


def one_process(kind, impl, v, a, cv, ct, av, at):
    v, a = v.clone().requires_grad_(True), a.clone().requires_grad_(True)
    loss = loss_fn(kind)(v, a, cv, ct, av, at, impl=impl)
    loss.backward()
    return loss.detach(), v.grad, a.grad


def embedding_worker(rank, world, store, out, uneven):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    rows, cols, v, a, cv, ct, av, at = make_batch(world, uneven)
    r, c = rows[rank], cols[rank]
    res = {}
    for kind in ("contrastive", "infonce"):
        for impl in ("reference", "triton"):
            for cap in (None, B * (1 + K)):
                vr = v[r].clone().requires_grad_(True)
                ar = a[c].clone().requires_grad_(True)
                loss = loss_fn(kind)(vr, ar, cv[r], ct[r], av[c], at[c], impl=impl,
                                     group=dist.group.WORLD, gather_capacity=cap)
                loss.backward()
                # DDP divides by world: the share this rank contributes to the average
                res[(kind, impl, cap)] = (loss.detach(), vr.grad / world, ar.grad / world)
    torch.save(res, f"{out}_{rank}.pt")
    dist.barrier()     # both ranks done before either tears gloo down (a race aborts a rank)
    dist.destroy_process_group()


@pytest.mark.parametrize("world,uneven", [(2, False), (3, False), (2, True)],
                         ids=["2_ranks", "3_ranks", "2_ranks_uneven"])
def test_gathered_negatives_equal_one_process_on_the_whole_batch(tmp_path, world, uneven):
    spawn_ranks(embedding_worker, (world, str(tmp_path / "store"), str(tmp_path / "r"), uneven),
                world, lambda: all((tmp_path / f"r_{k}.pt").is_file() for k in range(world)))
    rows, cols, v, a, cv, ct, av, at = make_batch(world, uneven)
    worst = 0.0
    for kind in ("contrastive", "infonce"):
        want = one_process(kind, "reference", v.double(), a.double(), cv, ct, av, at)
        for rank in range(world):
            got = torch.load(tmp_path / f"r_{rank}.pt")
            for impl in ("reference", "triton"):
                for cap in (None, B * (1 + K)):
                    loss, gv, ga = got[(kind, impl, cap)]
                    pairs = [("loss", loss, want[0]), ("dV", gv, want[1][rows[rank]]),
                             ("dA", ga, want[2][cols[rank]])]
                    for what, x, y in pairs:
                        err = (x.double() - y).abs().max().item()
                        tol = 1e-5 * max(1.0, y.abs().max().item())
                        worst = max(worst, err / tol)
                        assert err <= tol, (kind, impl, cap, rank, what, err)
    print("worst error / tolerance", worst)


def model_worker(rank, world, store, out, kind):
    from fastavts.models.avts import AVTS

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(AVTS("tiny", "tiny", dim=16).eval())
    video, audio, (rows, cols, _, _, cv, ct, av, at) = model_inputs(world)
    r, c = rows[rank], cols[rank]
    v, a, _, _ = model(video[r], audio[c])
    loss_fn(kind)(v, a, cv[r], ct[r], av[c], at[c], impl="reference",
                  group=dist.group.WORLD, gather_capacity=B * (1 + K)).backward()
    if rank == 0:   # DDP has averaged the gradients: every rank holds the same
        torch.save({n: p.grad for n, p in model.module.named_parameters()}, out)
    dist.barrier()     # both ranks done before either tears gloo down (a race aborts a rank)
    dist.destroy_process_group()


def model_inputs(world):
    g = torch.Generator().manual_seed(1)
    batch = make_batch(world, False)
    n = batch[0][-1].stop
    video = torch.randn(n, 3, 8, 32, 32, generator=g)
    audio = torch.randn(n * (1 + K), 1, 64, 128, generator=g)
    return video, audio, batch


@pytest.mark.parametrize("kind", ["contrastive", "infonce"])
def test_ddp_with_gathered_negatives_equals_one_process(tmp_path, kind):
    """BatchNorm on running statistics (eval mode), as tests/test_ddp.py explains."""
    from fastavts.models.avts import AVTS

    torch.manual_seed(0)
    model = AVTS("tiny", "tiny", dim=16).eval()
    video, audio, (_, _, _, _, cv, ct, av, at) = model_inputs(2)
    v, a, _, _ = model(video, audio)
    loss_fn(kind)(v, a, cv, ct, av, at, impl="reference").backward()
    want = {n: p.grad for n, p in model.named_parameters()}
    spawn_ranks(model_worker, (2, str(tmp_path / "store"), str(tmp_path / "g.pt"), kind), 2,
                lambda: (tmp_path / "g.pt").is_file())
    got = torch.load(tmp_path / "g.pt")
    worst = max(((got[n] - want[n]).abs().max() / (want[n].abs().max() + 1e-12)).item()
                for n in want)
    print("worst relative difference", worst)
    assert worst < 1e-4
