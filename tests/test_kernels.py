"""Every Triton kernel against its eager reference: forward and every gradient, awkward shapes, strided views.

On a CPU these run under Triton's interpreter (tests/conftest.py), so shapes are small; bf16 and large shapes need
a GPU and skip without one. Outputs are poisoned with NaN before each launch (kernels._utils.POISON), so an element
a kernel forgets to write fails the comparison. Tolerances: the per-dtype table of tests/conftest.py.
"""

import importlib

import pytest
import torch

from smollm_stack import kernels
from conftest import assert_close
from smollm_stack.kernels import reference
from smollm_stack.kernels.linear_cross_entropy import CHUNK_BUDGET_BYTES, chunk_rows, padded_width
from smollm_stack.kernels.rope import apply_rope_qk
from smollm_stack.model import ModelConfig, TransformerLM

cross_entropy_module = importlib.import_module("smollm_stack.kernels.cross_entropy")  # kernels.cross_entropy is the op

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 and large shapes)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("poison_outputs")
# The interpreter computes bf16 wrongly, so bf16 runs only where there is a GPU.
DTYPES = [torch.float32, torch.float16] + [pytest.param(torch.bfloat16, marks=cuda)]


def run(fn, inputs, upstream=None):
    """fn on fresh leaf copies of inputs, backward with the shared upstream gradient; returns (out, grads)."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    out.backward(torch.ones_like(out) if upstream is None else upstream)
    return out.detach(), [t.grad for t in leaves if t.is_floating_point()]


def assert_matches(fn_kernel, fn_ref, inputs, dtype, upcast_reference=False, upstream=None):
    """Kernel vs reference on the same inputs with one upstream gradient; upcast_reference runs the reference in
    fp32 and rounds its results to dtype (for references whose own math rounds to dtype at every step)."""
    if upstream is None:
        with torch.no_grad():
            shape_of = fn_kernel(*inputs)
        upstream = torch.randn(shape_of.shape, device=shape_of.device).to(shape_of.dtype)
    out, grads = run(fn_kernel, inputs, upstream)
    ref_inputs = [t.float() if upcast_reference and t.is_floating_point() else t for t in inputs]
    ref_out, ref_grads = run(fn_ref, ref_inputs, upstream.to(torch.float32) if upcast_reference else upstream)
    assert_close(out, ref_out.to(out.dtype), dtype)
    assert len(grads) == len(ref_grads)
    for g, rg, t in zip(grads, ref_grads, [t for t in inputs if t.is_floating_point()]):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert_close(g, rg.to(g.dtype), dtype)


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


# ----------------------------------------------------------------------------------------------- rms_norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 123, 123), (3, 7, 93), (1, 3), (2, 640)])
def test_rms_norm(shape, dtype):
    x, w = randn(*shape, dtype=dtype), randn(shape[-1], dtype=dtype, scale=0.3) + 1
    assert_matches(kernels.rms_norm, reference.rms_norm, [x, w], dtype)


def test_rms_norm_strided_input_and_fp32_weight():
    x = randn(7, 93, 5, dtype=torch.float16).transpose(1, 2)  # (7, 5, 93), rows not contiguous
    w = randn(93, scale=0.3) + 1  # fp32 weight with fp16 activations, as under autocast
    assert_matches(lambda x, w: kernels.rms_norm(x, w, eps=1e-3), lambda x, w: reference.rms_norm(x, w, eps=1e-3),
                   [x, w], torch.float16)  # fmt: skip


@pytest.mark.parametrize("out_dtype", [torch.float16, pytest.param(torch.bfloat16, marks=cuda)])
def test_rms_norm_fp32_residual_to_compute_dtype(out_dtype):
    # Autocast's pre-norm: fp32 x and weight in, the compute dtype out, dx back in fp32 from a compute-dtype dy.
    x, w = randn(3, 37, 93), randn(93, scale=0.3) + 1
    upstream = randn(3, 37, 93, dtype=out_dtype)
    out, (dx, dw) = run(lambda x, w: kernels.rms_norm(x, w, out_dtype=out_dtype), [x, w], upstream)
    ref_out, (ref_dx, ref_dw) = run(lambda x, w: reference.rms_norm(x, w, out_dtype=out_dtype), [x, w], upstream)
    assert out.dtype == out_dtype and dx.dtype == torch.float32 and dw.dtype == torch.float32
    assert_close(out, ref_out, out_dtype)  # both round the same fp32 value once
    assert_close(dx, ref_dx, torch.float32)  # the backward is fp32 throughout, from the same dy
    assert_close(dw, ref_dw, torch.float32)


def run_add_norm(fn, inputs, dh, dy):
    """fn (x, r, w) -> (h, y) on fresh leaf copies, backward from dh into h and dy into y (None: that one unused);
    returns (h, y, [dx, dr, dw]), a gradient that nothing reached as zeros."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    h, y = fn(*leaves)
    used = [(out, grad) for out, grad in ((h, dh), (y, dy)) if grad is not None]
    torch.autograd.backward(*zip(*used))
    return h.detach(), y.detach(), [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]


