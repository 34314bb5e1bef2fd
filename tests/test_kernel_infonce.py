"""The fused InfoNCE (kernels/infonce.py) against a float64 reference.

Like tests/test_kernel_contrastive.py: in the interpreter on a CPU (fp32, fp16), under the model
of the GPU's tl.dot products (the tf32_model fixture, imported from there), compiled on a GPU
(bf16 too); the error of loss, dV and dA against the float64 reference may be at most 2x the
PyTorch reference's own error at that precision, plus the dtype's term relative to the
magnitude (as for the margin kernel), plus for the gradients the cost of fp32 exp/log in the
softmax weights (rounding_terms: where one positive dominates a row, pz - pp cancels and the
gradient is small, so a relative bound would not do; the reference's autograd meets the same
cancellation with torch's exact-rounding exp and so stays below it).
The float64 reference itself is checked against a loop written from the definition.
"""
from __future__ import annotations

import math

import pytest
import torch
from test_kernel_contrastive import ATOL, ATOL_LOSS, DEVICE, DTYPES, _inbatch, _run, tf32_model  # noqa: F401

from fastavts.kernels import infonce as I
from fastavts.kernels.contrastive import IGNORED, POS, pair_cells


def rounding_terms(v, a, cv, ct, av, at, temperature, hard_min_shift, sync_tol):
    """What fp32 arithmetic alone may cost the gradients, from a model of it (absolute, per
    quantity). The softmax weights pz = exp(l - logZ), pp = exp(l - logP) come out of exp and
    log with a relative error of a few units in the last place, u = 2^-24 (the GPU's fast exp2
    and log2 included: take 8u); with W = (2/(T N)) (pz - pp) and dV_i = sum_j W_ij (v_i - a_j),
    |dV_i error| <= 32u (2/(T N)) sum_j (pz_ij + pp_ij) |v_i - a_j|, and the same over i for
    dA_j. When one positive dominates a row, pz - pp cancels: relative to |dV| the error is
    large, in absolute terms it is this (float64 quantities)."""
    v, a = v.double(), a.double()
    kinds = pair_cells(cv, ct, av, at, hard_min_shift, sync_tol)
    logits = -torch.cdist(v, a).pow(2) / temperature
    pos, keep = kinds == POS, kinds != IGNORED
    rows = pos.any(1, keepdim=True)
    pz = torch.softmax(logits.masked_fill(~keep, float("-inf")), 1).nan_to_num(0) * rows
    pp = torch.softmax(logits.masked_fill(~pos, float("-inf")), 1).nan_to_num(0) * rows
    n = max(1, int(rows.sum()))
    dist = torch.cdist(v, a)
    w = (pz + pp) * dist * (2 / (temperature * n)) * 8 * 2.0 ** -24
    return 0.0, w.sum(1).max().item() if w.numel() else 0.0, w.sum(0).max().item() if w.numel() else 0.0


def _check(name, tri, ref_p, ref64, dtype, extra=(0.0, 0.0, 0.0)):
    for what, t, r, g, x in zip(("loss", "dV", "dA"), tri, ref_p, ref64, extra):
        scale = g.abs().max().item() if g.numel() else 0.0
        err_t = (t - g).abs().max().item() if g.numel() else 0.0
        err_r = (r - g).abs().max().item() if g.numel() else 0.0
        bound = 2 * err_r + (ATOL_LOSS if what == "loss" else ATOL)[dtype] * scale + x
        print(f"{name} {what}: kernel err {err_t:.3e}, reference err {err_r:.3e}, "
              f"rounding term {x:.3e}, bound {bound:.3e}, |ref| {scale:.3e}")
        assert torch.isfinite(t).all(), f"{name} {what}: non-finite values"
        assert err_t <= bound, f"{name} {what}: kernel error {err_t:.3e} > bound {bound:.3e}"


def _compare(name, v, a, cv, ct, av, at, dtype, split=0, **kw):
    args = (cv, ct, av, at)
    tri = _run(I.inbatch_infonce_loss, v, a, *args, impl="triton", _split=split, **kw)
    ref_p = _run(I.inbatch_infonce_loss, v, a, *args, impl="reference", **kw)
    ref64 = _run(I.inbatch_infonce_loss, v.double(), a.double(), *args, impl="reference", **kw)
    extra = rounding_terms(v, a, *args, kw.get("temperature", 0.1), kw.get("hard_min_shift", 0.5),
                           kw.get("sync_tol", 0.02))
    _check(name, tri, ref_p, ref64, dtype, extra)
    return ref64


def test_reference_is_the_definition():
    """The float64 reference against a plain loop over rows and pairs, with several positives
    in a row, ignored pairs, rows without positives and padding ids."""
    g = torch.Generator().manual_seed(1)
    v, a = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(11, 5, generator=g,
                                                                             dtype=torch.float64)
    cv = torch.tensor([0, 0, 1, 2, 3, 3, 4])
    ct = torch.tensor([0.0, 1.0, 0.0, 2.0, 0.0, 0.0, 5.0])
    av = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, -1, 4, 0])
    at = torch.tensor([0.0, 1.0, 0.2, 0.0, 0.9, 9.0, 0.0, 0.01, 0.0, 0.3, 0.0])
    T = 0.3
    kinds = pair_cells(cv, ct, av, at, 0.5, 0.02)
    terms = []
    for i in range(7):
        num, den = [], []
        for j in range(11):
            k = int(kinds[i, j])
            if k == IGNORED:
                continue
            logit = -float(((v[i] - a[j]) ** 2).sum()) / T
            den.append(logit)
            if k == POS:
                num.append(logit)
        if num:
            terms.append(math.log(sum(map(math.exp, den))) - math.log(sum(map(math.exp, num))))
    want = sum(terms) / len(terms)
    assert len(terms) == 5 and (kinds[0] == POS).sum() == 2      # rows 3, 6: none; row 0: two
    got = I.inbatch_infonce_loss(v, a, cv, ct, av, at, temperature=T, impl="reference")
    assert got.item() == pytest.approx(want, rel=1e-12)


