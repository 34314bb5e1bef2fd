"""The in-batch losses (the AVTS margin loss and InfoNCE, --loss): eager reference vs
torch.compile(reference) vs the fused Triton kernel.

    python bench/bench_loss.py                                   # GPU: the issue's full grid
    python bench/bench_loss.py --sizes 256 1024 --dims 128       # CPU: eager and compiled only
    python bench/bench_loss.py --once --impl triton --sizes 8192 --dims 512   # for Nsight

For every B in --sizes (M = --m-factor x B) and D in --dims: forward, and forward+backward,
timed --repeats times after --warmup calls (CUDA events on a GPU, perf_counter on the CPU):
median, p20 and p80 in ms; the peak memory the call adds on top of its inputs (CUDA only:
torch.cuda.max_memory_allocated); achieved TFLOP/s from a written-out count of the maths, the
same count for every implementation so the rates compare like the times:

    forward           2 B M D   (the Gram matrix v.a of all pairs; the O(B M) elementwise
                                 work of kinds, sqrt and hinge is left out)
    forward+backward  6 B M D   (+ dV = W A and dA = W^T V, 2 B M D each)

The compiled reference is the branch-free form (kernels.contrastive.inbatch_reference_branchless:
one graph, no host sync). Rows go to bench/results/loss.jsonl with the machine and versions,
each as soon as it is measured; a Triton row also carries its speed-ups and its loss's
relative error against eager at the benchmark's own sizes. The default dtype is fp32, what the
trainer hands the loss.
Targets (docs/design.md section 5, H100/H200): Triton forward+backward at most 1/3 of eager's time
and 2/3 of compiled's; extra memory O((B + M) D).
On a CPU the Triton kernel runs only under TRITON_INTERPRET=1 (far too slow to time): it is
left out there unless --impl triton is asked for.
"""
from __future__ import annotations

import argparse
import statistics
import sys

from common import HERE, Rows, context, quantile, time_calls

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def make_inputs(B, M, D, dtype, device, seed=0):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1)
    a = torch.nn.functional.normalize(torch.randn(M, D, generator=g), dim=1)
    # the trainer's layout: B clips from B/2 videos, each clip's aligned window + 1 hard one
    cv = torch.arange(B) // 2
    av = torch.cat([cv, cv])[:M] if M <= 2 * B else torch.randint(0, B, (M,), generator=g)
    ct = torch.rand(B, generator=g) * 8
    at = torch.cat([ct, ct + 2.0])[:M] if M <= 2 * B else torch.rand(M, generator=g) * 8
    return [t.to(device) for t in (v.to(getattr(torch, dtype)), a.to(getattr(torch, dtype)),
                                   cv, ct, av, at)]


KWARGS = {"contrastive": dict(margin=1.0, hard_share=0.25, hard_min_shift=0.5, sync_tol=0.02),
          "infonce": dict(temperature=0.1, hard_min_shift=0.5, sync_tol=0.02)}


def loss_fn(impl, loss="contrastive"):
    """The loss as `impl` computes it, with the benchmark's settings bound."""
    import functools

    import torch

    from fastavts.kernels import contrastive as C
    from fastavts.kernels import infonce as I

    kw = KWARGS[loss]
    if loss == "contrastive":
        eager, branchless, fused = C.inbatch_reference, C.inbatch_reference_branchless, \
            C.inbatch_contrastive_loss
    else:   # the reference is branch-free already
        eager = branchless = I.inbatch_infonce_reference
        fused = I.inbatch_infonce_loss
    if impl == "eager":
        return functools.partial(eager, **kw)
    if impl == "compiled":
        return torch.compile(functools.partial(branchless, **kw), dynamic=False)
    return functools.partial(fused, impl="triton", **kw)


def time_one(fn, inputs, backward, args, device):
    import torch

    cuda = device == "cuda"
    v0, a0, *rest = inputs

    def call():
        v = v0.detach().requires_grad_(backward)
        a = a0.detach().requires_grad_(backward)
        loss = fn(v, a, *rest)
        if backward:
            loss.backward()
        return loss

    for _ in range(args.warmup):
        call()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = time_calls(call, 1 if args.once else args.repeats, cuda)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
    return times, peak


