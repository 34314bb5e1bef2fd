"""The fused contrastive loss (kernels/contrastive.py) against a float64 reference.

On a machine without a GPU the Triton kernels run in Triton's interpreter (conftest sets
TRITON_INTERPRET=1), fp32 and fp16; on a GPU they run compiled, bf16 included.

Tolerance, per quantity (loss, dV, dA): the error of the kernel against the float64 reference
(the same rounded inputs, computed in float64) may be at most 2x the error of the PyTorch
reference run at the inputs' precision, plus a small absolute term relative to the magnitude.
Errors are printed before each assertion.

Triton's interpreter multiplies fp32 operands of tl.dot in full fp32 whatever input_precision
says; the GPU does not. So in the interpreter every test here runs under a model of the GPU's
products (the `tf32_model` fixture, on for the whole file): TF32 operands keep 10 mantissa
bits (truncated, the pessimistic reading of the tensor cores), 3xTF32 is hi*hi + hi*lo + lo*hi
of such parts, fp16/bf16 operands multiply exactly. A kernel that asked for plain TF32 where
it promises fp32 accuracy fails these bounds (test_the_tf32_model_catches_a_tf32_backward).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastavts.kernels import contrastive as C

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
# fp32: the kernel promises fp32 accuracy (3xTF32 products). fp16/bf16: the gradient product
# W @ Y runs in TF32, so the gradient weights W carry TF32's 10 mantissa bits: 2^-10 of the
# largest gradient on top of the reference's own error (the returned gradients are rounded to
# 16 bits anyway: 2^-11 fp16, 2^-8 bf16). The loss itself meets the tighter 1e-4.
ATOL = {torch.float32: 1e-6, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -10}
ATOL_LOSS = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def _tf32(x: np.ndarray) -> np.ndarray:
    """fp32 -> the 19 bits a TF32 tensor core reads of it (sign, 8 exponent and the top 10
    mantissa bits: the rest is ignored, i.e. truncated)."""
    return (np.ascontiguousarray(x, np.float32).view(np.uint32)
            & np.uint32(0xFFFFE000)).view(np.float32)


def _rna_tf32(x: np.ndarray) -> np.ndarray:
    """cvt.rna.tf32.f32: fp32 rounded to 10 mantissa bits, ties away from zero."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def tf32_dot(a: np.ndarray, b: np.ndarray, precision: str) -> np.ndarray:
    """The product of fp32 tiles as the GPU computes tl.dot at `precision`, fp32 accumulate.
    tf32x3 as Triton writes it (F32DotTC): big = cvt.rna(x), small = x - big, then
    small_a big_b + big_a small_b + big_a big_b, each a TF32 product."""
    f32 = np.float32
    if precision == "ieee":
        return np.matmul(a, b, dtype=f32)
    if precision == "tf32":
        return np.matmul(_tf32(a), _tf32(b), dtype=f32)
    ab, bb = _rna_tf32(a), _rna_tf32(b)
    as_, bs = _tf32(a - ab), _tf32(b - bb)
    out = np.matmul(as_, bb, dtype=f32)
    out = out + np.matmul(ab, bs, dtype=f32)
    return out + np.matmul(ab, bb, dtype=f32)


@pytest.fixture(autouse=True)
def tf32_model(monkeypatch):
    """In the interpreter, tl.dot on fp32 operands follows its input_precision (see above)."""
    if not C.INTERPRET:
        yield
        return
    from triton.runtime import interpreter as I

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if not (str(a.dtype) == "fp32" and str(b.dtype) == "fp32"):
            return real(self, a, b, d, input_precision, max_num_imprecise_acc)
        prec = str(input_precision).split(".")[-1].lower()
        prod = tf32_dot(a.data, b.data, prec)
        return I.TensorHandle((prod + d.data).astype(d.data.dtype), d.dtype.scalar)

    real = I.InterpreterBuilder.create_dot
    monkeypatch.setattr(I.InterpreterBuilder, "create_dot", create_dot)
    yield


