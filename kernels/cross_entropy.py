"""Cross-entropy over the last dim with the gradient produced in the forward pass.

For a row x of width V with target c (n rows not ignored), loss = mean over rows of lse(x) - x[c], and
    dloss/dx = (softmax(x) - onehot(c)) / n,   zero for ignored rows.
One program per row: a first sweep over vocab blocks keeps a running max m and sum s of exp(x - m) (the online
log-sum-exp, fp32 whatever the input dtype), then a second sweep writes the gradient. Because the gradient is
complete after the forward, the backward only scales it by the upstream gradient, which is skipped on the device
when that is exactly 1 (the usual case: the loss is the root of the graph).

Eager PyTorch upcasts the logits to fp32, materializes log-softmax, gathers, and in the backward builds softmax and
the one-hot difference again: several passes over an (N, V) fp32 tensor. Here the logits are read twice (the
second read mostly from L2 for a 20-100 KB row) and the gradient written once in the input dtype.
"""

import torch
import triton
import triton.language as tl

from kernels import _utils


@triton.jit
def _cross_entropy_kernel(
    logits_ptr,  # (N, V) logits, row stride stride_logits, contiguous columns
    grad_ptr,  # (N, V) gradient out, row stride stride_grad; may be logits_ptr itself (in-place, per element)
    targets_ptr,  # (N,) integer targets
    loss_ptr,  # (N,) fp32 per-row loss, already divided by n_valid
    n_valid_ptr,  # () number of non-ignored targets, read on the device so the host never waits for it
    stride_logits,
    stride_grad,
    V,
    ignore_index,
    WRITE_GRAD: tl.constexpr,  # False for a loss without backward (evaluation): skips the second sweep
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * V may pass 2^31
    logits_ptr += row * stride_logits
    grad_ptr += row * stride_grad
    target = tl.load(targets_ptr + row)
    ignored = target == ignore_index
    inv_n = 1.0 / tl.maximum(tl.load(n_valid_ptr).to(tl.float32), 1.0)
    cols = tl.arange(0, BLOCK_V)

    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        x = tl.load(logits_ptr + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)

    target_logit = tl.load(logits_ptr + tl.where(ignored, 0, target)).to(tl.float32)
    scale = tl.where(ignored, 0.0, inv_n)
    tl.store(loss_ptr + row, (lse - target_logit) * scale)

    if WRITE_GRAD:
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            x = tl.load(logits_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            grad = (tl.exp(x - lse) - tl.where(start + cols == target, 1.0, 0.0)) * scale
            tl.store(grad_ptr + start + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_kernel(
    x_ptr,  # contiguous tensor scaled in place
    scale_ptr,  # () the scale, read on the device
    n_elements,
    BLOCK: tl.constexpr,
):
    scale = tl.load(scale_ptr).to(tl.float32)
    if scale != 1.0:  # the common case (loss.backward()) costs one scalar load per program, no traffic
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        tl.store(x_ptr + offs, (x * scale).to(x_ptr.dtype.element_ty), mask=mask)


def scale_(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x *= scale in place for a contiguous x we own and a one-element tensor scale, without a host sync."""
    block = 2048
    _scale_kernel[(triton.cdiv(x.numel(), block),)](x, scale, x.numel(), BLOCK=block, num_warps=4)
    return x


def cross_entropy_forward(
    logits2: torch.Tensor,
    targets: torch.Tensor,
    n_valid: torch.Tensor,
    ignore_index: int,
    grad: torch.Tensor | None,
) -> torch.Tensor:
    """Launch on a (N, V) view: write the gradient of the mean loss into grad (may be logits2, or None for no
    gradient); return the per-row losses, already divided by n_valid.

    The caller has range-checked targets and counted n_valid, so a chunked caller can pass the whole batch's count.
    """
    N, V = logits2.shape
    losses = _utils.empty((N,), torch.float32, logits2.device)
    block_v = min(triton.next_power_of_2(V), 1024 if _utils.INTERPRET else 8192)
    _cross_entropy_kernel[(N,)](
        logits2, logits2 if grad is None else grad, targets, losses, n_valid, logits2.stride(0),
        0 if grad is None else grad.stride(0), V, ignore_index,
        WRITE_GRAD=grad is not None, BLOCK_V=block_v, num_warps=_utils.num_warps_for(block_v),
    )
    return losses


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, with_grad: bool) -> torch.Tensor:
        logits2 = _utils.rows_of(logits)
        targets = targets.reshape(-1).contiguous()  # the kernel reads targets[row] with unit stride
        n_valid = _utils.count_valid_targets(targets, logits2.shape[1], ignore_index)
        grad = _utils.empty(logits2.shape, logits.dtype, logits.device) if with_grad else None
        loss = cross_entropy_forward(logits2, targets, n_valid, ignore_index, grad).sum()
        # Kept on ctx, not saved: backward scales this buffer in place, so it must be used once.
        ctx.grad = grad
        ctx.logits_shape = logits.shape
        return loss

    @staticmethod
    def backward(ctx, dloss: torch.Tensor):
        if ctx.grad is None:
            raise RuntimeError("cross_entropy's backward can run only once per forward: it scales in place")
        grad, ctx.grad = ctx.grad, None
        return scale_(grad, dloss).view(ctx.logits_shape), None, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean -log softmax(logits)[target] over non-ignored targets of any leading dims; a fp32 scalar (0 if none)."""
    _utils.check_float("logits", logits)
    _utils.check_same_device(logits=logits, targets=targets)
    if logits.dim() == 0 or targets.shape != logits.shape[:-1] or logits.numel() == 0:
        raise ValueError(
            f"targets must have shape logits.shape[:-1]; "
            f"got logits {tuple(logits.shape)}, targets {tuple(targets.shape)}"
        )
    # Without a backward to come (evaluation, no_grad) the kernel skips writing the gradient.
    with_grad = torch.is_grad_enabled() and logits.requires_grad
    return CrossEntropyFunction.apply(logits, targets, ignore_index, with_grad)
