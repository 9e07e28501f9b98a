"""The Triton FlashAttention kernel against the explicit-softmax reference: output and dq, dk, dv, on odd lengths,
GQA, decoding against a longer cache, strided inputs, huge scores and bad input; bf16 and determinism on a GPU only.

On a CPU these run on Triton's interpreter (tests/conftest.py), with 16x32 / 32x16 tiles, so every shape below spans
several blocks and a ragged last one.
"""

import dataclasses
import math

import pytest
import torch

from smollm_stack import kernels
from conftest import assert_close, tolerance
from smollm_stack.kernels import reference as ref
from smollm_stack.kernels.check import native_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16]
# Tolerances: conftest's row per dtype, 4 roundings where the row counts one: the output's, P's before P V and
# P^T dO, dS's before dS K and dS^T Q, and the online softmax's rescaling of the accumulator (fp16 rounds P and dS to
# fp16 before their dots). Each dot sums <= 67 keys or queries of a softmax-weighted (sum 1) or unit-normal term,
# so its error stays at the scale of the unit-normal inputs: atol is relative to 1, not to each tensor's maximum.
ROUNDINGS, SCALE = 4, 1.0
pytestmark = pytest.mark.usefixtures("poison_outputs")
GPU_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16 is not exact in the interpreter)")


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    kv_heads: int
    q_len: int  # T
    kv_len: int  # S
    head_dim: int
    causal: bool = True
    scale: float | None = None


CASES = {
    "mha-odd": Case(1, 2, 2, 17, 17, 16),
    "mqa-67": Case(2, 4, 1, 67, 67, 32),
    "gqa-d64": Case(1, 4, 2, 33, 33, 64),
    "one-token": Case(1, 2, 1, 1, 1, 16),
    "decode-1-of-37": Case(2, 4, 2, 1, 37, 32),
    "prefill-20-of-53-scaled": Case(1, 2, 2, 20, 53, 16, scale=0.3),
    "whole-blocks": Case(1, 2, 2, 64, 64, 16),
    "noncausal-17-by-67": Case(1, 4, 2, 17, 67, 16, causal=False),
    "noncausal-45-by-19": Case(1, 2, 1, 45, 19, 32, causal=False),
}


def make_inputs(case: Case, dtype: torch.dtype, seed: int = 0, magnitude: float = 1.0):
    """q, k, v (leaves requiring grad) and one upstream gradient shared by the kernel and the reference."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(case.batch, h, n, case.head_dim) for h, n in ((case.heads, case.q_len), (case.kv_heads, case.kv_len))]
    q = torch.randn(shapes[0], generator=g) * magnitude
    k = torch.randn(shapes[1], generator=g) * magnitude
    v = torch.randn(shapes[1], generator=g)
    do = torch.randn(shapes[0], generator=g)
    q, k, v = (x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v))
    return q, k, v, do.to(DEVICE, dtype)


def run_with_grads(fn, q, k, v, do, case: Case):
    """fn's output and its (dq, dk, dv) for the upstream gradient do, on fresh leaves."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, causal=case.causal, scale=case.scale)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def fp32_reference(q, k, v, do, case: Case):
    """The explicit-softmax reference in fp32 from the same (upcast) inputs."""
    return run_with_grads(ref.flash_attention, q.float(), k.float(), v.float(), do.float(), case)


