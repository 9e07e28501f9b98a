"""kernels/nesterov.py against the foreach formulas Muon's CPU path runs (torch.lerp), on stacks of matrices of
different layouts, odd sizes, a zero matrix and unaligned addresses; in fp32 and in a bf16 stack (whose values the
interpreter only stores and loads: its own fp32-to-bf16 cast truncates, so a stored value is within one bf16 ulp,
2^-7 relative, of the fp32 one, where a GPU's rounding is within half of it)."""

import pytest
import torch

from smollm_stack.kernels import nesterov

MU = 0.95
U32 = 2.0**-24  # fp32's unit roundoff
# Each lerp, a + w (b - a) or b - (1 - w) (b - a), rounds 3 times, each error at most U32 times a value bounded by
# |a| + |b|; the kernel's and torch's orders and FMA contractions differ, so at most 6 U32 (|a| + |b|) apart. The
# momentum: 6 U32 (|M| + |G|). The look-ahead lerps G with that momentum (|M_new| <= |M| + |G|), adding mu times its
# difference and its own 6 U32 (|G| + |M_new|) <= 6 U32 (2 |G| + |M|): at most 18 U32 (|M| + |G|) in all.
MOMENTUM_ROUNDINGS, LOOK_AHEAD_ROUNDINGS = 6, 18
BF16_ULP = 2.0**-7  # one bf16 ulp relative: the interpreter's truncating cast (module docstring)


def matrices(shapes, seed, zero=()):
    g = torch.Generator().manual_seed(seed)
    return [torch.zeros(s) if i in zero else torch.randn(s, generator=g) for i, s in enumerate(shapes)]


def unaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of t 4 bytes past a 16-byte boundary, so the kernel must not assume 16-byte vectors."""
    buffer = torch.empty(t.numel() + 1)
    return buffer[1:].view(t.shape).copy_(t)


# (stack shape (k, K), the matrices' shapes: wide (k, K) and tall (K, k), the zero one, BLOCK): several tiles of a
# matrix with a ragged last one (BLOCK 16 for 35 elements; 2145 = 2048 + 97 at the real BLOCK), one tile (BLOCK 64)
CASES = [
    ((5, 7), [(5, 7), (7, 5), (5, 7), (7, 5)], (2,), 16),
    ((5, 7), [(7, 5), (5, 7)], (), 64),
    ((33, 65), [(33, 65), (65, 33), (65, 33)], (1,), nesterov.BLOCK),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stack, shapes, zero, block", CASES)
def test_stack_is_the_foreach_look_ahead_and_its_norm(monkeypatch, dtype, stack, shapes, zero, block):
    monkeypatch.setattr(nesterov, "BLOCK", block)
    grads, momenta = matrices(shapes, 0, zero), matrices(shapes, 1, zero)
    momenta[-1] = unaligned(momenta[-1])  # an address off 16 bytes: the launch drops its alignment hint
    want_m = [torch.lerp(m, g, 1 - MU) for m, g in zip(momenta, grads, strict=True)]  # Muon's foreach path
    want_u = [torch.lerp(g, m, MU) for g, m in zip(grads, want_m, strict=True)]
    bounds = [(m.abs() + g.abs()) * U32 for m, g in zip(momenta, grads, strict=True)]
    x = torch.full((len(shapes), *stack), float("nan"), dtype=dtype)  # an element never written stays NaN
    ssq = torch.full((len(shapes),), float("nan"), dtype=torch.float64)
    nesterov.nesterov_(grads, momenta, x, ssq, MU)
    for j, (m, u, bound) in enumerate(zip(want_m, want_u, bounds, strict=True)):
        assert ((momenta[j] - m).abs() <= MOMENTUM_ROUNDINGS * bound).all()
        stored = x[j].view(u.shape).float()
        slack = LOOK_AHEAD_ROUNDINGS * bound + (BF16_ULP * u.abs() if dtype == torch.bfloat16 else 0)
        assert ((stored - u).abs() <= slack).all(), j
    # fp64 squares of the stored values are exact; sums of < 2^12 of them in another order: < 2^12 2^-53 relative
    torch.testing.assert_close(ssq, x.double().square().sum((1, 2)), rtol=1e-12, atol=0)
    before = x.clone()
    nesterov.divide_by_norm_(x, ssq)
    # the same fp64 operations, each correctly rounded, then the roundings to fp32 and the dtype (bf16: the
    # interpreter's truncation against torch's rounding to nearest, one ulp apart at most)
    want = (before.double() * (1 / ssq.clamp_min(1e-300).sqrt())[:, None, None]).float().to(dtype)
    torch.testing.assert_close(x, want, rtol=BF16_ULP if dtype == torch.bfloat16 else 0, atol=0)
    assert [x[j].abs().max().item() == 0 for j in range(len(shapes))] == [j in zero for j in range(len(shapes))]


def test_norm_of_tiny_and_huge_matrices_is_right():
    """No division by the largest entry first: the fp64 squares neither overflow nor flush at fp32's extremes, and the
    factor 1 / norm (up to 2^149 here) is applied in fp64."""
    grads = [torch.full((3, 4), 2.0**-140), torch.full((3, 4), 2.0**120)]  # subnormal fp32; squares past fp32's max
    momenta = [torch.zeros(3, 4), torch.zeros(3, 4)]
    x, ssq = torch.empty(2, 3, 4), torch.empty(2, dtype=torch.float64)
    nesterov.divide_by_norm_(x, nesterov.nesterov_(grads, momenta, x, ssq, 0.0))
    torch.testing.assert_close(x, torch.full((2, 3, 4), 12**-0.5), rtol=U32, atol=0)


def test_bad_arguments_are_clear_errors():
    g, x, ssq = [torch.zeros(2, 3)], torch.zeros(1, 2, 3), torch.zeros(1, dtype=torch.float64)
    with pytest.raises(ValueError, match="1 gradients and momenta"):
        nesterov.nesterov_(g, [], x, ssq, MU)
    with pytest.raises(ValueError, match="contiguous fp32 of 6 elements"):
        nesterov.nesterov_([torch.zeros(3, 2).t()], g, x, ssq, MU)
    with pytest.raises(ValueError, match="ssq must be"):
        nesterov.nesterov_(g, g, x, ssq.float(), MU)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        nesterov.nesterov_(g, g, x.half(), ssq, MU)
    with pytest.raises(ValueError, match="fp64 ssq"):
        nesterov.divide_by_norm_(x, ssq.float())