# Tolerances: h = x + r is one fp32 add rounded once to h's dtype on both sides: bitwise equal. y and dw are
# rms_norm's, of the same h. dh_total = dh + (the norm's gradient): the reference rounds the norm's gradient to a
# half h's dtype and then the sum, the kernel the fp32 sum once, so dx and dr are 2 roundings apart.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 37, 123), (3, 7, 93), (1, 3)])  # 111 rows: 7 blocks of 16 over 4 programs
@pytest.mark.parametrize("used", ["h y", "y", "h"])  # a block's add; the last norm's; h alone (no norm gradient)
def test_add_rms_norm(shape, dtype, used):
    x, r, w = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype), randn(shape[-1], dtype=dtype, scale=0.3) + 1
    dh = randn(*shape, dtype=dtype) if "h" in used else None
    dy = randn(*shape, dtype=dtype) if "y" in used else None
    h, y, grads = run_add_norm(kernels.add_rms_norm, [x, r, w], dh, dy)
    ref_h, ref_y, ref_grads = run_add_norm(reference.add_rms_norm, [x, r, w], dh, dy)
    assert torch.equal(h, ref_h) and h.dtype == y.dtype == dtype
    assert_close(y, ref_y, dtype)
    for g, rg, t, roundings in zip(grads, ref_grads, [x, r, w], [2, 2, 1]):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert_close(g, rg, dtype, roundings=roundings)


@pytest.mark.parametrize("out_dtype", [torch.float16, pytest.param(torch.bfloat16, marks=cuda)])
def test_add_rms_norm_fp32_stream_and_compute_dtype_branch(out_dtype):
    # Autocast's block: the fp32 stream x (a strided view), a branch r and y in the compute dtype; dx in fp32 and dr
    # in the compute dtype, each the fp32 dh_total rounded once (as the reference rounds it), from fp32 dh.
    x, r = randn(3, 93, 37).transpose(1, 2), randn(3, 37, 93, dtype=out_dtype)
    w, dh, dy = randn(93, scale=0.3) + 1, randn(3, 37, 93), randn(3, 37, 93, dtype=out_dtype)
    fn = lambda x, r, w: kernels.add_rms_norm(x, r, w, out_dtype=out_dtype)  # noqa: E731
    h, y, (dx, dr, dw) = run_add_norm(fn, [x, r, w], dh, dy)
    ref = lambda x, r, w: reference.add_rms_norm(x, r, w, out_dtype=out_dtype)  # noqa: E731
    ref_h, ref_y, (ref_dx, ref_dr, ref_dw) = run_add_norm(ref, [x, r, w], dh, dy)
    assert (h.dtype, y.dtype, dx.dtype, dr.dtype) == (torch.float32, out_dtype, torch.float32, out_dtype)
    assert torch.equal(h, ref_h)
    assert_close(y, ref_y, out_dtype)
    assert_close(dx, ref_dx, torch.float32)
    assert_close(dr, ref_dr, out_dtype)
    assert_close(dw, ref_dw, torch.float32)