def assert_all_close(actual, expected, dtype):
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        assert_close(a.float(), e.float(), dtype, ROUNDINGS, SCALE, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_matches_reference(case, dtype):
    q, k, v, do = make_inputs(case, dtype)
    actual = run_with_grads(kernels.flash_attention, q, k, v, do, case)
    assert [t.dtype for t in actual] == [dtype] * 4
    assert_all_close(actual, fp32_reference(q, k, v, do, case), dtype)


def test_strided_inputs_as_the_model_passes_them():
    """q, k, v as (B, T, H, d) transposes, K/V as the prefix of a longer cache, dO non-contiguous: read in place,
    never written; O, dq in q's layout and dk, dv in k's (torch.autograd.grad hands them over as made)."""
    case = Case(2, 4, 2, 19, 19, 32)
    q, k, v, do = make_inputs(case, torch.float32)
    cache = torch.zeros(2, 2, 40, 32, device=DEVICE)
    cache[:, :, :19] = k.detach()
    q_strided = q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    k_strided = cache[:, :, :19].requires_grad_()
    v_strided = v.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    do_strided = do.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (q_strided.is_contiguous() or k_strided.is_contiguous() or do_strided.is_contiguous())
    before = [t.detach().clone() for t in (q_strided, k_strided, v_strided, do_strided)]
    out = kernels.flash_attention(q_strided, k_strided, v_strided)
    actual = out.detach(), *torch.autograd.grad(out, (q_strided, k_strided, v_strided), do_strided)
    assert_all_close(actual, fp32_reference(q, k, v, do, case), torch.float32)
    # O and dq come in q's layout, dk and dv in k's (a cache prefix's: packed; v shares it in the model)
    layouts = [t.stride() for t in (q_strided, q_strided, k_strided.contiguous(), k_strided.contiguous())]
    assert [t.stride() for t in actual] == layouts
    for b, t in zip(before, (q_strided, k_strided, v_strided, do_strided)):
        assert torch.equal(b, t.detach())


def score_rounding_bounds(q, k, v, do, case: Case, delta: float):
    """Elementwise fp64 bounds on what an error of at most delta (relative) in every probability P does to
    (out, dq, dk, dv), propagated through O = P V, dV = P^T dO, dS = P (dP - D), dQ = scale dS K, dK = scale dS^T Q."""
    q, k, v, do = (t.detach().double() for t in (q, k, v, do))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-2, -1)) * case.scale
    if case.causal:
        scores = scores.masked_fill(~ref.causal_mask(case.q_len, case.kv_len, q.device), float("-inf"))
    p = torch.softmax(scores, dim=-1)
    dp = do @ v.transpose(-2, -1)
    d_row = (p * dp).sum(-1, keepdim=True)
    err_p = delta * p
    err_ds = err_p * (dp - d_row).abs() + p * (err_p * dp.abs()).sum(-1, keepdim=True)
    per_head = lambda t: t.unflatten(1, (-1, group)).sum(2)  # dK/dV of a K/V head sum over its query heads
    return (
        err_p @ v.abs(),
        case.scale * err_ds @ k.abs(),
        per_head(case.scale * err_ds.transpose(-2, -1) @ q.abs()),
        per_head(err_p.transpose(-2, -1) @ do.abs()),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", [0, 2])
def test_large_scores_stay_finite_and_correct(dtype, seed):
    """Scores of +-1e4 (q, k ~ 50, d = 16): a -inf - -inf or an exp overflow in the online softmax would show as NaN.

    q and k are integers, so every product and partial sum of q.k is exact in fp32 (|q.k| < 2^24) whatever order the
    dot sums in: the result cannot depend on which BLAS kernels this CPU picks. What is left is the kernel's own
    rounding in base 2: s * scale * log2(e) and the row's log-sum-exp each round at an ulp of |s|·log2(e) ~ 1.5e4, so
    exp2(s·scale·log2e - lse) is off by at most a relative delta = 4 u max|s|·log2(e) (u = 2^-24; two roundings of
    the score, two of lse), about 4e-3. score_rounding_bounds carries that delta through the backward formulas; on top
    sits the usual fp32/fp16 rule relative to each output's natural size. A wrong kernel misses by O(1), not O(delta).
    """
    case = Case(1, 4, 2, 33, 45, 16, scale=0.25)
    q, k, v, do = make_inputs(case, dtype, seed=seed, magnitude=50.0)
    q, k = (t.detach().round().requires_grad_() for t in (q, k))
    assert_within_score_rounding(kernels.flash_attention, q, k, v, do, case, dtype, 1e4)


def assert_within_score_rounding(fn, q, k, v, do, case: Case, dtype, least: float):
    """fn's output and grads against fp64's, within score_rounding_bounds plus the dtype's rule relative to each
    output's natural size, for integer q and k whose largest score is at least ``least`` (see the test above)."""
    scores = q.double() @ k.double().repeat_interleave(case.heads // case.kv_heads, dim=1).transpose(-2, -1)
    scores = scores * case.scale
    assert scores.abs().max() > least  # the inputs really are in the regime under test
    actual = run_with_grads(fn, q, k, v, do, case)
    exact = run_with_grads(ref.flash_attention, q.double(), k.double(), v.double(), do.double(), case)
    delta = 4 * 2.0**-24 * scores.abs().max().item() * math.log2(math.e)
    bounds = score_rounding_bounds(q, k, v, do, case, delta)
    size = {name: t.abs().max().item() for name, t in (("q", q), ("k", k), ("v", v), ("do", do))}
    term = case.scale * size["do"] * size["v"]
    natural = (size["v"], term * size["k"], term * size["q"], size["do"] * case.q_len)
    for name, a, e, n, b in zip(("out", "dq", "dk", "dv"), actual, exact, natural, bounds):
        assert torch.isfinite(a).all(), name
        excess = (a.double() - e).abs() - b - tolerance(dtype, ROUNDINGS)[1] * n
        assert excess.max() <= 0, f"{name}: error exceeds its bound by {excess.max():.3g} (natural size {n:.3g})"


@pytest.mark.parametrize(
    "shapes, kwargs, error, match",
    [
        (((2, 4, 8, 16), (2, 8, 16), (2, 8, 16)), {}, ValueError, "expects q"),
        (((1, 4, 8, 16), (1, 3, 8, 16), (1, 3, 8, 16)), {}, ValueError, "multiple of key/value heads"),
        (((1, 2, 8, 48), (1, 2, 8, 48), (1, 2, 8, 48)), {}, ValueError, "head dim 48"),
        (((1, 2, 8, 16), (2, 2, 8, 16), (2, 2, 8, 16)), {}, ValueError, "batch and head dim"),
        (((1, 2, 9, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {}, ValueError, "T <= S"),
        (((1, 2, 0, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {}, ValueError, "at least one query"),
        (((4096, 32, 1, 16), (4096, 32, 1, 16), (4096, 32, 1, 16)), {}, ValueError, "batch x heads"),
        (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"dtype_k": torch.float16}, TypeError, "share one dtype"),
        (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"dtype_k": torch.int32}, TypeError, "k must be float"),
    ],
)
def test_rejects_bad_inputs(shapes, kwargs, error, match):
    q, k, v = (torch.zeros(s) for s in shapes)
    if "dtype_k" in kwargs:
        k = k.to(kwargs["dtype_k"])
    with pytest.raises(error, match=match):
        kernels.flash_attention(q, k, v)


@GPU_ONLY
@pytest.mark.parametrize("head_dim", [64, 128])
def test_bf16_flashattention_rule(head_dim):
    """bf16 error vs an fp32 reference at most 2x eager bf16 PyTorch's own (plus a tiny floor), output and grads."""
    case = Case(2, 8, 2, 1000, 1000, head_dim)
    q, k, v, do = make_inputs(case, torch.bfloat16)
    expected = fp32_reference(q, k, v, do, case)
    actual = run_with_grads(kernels.flash_attention, q, k, v, do, case)
    baseline = run_with_grads(lambda q, k, v, causal, scale: native_attention(q, k, v), q, k, v, do, case)
    for name, a, b, e in zip(("out", "dq", "dk", "dv"), actual, baseline, expected):
        err, eager_err = (a.float() - e).abs().max().item(), (b.float() - e).abs().max().item()
        assert err <= 2 * eager_err + 1e-5 * e.abs().max().item(), f"{name}: error {err:.3g} vs eager {eager_err:.3g}"


@GPU_ONLY
def test_backward_is_deterministic():
    """No atomics: two backward passes give the same bits (GQA, so dK/dV sum over query heads)."""
    case = Case(2, 8, 2, 1000, 1000, 64)
    q, k, v, do = make_inputs(case, torch.bfloat16)
    first, second = (run_with_grads(kernels.flash_attention, q, k, v, do, case) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