def test_the_tf32_model_is_tf32():
    """The model against numbers worked out by hand: 1 + 2^-12 has no TF32 form (10 mantissa
    bits), 3xTF32 recovers it to fp32 accuracy."""
    a = np.array([[1 + 2.0 ** -12]], np.float32)
    b = np.array([[1.0]], np.float32)
    assert tf32_dot(a, b, "tf32")[0, 0] == 1.0
    assert tf32_dot(a, b, "tf32x3")[0, 0] == np.float32(1 + 2.0 ** -12)
    assert tf32_dot(a, b, "ieee")[0, 0] == np.float32(1 + 2.0 ** -12)


def _run(fn, v, a, *args, **kw):
    v = v.detach().clone().requires_grad_(True)
    a = a.detach().clone().requires_grad_(True)
    loss = fn(v, a, *args, **kw)
    loss.backward()
    return loss.detach().double(), v.grad.double(), a.grad.double()


def _check(name, tri, ref_p, ref64, dtype):
    for what, t, r, g in zip(("loss", "dV", "dA"), tri, ref_p, ref64):
        scale = g.abs().max().item() if g.numel() else 0.0
        err_t = (t - g).abs().max().item() if g.numel() else 0.0
        err_r = (r - g).abs().max().item() if g.numel() else 0.0
        bound = 2 * err_r + (ATOL_LOSS if what == "loss" else ATOL)[dtype] * scale
        print(f"{name} {what}: kernel err {err_t:.3e}, reference err {err_r:.3e}, "
              f"bound {bound:.3e}, |ref| {scale:.3e}")
        assert torch.isfinite(t).all(), f"{name} {what}: non-finite values"
        assert err_t <= bound, f"{name} {what}: kernel error {err_t:.3e} > bound {bound:.3e}"


def _inbatch(B, M, D, dtype, *, videos=5, steps=8, step=0.25, seed=0, normalize=True,
             noncontig=False):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(B, D, generator=g)
    a = torch.randn(M, D, generator=g)
    if normalize:  # like the trainer's embeddings, so distances straddle the margin
        v, a = torch.nn.functional.normalize(v, dim=1), torch.nn.functional.normalize(a, dim=1)
        a[: min(B, M)] = 0.6 * a[: min(B, M)] + 0.4 * v[: min(B, M)]
    cv = torch.randint(0, videos, (B,), generator=g)
    av = torch.randint(0, videos, (M,), generator=g)
    # times on a grid so that gaps hit sync_tol and hard_min_shift exactly (ties)
    ct = torch.randint(0, steps, (B,), generator=g).float() * step
    at = torch.randint(0, steps, (M,), generator=g).float() * step
    v, a = v.to(DEVICE, dtype), a.to(DEVICE, dtype)
    if noncontig:
        v = torch.cat([v, v], 1)[:, ::2]
        a = torch.cat([a, a], 1)[:, ::2]
    return v, a, cv.to(DEVICE), ct.to(DEVICE), av.to(DEVICE), at.to(DEVICE)


def _compare_inbatch(name, v, a, cv, ct, av, at, dtype, split=0, **kw):
    args = (cv, ct, av, at)
    tri = _run(C.inbatch_contrastive_loss, v, a, *args, impl="triton", _split=split, **kw)
    ref_p = _run(C.inbatch_contrastive_loss, v, a, *args, impl="reference", **kw)
    ref64 = _run(C.inbatch_contrastive_loss, v.double(), a.double(), *args, impl="reference",
                 **kw)
    _check(name, tri, ref_p, ref64, dtype)
    return ref64