def test_add_rms_norm_gradients_are_separate_tensors():
    # dx and dr hold one value but are never one tensor: accumulating into one leaf's .grad must leave the other's.
    x, r, w = randn(4, 24).requires_grad_(), randn(4, 24).requires_grad_(), randn(24).requires_grad_()
    for _ in range(2):
        h, y = kernels.add_rms_norm(x, r, w)
        torch.autograd.backward([h, y], [torch.ones_like(h), torch.ones_like(y)])
    assert torch.equal(x.grad, r.grad) and x.grad.data_ptr() != r.grad.data_ptr()
    one = [t.detach().clone().requires_grad_() for t in (x, r, w)]
    h, y = kernels.add_rms_norm(*one)
    torch.autograd.backward([h, y], [torch.ones_like(h), torch.ones_like(y)])
    assert_close(x.grad, 2 * one[0].grad, torch.float32)


# ----------------------------------------------------------------------------------------------- swiglu


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 123, 123), (3, 7, 93), (1,)])
def test_swiglu(shape, dtype):
    g, u = randn(*shape, dtype=dtype, scale=3), randn(*shape, dtype=dtype)
    assert_matches(kernels.swiglu, reference.swiglu, [g, u], dtype, upcast_reference=True)


def test_swiglu_strided_inputs():
    g = randn(93, 3, 7).permute(1, 2, 0)
    u = randn(3, 7, 186)[..., ::2]
    assert_matches(kernels.swiglu, reference.swiglu, [g, u], torch.float32)


# ----------------------------------------------------------------------------------------------- rope


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,positions_shape", [((2, 3, 37, 26), (37,)), ((2, 3, 37, 26), (2, 37)),
                                                   ((3, 37, 62), (3, 37)), ((37, 10), (37,))])  # fmt: skip
def test_rope(shape, positions_shape, dtype):
    x = randn(*shape, dtype=dtype)
    positions = torch.randint(0, 2000, positions_shape, device=DEVICE)
    assert_matches(lambda x: kernels.apply_rope(x, positions, theta=500.0),
                   lambda x: reference.apply_rope(x, positions, theta=500.0), [x], dtype)  # fmt: skip


