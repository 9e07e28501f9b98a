"""The lm_head matmul and the cross-entropy in one op, in token chunks, so the (N, V) logits never exist whole.

loss = cross_entropy(hidden @ W^T, targets). For each chunk of tokens:
    logits = h_c @ W^T                  (cuBLAS, in the activation dtype with fp32 accumulation, like autocast)
    loss_c, dlogits = CE kernel         (one Triton launch writes dlogits over the logits buffer in place)
    dh_c  = dlogits @ W                 (straight into the chunk's rows of dhidden)
    dW   += dlogits^T @ h_c             (summed across chunks in fp32)
The gradients are those of the mean over all non-ignored tokens (the count is taken once, up front), so everything
is finished in the forward; the backward only scales by the upstream gradient, which is skipped on the device when
it is exactly 1.

Memory: eager PyTorch holds the logits in the activation dtype, their fp32 copy, and fp32 softmax/gradient tensors
of the same (N, V) size at once (about 14 bytes a logit for bf16). Here the only (N, V)-shaped buffer is one
chunk's logits, 2 bytes a logit, sized by CHUNK_BUDGET_FRACTION of the device's memory. Speed: the three matmuls are
the same as eager's, and the loss and its gradient cost one Triton pass instead of eager's many fp32 passes.
"""

import torch
import triton

from kernels import _utils
from kernels.cross_entropy import cross_entropy_forward, scale_

# One chunk's logits may take 1/64 of the device's memory (1.25 GB on an 80 GB card: two chunks of 8192 tokens at
# V = 50257), which keeps each matmul large enough for cuBLAS to run at full speed while staying far below eager.
CHUNK_BUDGET_FRACTION = 1 / 64
# Without a device memory figure (CPU), a fixed budget of the same order.
CPU_CHUNK_BUDGET_BYTES = 256 * 2**20


def chunk_rows(n_tokens: int, vocab_size: int, dtype: torch.dtype, device: torch.device) -> int:
    """Tokens per chunk: as many as the logits budget allows, split evenly, rounded up to a multiple of 128."""
    if device.type == "cuda":
        budget = torch.cuda.get_device_properties(device).total_memory * CHUNK_BUDGET_FRACTION
    else:
        budget = CPU_CHUNK_BUDGET_BYTES
    max_rows = max(128, int(budget // (vocab_size * dtype.itemsize)))
    n_chunks = triton.cdiv(n_tokens, max_rows)
    return min(n_tokens, 128 * triton.cdiv(triton.cdiv(n_tokens, n_chunks), 128))


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
    n_valid = _utils.count_valid_targets(t, V, ignore_index)
    dh = _utils.empty(h.shape, h.dtype, h.device) if need_dh else None
    dw = None
    # One logits buffer serves every chunk. Its rows are padded to 64 elements so that each row starts 16-byte
    # aligned (V = 50257 is odd): cuBLAS then takes its aligned fast paths, and the CE kernel vectorizes.
    buffer = torch.empty(min(rows, N), 64 * triton.cdiv(V, 64), dtype=h.dtype, device=h.device)
    losses = []
    for start in range(0, N, rows):
        h_c = h[start : start + rows]
        logits = torch.mm(h_c, w.t(), out=buffer[: h_c.shape[0], :V])
        grad = logits if need_dh or need_dw else None  # the kernel overwrites the logits with dlogits
        losses.append(cross_entropy_forward(logits, t[start : start + rows], n_valid, ignore_index, grad))
        if need_dh:
            torch.mm(logits, w, out=dh[start : start + rows])
        if need_dw:
            # Summed in fp32 across chunks, so the activation dtype's rounding happens once per chunk, not per sum.
            dw_c = logits.t() @ h_c
            dw = dw_c.float() if dw is None else dw.add_(dw_c)
    return torch.cat(losses).sum(), dh, dw


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk_size: int | None, with_grad: bool):
        h = hidden.reshape(-1, hidden.shape[-1])
        t = targets.reshape(-1).contiguous()  # the kernel reads targets[row] with unit stride
        rows = chunk_size or chunk_rows(h.shape[0], weight.shape[0], h.dtype, h.device)
        # Compute like autocast, explicitly (so autocast itself is switched off): the matmuls run in the activation
        # dtype, an fp32 weight cast once, and each gradient returns in its own input's dtype.
        with torch.autocast(h.device.type, enabled=False):
            loss, dh, dw = linear_cross_entropy_chunks(
                h, weight.to(h.dtype), t, ignore_index, rows,
                need_dh=with_grad and ctx.needs_input_grad[0], need_dw=with_grad and ctx.needs_input_grad[1],
            )  # fmt: skip
        ctx.grads = (
            None if dh is None else dh.view(hidden.shape),
            None if dw is None else dw.to(weight.dtype),
        )
        return loss

    @staticmethod
    def backward(ctx, dloss):
        if ctx.grads is None:
            raise RuntimeError(
                "fused_linear_cross_entropy's backward can run only once per forward: it scales its gradients in place"
            )
        (dh, dw), ctx.grads = ctx.grads, None
        dh = None if dh is None else scale_(dh, dloss)
        dw = None if dw is None else scale_(dw, dloss)
        return dh, dw, None, None, None, None


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
    memory-derived default; tests use it to force many chunks.
    """
    _utils.check_float("hidden", hidden)
    _utils.check_float("weight", weight)
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
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, ignore_index, chunk_size, with_grad)
