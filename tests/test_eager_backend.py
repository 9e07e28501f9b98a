"""The fast eager backend (kernels.eager) against the obviously-correct references, forward and backward.

Gold is the reference run in fp64 on the same inputs (upcast after rounding them to the tested dtype), so what is
measured is the eager op's own error. The bound, from the usual rounding analysis, is elementwise

    |eager - gold| <= 2 * (n * u32 + r * u) * max|gold|

n: the longest fp32 accumulation on the path (a sum of n terms errs by at most n * u32 times the sum of their
magnitudes, which the softmax-weighted sums and normalized rows here keep within a small multiple of max|gold|);
r: the roundings to the tested dtype along the path (each one relative u, conftest's UNIT: 2^-24 fp32, 2^-11
fp16, 2^-8 bf16); the 2 covers the gradients, whose chain adds one more term of each kind. Measured relative to the
largest gold element, because softmax-backward and RoPE outputs have components that cancel to near zero.
"""

import pytest
import torch

from smollm_stack import kernels
from conftest import UNIT
from smollm_stack.kernels import cpu_blas, eager, reference

U32 = UNIT[torch.float32]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_near(actual: torch.Tensor, gold: torch.Tensor, dtype: torch.dtype, n: int, r: int, name: str = ""):
    assert actual.shape == gold.shape, name
    bound = 2 * (n * U32 + r * UNIT[dtype]) * gold.abs().max().item()
    err = (actual.double() - gold).abs().max().item()
    assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g}"


def run_both(fn_eager, fn_gold, inputs: list[torch.Tensor], seed: int = 0):
    """Outputs and input gradients of both functions for one shared upstream gradient; gold runs on fp64 copies."""
    ours = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    gold = [x.detach().double().requires_grad_() if x.is_floating_point() else x for x in inputs]
    y, y_gold = fn_eager(*ours), fn_gold(*gold)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (y.double() * dy).sum().backward()
    (y_gold * dy).sum().backward()
    grads = [(a.grad, b.grad) for a, b in zip(ours, gold) if a.is_floating_point()]
    return (y, y_gold), grads


def half_supported(dtype: torch.dtype, fn) -> bool:
    try:
        fn()
        return True
    except RuntimeError:  # an op without a CPU kernel for this dtype
        return dtype == torch.float32


def test_ops_has_the_triton_names():
    names = {"rms_norm", "add_rms_norm", "swiglu", "apply_rope", "cross_entropy", "fused_linear_cross_entropy",
             "flash_attention"}  # fmt: skip
    assert kernels.ops("eager") is eager
    assert names <= set(vars(eager)) and names <= set(vars(reference))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype):
    x = torch.randn(3, 5, 123).to(dtype) * 3
    w = torch.rand(123).to(dtype) + 0.5
    (y, gold), grads = run_both(lambda x, w: eager.rms_norm(x, w, 1e-5), lambda x, w: reference.rms_norm(x, w), [x, w])
    assert y.dtype == dtype
    assert_near(y, gold, dtype, n=123, r=2, name="y")
    for (g, g_gold), name in zip(grads, ("dx", "dw")):
        assert g.dtype == dtype
        assert_near(g, g_gold, dtype, n=3 * 5 * 123, r=3, name=name)  # dw sums over every row


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(dtype):
    """rms_norm's bounds with one more rounding on every path: h = x + r rounded to dtype (gold adds exactly)."""
    x, r = torch.randn(3, 5, 123).to(dtype) * 3, torch.randn(3, 5, 123).to(dtype)
    w = torch.rand(123).to(dtype) + 0.5

    def both(add_rms_norm):  # h and y in one tensor, so one upstream gradient reaches each
        return lambda x, r, w: torch.cat([t.flatten() for t in add_rms_norm(x, r, w, 1e-5)])

    (out, gold), grads = run_both(both(eager.add_rms_norm), both(reference.add_rms_norm), [x, r, w])
    assert out.dtype == dtype
    assert_near(out, gold, dtype, n=123, r=3, name="h, y")
    for (g, g_gold), name in zip(grads, ("dx", "dr", "dw")):
        assert g.dtype == dtype
        assert_near(g, g_gold, dtype, n=3 * 5 * 123, r=4, name=name)