def test_rope_strided_heads_view():
    x = randn(2, 37, 3, 26).transpose(1, 2)  # (B, H, T, d) view of a (B, T, H, d) projection, as in attention
    positions = torch.arange(37, device=DEVICE)
    assert_matches(lambda x: kernels.apply_rope(x, positions), lambda x: reference.apply_rope(x, positions), [x],
                   torch.float32)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_qk_writes_in_the_layout_it_reads(dtype):
    # q, k as attention gets them, (B, H, T, d) views of (B, T, H, d) projections: outputs and gradients keep that
    # layout, so attention reads them in place and the projections' backward gets its gradient as a view.
    q, k = (randn(2, 37, h, 26, dtype=dtype).transpose(1, 2).requires_grad_() for h in (6, 2))
    dq_out, dk_out = (randn(2, 37, h, 26, dtype=dtype).transpose(1, 2) for h in (6, 2))
    positions = torch.arange(37, device=DEVICE)
    out = apply_rope_qk(q, k, positions, theta=500.0)
    grads = torch.autograd.grad(out, (q, k), (dq_out, dk_out))  # as made: no leaf's layout imposed on them
    assert [t.stride() for t in (*out, *grads)] == [q.stride(), k.stride(), q.stride(), k.stride()]
    for x, y, dy, dx in ((q, out[0], dq_out, grads[0]), (k, out[1], dk_out, grads[1])):
        ref_y, (ref_dx,) = run(lambda x: reference.apply_rope(x, positions, 500.0), [x.detach()], dy)
        assert_close(y.detach(), ref_y, dtype)
        assert_close(dx, ref_dx, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("positions_shape", [(37,), (2, 37)])
def test_rope_qk_in_one_launch(positions_shape, dtype):
    # Grouped-query shapes as attention has them: k a strided (B, Hkv, T, d) view of a (B, T, Hkv, d) projection.
    q, k = randn(2, 6, 37, 26, dtype=dtype), randn(2, 37, 2, 26, dtype=dtype).transpose(1, 2)
    positions = torch.randint(0, 2000, positions_shape, device=DEVICE)

    def both(rope):
        return lambda q, k: torch.cat([y.flatten() for y in rope(q, k)])

    def reference_qk(q, k):
        return reference.apply_rope(q, positions, 500.0), reference.apply_rope(k, positions, 500.0)

    assert_matches(both(lambda q, k: apply_rope_qk(q, k, positions, theta=500.0)), both(reference_qk), [q, k], dtype)


# ----------------------------------------------------------------------------------------------- cross-entropy


def _targets(shape, vocab, ignore_every=5):
    t = torch.randint(0, vocab, shape, device=DEVICE)
    t.view(-1)[::ignore_every] = -100
    return t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,vocab", [((37,), 301), ((2, 5), 123), ((5,), 2500)])  # 2500: several vocab blocks
def test_cross_entropy(shape, vocab, dtype):
    logits, t = randn(*shape, vocab, dtype=dtype, scale=3), _targets(shape, vocab)
    assert_matches(lambda x: kernels.cross_entropy(x, t), lambda x: reference.cross_entropy(x, t), [logits], dtype)


@pytest.fixture
def small_ce_blocks(monkeypatch):
    """CE's loop path on interpreter-sized rows: rows wider than 128 loop over blocks of 32, then 16-lane halves."""
    monkeypatch.setattr(cross_entropy_module, "SINGLE_TILE_MAX", 128)
    monkeypatch.setattr(cross_entropy_module, "LOOP_BLOCK", 32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [257, 1031, 100])  # odd: unaligned rows (head + unmasked loop + tail); 100: one tile
@pytest.mark.parametrize("row_pad", [0, 3])  # 3: the gradient's rows (stride vocab) aligned unlike the logits'
def test_cross_entropy_loop_and_single_tile_paths(small_ce_blocks, vocab, row_pad, dtype):
    logits, t = randn(5, vocab + row_pad, dtype=dtype, scale=3)[:, :vocab], _targets((5,), vocab)
    t[2], t[3], t[4] = vocab - 12, 0, vocab - 1  # in the vector tail, the unaligned head and the ragged end
    assert_matches(lambda x: kernels.cross_entropy(x, t), lambda x: reference.cross_entropy(x, t), [logits], dtype)


def test_fused_linear_cross_entropy_loop_path_in_padded_buffer(small_ce_blocks):
    hidden, weight = randn(2, 7, 24), randn(257, 24, scale=0.3)  # rows padded to 320: aligned; 257 = 7 x 32 + 33
    t = _targets((2, 7), 257)
    assert_matches(lambda h, w: kernels.fused_linear_cross_entropy(h, w, t, chunk_size=8),
                   lambda h, w: reference.fused_linear_cross_entropy(h, w, t), [hidden, weight], torch.float32)


def test_cross_entropy_strided_inputs_and_upstream_scale():
    logits = randn(37, 400, scale=3)[:, :301]  # row stride 400
    t = _targets((37, 2), 301)[:, 1]  # stride 2
    upstream = torch.tensor(0.37, device=DEVICE)
    assert_matches(lambda x: kernels.cross_entropy(x, t, ignore_index=-100), lambda x: reference.cross_entropy(x, t),
                   [logits], torch.float32, upstream=upstream)  # fmt: skip


def test_cross_entropy_all_ignored_is_zero():
    logits = randn(4, 17).requires_grad_()
    loss = kernels.cross_entropy(logits, torch.full((4,), 7, device=DEVICE), ignore_index=7)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cross_entropy_overwrite_logits_writes_the_gradient_over_them(dtype):
    # Logits from a matmul, as a model's head makes them (3-D, odd V); the reference's matmul runs in the same dtype.
    hidden, weight, t = randn(3, 7, 24, dtype=dtype), randn(301, 24, dtype=dtype, scale=0.3), _targets((3, 7), 301)
    upstream, held = torch.tensor(0.37, device=DEVICE), []

    def overwriting(h, w):
        held.append(h @ w.t())
        return kernels.cross_entropy(held[-1], t, overwrite_logits=True)

    assert_matches(overwriting, lambda h, w: reference.cross_entropy(h @ w.t(), t), [hidden, weight], dtype,
                   upstream=upstream)  # fmt: skip
    logits = (hidden @ weight.t()).requires_grad_()
    (ref_grad,) = torch.autograd.grad(reference.cross_entropy(logits, t), logits, upstream)
    # their memory holds the gradient, rounded to dtype by the kernel and again by the upstream scale
    assert_close(held[0].detach(), ref_grad, dtype, roundings=2)


def test_cross_entropy_overwrite_logits_never_corrupts_what_others_read():
    x, t = randn(5, 33, scale=3), _targets((5,), 33)
    with pytest.raises(ValueError, match="leaf"):  # the caller's own tensor
        kernels.cross_entropy(x.clone().requires_grad_(), t, overwrite_logits=True)
    z = x.clone().requires_grad_()
    logits = z.exp()  # exp saved its output for its backward: these very logits
    version = logits._version
    loss = kernels.cross_entropy(logits, t, overwrite_logits=True)
    assert logits._version > version  # the forward's write is declared: autograd and torch.compile see it
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    y = x.clone()
    with torch.no_grad():
        kernels.cross_entropy(z * 1, t, overwrite_logits=True)
    kernels.cross_entropy(y, t, overwrite_logits=True)  # no gradient wanted: nothing is written
    assert torch.equal(y, x)


# ----------------------------------------------------------------------------------------------- fused linear CE


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [None, 16])  # 16 tokens: many chunks, the last one ragged
def test_fused_linear_cross_entropy(chunk_size, dtype):
    hidden, weight = randn(3, 37, 48, dtype=dtype), randn(301, 48, dtype=dtype, scale=0.3)
    t = _targets((3, 37), 301)
    assert_matches(lambda h, w: kernels.fused_linear_cross_entropy(h, w, t, chunk_size=chunk_size),
                   lambda h, w: reference.fused_linear_cross_entropy(h, w, t), [hidden, weight], dtype)  # fmt: skip


