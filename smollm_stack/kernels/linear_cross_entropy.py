"""The lm_head matmul and the cross-entropy in one op, in token chunks, so the (N, V) logits never exist whole.

loss = cross_entropy(hidden @ W^T, targets). For each chunk of tokens:
    logits = h_c @ W^T                  (cuBLAS, in the activation dtype with fp32 accumulation, like autocast)
    loss_c, dlogits = CE kernel         (one Triton launch writes dlogits over the logits buffer in place)
    dh_c  = dlogits @ W                 (straight into the chunk's rows of dhidden)
    dW   += dlogits^T @ h_c             (one cuBLAS addmm into the fp32 dW in place: no per-chunk output or cast;
                                         the first chunk's product, written in fp32, is dW: no zeros first)
The gradients are those of the mean over all non-ignored tokens (the count is taken once, up front), so everything
is finished in the forward; the backward only scales by the upstream gradient, which is skipped on the device when
it is exactly 1.

Memory: eager PyTorch holds the logits in the activation dtype, their fp32 copy, and fp32 softmax/gradient tensors
of the same (N, V) size at once (about 14 bytes a logit for bf16). Here the only (N, V)-shaped buffer is one
chunk's logits, 2 bytes a logit, at most CHUNK_BUDGET_BYTES (256 MiB) on any device: at 125M (16 x 1024 tokens,
V = 50257, rows padded to 50304) seven chunks of 2432 tokens, 245 MB, against 824 MB for two chunks of 8192 when
the budget was 1/64 of an 80 GB card. Each chunk's matmuls stay large (2432 x 768 x 50257: 188 GFLOP, thousands of
output tiles), so cuBLAS runs them at full rate; what more chunks cost is the weight and the fp32 dW read again per
chunk (Vd (2 + 2 + 8) bytes, 0.46 GB a chunk at 125M, under the GEMMs' own FLOP time). Speed: the three matmuls
are the same as eager's, and the loss and its gradient cost one Triton pass instead of eager's many fp32 passes.

Casts. dW accumulates in fp32 inside the matmul (cuBLAS's fp32-output GEMM for bf16/fp16 inputs), where the old
loop wrote each chunk's V x d product in bf16 and cast it up: per chunk 2Vd + 6Vd extra bytes (0.3 GB at 125M) and
one more rounding. The fp32 lm_head weight is cast to the activation dtype once per optimizer step, not once per
call (grad accumulation calls the loss once per micro-batch with the same weight), by kernels/weight_cache.py, which
says when its copy is remade. It saves 6Vd bytes of traffic (0.23 GB at 125M) per micro-batch after the first.

The op is registered as a torch.library custom op (smollm_stack::linear_cross_entropy) with a fake implementation and
autograd, so torch.compile traces through it without a graph break.
"""

import torch
import triton

from smollm_stack.kernels import _utils
from smollm_stack.kernels.cross_entropy import cross_entropy_forward, scale_
from smollm_stack.kernels.stacked_linear import weight_grad
from smollm_stack.kernels.weight_cache import stacked_weight

CHUNK_BUDGET_BYTES = 256 * 2**20  # the most one chunk's logits buffer may take, on any device (module docstring)


def padded_width(vocab_size: int) -> int:
    """Elements in a row of the logits buffer: V rounded up to 64, so every row starts 16-byte aligned."""
    return 64 * triton.cdiv(vocab_size, 64)


