"""The AVTS contrastive loss, fused: reference, Triton kernels, launchers and autograd.

    inbatch_contrastive_loss(v, a, clip_video, clip_t0, audio_video, audio_t0, *, margin=1.0,
                             hard_share=0.25, hard_min_shift=0.5, sync_tol=0.02, impl="auto",
                             group=None)
    paired_contrastive_loss(v, a, y, *, margin=1.0, impl="auto")

v (B, D) clip embeddings and a (M, D) audio embeddings (fp32, fp16 or bf16; accumulation in
fp32); d(i, j) = ||v_i - a_j||. The kind of pair (i, j) comes from the ids and start times:
positive (same video, |clip_t0 - audio_t0| <= sync_tol), hard (same video, gap >= hard_min_shift,
which wins if the two ranges overlap), ignored (same video, in between), easy (other video).
The gap is taken in float64 from the float32 times in both implementations, so ties at the
boundaries fall the same way.

    loss = 0.5 * mean_pos(d^2)
         + 0.5 * ((1 - h) * mean_easy(relu(m - d)^2) + h * mean_hard(relu(m - d)^2))

or, with hard_share=None (every negative pair weighing the same: the paper's curriculum, where
the share of hard negatives is set by sampling them, not by weights),

    loss = 0.5 * mean_pos(d^2) + 0.5 * mean_{easy and hard}(relu(m - d)^2)

A kind without pairs drops out and the weights left in its half are renormalised (only hard
negatives and h = 0, or only easy ones and h = 1: they get the whole half); without negatives
the loss is mean_pos(d^2), without anything it is 0.

How the kernel avoids the B x M matrix. The loss is linear in three sums and three counts:
loss = c_pos * S_pos + c_easy * S_easy + c_hard * S_hard, the c's depending only on the counts.
Forward: each program takes a (BLOCK_B x BLOCK_M) tile at a time, d^2 = |v|^2 + |a|^2 - 2 v.a
from a tiled matrix product over D, kinds from the four small vectors, and writes its six
partial sums; torch adds them in float64 (deterministic) and forms the loss and the c's.
Backward: with w_ij = dloss/d(d_ij^2) (c_pos for positives, -c_kind * relu(m - d)/d for
negatives, 0 at d = 0 as torch.cdist does), dV_i = 2 g (sum_j w_ij) v_i - 2 g (W A)_i and
dA_j = 2 g (sum_i w_ij) a_j - 2 g (W^T V)_j: one kernel, called with the roles of V and A
swapped, recomputes the distance tiles and accumulates the row sums and W @ A tile by tile.
The M (or B) axis can be split over several programs whose fp32 partial gradients torch sums.
Extra memory: O((B + M) * D) for the split partials, O(B + M) otherwise.

Precision (see _precisions): fp32 inputs use 3xTF32 for the distance and the gradient products
(about fp32 accuracy); fp16/bf16 distance products run on the inputs' own tensor-core path
(exact products, fp32 accumulation) and their gradient products in TF32 on fp32 copies (the
weights w span too wide a range for fp16). tests/test_kernel_contrastive.py holds every dtype
to its bound under a model of these products (the interpreter itself multiplies in fp32).

Registered as torch.library custom ops (fastavts::contrastive_sums / _sums_bwd: the sums and
counts of a process's rows; the loss is assembled from them in torch, and the paired pair), so
torch.compile keeps them in its graph. Across ranks (`group`): every rank's audio columns are
gathered (gather_columns), each rank sums its own rows against all of them, the counts are
all-reduced, and world_scale makes DDP's averaged gradients those of one process on the whole
batch.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..pairs import Cell
from .tuning import autotune

try:  # triton is a dependency, but the reference must work where it cannot be imported
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# FASTAVTS_AUTOTUNE=0: one tile configuration instead of autotuning over several (the test suite
# on a GPU sets it: autotuning every test's distinct shape would take minutes; the benchmarks
# autotune and check the loss they get against eager PyTorch at their own sizes)
AUTOTUNE = os.environ.get("FASTAVTS_AUTOTUNE", "1") != "0"
# the loss-matrix cell codes (fastavts/pairs.py: Cell), as plain ints for the kernels
POS, EASY, HARD, IGNORED = (int(c) for c in (Cell.POS, Cell.EASY, Cell.HARD, Cell.IGNORED))
IMPLS = ("auto", "triton", "reference")
# Tiles of the in-batch margin kernels: (BLOCK_B, BLOCK_M, BLOCK_K, warps, stages), the backward
# with BLOCK_DO (output columns of dX) before the warps; the first is the one used without
# autotuning. Each compiles for sm_90 at fp32 (3xTF32), fp16 and bf16 with no register spilled
# and within an H100's shared memory (compile_all reports it; the CPU tests check it with
# ptxas): larger tiles, 4 warps or 3 stages spilled 100 B - 4 KB a thread. InfoNCE has its own
# (kernels/infonce.py).
FWD_TILES = ((64, 64, 32, 8, 2), (64, 64, 16, 8, 2))
BWD_TILES = ((64, 64, 16, 128, 8, 2), (64, 32, 32, 128, 8, 2), (64, 64, 32, 64, 8, 2))
SHARED_LIMIT = 227 * 1024   # bytes of shared memory a block may use on an H100 / H200


# --------------------------------------------------------------------------------------------
# Reference (plain PyTorch, materialises the B x M matrix)

def pair_cells(clip_video, clip_t0, audio_video, audio_t0, hard_min_shift: float = 0.5,
               sync_tol: float = 0.02):
    """(B, M) int8 loss-matrix cells (fastavts.pairs.Cell) of all clip-audio pairs. A negative
    id marks padding (columns gathered from ranks with fewer): every pair with it is ignored."""
    same = clip_video[:, None] == audio_video[None, :]
    gap = (clip_t0[:, None].double() - audio_t0[None, :].double()).abs()
    # hard wins where the two ranges overlap (sync_tol >= hard_min_shift); torch.where, not
    # boolean-mask assignment, which would wait for the GPU (a nonzero() inside)
    hard = gap >= hard_min_shift
    ignored = ~hard & (gap > sync_tol)
    kind = hard.to(torch.int8) * HARD + ignored.to(torch.int8) * IGNORED   # POS = 0 elsewhere
    kind = torch.where(same, kind, EASY)
    pad = (clip_video[:, None] < 0) | (audio_video[None, :] < 0)
    return torch.where(pad, IGNORED, kind).to(torch.int8)


pair_kinds = pair_cells   # the name before fastavts.pairs (kept for importers)


def _weighted_mean(values, mask):
    n = mask.sum()
    return (values * mask).sum() / n.clamp_min(1), n > 0


def contrastive_terms(d, kinds, margin: float, hard_share: float | None):
    """The contrastive loss from distances d and kinds of the same shape (hard_share None:
    every negative pair weighs the same)."""
    d2 = d.pow(2)
    neg = F.relu(margin - d).pow(2)
    pos, has_pos = _weighted_mean(d2, kinds == POS)
    if hard_share is None:
        negative, has_neg = _weighted_mean(neg, (kinds == EASY) | (kinds == HARD))
        if not has_neg:
            return pos if has_pos else d.sum() * 0
        return negative if not has_pos else 0.5 * pos + 0.5 * negative
    easy, has_easy = _weighted_mean(neg, kinds == EASY)
    hard, has_hard = _weighted_mean(neg, kinds == HARD)
    w_easy = (1 - hard_share) * has_easy.to(d.dtype)   # in d's precision (float64 stays so)
    w_hard = hard_share * has_hard.to(d.dtype)
    if not (has_easy or has_hard):
        return pos if has_pos else d.sum() * 0
    if w_easy + w_hard == 0:  # the only negatives present have weight 0: give them the half
        w_easy, w_hard = has_easy.to(d.dtype), has_hard.to(d.dtype)
    negative = (w_easy * easy + w_hard * hard) / (w_easy + w_hard)
    if not has_pos:
        return negative
    return 0.5 * pos + 0.5 * negative


def inbatch_reference(v, a, clip_video, clip_t0, audio_video, audio_t0, *, margin=1.0,
                      hard_share=0.25, hard_min_shift=0.5, sync_tol=0.02):
    """All B x M pairs, computed in fp32 (float64 for float64 inputs)."""
    dt = torch.float64 if v.dtype == torch.float64 else torch.float32
    d = torch.cdist(v.to(dt), a.to(dt))                       # (B, M)
    kinds = pair_cells(clip_video, clip_t0, audio_video, audio_t0, hard_min_shift, sync_tol)
    return contrastive_terms(d, kinds, margin, hard_share)


def reference_sums(v, a, clip_video, clip_t0, audio_video, audio_t0, *, margin=1.0,
                   hard_min_shift=0.5, sync_tol=0.02):
    """(sums (3,), counts (3,)) of positives' d^2, easy and hard hinges over all B x M pairs,
    branch-free (no host sync); fp32, float64 for float64 inputs."""
    dt = torch.float64 if v.dtype == torch.float64 else torch.float32
    d = torch.cdist(v.to(dt), a.to(dt))
    kinds = pair_cells(clip_video, clip_t0, audio_video, audio_t0, hard_min_shift, sync_tol)
    hinge = F.relu(margin - d).pow(2)
    masks = [kinds == POS, kinds == EASY, kinds == HARD]
    sums = torch.stack([(v_ * m).sum() for v_, m in zip((d.pow(2), hinge, hinge), masks)])
    counts = torch.stack([m.sum() for m in masks]).double()
    return sums, counts


def loss_from_sums(sums, counts, hard_share: float, group=None):
    """The loss from the three sums and counts (the rule of the module docstring). With a
    group the counts are the whole batch's (all-reduced) and the loss is scaled for DDP."""
    if group is not None:   # counts carry no gradient
        counts = counts.detach().clone()
        torch.distributed.all_reduce(counts, group=group)
    local = (coefficients(counts, hard_share).to(sums.dtype) * sums).sum()
    return world_scale(local, group)