def test_fused_linear_cross_entropy_mixed_dtypes_strided_and_upstream_scale():
    # Autocast's case: fp16 activations, the fp32 lm_head weight passed raw; each gradient in its input's dtype.
    hidden, weight = randn(29, 2, 40, dtype=torch.float16).transpose(0, 1), randn(97, 40, scale=0.3)
    t = _targets((2, 29, 3), 97)[..., 2]
    upstream = torch.tensor(2.5, device=DEVICE)
    out, (dh, dw) = run(lambda h, w: kernels.fused_linear_cross_entropy(h, w, t, chunk_size=8), [hidden, weight],
                        upstream)  # fmt: skip
    ref_out, (ref_dh, ref_dw) = run(lambda h, w: reference.fused_linear_cross_entropy(h, w.half(), t),
                                    [hidden, weight], upstream)  # fmt: skip
    assert out.dtype == torch.float32 and dh.dtype == torch.float16 and dw.dtype == torch.float32
    assert_close(out, ref_out, torch.float32)
    assert_close(dh, ref_dh, torch.float16)
    assert_close(dw, ref_dw, torch.float16)  # the matmul ran in fp16


def test_fused_linear_cross_entropy_recasts_weight_after_update():
    # The fp32 weight's fp16 copy is reused across calls, so an in-place update (an optimizer step) must invalidate it.
    hidden, weight, t = randn(9, 16, dtype=torch.float16), randn(33, 16), _targets((9,), 33)
    for _ in range(2):
        loss = kernels.fused_linear_cross_entropy(hidden, weight, t, chunk_size=4)
        assert_close(loss, reference.fused_linear_cross_entropy(hidden, weight.half(), t), torch.float16)
        with torch.no_grad():
            weight.mul_(-2.0)