SHAPES = [(1, 1, 3), (1, 7, 64), (13, 1, 130), (37, 70, 512), (129, 257, 130), (300, 700, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,M,D", SHAPES)
def test_infonce_kernel_matches_float64(B, M, D, dtype):
    v, a, cv, ct, av, at = _inbatch(B, M, D, dtype, seed=B + 2 * M + D)
    _compare(f"B={B} M={M} D={D} {dtype}", v, a, cv, ct, av, at, dtype,
             sync_tol=0.25, hard_min_shift=0.5, temperature=0.2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["no_pos_rows", "several_pos", "nothing", "split", "noncontig",
                                  "low_temperature", "padding"])
def test_infonce_kernel_edge_cases(case, dtype):
    kw = dict(sync_tol=0.25, hard_min_shift=0.5, temperature=0.2)
    v, a, cv, ct, av, at = _inbatch(45, 90, 64, dtype, seed=7, noncontig=case == "noncontig")
    split = 0
    if case == "no_pos_rows":      # a third of the clips have no aligned window at all
        at = torch.where(av % 3 == 0, at + 50.0, at)
    elif case == "several_pos":    # three videos only: rows with several positives
        cv, av = cv % 3, av % 3
    elif case == "nothing":        # every pair ignored: loss 0, gradients 0
        cv, av = cv * 0, av * 0
        ct, at = ct * 0, at * 0 + 0.3
    elif case == "split":
        split = 3
    elif case == "low_temperature":  # logits down to -400: the online log-sum-exp must hold
        kw["temperature"] = 0.01
    elif case == "padding":        # id -1 columns (gathered from a rank with fewer): ignored
        av = torch.where(torch.arange(len(av), device=av.device) % 4 == 0, -1, av)
    ref64 = _compare(f"{case} {dtype}", v, a, cv, ct, av, at, dtype, split=split, **kw)
    if case == "nothing":
        assert ref64[0].item() == 0.0 and ref64[1].abs().max() == 0


def test_the_trainers_infonce_is_this_loss():
    """fastavts.losses.infonce_loss (kinds given) and the fused entry point agree."""
    from fastavts.losses import infonce_loss

    v, a, cv, ct, av, at = _inbatch(40, 80, 16, torch.float64, seed=3)
    kinds = pair_cells(cv, ct, av, at, 0.5, 0.25)
    want = infonce_loss(v, a, kinds, 0.1)
    got = I.inbatch_infonce_loss(v, a, cv, ct, av, at, temperature=0.1, hard_min_shift=0.5,
                                 sync_tol=0.25, impl="reference")
    assert got.item() == pytest.approx(want.item(), rel=1e-12)


def test_compiled_graph_has_no_break():
    import torch._dynamo as dynamo

    v, a, cv, ct, av, at = _inbatch(16, 32, 8, torch.float32)

    def f(v, a):
        return I.inbatch_infonce_loss(v * 2, a, cv, ct, av, at, impl="triton") + v.sum()

    explain = dynamo.explain(f)(v, a)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    torch.library.opcheck(torch.ops.fastavts.infonce_rows.default,
                          (v, a, cv, ct.float(), av, at.float(), 0.1, 0.5, 0.02, 0),
                          test_utils=("test_schema", "test_faketensor"))


def test_kernels_compile_for_hopper_without_spills_within_shared_memory():
    from test_kernel_contrastive import check_resources, compiled_for_hopper

    rows = compiled_for_hopper("fastavts.kernels.infonce")
    # per dtype: the forward at each forward tile, the backward (on rows, on columns) at each
    assert len(rows) == 3 * (len(I.FWD_TILES) + 2 * len(I.BWD_TILES))
    check_resources(rows)


@pytest.mark.parametrize("B,M,D", [(129, 257, 130), (1, 7, 64)])
def test_a_backward_off_by_a_tenth_of_a_percent_fails(B, M, D, monkeypatch):
    """The bounds above can fail: the backward's weights scaled by 1.001 miss them."""
    real = I._infonce_rows_bwd

    def off(stats, *rest):
        return real(stats * torch.tensor([1, 1, 1.001, 1.001], device=stats.device), *rest)

    monkeypatch.setattr(I, "_infonce_rows_bwd", off)
    v, a, cv, ct, av, at = _inbatch(B, M, D, torch.float32, seed=B + 2 * M + D)
    with pytest.raises(AssertionError, match="kernel error"):
        _compare("off by 0.1 %", v, a, cv, ct, av, at, torch.float32, sync_tol=0.25,
                 hard_min_shift=0.5, temperature=0.2)