def test_rms_norm_out_dtype():
    """fp32 residual stream in, bf16 out: one rounding, at the end."""
    x, w = torch.randn(4, 77), torch.rand(77) + 0.5
    y = eager.rms_norm(x, w, out_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert_near(y, reference.rms_norm(x.double(), w.double()), torch.bfloat16, n=77, r=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(dtype):
    g = torch.randn(7, 33, 5).to(dtype).transpose(0, 1) * 4  # a strided view
    u = torch.randn(33, 7, 5).to(dtype)
    (y, gold), grads = run_both(eager.swiglu, reference.swiglu, [g, u])
    assert_near(y, gold, dtype, n=1, r=2)
    for (d, d_gold), name in zip(grads, ("dgate", "dup")):
        assert_near(d, d_gold, dtype, n=1, r=3, name=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_row", [False, True])
def test_rope(dtype, per_row):
    """Offsets as in decoding (positions not starting at 0), per-row positions, a head dim that is no power of 2."""
    B, H, T, d = 2, 3, 7, 10
    x = torch.randn(B, T, H, d).to(dtype).transpose(1, 2)  # (B, H, T, d) as the model's view of its projections
    positions = torch.arange(T) + 37
    if per_row:
        positions = torch.stack([positions, torch.randperm(200)[:T]])
    # The angles are fp32 in both (one home for them: the reference's), so only the rotation's roundings differ.
    (y, gold), grads = run_both(
        lambda x: eager.apply_rope(x, positions), lambda x: reference.apply_rope(x, positions), [x]
    )
    assert_near(y, gold, dtype, n=2, r=1)
    assert_near(grads[0][0], grads[0][1], dtype, n=2, r=2, name="dx")


def test_apply_rope_qk_equals_two_calls():
    q, k = torch.randn(2, 4, 9, 12), torch.randn(2, 2, 9, 12)
    positions = torch.arange(9) + 3
    q_rot, k_rot = eager.apply_rope_qk(q, k, positions, 500.0)
    torch.testing.assert_close(q_rot, eager.apply_rope(q, positions, 500.0), rtol=0, atol=0)
    torch.testing.assert_close(k_rot, eager.apply_rope(k, positions, 500.0), rtol=0, atol=0)


ATTENTION_SHAPES = [
    # (B, H, Hkv, T, S, d, causal)
    (2, 6, 2, 37, 37, 16, True),  # GQA, a ragged length
    (1, 4, 4, 19, 19, 10, False),  # MHA, no mask
    (2, 4, 1, 1, 40, 16, True),  # decoding one token: sees every cached key
    (2, 6, 3, 5, 40, 8, True),  # a chunk of 5 queries after 35 cached: the mask aligned to the end
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=str)
def test_flash_attention(dtype, shape):
    B, H, Hkv, T, S, d, causal = shape
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, d, generator=gen).to(dtype)
    k, v = (torch.randn(B, Hkv, S, d, generator=gen).to(dtype) for _ in range(2))
    if not half_supported(dtype, lambda: eager.flash_attention(q, k, v, causal=causal)):
        pytest.skip(f"no CPU attention kernel for {dtype}")
    (y, gold), grads = run_both(
        lambda q, k, v: eager.flash_attention(q, k, v, causal=causal),
        lambda q, k, v: reference.flash_attention(q, k, v, causal=causal),
        [q, k, v],
    )
    assert_near(y, gold, dtype, n=S + d, r=3)  # scores (d terms), then the weighted sum (S terms)
    group = H // Hkv
    for (g, g_gold), name in zip(grads, ("dq", "dk", "dv")):
        assert_near(g, g_gold, dtype, n=2 * (S + d) * group, r=4, name=name)  # dk, dv also sum over the group


def test_flash_attention_rejects_more_queries_than_keys():
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="T <= S"):
        eager.flash_attention(q, k, k, causal=True)


def _with_ignored(targets: torch.Tensor) -> torch.Tensor:
    targets = targets.clone()
    targets.view(-1)[::7] = -100
    return targets


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy(dtype):
    V = 101
    logits = (torch.randn(2, 37, V) * 3).to(dtype)
    targets = _with_ignored(torch.randint(0, V, (2, 37)))
    (loss, gold), grads = run_both(eager.cross_entropy, reference.cross_entropy, [logits, targets])
    assert loss.dtype == torch.float32
    # Per-row log-softmax in fp32 over V terms, the row's loss rounded once to the dtype; the mean over 74 rows.
    assert_near(loss, gold, dtype, n=V + 74, r=1)
    assert_near(grads[0][0], grads[0][1], dtype, n=V, r=2, name="dlogits")


def test_cross_entropy_all_ignored_is_zero():
    logits = torch.randn(3, 11, requires_grad=True)
    loss = eager.cross_entropy(logits, torch.full((3,), -100))
    loss.backward()
    assert loss.item() == 0 and not logits.grad.any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [16, None])
@pytest.mark.parametrize("blas", ["torch", "openblas"])
def test_fused_linear_cross_entropy(dtype, chunk_size, blas):
    """Chunks of 16 rows over 74 (the last one ragged), or the default single chunk; the weight stays fp32. Its
    products through torch's BLAS and through OpenBLAS (kernels.cpu_blas: fp32 only)."""
    if blas == "openblas" and (dtype != torch.float32 or not cpu_blas._openblas()):
        pytest.skip("OpenBLAS multiplies fp32 only, and needs numpy built with it")
    V, dm = 101, 24
    hidden = torch.randn(2, 37, dm).to(dtype)
    weight = torch.randn(V, dm) * 0.3
    targets = _with_ignored(torch.randint(0, V, (2, 37)))
    if not half_supported(dtype, lambda: eager.fused_linear_cross_entropy(hidden, weight, targets)):
        pytest.skip(f"no CPU matmul for {dtype}")
    with cpu_blas.route(blas):
        (loss, gold), grads = run_both(
            lambda h, w, t: eager.fused_linear_cross_entropy(h, w, t, chunk_size=chunk_size),
            lambda h, w, t: reference.fused_linear_cross_entropy(h, w.to(h.dtype), t),  # the matmul in hidden's dtype
            [hidden, weight, targets],
        )
    assert loss.dtype == torch.float32
    # Logits: d terms, rounded to the dtype; log-softmax: V terms; the mean: 74 rows.
    assert_near(loss, gold, dtype, n=dm + V + 74, r=2)
    (dh, dh_gold), (dw, dw_gold) = grads
    assert dh.dtype == dtype and dw.dtype == torch.float32
    assert_near(dh, dh_gold, dtype, n=dm + V + V, r=3, name="dhidden")  # dh = dlogits @ w: V terms
    assert_near(dw, dw_gold, dtype, n=dm + V + 74, r=3, name="dweight")  # dw = dlogits^T @ h: 74 terms


def test_fused_linear_cross_entropy_without_grad_keeps_no_graph():
    hidden, weight = torch.randn(5, 8, requires_grad=True), torch.randn(13, 8)
    with torch.no_grad():
        loss = eager.fused_linear_cross_entropy(hidden, weight, torch.randint(0, 13, (5,)))
    assert loss.grad_fn is None