SHAPES = [(1, 1, 3), (1, 7, 64), (13, 1, 130), (37, 70, 512), (129, 257, 130), (300, 700, 64),
          (200, 650, 3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,M,D", SHAPES)
def test_inbatch_kernel_matches_float64(B, M, D, dtype):
    v, a, cv, ct, av, at = _inbatch(B, M, D, dtype, seed=B + M + D)
    _compare_inbatch(f"B={B} M={M} D={D} {dtype}", v, a, cv, ct, av, at, dtype,
                     sync_tol=0.25, hard_min_shift=0.5, hard_share=0.3, margin=1.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["no_pos", "no_hard", "no_neg", "only_hard_h0", "only_easy_h1",
                                  "one_video", "nothing", "split", "noncontig", "raw", "pooled"])
def test_inbatch_kernel_edge_cases(case, dtype):
    kw = dict(sync_tol=0.25, hard_min_shift=0.5, hard_share=0.3, margin=1.0)
    v, a, cv, ct, av, at = _inbatch(45, 90, 64, dtype, seed=3, noncontig=case == "noncontig",
                                    normalize=case != "raw")
    split = 0
    if case == "no_pos":      # every window 2 s away from every clip of its video
        at = ct.max() + 2.0 + at
    elif case == "no_hard":   # every same-video gap below hard_min_shift
        kw["hard_min_shift"] = 100.0
    elif case == "no_neg":    # one video, no hard shifts: positives and ignored pairs only
        cv, av = cv * 0, av * 0
        kw["hard_min_shift"] = 100.0
    elif case == "only_hard_h0":  # one video, all negatives hard, hard_share 0
        cv, av = cv * 0, av * 0
        kw["hard_share"] = 0.0
    elif case == "only_easy_h1":  # different videos only, hard_share 1
        av = av + 100
        kw["hard_share"] = 1.0
    elif case == "one_video":     # duplicates: all clips of one video, windows of two
        cv = cv * 0
        av = av % 2
    elif case == "nothing":       # all pairs ignored: the loss is 0, gradients 0
        cv, av = cv * 0, av * 0
        ct, at = ct * 0, at * 0 + 0.3
    elif case == "split":         # the column range split over programs (GPU launch path)
        split = 3
    elif case == "raw":           # unnormalised embeddings, distances far beyond the margin
        kw["margin"] = 5.0
    elif case == "pooled":        # hard_share None: every negative pair weighs the same
        kw["hard_share"] = None
    ref64 = _compare_inbatch(f"{case} {dtype}", v, a, cv, ct, av, at, dtype, split=split, **kw)
    if case == "nothing":
        assert ref64[0].item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kinds_at_the_boundaries_match_the_reference(dtype):
    """Gaps of exactly sync_tol and hard_min_shift, and float32 times that are not exact."""
    v, a, cv, ct, av, at = _inbatch(20, 40, 16, dtype, videos=1, seed=5)
    ct = torch.full_like(ct, 1.0)
    at = torch.tensor([1.0, 1.02, 1.5, 0.5, 1.49999, 1.0200001, 0.98, 2.0] * 5,
                      device=at.device)
    for sync_tol, hard in ((0.02, 0.5), (0.5, 0.5), (0.0, 1.0)):
        kinds = C.pair_cells(cv, ct, av, at, hard, sync_tol)
        assert (kinds == C.POS).any() and (kinds == C.HARD).any()
        _compare_inbatch(f"tol={sync_tol} hard={hard} {dtype}", v, a, cv, ct, av, at, dtype,
                         sync_tol=sync_tol, hard_min_shift=hard, hard_share=0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,D,labels", [(1, 3, "mixed"), (37, 130, "mixed"), (300, 512, "mixed"),
                                        (64, 64, "all_pos"), (64, 64, "all_neg")])
def test_paired_kernel_matches_float64(B, D, labels, dtype):
    v, a, *_ = _inbatch(B, B, D, dtype, seed=B + D)
    y = torch.randint(0, 2, (B,), generator=torch.Generator().manual_seed(B)).to(DEVICE)
    if labels != "mixed":
        y = torch.full_like(y, 1 if labels == "all_pos" else 0)
    tri = _run(C.paired_contrastive_loss, v, a, y, impl="triton", margin=1.2)
    ref_p = _run(C.paired_contrastive_loss, v, a, y, impl="reference", margin=1.2)
    ref64 = _run(C.paired_contrastive_loss, v.double(), a.double(), y, impl="reference",
                 margin=1.2)
    _check(f"paired B={B} D={D} {labels}", tri, ref_p, ref64, dtype)


def test_reference_is_the_hand_computed_loss():
    """The float64 reference the kernel is held to, on a case worked out by hand."""
    v = torch.tensor([[0.0], [10.0]], dtype=torch.float64)
    a = torch.tensor([[0.5], [0.2], [10.0], [9.7]], dtype=torch.float64)
    cv, ct = torch.tensor([0, 1]), torch.tensor([0.0, 0.0])
    av, at = torch.tensor([0, 0, 1, 1]), torch.tensor([0.0, 1.0, 0.0, 2.0])
    want = 0.5 * (0.25 / 2) + 0.5 * (0.75 * 0.0 + 0.25 * ((0.8 ** 2 + 0.7 ** 2) / 2))
    got = C.inbatch_contrastive_loss(v, a, cv, ct, av, at, impl="reference")
    assert got.item() == pytest.approx(want, rel=1e-12)
    if DEVICE == "cpu":
        # |v|^2 + |a|^2 - 2 v.a with |v| = 10 and the product in 3xTF32 (the GPU's, modelled
        # here): d^2 is known to about 100 * 2^-21, ~5e-5, of a loss of 0.13
        got = C.inbatch_contrastive_loss(v.float(), a.float(), cv, ct, av, at, impl="triton")
        assert got.item() == pytest.approx(want, rel=3e-4)


def test_impl_switch_and_errors():
    v, a, cv, ct, av, at = _inbatch(4, 6, 8, torch.float32)
    with pytest.raises(ValueError, match="choose one of"):
        C.inbatch_contrastive_loss(v, a, cv, ct, av, at, impl="fast")
    with pytest.raises(ValueError, match="same D"):
        C.inbatch_contrastive_loss(v, a[:, :4], cv, ct, av, at)
    with pytest.raises(ValueError, match="audio_t0 must have shape"):
        C.inbatch_contrastive_loss(v, a, cv, ct, av, at[:3])
    with pytest.raises(TypeError, match="fp32, fp16 or bf16"):
        C.inbatch_contrastive_loss(v.double(), a.double(), cv, ct, av, at, impl="triton")
    # auto: the kernel on CUDA tensors, the reference elsewhere (both give the same loss)
    ref = C.inbatch_contrastive_loss(v, a, cv, ct, av, at, impl="reference")
    auto = C.inbatch_contrastive_loss(v, a, cv, ct, av, at, impl="auto")
    assert torch.allclose(ref, auto, atol=1e-5)


def test_compiled_graph_has_no_break():
    """The kernel is a registered custom op: torch.compile keeps it in one graph."""
    import torch._dynamo as dynamo

    v, a, cv, ct, av, at = _inbatch(16, 32, 8, torch.float32)

    def f(v, a):
        return C.inbatch_contrastive_loss(v * 2, a, cv, ct, av, at, impl="triton") + v.sum()

    explain = dynamo.explain(f)(v, a)
    print(explain.graph_break_count, explain.break_reasons)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    torch.library.opcheck(torch.ops.fastavts.contrastive_sums.default,
                          (v, a, cv, ct.float(), av, at.float(), 1.0, 0.5, 0.02, 0),
                          test_utils=("test_schema", "test_faketensor"))


def compiled_for_hopper(module: str) -> list[dict]:
    """Every kernel of `module` at every tile it may run with, compiled for sm_90 by ptxas in
    a subprocess (the kernels of this process are interpreted ones): the report's rows."""
    import os
    import re
    import subprocess
    import sys

    if CUDA:
        pytest.skip("the GPU runs the kernels themselves")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", module, "--compile", "90"], env=env,
                       capture_output=True, text=True, timeout=900)
    print(r.stdout, r.stderr[-3000:])
    assert r.returncode == 0
    line = re.compile(r"^(.+) sm_90 (\{.*\}) w(\d+) s(\d+): (\d+) registers, stack (\d+) B, "
                      r"shared (\d+) B$")
    rows = [line.match(x) for x in r.stdout.splitlines() if " sm_90 " in x]
    assert rows and all(rows), r.stdout
    return [dict(name=m[1], tile=m[2], registers=int(m[5]), stack=int(m[6]), shared=int(m[7]))
            for m in rows]


