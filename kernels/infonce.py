"""InfoNCE over in-batch pairs with pair kinds, fused: reference, Triton kernels, launchers,
autograd, and negatives gathered across ranks.

    inbatch_infonce_loss(v, a, clip_video, clip_t0, audio_video, audio_t0, *, temperature=0.1,
                         hard_min_shift=0.5, sync_tol=0.02, impl="auto", group=None)

v (B, D) clip embeddings, a (M, D) audio embeddings (fp32, fp16 or bf16); logits
l_ij = -||v_i - a_j||^2 / temperature. The kind of pair (i, j) comes from the ids and times as
in the margin loss (kernels/contrastive.py): positive, easy, hard, or ignored (same video,
overlapping windows; also any pair with a negative id: padding). For every clip with at least
one positive window:

    term_i = logsumexp_{j not ignored} l_ij - logsumexp_{j positive} l_ij

and the loss is the mean of term_i over those clips (0 when there are none). Several positives
in a row count together (the numerator sums over them).

How the kernel avoids the B x M matrix. Forward: each program takes a block of clip rows and
walks the audio columns tile by tile (d^2 from a tiled product over D, as the margin kernel),
keeping for each row a running maximum and a rescaled sum for both log-sum-exps (the online
log-sum-exp of flash-attention and Inf-CL, here with two masks from the kinds); it writes
logZ_i, logP_i and the number of positives per row (per split of the columns; torch combines
splits with a log-sum-exp). Backward: with g_z, g_p the upstream gradients of logZ and logP,
dL/d(d^2_ij) = -(g_z,i pz_ij + g_p,i pp_ij) / temperature, pz = exp(l - logZ) over kept pairs,
pp = exp(l - logP) over positives; dV and dA follow as in the margin kernel (a row sum times
the row, minus a tiled product), one kernel called for V with the clip statistics on its rows
and for A with them on its columns. Extra memory O((B + M) D) for split partials, O(B + M)
otherwise.

Precision (see _precisions): fp32 inputs: the distance product in IEEE fp32 (the logits divide
d^2 by the temperature, which would magnify 3xTF32's error), the gradient product in 3xTF32;
16-bit inputs: exact distance products, TF32 gradient products.

Across ranks (`group`): the columns (a, their ids and times) of every rank are all-gathered,
`a` with gradients (torch.distributed.nn.functional.all_gather: its backward sums every rank's
gradient into the owner's); each rank computes its own rows against all columns; the number of
rows with positives is all-reduced. A rank's returned loss has the value of the whole batch's
loss and the gradient of world_size x its own rows' share, so DDP's average of the ranks'
parameter gradients is the gradient of one process on the concatenated batch.
"""
from __future__ import annotations

import torch