def main(argv=None) -> int:
    import torch

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+",
                   default=[256, 1024, 4096, 8192] if cuda else [256, 1024])
    p.add_argument("--m-factor", type=int, default=2, help="M = this x B (default 2)")
    p.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    p.add_argument("--loss", choices=["contrastive", "infonce"], nargs="+",
                   default=["contrastive", "infonce"],
                   help="the margin loss and/or InfoNCE (both with pair kinds)")
    p.add_argument("--dtype", choices=list(DTYPES), nargs="+", default=["fp32"],
                   help="embedding dtype(s); fp32 is what the trainer hands the loss (the towers "
                   "normalise their embeddings in fp32 under bf16 autocast)")
    p.add_argument("--impl", nargs="+", choices=["eager", "compiled", "triton"],
                   default=["eager", "compiled", "triton"] if cuda else ["eager", "compiled"])
    p.add_argument("--passes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--once", action="store_true",
                   help="one configuration, one timed call (for Nsight Compute / nsys)")
    p.add_argument("--out", default=str(HERE / "results" / "loss.jsonl"))
    args = p.parse_args(argv)
    if args.once:
        args.sizes, args.dims, args.impl = args.sizes[:1], args.dims[:1], args.impl[:1]
        args.passes, args.warmup = args.passes[-1:], 1
    device = "cuda" if cuda else "cpu"
    ctx = context()
    print(f"machine: {ctx['machine']}\nversions: {ctx['versions']}\ngit: {ctx['git']}")
    if not cuda:
        print("NOTE: no CUDA GPU: CPU figures (eager and compiled reference); the Triton kernel "
              "and the targets need an H100/H200.")
    rows = Rows(args.out, enabled=not args.once)
    hdr = f"{'loss':>11} {'dtype':>5} {'B':>6} {'M':>6} {'D':>4} {'pass':>8} {'impl':>9} {'median ms':>10} " \
          f"{'p20':>9} {'p80':>9} {'TFLOP/s':>8} {'extra MB':>9}"
    print(hdr)
    for loss, dtype in [(x, y) for x in args.loss for y in args.dtype]:
        fns = {impl: loss_fn(impl, loss) for impl in args.impl}
        for B in args.sizes:
            M = args.m_factor * B
            for D in args.dims:
                inputs = make_inputs(B, M, D, DTYPES[dtype], device)
                for ps in args.passes:
                    flops = (2 if ps == "fwd" else 6) * B * M * D
                    done = {}
                    for impl in args.impl:
                        if impl == "compiled":
                            # a fresh compilation per configuration: one compiled function over
                            # the whole grid hits dynamo's recompile limit (8) and silently
                            # runs eager
                            torch._dynamo.reset()
                            fns[impl] = loss_fn(impl, loss)
                        key = dict(ctx, bench="loss", device=device, loss=loss, B=B, M=M, D=D,
                                   dtype=dtype, pass_=ps, impl=impl)
                        try:
                            times, peak = time_one(fns[impl], inputs, ps == "fwd+bwd", args,
                                                   device)
                        except torch.OutOfMemoryError:
                            torch.cuda.empty_cache()
                            print(f"{loss:>11} {dtype:>5} {B:>6} {M:>6} {D:>4} {ps:>8} {impl:>9}   out of "
                                  f"memory")
                            rows.add(dict(key, oom=True))
                            continue
                        med = statistics.median(times)
                        row = dict(key, median_ms=round(med, 4),
                                   p20_ms=round(quantile(times, 0.2), 4),
                                   p80_ms=round(quantile(times, 0.8), 4), repeats=len(times),
                                   tflops=float(f"{flops / (med * 1e-3) / 1e12:.4g}"),
                                   extra_mem_mb=None if peak is None else round(peak, 1),
                                   flop_count="fwd 2BMD, fwd+bwd 6BMD")
                        done[impl] = med
                        if impl == "triton":
                            # the speed-ups, and the kernel's loss against the eager one at the
                            # benchmark's own sizes (the configurations autotuning picked)
                            for base in ("eager", "compiled"):
                                row[f"vs_{base}"] = (float(f"{done[base] / med:.3g}")
                                                     if base in done else None)
                            row["loss_rel_err_vs_eager"] = loss_error(fns, inputs)
                        rows.add(row)
                        print(f"{loss:>11} {dtype:>5} {B:>6} {M:>6} {D:>4} {ps:>8} {impl:>9} {med:>10.3f} "
                              f"{row['p20_ms']:>9.3f} {row['p80_ms']:>9.3f} "
                              f"{row['tflops']:>8.4g} "
                              f"{'-' if peak is None else f'{peak:.1f}':>9}"
                              + (f"  {row['vs_eager']}x eager, {row['vs_compiled']}x compiled"
                                 if impl == "triton" else ""))
                del inputs
    rows.done()
    return 0


def loss_error(fns, inputs) -> float | None:
    """|triton - eager| / |eager| of the forward loss on these inputs."""
    import torch

    if "eager" not in fns:
        return None
    v, a, *rest = inputs
    with torch.no_grad():
        ref = float(fns["eager"](v, a, *rest))
        got = float(fns["triton"](v, a, *rest))
    return float(f"{abs(got - ref) / max(abs(ref), 1e-30):.3g}")


if __name__ == "__main__":
    sys.exit(main())