def check_resources(rows: list[dict]) -> None:
    """No register spilled to local memory (stack 0: the kernels keep no local arrays) and
    shared memory within an H100's 227 KB per block, at every tile a run may pick."""
    spilled = [r for r in rows if r["stack"]]
    assert not spilled, f"{len(spilled)} kernel(s) spill: {spilled[:4]}"
    over = [r for r in rows if r["shared"] > C.SHARED_LIMIT]
    assert not over, over


def test_kernels_compile_for_hopper_without_spills_within_shared_memory():
    """ptxas accepts every kernel for sm_90 at each dtype and tile (catches what the
    interpreter forgives: dtypes, tl.dot shapes, shared memory), none spills registers (the
    tiles before this check spilled 100 B - 4 KB a thread) and each fits the shared memory."""
    rows = compiled_for_hopper("fastavts.kernels.contrastive")
    tiles = len(C.FWD_TILES) + len(C.BWD_TILES) + 2       # + the paired forward and backward
    assert len(rows) == 3 * tiles                           # fp32, fp16, bf16
    check_resources(rows)


def test_pooled_negatives_are_one_mean_over_every_negative_pair():
    v, a, cv, ct, av, at = _inbatch(20, 40, 8, torch.float64, seed=9)
    kinds = C.pair_cells(cv, ct, av, at, 0.5, 0.25)
    d = torch.cdist(v, a)
    neg = (kinds == C.EASY) | (kinds == C.HARD)
    want = 0.5 * d[kinds == C.POS].pow(2).mean() + 0.5 * (1.0 - d[neg]).clamp_min(0).pow(2).mean()
    got = C.inbatch_contrastive_loss(v, a, cv, ct, av, at, hard_share=None, sync_tol=0.25,
                                     impl="reference")
    assert got.item() == pytest.approx(want.item(), rel=1e-12)