from .contrastive import (  # noqa: F401
    DTYPES,
    EASY,
    HARD,
    IGNORED,
    INTERPRET,
    POS,
    _check_shapes,
    _choose_split,
    _lims,
    _prep_ids,
    _prep_times,
    _use_triton,
    compile_report,
    gather_columns,
    inbatch_jobs,
    pair_cells,
    world_scale,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None



def _precisions(dtype):
    """(distance product, gradient product) input precision of tl.dot.

    fp32 inputs: the distance product in IEEE fp32 (CUDA-core FMAs), not 3xTF32 as the margin
    kernel: the logits are d^2 / temperature, so 3xTF32's ~2^-21 relative error of v.a grows by
    1/temperature (x10 at 0.1) and the softmax weights, and the gradients' cancellations, carry
    it (measured under the TF32 model: 1.3e-5 relative in dV against the reference's 1.2e-6).
    The gradient product W @ Y in 3xTF32. fp16/bf16 inputs: exact 16-bit distance products
    with fp32 accumulation, the gradient product in TF32 (as the margin kernel)."""
    return ("ieee", "tf32x3") if dtype == torch.float32 else ("tf32", "tf32")


# --------------------------------------------------------------------------------------------
# Reference (plain PyTorch, materialises the B x M matrix)

def infonce_rows_reference(v, a, kinds, temperature: float):
    """Per row: (logZ (B,), logP (B,), number of positives (B,)), in fp32 (float64 inputs stay
    float64). Rows without kept pairs get logZ = -inf, rows without positives logP = -inf."""
    dt = torch.float64 if v.dtype == torch.float64 else torch.float32
    logits = -torch.cdist(v.to(dt), a.to(dt)).pow(2) / temperature        # (B, M)
    pos = kinds == POS
    keep = kinds != IGNORED
    logz = torch.logsumexp(logits.masked_fill(~keep, float("-inf")), 1)
    logp = torch.logsumexp(logits.masked_fill(~pos, float("-inf")), 1)
    return logz, logp, pos.sum(1).to(dt)


def loss_from_rows(logz, logp, npos, group=None):
    """Mean over rows with positives of logZ - logP, branch-free (no host sync); with a group
    the number of such rows is the whole batch's and the loss is scaled for DDP (world_scale)."""
    rows = npos > 0
    # rows without a positive: zeros in, zero gradient out (their logZ, logP may be -inf)
    term = torch.where(rows, torch.where(rows, logz, 0.0) - torch.where(rows, logp, 0.0), 0.0)
    n = rows.sum().to(term.dtype)
    if group is not None:
        n = n.clone()
        torch.distributed.all_reduce(n, group=group)
    local = term.sum() / n.clamp_min(1)
    return world_scale(local, group)


def inbatch_infonce_reference(v, a, clip_video, clip_t0, audio_video, audio_t0, *,
                              temperature=0.1, hard_min_shift=0.5, sync_tol=0.02):
    """The loss on one process, all B x M pairs in memory (fp32; float64 for float64 inputs)."""
    kinds = pair_cells(clip_video, clip_t0, audio_video, audio_t0, hard_min_shift, sync_tol)
    return loss_from_rows(*infonce_rows_reference(v, a, kinds, temperature))


# --------------------------------------------------------------------------------------------
# Triton kernels

# Tiles of the InfoNCE kernels (as contrastive.FWD_TILES / BWD_TILES: the first without
# autotuning, each compiled for sm_90 at every dtype with no register spilled; its fp32 distance
# product in IEEE fp32 needs narrower row blocks than the margin kernel's)
FWD_TILES = ((32, 64, 32, 8, 2), (64, 64, 32, 8, 1))
BWD_TILES = ((32, 64, 16, 128, 8, 2), (32, 32, 32, 128, 8, 2), (32, 64, 16, 256, 8, 2))

if triton is not None:
    from .contrastive import _configs, _dist_tile, _kinds_tile, _prune
    from .tuning import autotune

    NEG = tl.constexpr(-1.0e30)   # "minus infinity" that keeps exp(x - max) finite

    @autotune(configs=_configs(True, FWD_TILES), key=["Bn", "Mn", "D"])
    @triton.jit
    def _infonce_fwd_kernel(X, Y, XN, YN, XV, XT, YV, YT, LIM, OUT, Bn, Mn, D, m_per_split,
                            sxb, sxd, syb, syd, inv_t,
                            BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                            PRECISION: tl.constexpr):
        """OUT[split, row] = (logZ, logP, n_pos) of this split's columns."""
        pid_b = tl.program_id(0)
        pid_s = tl.program_id(1)
        rb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        mb = rb < Bn
        mz = tl.full((BLOCK_B,), NEG, dtype=tl.float32)
        sz = tl.zeros((BLOCK_B,), dtype=tl.float32)
        mp = tl.full((BLOCK_B,), NEG, dtype=tl.float32)
        sp = tl.zeros((BLOCK_B,), dtype=tl.float32)
        npos = tl.zeros((BLOCK_B,), dtype=tl.float32)
        m_lo = pid_s * m_per_split
        m_hi = tl.minimum(m_lo + m_per_split, Mn)
        for m0 in range(m_lo, m_hi, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            mm = rm < m_hi
            d2 = _dist_tile(X, Y, XN, YN, rb, rm, mb, mm, D, sxb, sxd, syb, syd,
                            BLOCK_B, BLOCK_M, BLOCK_K, PRECISION)
            pos, easy, hard = _kinds_tile(XV, XT, YV, YT, LIM, rb, rm, mb, mm)
            keep = pos | easy | hard
            logit = -d2 * inv_t
            # online log-sum-exp over kept pairs (z) and over positives (p)
            # (masked entries go through exp(NEG) = 0, never exp of a large number)
            new_mz = tl.maximum(mz, tl.max(tl.where(keep, logit, NEG), 1))
            sz = sz * tl.exp(mz - new_mz) + tl.sum(
                tl.where(keep, tl.exp(tl.where(keep, logit - new_mz[:, None], NEG)), 0.0), 1)
            mz = new_mz
            new_mp = tl.maximum(mp, tl.max(tl.where(pos, logit, NEG), 1))
            sp = sp * tl.exp(mp - new_mp) + tl.sum(
                tl.where(pos, tl.exp(tl.where(pos, logit - new_mp[:, None], NEG)), 0.0), 1)
            mp = new_mp
            npos += tl.sum(pos.to(tl.float32), 1)
        logz = tl.where(sz > 0, mz + tl.log(tl.where(sz > 0, sz, 1.0)), float("-inf"))
        logp = tl.where(sp > 0, mp + tl.log(tl.where(sp > 0, sp, 1.0)), float("-inf"))
        o = OUT + (pid_s * Bn + rb) * 3
        tl.store(o + 0, logz, mask=mb)
        tl.store(o + 1, logp, mask=mb)
        tl.store(o + 2, npos, mask=mb)

    @autotune(configs=_configs(False, BWD_TILES), key=["Bn", "Mn", "D"],
                     prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _infonce_bwd_kernel(X, Y, XN, YN, XV, XT, YV, YT, LIM, STATS, DX, Bn, Mn, D,
                            m_per_split, sxb, sxd, syb, syd, inv_t,
                            BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr,
                            GRAD_PRECISION: tl.constexpr, STATS_ON_ROWS: tl.constexpr):
        """DX[split] = (sum_j w_ij) x_i - (W Y)_i with w = dL/d(d^2) (the factor 2 is in
        STATS' gradients). STATS: (clips, 4) = (logZ, logP, 2 g_z, 2 g_p) of each clip, on the
        rows (X = clips) or on the columns (X = audio)."""
        pid_b = tl.program_id(0)
        pid_d = tl.program_id(1)
        pid_s = tl.program_id(2)
        rb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        mb = rb < Bn
        rdo = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
        mdo = rdo < D
        if STATS_ON_ROWS:
            lz_r = tl.load(STATS + rb * 4 + 0, mask=mb, other=0.0)
            lp_r = tl.load(STATS + rb * 4 + 1, mask=mb, other=0.0)
            gz_r = tl.load(STATS + rb * 4 + 2, mask=mb, other=0.0)
            gp_r = tl.load(STATS + rb * 4 + 3, mask=mb, other=0.0)
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
            keep = pos | easy | hard
            logit = -d2 * inv_t
            if STATS_ON_ROWS:
                lz, lp, gz, gp = lz_r[:, None], lp_r[:, None], gz_r[:, None], gp_r[:, None]
            else:
                lz = tl.load(STATS + rm * 4 + 0, mask=mm, other=0.0)[None, :]
                lp = tl.load(STATS + rm * 4 + 1, mask=mm, other=0.0)[None, :]
                gz = tl.load(STATS + rm * 4 + 2, mask=mm, other=0.0)[None, :]
                gp = tl.load(STATS + rm * 4 + 3, mask=mm, other=0.0)[None, :]
            # a clip without positives has zero upstream gradients (and maybe logP = -inf):
            # its pairs contribute nothing, computed without inf - inf
            use_z = keep & (gz != 0.0)
            use_p = pos & (gp != 0.0)
            pz = tl.where(use_z, tl.exp(tl.where(use_z, logit - lz, NEG)), 0.0)
            pp = tl.where(use_p, tl.exp(tl.where(use_p, logit - lp, NEG)), 0.0)
            w = -(gz * pz + gp * pp) * inv_t
            rs += tl.sum(w, 1)
            y = tl.load(Y + rm[:, None] * syb + rdo[None, :] * syd,
                        mask=mm[:, None] & mdo[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(w, y, acc, input_precision=GRAD_PRECISION)
        x = tl.load(X + rb[:, None] * sxb + rdo[None, :] * sxd, mask=mb[:, None] & mdo[None, :],
                    other=0.0).to(tl.float32)
        out = rs[:, None] * x - acc
        tl.store(DX + (pid_s * Bn + rb[:, None]) * D + rdo[None, :], out,
                 mask=mb[:, None] & mdo[None, :])


# --------------------------------------------------------------------------------------------
# Launchers and the custom ops

def _rows_fwd(v, a, cv, ct, av, at, temperature, hard_min_shift, sync_tol, split=None):
    B, D = v.shape
    M = a.shape[0]
    vn, an = v.float().pow(2).sum(1), a.float().pow(2).sum(1)
    split = split or _choose_split(B, M, v.device)
    per = triton.cdiv(M, split)
    out = torch.empty((split, B, 3), dtype=torch.float32, device=v.device)
    prec, _ = _precisions(v.dtype)
    grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), split)
    _infonce_fwd_kernel[grid](v, a, vn, an, cv, ct, av, at, _lims(sync_tol, hard_min_shift,
                              v.device), out, B, M, D, per, v.stride(0), v.stride(1),
                              a.stride(0), a.stride(1), 1.0 / float(temperature), PRECISION=prec)
    logz = torch.logsumexp(out[..., 0], 0)   # splits combined (-inf where a split is empty)
    logp = torch.logsumexp(out[..., 1], 0)
    return logz, logp, out[..., 2].sum(0)


def _grad(x, y, xv, xt, yv, yt, stats, temperature, hard_min_shift, sync_tol, on_rows, split):
    B, D = x.shape
    M = y.shape[0]
    xn, yn = x.float().pow(2).sum(1), y.float().pow(2).sum(1)
    split = split or _choose_split(B, M, x.device)
    per = triton.cdiv(M, split)
    dx = torch.empty((split, B, D), dtype=torch.float32, device=x.device)
    prec, gprec = _precisions(x.dtype)
    grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), triton.cdiv(D, meta["BLOCK_DO"]),
                         split)
    _infonce_bwd_kernel[grid](x, y, xn, yn, xv, xt, yv, yt, _lims(sync_tol, hard_min_shift,
                              x.device), stats, dx, B, M, D, per, x.stride(0), x.stride(1),
                              y.stride(0), y.stride(1), 1.0 / float(temperature),
                              PRECISION=prec, GRAD_PRECISION=gprec, STATS_ON_ROWS=on_rows)
    return (dx[0] if split == 1 else dx.sum(0)).to(x.dtype)


@torch.library.custom_op("fastavts::infonce_rows", mutates_args=())
def _infonce_rows(v: torch.Tensor, a: torch.Tensor, cv: torch.Tensor, ct: torch.Tensor,
                  av: torch.Tensor, at: torch.Tensor, temperature: float, hard_min_shift: float,
                  sync_tol: float, split: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _rows_fwd(v, a, cv, ct, av, at, temperature, hard_min_shift, sync_tol, split or None)


@_infonce_rows.register_fake
def _(v, a, cv, ct, av, at, temperature, hard_min_shift, sync_tol, split):
    B = v.shape[0]
    return (v.new_empty((B,), dtype=torch.float32), v.new_empty((B,), dtype=torch.float32),
            v.new_empty((B,), dtype=torch.float32))


@torch.library.custom_op("fastavts::infonce_rows_bwd", mutates_args=())
def _infonce_rows_bwd(stats: torch.Tensor, v: torch.Tensor, a: torch.Tensor, cv: torch.Tensor,
                      ct: torch.Tensor, av: torch.Tensor, at: torch.Tensor, temperature: float,
                      hard_min_shift: float, sync_tol: float, split: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    args = (temperature, hard_min_shift, sync_tol)
    dv = _grad(v, a, cv, ct, av, at, stats, *args, True, split or None)
    da = _grad(a, v, av, at, cv, ct, stats, *args, False, split or None)
    return dv, da


@_infonce_rows_bwd.register_fake
def _(stats, v, a, cv, ct, av, at, temperature, hard_min_shift, sync_tol, split):
    return torch.empty_like(v), torch.empty_like(a)


def _rows_setup(ctx, inputs, output):
    v, a, cv, ct, av, at, temperature, hard_min_shift, sync_tol, split = inputs
    ctx.save_for_backward(v, a, cv, ct, av, at, output[0], output[1])
    ctx.args = (temperature, hard_min_shift, sync_tol, split)


def _rows_backward(ctx, g_logz, g_logp, _g_npos):
    v, a, cv, ct, av, at, logz, logp = ctx.saved_tensors
    # dL/d(d^2) = -(g_z pz + g_p pp) / T and d(d^2)/dv = 2 (v - a): the 2 goes in here
    stats = torch.stack([logz, logp, 2 * g_logz.float(), 2 * g_logp.float()], 1).contiguous()
    dv, da = _infonce_rows_bwd(stats, v, a, cv, ct, av, at, *ctx.args)
    return dv, da, None, None, None, None, None, None, None, None


_infonce_rows.register_autograd(_rows_backward, setup_context=_rows_setup)


# --------------------------------------------------------------------------------------------
# Public function

def inbatch_infonce_loss(v, a, clip_video, clip_t0, audio_video, audio_t0, *,
                         temperature: float = 0.1, hard_min_shift: float = 0.5,
                         sync_tol: float = 0.02, impl: str = "auto", group=None,
                         gather_capacity: int | None = None, _split: int = 0):
    """InfoNCE over every clip's row of audio windows, pair kinds from ids and times (scalar,
    fp32). `group`: a process group whose ranks' audio columns are gathered (see the module
    docstring); `gather_capacity`: the most columns any rank has (pads, no host sync), else the
    sizes are exchanged."""
    B, M = v.shape[0], a.shape[0]
    _check_shapes(v, a, ("clip_video", clip_video, B), ("clip_t0", clip_t0, B),
                  ("audio_video", audio_video, M), ("audio_t0", audio_t0, M))
    if group is not None:
        a, audio_video, audio_t0 = gather_columns(a, audio_video, audio_t0, group,
                                                  gather_capacity)
    if not _use_triton(impl, v):
        kinds = pair_cells(clip_video, clip_t0, audio_video, audio_t0, hard_min_shift, sync_tol)
        return loss_from_rows(*infonce_rows_reference(v, a, kinds, temperature), group=group)
    if a.dtype != v.dtype:
        a = a.to(v.dtype)
    if B == 0 or a.shape[0] == 0:
        return world_scale((v.sum() + a.sum()).float() * 0, group)
    logz, logp, npos = _infonce_rows(v, a, _prep_ids(clip_video), _prep_times(clip_t0),
                                     _prep_ids(audio_video), _prep_times(audio_t0),
                                     float(temperature), float(hard_min_shift), float(sync_tol),
                                     int(_split))
    return loss_from_rows(logz, logp, npos, group=group)


# --------------------------------------------------------------------------------------------
# `python -m fastavts.kernels.infonce --compile 90`: compile every kernel at every tile it may run
# with, for a GPU architecture without one, and report its resources (contrastive.py has how).

def compile_all(arch: int = 90) -> list[dict]:
    """Every kernel of this file, every tile and dtype, compiled for `arch` (report rows:
    contrastive.compile_report)."""
    jobs = []
    for t, dtype in DTYPES:
        jobs += inbatch_jobs(_infonce_fwd_kernel.fn, _infonce_bwd_kernel.fn, t, dtype, "inv_t",
                             "infonce", {"STATS": "*fp32"},
                             bwd_variants=({"STATS_ON_ROWS": True}, {"STATS_ON_ROWS": False}),
                             precisions=_precisions, tiles=(FWD_TILES, BWD_TILES))
    return compile_report(jobs, arch)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="compile the InfoNCE kernels for a GPU architecture")
    p.add_argument("--compile", type=int, default=90, metavar="ARCH",
                   help="compute capability as an integer (90 = H100/H200)")
    compile_all(p.parse_args().compile)