def inbatch_reference_branchless(v, a, clip_video, clip_t0, audio_video, audio_t0, *,
                                 margin=1.0, hard_share=0.25, hard_min_shift=0.5, sync_tol=0.02,
                                 group=None):
    """The same loss without Python branches on tensor values (for torch.compile: one graph,
    no host sync). Materialises the B x M matrix like the reference."""
    sums, counts = reference_sums(v, a, clip_video, clip_t0, audio_video, audio_t0,
                                  margin=margin, hard_min_shift=hard_min_shift, sync_tol=sync_tol)
    return loss_from_sums(sums, counts, hard_share, group)


# --------------------------------------------------------------------------------------------
# Negatives across ranks

def gather_columns(a, audio_video, audio_t0, group, capacity: int | None = None):
    """Every rank's audio columns, in rank order: `a` with gradients (_GatherRows: the backward
    sums every rank's gradient into the owner's rows), ids and times without them. Ranks with fewer columns are padded to `capacity` with id -1 (ignored by every
    pair); without a capacity the ranks' sizes are exchanged first (a host read)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    if world == 1:
        return a, audio_video, audio_t0
    M = a.shape[0]
    if capacity is None:
        size = torch.tensor([M], dtype=torch.int64, device=a.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size, group=group)
        capacity = max(int(x.item()) for x in sizes)
    if M > capacity:
        raise ValueError(f"{M} audio columns on this rank, more than gather capacity {capacity}: "
                         f"every rank must fit the capacity (the trainer passes batch x (1 + k))")
    if capacity > M:
        pad = capacity - M
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
        audio_video = torch.cat([audio_video, audio_video.new_full((pad,), -1)])
        audio_t0 = torch.cat([audio_t0, audio_t0.new_zeros(pad)])
    a_all = _GatherRows.apply(a, group)
    # ids and times in one collective: float64 holds ids below 2^53 and float32 times exactly
    meta = torch.stack([audio_video.to(torch.float64), audio_t0.to(torch.float64)], 1)
    parts = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(parts, meta.contiguous(), group=group)
    meta = torch.cat(parts)
    return a_all, meta[:, 0].to(audio_video.dtype), meta[:, 1].to(audio_t0.dtype)


class _GatherRows(torch.autograd.Function):
    """All ranks' rows in rank order (equal row counts); backward: each rank gets the sum over
    ranks of the gradient of its own rows (reduce-scatter on NCCL; gloo, which lacks it, sums
    the whole gradient and keeps its slice)."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        ctx.group, ctx.n = group, x.shape[0]
        ctx.rank, world = dist.get_rank(group), dist.get_world_size(group)
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        parts = list(out.chunk(world))
        dist.all_gather(parts, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist

        g = g.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            mine = g.new_empty((ctx.n, *g.shape[1:]))
            dist.reduce_scatter_tensor(mine, g, group=ctx.group)
            return mine, None
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def world_scale(local, group):
    """A rank's share `local` of a loss summed over ranks -> a tensor whose value is the whole
    loss (all-reduced, for logging and the finiteness check) and whose gradient is world_size x
    the share's: DDP averages the ranks' gradients, so the average is the whole loss's."""
    if group is None:
        return local
    import torch.distributed as dist

    world = dist.get_world_size(group)
    total = local.detach().clone()
    dist.all_reduce(total, group=group)
    return world * local + (total - world * local).detach()


def paired_reference(v, a, y, *, margin=1.0):
    dt = torch.float64 if v.dtype == torch.float64 else torch.float32
    d = (v.to(dt) - a.to(dt)).norm(dim=1)
    kinds = torch.where(y.bool(), POS, EASY).to(torch.int8)
    return contrastive_terms(d, kinds, margin, hard_share=0.0)


def paired_reference_branchless(v, a, y, *, margin=1.0):
    """paired_reference without Python branches on tensor values (no host sync)."""
    dt = torch.float64 if v.dtype == torch.float64 else torch.float32
    d = (v.to(dt) - a.to(dt)).norm(dim=1)
    pos = y.bool()
    sums = torch.stack([(d.pow(2) * pos).sum(), (F.relu(margin - d).pow(2) * ~pos).sum(),
                        d.new_zeros(())])
    counts = torch.stack([pos.sum(), (~pos).sum(), pos.new_zeros((), dtype=torch.int64)]).double()
    return (coefficients(counts, 0.0).to(dt) * sums).sum()


# --------------------------------------------------------------------------------------------
# The loss from the sums: loss = sum_k c_k S_k (device-side, no host sync)

def coefficients(counts, hard_share: float | None):
    """(3,) float64 counts (pos, easy, hard) -> (3,) float64 c's of the rule above (hard_share
    None: one weight for every negative pair)."""
    n_pos, n_easy, n_hard = counts.unbind()
    has_pos, has_easy, has_hard = n_pos > 0, n_easy > 0, n_hard > 0
    if hard_share is None:
        n_neg = n_easy + n_hard
        has_neg = n_neg > 0
        c_pos = torch.where(has_pos, 1 / n_pos.clamp_min(1), 0.0)
        c_neg = torch.where(has_neg, 1 / n_neg.clamp_min(1), 0.0)
        half = torch.where(has_pos & has_neg, 0.5, 1.0)
        return torch.stack([c_pos, c_neg, c_neg]) * half
    w_easy = (1 - hard_share) * has_easy.double()
    w_hard = hard_share * has_hard.double()
    zero = (w_easy + w_hard) == 0
    w_easy = torch.where(zero, has_easy.double(), w_easy)
    w_hard = torch.where(zero, has_hard.double(), w_hard)
    wsum = (w_easy + w_hard).clamp_min(1e-300)
    has_neg = has_easy | has_hard
    c_pos = torch.where(has_pos, 1 / n_pos.clamp_min(1), 0.0)
    c_easy = torch.where(has_neg, w_easy / (wsum * n_easy.clamp_min(1)), 0.0)
    c_hard = torch.where(has_neg, w_hard / (wsum * n_hard.clamp_min(1)), 0.0)
    half = torch.where(has_pos & has_neg, 0.5, 1.0)
    return torch.stack([c_pos, c_easy, c_hard]) * half


# --------------------------------------------------------------------------------------------
# Triton kernels

if triton is not None:

    def _configs(fwd: bool, tiles=None):
        """Autotune configs of a forward or backward kernel from its tiles (default: this
        file's FWD_TILES / BWD_TILES)."""
        if INTERPRET:  # the interpreter runs one config, with large tiles (fewer Python steps)
            return [triton.Config({"BLOCK_B": 64, "BLOCK_M": 64, "BLOCK_K": 128}
                                  | ({} if fwd else {"BLOCK_DO": 512}), num_warps=4)]
        out = []
        tiles = tiles or (FWD_TILES if fwd else BWD_TILES)
        for tile in tiles[:None if AUTOTUNE else 1]:
            *blocks, w, s = tile
            names = ("BLOCK_B", "BLOCK_M", "BLOCK_K") + (() if fwd else ("BLOCK_DO",))
            out.append(triton.Config(dict(zip(names, blocks)), num_warps=w, num_stages=s))
        return out

    def _prune(configs, named_args, **kwargs):
        """Output-D tiles no wider than D needs (the smallest that covers it, at least)."""
        if INTERPRET:
            return configs
        need = max(16, triton.next_power_of_2(named_args["D"]))
        kept = [c for c in configs if c.kwargs.get("BLOCK_DO", 0) <= need]
        return kept or configs

    @triton.jit
    def _dist_tile(X, Y, XN, YN, rb, rm, mb, mm, D, sxb, sxd, syb, syd,
                   BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                   PRECISION: tl.constexpr):
        """Squared distances of a (BLOCK_B, BLOCK_M) tile, fp32, clamped at 0."""
        dot = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mk = rk < D
            x = tl.load(X + rb[:, None] * sxb + rk[None, :] * sxd, mask=mb[:, None] & mk[None, :],
                        other=0.0)
            y = tl.load(Y + rm[:, None] * syb + rk[None, :] * syd, mask=mm[:, None] & mk[None, :],
                        other=0.0)
            dot = tl.dot(x, tl.trans(y), dot, input_precision=PRECISION)
        xn = tl.load(XN + rb, mask=mb, other=0.0)
        yn = tl.load(YN + rm, mask=mm, other=0.0)
        return tl.maximum(xn[:, None] + yn[None, :] - 2.0 * dot, 0.0)

    @triton.jit
    def _kinds_tile(XV, XT, YV, YT, LIM, rb, rm, mb, mm):
        """(pos, easy, hard) masks of a tile; the gap in float64 like the reference."""
        xv = tl.load(XV + rb, mask=mb, other=0)
        yv = tl.load(YV + rm, mask=mm, other=0)
        xt = tl.load(XT + rb, mask=mb, other=0.0).to(tl.float64)
        yt = tl.load(YT + rm, mask=mm, other=0.0).to(tl.float64)
        sync_tol = tl.load(LIM)
        hard_min = tl.load(LIM + 1)
        # a negative id is padding (columns gathered from ranks with fewer): never a pair
        valid = mb[:, None] & mm[None, :] & (xv[:, None] >= 0) & (yv[None, :] >= 0)
        same = xv[:, None] == yv[None, :]
        gap = tl.abs(xt[:, None] - yt[None, :])
        hard = valid & same & (gap >= hard_min)
        pos = valid & same & (gap <= sync_tol) & (gap < hard_min)
        easy = valid & (xv[:, None] != yv[None, :])
        return pos, easy, hard

    @autotune(configs=_configs(True), key=["Bn", "Mn", "D"])
    @triton.jit
    def _inbatch_fwd_kernel(X, Y, XN, YN, XV, XT, YV, YT, LIM, OUT, Bn, Mn, D, m_per_split,
                            sxb, sxd, syb, syd, margin,
                            BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                            PRECISION: tl.constexpr):
        pid_b = tl.program_id(0)
        pid_s = tl.program_id(1)
        rb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        mb = rb < Bn
        s_pos = tl.zeros((BLOCK_B,), dtype=tl.float32)
        s_easy = tl.zeros((BLOCK_B,), dtype=tl.float32)
        s_hard = tl.zeros((BLOCK_B,), dtype=tl.float32)
        n_pos = tl.zeros((BLOCK_B,), dtype=tl.float32)
        n_easy = tl.zeros((BLOCK_B,), dtype=tl.float32)
        n_hard = tl.zeros((BLOCK_B,), dtype=tl.float32)
        m_lo = pid_s * m_per_split
        m_hi = tl.minimum(m_lo + m_per_split, Mn)
        for m0 in range(m_lo, m_hi, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            mm = rm < m_hi
            d2 = _dist_tile(X, Y, XN, YN, rb, rm, mb, mm, D, sxb, sxd, syb, syd,
                            BLOCK_B, BLOCK_M, BLOCK_K, PRECISION)
            pos, easy, hard = _kinds_tile(XV, XT, YV, YT, LIM, rb, rm, mb, mm)
            h = tl.maximum(margin - tl.sqrt(d2), 0.0)
            h2 = h * h
            s_pos += tl.sum(tl.where(pos, d2, 0.0), 1)
            s_easy += tl.sum(tl.where(easy, h2, 0.0), 1)
            s_hard += tl.sum(tl.where(hard, h2, 0.0), 1)
            n_pos += tl.sum(pos.to(tl.float32), 1)
            n_easy += tl.sum(easy.to(tl.float32), 1)
            n_hard += tl.sum(hard.to(tl.float32), 1)
        # one row of 6 partial sums per (row, split): (split, B, 6), summed by torch in fp64
        o = OUT + (pid_s * Bn + rb) * 6
        tl.store(o + 0, s_pos, mask=mb)
        tl.store(o + 1, s_easy, mask=mb)
        tl.store(o + 2, s_hard, mask=mb)
        tl.store(o + 3, n_pos, mask=mb)
        tl.store(o + 4, n_easy, mask=mb)
        tl.store(o + 5, n_hard, mask=mb)

    @autotune(configs=_configs(False), key=["Bn", "Mn", "D"],
                     prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _inbatch_bwd_kernel(X, Y, XN, YN, XV, XT, YV, YT, LIM, COEF, DX, Bn, Mn, D, m_per_split,
                            sxb, sxd, syb, syd, margin,
                            BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr,
                            GRAD_PRECISION: tl.constexpr):
        """DX[split] = (sum_j w_ij) x_i - (W Y)_i over this split's columns (COEF carries 2g)."""
        pid_b = tl.program_id(0)
        pid_d = tl.program_id(1)
        pid_s = tl.program_id(2)
        rb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        mb = rb < Bn
        rdo = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
        mdo = rdo < D
        c_pos = tl.load(COEF)
        c_easy = tl.load(COEF + 1)
        c_hard = tl.load(COEF + 2)
        acc = tl.zeros((BLOCK_B, BLOCK_DO), dtype=tl.float32)
        rs = tl.zeros((BLOCK_B,), dtype=tl.float32)
        m_lo = pid_s * m_per_split
        m_hi = tl.minimum(m_lo + m_per_split, Mn)
        for m0 in range(m_lo, m_hi, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            mm = rm < m_hi
            d2 = _dist_tile(X, Y, XN, YN, rb, rm, mb, mm, D, sxb, sxd, syb, syd,
                            BLOCK_B, BLOCK_M, BLOCK_K, PRECISION)
            pos, easy, hard = _kinds_tile(XV, XT, YV, YT, LIM, rb, rm, mb, mm)
            d = tl.sqrt(d2)
            pull = -tl.maximum(margin - d, 0.0) / tl.where(d > 0, d, 1.0)
            pull = tl.where(d > 0, pull, 0.0)
            w = tl.where(pos, c_pos, 0.0) + tl.where(easy, c_easy * pull, 0.0) \
                + tl.where(hard, c_hard * pull, 0.0)
            rs += tl.sum(w, 1)
            y = tl.load(Y + rm[:, None] * syb + rdo[None, :] * syd,
                        mask=mm[:, None] & mdo[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(w, y, acc, input_precision=GRAD_PRECISION)
        x = tl.load(X + rb[:, None] * sxb + rdo[None, :] * sxd, mask=mb[:, None] & mdo[None, :],
                    other=0.0).to(tl.float32)
        out = rs[:, None] * x - acc
        tl.store(DX + (pid_s * Bn + rb[:, None]) * D + rdo[None, :], out,
                 mask=mb[:, None] & mdo[None, :])

    @triton.jit
    def _paired_fwd_kernel(X, Y, LAB, OUT, Bn, D, sxb, sxd, syb, syd, margin,
                           BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        mr = r < Bn
        d2 = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            m2 = mr[:, None] & (rk[None, :] < D)
            x = tl.load(X + r[:, None] * sxb + rk[None, :] * sxd, mask=m2, other=0.0)
            y = tl.load(Y + r[:, None] * syb + rk[None, :] * syd, mask=m2, other=0.0)
            diff = x.to(tl.float32) - y.to(tl.float32)
            d2 += tl.sum(diff * diff, 1)
        lab = tl.load(LAB + r, mask=mr, other=0)
        pos = mr & (lab != 0)
        neg = mr & (lab == 0)
        h = tl.maximum(margin - tl.sqrt(d2), 0.0)
        o = OUT + pid * 6
        tl.store(o + 0, tl.sum(tl.where(pos, d2, 0.0), 0))
        tl.store(o + 1, tl.sum(tl.where(neg, h * h, 0.0), 0))
        tl.store(o + 2, 0.0)
        tl.store(o + 3, tl.sum(pos.to(tl.float32), 0))
        tl.store(o + 4, tl.sum(neg.to(tl.float32), 0))
        tl.store(o + 5, 0.0)

    @triton.jit
    def _paired_bwd_kernel(X, Y, LAB, COEF, DX, DY, Bn, D, sxb, sxd, syb, syd, margin,
                           BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        mr = r < Bn
        d2 = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            m2 = mr[:, None] & (rk[None, :] < D)
            x = tl.load(X + r[:, None] * sxb + rk[None, :] * sxd, mask=m2, other=0.0)
            y = tl.load(Y + r[:, None] * syb + rk[None, :] * syd, mask=m2, other=0.0)
            diff = x.to(tl.float32) - y.to(tl.float32)
            d2 += tl.sum(diff * diff, 1)
        d = tl.sqrt(d2)
        lab = tl.load(LAB + r, mask=mr, other=0)
        pull = tl.where(d > 0, -tl.maximum(margin - d, 0.0) / tl.where(d > 0, d, 1.0), 0.0)
        w = tl.where(lab != 0, tl.load(COEF), tl.load(COEF + 1) * pull)
        for k0 in range(0, D, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            m2 = mr[:, None] & (rk[None, :] < D)
            x = tl.load(X + r[:, None] * sxb + rk[None, :] * sxd, mask=m2, other=0.0)
            y = tl.load(Y + r[:, None] * syb + rk[None, :] * syd, mask=m2, other=0.0)
            g = w[:, None] * (x.to(tl.float32) - y.to(tl.float32))
            o = r[:, None] * D + rk[None, :]
            tl.store(DX + o, g.to(DX.dtype.element_ty), mask=m2)
            tl.store(DY + o, (-g).to(DY.dtype.element_ty), mask=m2)


# --------------------------------------------------------------------------------------------
# Launchers

def _precisions(dtype):
    """(distance product, gradient product) input precision of tl.dot.

    fp32 inputs: 3xTF32 for both products (about fp32 accuracy; plain TF32 rounds each
    operand to 10 mantissa bits, ~1e-4 relative error in the gradients against fp32's ~1e-6).
    fp16/bf16 inputs: the distance product runs on the inputs' own tensor-core path (exact
    products, fp32 accumulation; the argument is ignored for 16-bit operands); the gradient
    product W @ Y runs in TF32 on fp32 copies (W spans too wide a range for fp16): W is rounded
    to 10 mantissa bits (relative 2^-11), below the 16-bit rounding of the gradients returned."""
    return ("tf32x3", "tf32x3") if dtype == torch.float32 else ("tf32", "tf32")


def _choose_split(rows: int, cols: int, device) -> int:
    """How many programs share one row block's columns: enough programs to fill the GPU."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(rows, 64)
    return max(1, min(triton.cdiv(2 * sms, row_blocks), triton.cdiv(cols, 256)))


_LIMS: dict = {}


def _lims(sync_tol, hard_min_shift, device):
    """The two float64 limits as a device tensor, made once per (values, device): making it
    anew each call is a host-to-device copy from pageable memory, which waits for the GPU."""
    key = (float(sync_tol), float(hard_min_shift), str(device))
    t = _LIMS.get(key)
    if t is None:
        t = _LIMS[key] = torch.tensor(key[:2], dtype=torch.float64, device=device)
    return t


def _check_triton(t):
    if triton is None:
        raise RuntimeError("impl='triton' needs the triton package (pip install triton)")
    if t.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"impl='triton' needs CUDA tensors (got {t.device.type}); on a machine without a GPU "
            "set TRITON_INTERPRET=1 before importing fastavts to run the kernels in Triton's "
            "interpreter, or use impl='reference' / 'auto'")


def _inbatch_sums(v, a, cv, ct, av, at, margin, hard_min_shift, sync_tol, split=None):
    B, D = v.shape
    M = a.shape[0]
    vn, an = v.float().pow(2).sum(1), a.float().pow(2).sum(1)
    split = split or _choose_split(B, M, v.device)
    per = triton.cdiv(M, split)
    out = torch.zeros((split, B, 6), dtype=torch.float32, device=v.device)
    prec, _ = _precisions(v.dtype)
    grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), split)
    _inbatch_fwd_kernel[grid](v, a, vn, an, cv, ct, av, at, _lims(sync_tol, hard_min_shift,
                              v.device), out, B, M, D, per, v.stride(0), v.stride(1),
                              a.stride(0), a.stride(1), float(margin), PRECISION=prec)
    tot = out.double().sum((0, 1))
    return tot[:3], tot[3:], vn, an


def _inbatch_grad(x, y, xn, yn, xv, xt, yv, yt, coef, margin, hard_min_shift, sync_tol,
                  split=None):
    B, D = x.shape
    M = y.shape[0]
    split = split or _choose_split(B, M, x.device)
    per = triton.cdiv(M, split)
    dx = torch.empty((split, B, D), dtype=torch.float32, device=x.device)
    prec, gprec = _precisions(x.dtype)
    grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), triton.cdiv(D, meta["BLOCK_DO"]),
                         split)
    _inbatch_bwd_kernel[grid](x, y, xn, yn, xv, xt, yv, yt, _lims(sync_tol, hard_min_shift,
                              x.device), coef, dx, B, M, D, per, x.stride(0), x.stride(1),
                              y.stride(0), y.stride(1), float(margin), PRECISION=prec,
                              GRAD_PRECISION=gprec)
    return (dx[0] if split == 1 else dx.sum(0)).to(x.dtype)


def _prep_ids(t):
    """Video ids as int32 (dataset indices; -1 pads): int64 ids cost the kernels registers."""
    return t.to(torch.int32).contiguous()


def _prep_times(t):
    return t.to(torch.float32).contiguous()


# The custom ops: torch.compile sees them as single nodes (no graph break), autograd through
# register_autograd. `split` = 0 lets the launcher choose (tests force other values).

@torch.library.custom_op("fastavts::contrastive_sums", mutates_args=())
def _contrastive_sums(v: torch.Tensor, a: torch.Tensor, cv: torch.Tensor, ct: torch.Tensor,
                      av: torch.Tensor, at: torch.Tensor, margin: float, hard_min_shift: float,
                      sync_tol: float, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums (3,), counts (3,)) float64 of this process's rows against the given columns."""
    sums, counts, _, _ = _inbatch_sums(v, a, cv, ct, av, at, margin, hard_min_shift, sync_tol,
                                       split or None)
    return sums.clone(), counts.clone()   # views of one buffer: outputs may not alias


@_contrastive_sums.register_fake
def _(v, a, cv, ct, av, at, margin, hard_min_shift, sync_tol, split):
    return (v.new_empty((3,), dtype=torch.float64), v.new_empty((3,), dtype=torch.float64))


@torch.library.custom_op("fastavts::contrastive_sums_bwd", mutates_args=())
def _contrastive_sums_bwd(gsums: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                          cv: torch.Tensor, ct: torch.Tensor, av: torch.Tensor, at: torch.Tensor,
                          margin: float, hard_min_shift: float, sync_tol: float, split: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    c2 = (2 * gsums.float()).contiguous()   # d(d^2)/dv = 2 (v - a): the 2 goes in here
    vn, an = v.float().pow(2).sum(1), a.float().pow(2).sum(1)
    dv = _inbatch_grad(v, a, vn, an, cv, ct, av, at, c2, margin, hard_min_shift, sync_tol,
                       split or None)
    da = _inbatch_grad(a, v, an, vn, av, at, cv, ct, c2, margin, hard_min_shift, sync_tol,
                       split or None)
    return dv, da


@_contrastive_sums_bwd.register_fake
def _(gsums, v, a, cv, ct, av, at, margin, hard_min_shift, sync_tol, split):
    return torch.empty_like(v), torch.empty_like(a)


def _sums_setup(ctx, inputs, output):
    v, a, cv, ct, av, at, margin, hard_min_shift, sync_tol, split = inputs
    ctx.save_for_backward(v, a, cv, ct, av, at)
    ctx.args = (margin, hard_min_shift, sync_tol, split)


def _sums_backward(ctx, gsums, _gcounts):
    v, a, cv, ct, av, at = ctx.saved_tensors
    dv, da = _contrastive_sums_bwd(gsums, v, a, cv, ct, av, at, *ctx.args)
    return dv, da, None, None, None, None, None, None, None, None


_contrastive_sums.register_autograd(_sums_backward, setup_context=_sums_setup)


def _paired_launch_sizes(D):
    return 64, min(32, max(16, triton.next_power_of_2(D)))   # 128 wide: 700-900 B spilled


@torch.library.custom_op("fastavts::paired_contrastive_fwd", mutates_args=())
def _paired_fwd(v: torch.Tensor, a: torch.Tensor, y: torch.Tensor, margin: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    B, D = v.shape
    br, bk = _paired_launch_sizes(D)
    n = triton.cdiv(B, br)
    out = torch.zeros((n, 6), dtype=torch.float32, device=v.device)
    _paired_fwd_kernel[(n,)](v, a, y, out, B, D, v.stride(0), v.stride(1), a.stride(0),
                             a.stride(1), float(margin), BLOCK_R=br, BLOCK_K=bk)
    tot = out.double().sum(0)
    c = coefficients(tot[3:], 0.0)
    return (c * tot[:3]).sum().float(), c.float()


@_paired_fwd.register_fake
def _(v, a, y, margin):
    return v.new_empty((), dtype=torch.float32), v.new_empty((3,), dtype=torch.float32)


@torch.library.custom_op("fastavts::paired_contrastive_bwd", mutates_args=())
def _paired_bwd(grad: torch.Tensor, coef: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                y: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, D = v.shape
    br, bk = _paired_launch_sizes(D)
    c2 = (coef * (2 * grad.float())).contiguous()
    dv, da = torch.empty_like(v), torch.empty_like(a)
    _paired_bwd_kernel[(triton.cdiv(B, br),)](v, a, y, c2, dv, da, B, D, v.stride(0),
                                               v.stride(1), a.stride(0), a.stride(1),
                                               float(margin), BLOCK_R=br, BLOCK_K=bk)
    return dv, da


@_paired_bwd.register_fake
def _(grad, coef, v, a, y, margin):
    return torch.empty_like(v), torch.empty_like(a)


def _paired_setup(ctx, inputs, output):
    v, a, y, margin = inputs
    ctx.save_for_backward(v, a, y, output[1])
    ctx.margin = margin


def _paired_backward(ctx, grad, _grad_coef):
    v, a, y, coef = ctx.saved_tensors
    dv, da = _paired_bwd(grad, coef, v, a, y, ctx.margin)
    return dv, da, None, None


_paired_fwd.register_autograd(_paired_backward, setup_context=_paired_setup)


# --------------------------------------------------------------------------------------------
# Public functions

def _use_triton(impl: str, v) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: choose one of {', '.join(IMPLS)}")
    if impl == "reference":
        return False
    if impl == "auto":
        return triton is not None and v.device.type == "cuda" and v.dtype != torch.float64
    _check_triton(v)
    if v.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"impl='triton' takes fp32, fp16 or bf16 embeddings, not {v.dtype}")
    return True


def _check_shapes(v, a, *vectors):
    if v.dim() != 2 or a.dim() != 2 or v.shape[1] != a.shape[1]:
        raise ValueError(f"v must be (B, D) and a (M, D) with the same D; got {tuple(v.shape)} "
                         f"and {tuple(a.shape)}")
    for name, t, n in vectors:
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")


def inbatch_contrastive_loss(v, a, clip_video, clip_t0, audio_video, audio_t0, *,
                             margin: float = 1.0, hard_share: float | None = 0.25,
                             hard_min_shift: float = 0.5, sync_tol: float = 0.02,
                             impl: str = "auto", group=None, gather_capacity: int | None = None,
                             _split: int = 0):
    """The AVTS contrastive loss over all B x M clip-audio pairs (scalar, fp32; float64 for
    float64 inputs on the reference). `group`: a process group whose ranks' audio columns join
    every rank's negatives (gather_columns; the loss then has the whole batch's value and
    DDP-ready gradients, world_scale); `gather_capacity`: the most columns any rank has."""
    B, M = v.shape[0], a.shape[0]
    _check_shapes(v, a, ("clip_video", clip_video, B), ("clip_t0", clip_t0, B),
                  ("audio_video", audio_video, M), ("audio_t0", audio_t0, M))
    if group is not None:
        a, audio_video, audio_t0 = gather_columns(a, audio_video, audio_t0, group,
                                                  gather_capacity)
    if hard_share is not None:
        hard_share = float(hard_share)
    if not _use_triton(impl, v):   # the reference, in its branch-free form (no host sync)
        return inbatch_reference_branchless(v, a, clip_video, clip_t0, audio_video, audio_t0,
                                            margin=margin, hard_share=hard_share,
                                            hard_min_shift=hard_min_shift, sync_tol=sync_tol,
                                            group=group)
    if a.dtype != v.dtype:
        a = a.to(v.dtype)
    if B == 0 or a.shape[0] == 0:
        return world_scale((v.sum() + a.sum()).float() * 0, group)
    sums, counts = _contrastive_sums(v, a, _prep_ids(clip_video), _prep_times(clip_t0),
                                     _prep_ids(audio_video), _prep_times(audio_t0),
                                     float(margin), float(hard_min_shift), float(sync_tol),
                                     int(_split))
    return loss_from_sums(sums, counts, hard_share, group).float()


def paired_contrastive_loss(v, a, y, *, margin: float = 1.0, impl: str = "auto"):
    """Pair i = (v_i, a_i) with label y_i: 0.5 mean_{y=1} d^2 + 0.5 mean_{y=0} relu(m - d)^2."""
    _check_shapes(v, a, ("y", y, v.shape[0]))
    if v.shape[0] != a.shape[0]:
        raise ValueError(f"paired: v and a need the same number of rows, got {v.shape[0]} and "
                         f"{a.shape[0]}")
    if not _use_triton(impl, v):
        return paired_reference_branchless(v, a, y, margin=margin)
    if a.dtype != v.dtype:
        a = a.to(v.dtype)
    if v.shape[0] == 0:
        return (v.sum() + a.sum()).float() * 0
    loss, _ = _paired_fwd(v, a, y.to(torch.int32).contiguous(), float(margin))
    return loss


# --------------------------------------------------------------------------------------------
# `python -m fastavts.kernels.contrastive --compile 90`: compile every kernel at every tile it
# may run with, for a GPU architecture without one (ptxas runs; nothing is launched), and
# report its registers, stack (spilled registers) and shared memory. Used by the CPU tests.

def compile_report(jobs, arch: int = 90) -> list[dict]:
    """jobs: (name, jit function, signature, constexprs, warps, stages). One row each."""
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if INTERPRET:
        raise RuntimeError("unset TRITON_INTERPRET to compile the kernels")
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    rows = []
    for name, fn, sig, const, warps, stages in jobs:
        k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": warps, "num_stages": stages})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                                   text=True, check=True).stdout
        fields = dict(x.split(":", 1) for x in usage.split() if x.split(":")[0] in ("REG", "STACK"))
        row = dict(kernel=name, config={k2: v for k2, v in const.items() if k2.startswith("BLOCK")},
                   warps=warps, stages=stages, registers=int(fields["REG"]),
                   stack_bytes=int(fields["STACK"]), shared_bytes=int(k.metadata.shared))
        print(f"{name} sm_{arch} {row['config']} w{warps} s{stages}: {row['registers']} "
              f"registers, stack {row['stack_bytes']} B, shared {row['shared_bytes']} B",
              flush=True)
        rows.append(row)
    return rows


def _signatures(t: str, last: str):
    """(X/Y/ids/times pointers, sizes) of an in-batch kernel at dtype `t` (`last`: margin or
    inv_t)."""
    ids = {"XV": "*i32", "XT": "*fp32", "YV": "*i32", "YT": "*fp32", "LIM": "*fp64"}
    sizes = {"Bn": "i32", "Mn": "i32", "D": "i32", "m_per_split": "i32", "sxb": "i32",
             "sxd": "i32", "syb": "i32", "syd": "i32", last: "fp32"}
    return {"X": f"*{t}", "Y": f"*{t}", "XN": "*fp32", "YN": "*fp32", **ids}, sizes


def inbatch_jobs(fwd_kernel, bwd_kernel, t: str, dtype, last: str, out_name: str,
                 bwd_extra: dict, bwd_variants=({},), precisions=None, tiles=None):
    """compile_report jobs of an in-batch loss's kernels at every tile they may run with
    (`precisions`: the loss's own dtype -> tl.dot precisions; `tiles`: its (forward, backward)
    tiles, default this file's)."""
    fwd_tiles, bwd_tiles = tiles or (FWD_TILES, BWD_TILES)
    prec, gprec = (precisions or _precisions)(dtype)
    xy, sizes = _signatures(t, last)
    blocks = {"BLOCK_B": "constexpr", "BLOCK_M": "constexpr", "BLOCK_K": "constexpr"}
    jobs = []
    for bb, bm, bk, w, st in fwd_tiles:
        jobs.append((f"{out_name}_fwd {t}", fwd_kernel,
                     {**xy, "OUT": "*fp32", **sizes, **blocks, "PRECISION": "constexpr"},
                     dict(BLOCK_B=bb, BLOCK_M=bm, BLOCK_K=bk, PRECISION=prec), w, st))
    for bb, bm, bk, bdo, w, st in bwd_tiles:
        for variant in bwd_variants:
            sig = {**xy, **bwd_extra, "DX": "*fp32", **sizes, **blocks, "BLOCK_DO": "constexpr",
                   "PRECISION": "constexpr", "GRAD_PRECISION": "constexpr",
                   **{k: "constexpr" for k in variant}}
            jobs.append((f"{out_name}_bwd{''.join(f' {k}={v}' for k, v in variant.items())} {t}",
                         bwd_kernel, sig, dict(BLOCK_B=bb, BLOCK_M=bm, BLOCK_K=bk, BLOCK_DO=bdo,
                                               PRECISION=prec, GRAD_PRECISION=gprec, **variant),
                         w, st))
    return jobs


DTYPES = (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16))


def compile_all(arch: int = 90) -> list[dict]:
    """Every kernel of this file, every tile and dtype, compiled for `arch` (report rows)."""
    jobs = []
    for t, dtype in DTYPES:
        jobs += inbatch_jobs(_inbatch_fwd_kernel.fn, _inbatch_bwd_kernel.fn, t, dtype,
                             "margin", "inbatch", {"COEF": "*fp32"})
        rows = {"Bn": "i32", "D": "i32", "sxb": "i32", "sxd": "i32", "syb": "i32", "syd": "i32",
                "margin": "fp32", "BLOCK_R": "constexpr", "BLOCK_K": "constexpr"}
        br, bk = _paired_launch_sizes(128)
        jobs.append((f"paired_fwd {t}", _paired_fwd_kernel,
                     {"X": f"*{t}", "Y": f"*{t}", "LAB": "*i32", "OUT": "*fp32", **rows},
                     dict(BLOCK_R=br, BLOCK_K=bk), 4, 3))
        jobs.append((f"paired_bwd {t}", _paired_bwd_kernel,
                     {"X": f"*{t}", "Y": f"*{t}", "LAB": "*i32", "COEF": "*fp32", "DX": f"*{t}",
                      "DY": f"*{t}", **rows}, dict(BLOCK_R=br, BLOCK_K=bk), 4, 3))
    return compile_report(jobs, arch)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=compile_all.__doc__ or "compile the kernels")
    p.add_argument("--compile", type=int, default=90, metavar="ARCH",
                   help="compute capability as an integer (90 = H100/H200)")
    compile_all(p.parse_args().compile)