@pytest.mark.parametrize("case", ["mixed", "no_pos", "only_hard_h0", "nothing", "pooled"])
def test_branchless_reference_equals_the_reference(case):
    """bench_loss compiles the branch-free form; it must be the same loss and gradients."""
    v, a, cv, ct, av, at = _inbatch(30, 50, 16, torch.float64, seed=11)
    kw = dict(sync_tol=0.25, hard_min_shift=0.5, hard_share=0.3)
    if case == "no_pos":
        at = ct.max() + 2.0 + at
    elif case == "only_hard_h0":
        cv, av, kw["hard_share"] = cv * 0, av * 0, 0.0
    elif case == "nothing":
        cv, av, ct, at = cv * 0, av * 0, ct * 0, at * 0 + 0.3
    elif case == "pooled":
        kw["hard_share"] = None
    ref = _run(C.inbatch_reference, v, a, cv, ct, av, at, **kw)
    got = _run(C.inbatch_reference_branchless, v, a, cv, ct, av, at, **kw)
    for r, g in zip(ref, got):
        assert torch.allclose(r, g, rtol=1e-9, atol=1e-12), (r - g).abs().max()


@pytest.mark.skipif(not C.INTERPRET, reason="the model stands in for the GPU in the interpreter")
def test_the_tf32_model_catches_a_tf32_backward(monkeypatch):
    """The bounds above can fail: with the fp32 gradient product in plain TF32 (as the kernel
    had it) the fp32 gradients miss their bound under the model."""
    monkeypatch.setattr(C, "_precisions", lambda dtype: ("tf32x3", "tf32"))
    v, a, cv, ct, av, at = _inbatch(129, 257, 130, torch.float32, seed=516)
    with pytest.raises(AssertionError, match="kernel error"):
        _compare_inbatch("tf32 backward", v, a, cv, ct, av, at, torch.float32,
                         sync_tol=0.25, hard_min_shift=0.5, hard_share=0.3, margin=1.5)