def chunk_rows(n_tokens: int, vocab_size: int, dtype: torch.dtype) -> int:
    """Tokens per chunk: the fewest chunks whose buffer fits CHUNK_BUDGET_BYTES, split evenly, in multiples of 128
    (at least 128 rows, whatever the vocabulary)."""
    max_rows = max(1, CHUNK_BUDGET_BYTES // (padded_width(vocab_size) * dtype.itemsize * 128)) * 128
    n_chunks = triton.cdiv(n_tokens, max_rows)
    return min(n_tokens, 128 * triton.cdiv(triton.cdiv(n_tokens, n_chunks), 128))


# cuBLAS's fp32-output GEMM for bf16/fp16 inputs (aten::addmm.dtype, CUDA only, torch >= 2.8); whether its out=
# variant takes dw itself as out, as addmm_ does (then the GEMM accumulates in place: None until first tried).
_HAS_FP32_OUT_ADDMM = "dtype" in torch.ops.aten.addmm.overloads()
_FP32_OUT_IN_PLACE = [None]


def add_dw(dw: torch.Tensor, dlogits: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """dw + dlogits^T @ h for an fp32 dw, the products in the activation dtype and the sums in fp32.

    On the fp32-output path the GEMM writes into dw itself (beta = 1: reads dw once, writes it once). Out of place,
    CUDA's addmm first copies dw into its new output (4 V d bytes read and written more a chunk: 1.08 GB a step at
    125M), which is the fallback where a torch refuses out= aliased with the addend."""
    if dlogits.dtype == dw.dtype:
        return dw.addmm_(dlogits.t(), h)
    if dw.is_cuda and _HAS_FP32_OUT_ADDMM:
        if _FP32_OUT_IN_PLACE[0] is not False:
            try:
                torch.addmm(dw, dlogits.t(), h, out_dtype=torch.float32, out=dw)
                _FP32_OUT_IN_PLACE[0] = True
                return dw
            except RuntimeError:
                if _FP32_OUT_IN_PLACE[0]:  # it worked before: this error is not about aliasing
                    raise
                _FP32_OUT_IN_PLACE[0] = False
        return torch.addmm(dw, dlogits.t(), h, out_dtype=torch.float32)
    return dw.add_(dlogits.t() @ h)  # CPUs (tests) and old torch: the product rounds before the fp32 sum


def linear_cross_entropy_chunks(
    h: torch.Tensor,
    w: torch.Tensor,
    t: torch.Tensor,
    ignore_index: int,
    rows: int,
    need_dh: bool,
    need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The chunked loop on (N, d) h, (V, d) w of one dtype: returns (loss, dh, dw in fp32), grads of the mean loss."""
    N, V = h.shape[0], w.shape[0]
    n_valid = _utils.count_valid_targets(t, ignore_index)
    dh = _utils.empty(h.shape, h.dtype, h.device) if need_dh else None
    dw = None  # the first chunk's product is dW's first value: no zeros to write, and none to read back
    # One logits buffer serves every chunk. Its rows are padded to 64 elements so that each row starts 16-byte
    # aligned (V = 50257 is odd): cuBLAS then takes its aligned fast paths, and the CE kernel vectorizes.
    buffer = torch.empty(min(rows, N), padded_width(V), dtype=h.dtype, device=h.device)
    losses = []
    for start in range(0, N, rows):
        h_c = h[start : start + rows]
        logits = torch.mm(h_c, w.t(), out=buffer[: h_c.shape[0], :V])
        grad = logits if need_dh or need_dw else None  # the kernel overwrites the logits with dlogits
        losses.append(cross_entropy_forward(logits, t[start : start + rows], n_valid, ignore_index, grad))
        if need_dh:
            torch.mm(logits, w, out=dh[start : start + rows])
        if need_dw:
            dw = weight_grad(logits, h_c, torch.float32) if dw is None else add_dw(dw, logits, h_c)
    return torch.cat(losses).sum(), dh, dw


@torch.library.custom_op("smollm_stack::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
    h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, ignore_index: int, chunk_size: int | None,
    need_dh: bool, need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dh, dw) for (N, d) h, (V, d) weight and (N,) contiguous t; a gradient not needed is an empty tensor."""
    rows = chunk_size or chunk_rows(h.shape[0], weight.shape[0], h.dtype)
    # Compute like autocast, explicitly (so autocast itself is switched off): the matmuls run in the activation
    # dtype, on the weight cast once per step, and each gradient returns in its own input's dtype.
    with torch.autocast(h.device.type, enabled=False):
        loss, dh, dw = linear_cross_entropy_chunks(
            h, stacked_weight((weight,), h.dtype), t, ignore_index, rows, need_dh, need_dw
        )
    dh = h.new_empty(0) if dh is None else dh
    return loss, dh, weight.new_empty(0) if dw is None else dw.to(weight.dtype)


@_linear_cross_entropy_op.register_fake
def _(h, weight, t, ignore_index, chunk_size, need_dh, need_dw):
    dh = h.new_empty(h.shape if need_dh else (0,))
    return h.new_empty((), dtype=torch.float32), dh, weight.new_empty(weight.shape if need_dw else (0,))


def _setup_context(ctx, inputs, output):
    ctx.need_dh, ctx.need_dw = inputs[5], inputs[6]
    ctx.save_for_backward(output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # dh and dw have no gradient: autograd need not make zeros of their shapes


def _backward(ctx, dloss, _dh, _dw):
    # Scaled in place: a second backward through the same graph fails autograd's saved-tensor version check.
    dh, dw = ctx.saved_tensors
    for grad, needed in ((dh, ctx.need_dh), (dw, ctx.need_dw)):
        if needed:
            scale_(grad, dloss)
    return dh if ctx.need_dh else None, dw if ctx.need_dw else None, None, None, None, None, None


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, targets) without materializing the logits; a fp32 scalar.

    hidden (..., d) and weight (V, d) may differ in dtype (bf16 activations, fp32 weight): the matmuls run in
    hidden's dtype and each gradient comes back in its input's dtype. chunk_size (tokens per chunk) overrides the
    memory-derived default; tests use it to force many chunks. An out-of-range target makes the loss NaN.
    """
    _utils.check_float("hidden", hidden)
    _utils.check_float("weight", weight)
    _utils.check_targets(targets)
    _utils.check_same_device(hidden=hidden, weight=weight, targets=targets)
    if weight.dim() != 2 or hidden.dim() == 0 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be (V, {hidden.shape[-1] if hidden.dim() else 'd'}), got {tuple(weight.shape)} "
            f"for hidden {tuple(hidden.shape)}"
        )
    if targets.shape != hidden.shape[:-1] or hidden.numel() == 0:
        raise ValueError(
            f"targets must have shape hidden.shape[:-1]; "
            f"got hidden {tuple(hidden.shape)}, targets {tuple(targets.shape)}"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    grad = torch.is_grad_enabled()
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).contiguous()  # the kernel reads targets[row] with unit stride
    loss, _, _ = _linear_cross_entropy_op(
        h, weight, t, ignore_index, chunk_size, grad and hidden.requires_grad, grad and weight.requires_grad
    )
    return loss