def test_fused_linear_cross_entropy_without_grad_needs_no_backward():
    hidden, weight = randn(9, 16), randn(33, 16)
    t = _targets((9,), 33)
    with torch.no_grad():
        loss = kernels.fused_linear_cross_entropy(hidden, weight, t, chunk_size=4)
    assert_close(loss, reference.fused_linear_cross_entropy(hidden, weight, t), torch.float32)


@pytest.mark.parametrize("tokens,vocab,dtype", [(16384, 50257, torch.bfloat16), (32768, 10000, torch.bfloat16),
                                                (16384, 50257, torch.float32), (1000, 3_000_000, torch.float16),
                                                (26714, 10000, torch.bfloat16)])  # 2 x the most rows that fit
def test_chunk_rows_keep_the_logits_buffer_within_budget(tokens, vocab, dtype):
    rows, row_bytes = chunk_rows(tokens, vocab, dtype), padded_width(vocab) * dtype.itemsize
    assert rows % 128 == 0 and rows * row_bytes <= max(CHUNK_BUDGET_BYTES, 128 * row_bytes)  # 128 rows at least
    assert chunk_rows(16384, 50257, torch.bfloat16) == 2432  # 125M: 7 chunks of 245 MB, not 2 of 824 MB
    assert chunk_rows(100, 50257, torch.bfloat16) == 100  # small batches: one chunk


# ----------------------------------------------------------------------------------------------- contracts


HOST_READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy", "cpu")


def test_training_step_never_reads_device_values_on_the_host(monkeypatch):
    """A training step must queue its work without waiting for the GPU: no tensor value may reach Python.

    On a CPU there is no sync to detect, so every Tensor method that hands a value to the host raises instead. Both
    losses standalone (an upstream gradient of 1 and of 0.5), then a whole step of the Triton model.
    """
    logits, hidden, weight = randn(9, 33, scale=3).requires_grad_(), randn(9, 16), randn(33, 16, scale=0.3)
    hidden.requires_grad_(), weight.requires_grad_()
    t = _targets((9,), 33)
    model = TransformerLM(ModelConfig(vocab_size=33, context_length=8, d_model=64, num_layers=1, num_heads=4,
                                      num_kv_heads=2, d_ff=48, backend="triton")).to(DEVICE)  # fmt: skip
    ids = torch.randint(0, 33, (2, 8), device=DEVICE)

    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor's value was read on the host (a host sync on a GPU)")

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, refuse)
    kernels.cross_entropy(logits, t).backward()
    kernels.fused_linear_cross_entropy(hidden, weight, t, chunk_size=4).backward(torch.tensor(0.5, device=DEVICE))
    model(ids, ids).backward()
    monkeypatch.undo()
    assert logits.grad.isfinite().all() and weight.grad.isfinite().all()
    assert all(p.grad.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize("bad", [33, -3])
def test_out_of_range_target_makes_the_loss_nan(bad):
    logits, hidden, weight = randn(5, 33).requires_grad_(), randn(5, 16), randn(33, 16)
    t = _targets((5,), 33)
    t[2] = bad
    loss = kernels.cross_entropy(logits, t)
    loss.backward()
    assert loss.isnan() and logits.grad[2].isnan().all() and logits.grad[[0, 1, 3, 4]].isfinite().all()
    assert kernels.fused_linear_cross_entropy(hidden, weight, t, chunk_size=2).isnan()



def test_inputs_are_not_modified():
    x, w = randn(3, 7, 93), randn(93)
    logits, t = randn(37, 301), _targets((37,), 301)
    hidden, weight = randn(37, 48), randn(301, 48)
    before = [a.clone() for a in (x, w, logits, hidden, weight)]
    run(kernels.rms_norm, [x, w])
    run(kernels.swiglu, [x, x])
    run(lambda x: kernels.apply_rope(x, torch.arange(7, device=DEVICE)), [x[..., :92]])
    for leaf in (logits, hidden, weight):
        leaf.requires_grad_()
    kernels.cross_entropy(logits, t).backward()
    kernels.fused_linear_cross_entropy(hidden, weight, t, chunk_size=16).backward()
    for a, b in zip((x, w, logits, hidden, weight), before):
        assert torch.equal(a.detach(), b)


def test_second_backward_is_refused():
    logits = randn(5, 11).requires_grad_()
    loss = kernels.cross_entropy(logits, _targets((5,), 11))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: kernels.rms_norm(randn(4, 8).double(), randn(8).double()), TypeError, "float32, float16 or bfloat16"),
        (lambda: kernels.rms_norm(randn(4, 8), randn(7)), ValueError, "weight must have shape"),
        (lambda: kernels.swiglu(randn(4, 8), randn(4, 9)), ValueError, "same shape"),
        (lambda: kernels.swiglu(randn(4, 8), randn(4, 8).half()), TypeError, "same dtype"),
        (lambda: kernels.apply_rope(randn(2, 5, 7), torch.arange(5)), ValueError, "even d"),
        (lambda: kernels.apply_rope(randn(2, 5, 8), torch.arange(6)), ValueError, "positions must be"),
        (lambda: apply_rope_qk(randn(2, 3, 5, 8), randn(2, 1, 5, 6), torch.arange(5)), ValueError, "q and k must be"),
        (lambda: kernels.rms_norm(randn(4, 8), randn(8), out_dtype=torch.int32), TypeError, "out_dtype"),
        (lambda: kernels.add_rms_norm(randn(4, 8), randn(4, 7), randn(8)), ValueError, "r must have x's shape"),
        (lambda: kernels.add_rms_norm(randn(4, 8), randn(4, 8).double(), randn(8)), TypeError, "r must be float32"),
        (lambda: kernels.cross_entropy(randn(4, 8), torch.zeros(3, dtype=torch.long)), ValueError, "targets must"),
        (lambda: kernels.cross_entropy(randn(4, 8), torch.zeros(4)), TypeError, "integer"),
        (lambda: kernels.fused_linear_cross_entropy(randn(4, 8), randn(9, 7), torch.zeros(4, dtype=torch.long)),
         ValueError, "weight must be"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ----------------------------------------------------------------------------------------------- GPU only


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_large_shapes_on_gpu(dtype):
    x, w = randn(4096, 1536, dtype=dtype), randn(1536, dtype=dtype)
    assert_matches(kernels.rms_norm, reference.rms_norm, [x, w], dtype)
    logits, t = randn(4096, 50257, dtype=dtype, scale=3), _targets((4096,), 50257)
    assert_matches(lambda x: kernels.cross_entropy(x, t), lambda x: reference.cross_entropy(x, t), [logits], dtype)


@cuda
def test_cross_entropy_offsets_beyond_int32_on_gpu():
    vocab = 50257
    n = 2**31 // vocab + 3  # rows x vocab > 2^31: the last rows' offsets overflow int32
    logits = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16).requires_grad_()
    t = torch.randint(0, vocab, (n,), device="cuda")
    kernels.cross_entropy(logits, t).backward()
    last = logits.detach()[-3:].float()
    expected = (torch.softmax(last, dim=-1) - torch.nn.functional.one_hot(t[-3:], vocab)) / n
    assert_close(logits.grad[-3:].float(), expected, torch.bfloat16)


def test_readme_snippet_runs_or_says_in_one_line_what_it_needs():
    """The README's kernels snippet as printed: off a GPU without the interpreter, ops("triton") raises one line
    that names TRITON_INTERPRET=1 (not Triton's "0 active drivers" at the first call); with it set, it runs."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", (root / "README.md").read_text(), re.S)
                   if 'kernels.ops("triton")' in b)  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(root)}
    for interpret in ([] if torch.cuda.is_available() else ["0"]) + ["1"]:
        result = subprocess.run([sys.executable, "-c", snippet], env={**env, "TRITON_INTERPRET": interpret},
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        if interpret == "1":
            assert result.returncode == 0, result.stderr[-3000:]
        else:
            last = result.stderr.strip().splitlines()[-1]
            assert last.startswith("RuntimeError: kernels.ops('triton') without a CUDA GPU"), last
            assert "TRITON_INTERPRET=1" in last
