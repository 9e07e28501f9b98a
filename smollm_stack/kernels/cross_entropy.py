"""Cross-entropy over the last dim with the gradient produced in the forward pass.

For a row x of width V with target c (n rows not ignored), loss = mean over rows of lse(x) - x[c], and
    dloss/dx = (softmax(x) - onehot(c)) / n,   zero for ignored rows.
One program per row, two ways, chosen by V:
- Single tile (V <= SINGLE_TILE_MAX = 16K): the whole row sits in registers (BLOCK_V = next power of two >= V, at
  most 32 fp32 values a thread at 16 warps), so the row is read once, exp() runs once per element and the gradient
  is written once: 2V bytes in and 2V out for bf16, the minimum. At V = 10000 that is one 16384-lane tile (16384 exps)
  instead of two sweeps of 2 x 8192 lanes (32768 exps and two reads); the masked lanes cost only ALU, and 40 KB
  moved per 16K exps keeps the SFUs an order of magnitude below the memory time. The target's logit is one scalar
  load, not a select-and-sum over the tile, which keeps the 16-warp tile at 62 registers a thread (96 with the sum):
  two CTAs fit on an SM (64K registers / (512 threads x 64)), so one row's loads overlap another's reductions and
  stores instead of the SM's memory pipe idling between rows.
- Loop (larger V): a first sweep keeps a running max m and sum s of exp(x - m) (the online log-sum-exp, fp32
  whatever the input dtype), a second sweep reads the row again and writes the gradient. That second read is HBM
  traffic unless the row is still in L2, so the number of rows in flight is what matters: 1-warp programs let an
  H100 SM hold 32 of them (its CTA cap), 4224 rows of 100 KB at V = 50257, ~420 MB streaming through a 50 MB L2,
  so every second sweep missed: 6 bytes of HBM per bf16 logit, not 4. Here a row gets LOOP_WARPS = 32 warps (1024
  threads, the most a CTA may have), so the 64-warp limit allows at most 2 rows an SM whatever the registers, and
  the registers (44 a thread, Triton 3.9) allow 1: 132 rows, 13 MB in flight at V = 50257 (at most 26.5 MB),
  within half the L2, the other half holding the gradient rows being written, so the second sweep hits L2 and the
  row costs 2V bytes in and 2V out. Each sweep step loads 32 KB an SM (1024 threads x two 16-byte vectors), above
  the ~18 KB an SM must keep in flight for its share of HBM's bandwidth (3 TB/s x ~0.8 us latency / 132 SMs).
  A row is covered in three parts, so its loads and stores are 16-byte vectors at any V, standalone or in FLCE's
  padded buffer (row starts are unaligned when V is odd, e.g. 50257): [head, tail), full LOOP_BLOCK blocks from
  the first 16-byte boundary, unmasked; [tail, vend), the whole 16-byte vectors left, in masked half blocks whose
  mask changes only at vector boundaries, so the masked accesses stay vectors; and the < 2 VEC elements before the
  boundary and after the last whole vector, in one masked step of scalars. At V = 50257: 3 blocks of 16384, one
  half block holding 1104 elements, and 1 + head scalars.

Because the gradient is complete after the forward, the backward only scales it by the upstream gradient in place;
the scale kernel is grid-stride (a few programs per SM) and returns after one scalar load when the upstream gradient
is exactly 1 (the usual case: the loss is the root of the graph), instead of launching N*V/2048 idle programs.

Targets are not range-checked on the host (that would be a host sync per step): a target outside [0, V) that is not
ignore_index is read at a safe index and turns its row's loss and gradient into NaN, so the mean loss is NaN and the
trainer's divergence check stops the run. Token files are range-checked once when the trainer opens them.

Eager PyTorch upcasts the logits to fp32, materializes log-softmax, gathers, and in the backward builds softmax and
the one-hot difference again: several passes over an (N, V) fp32 tensor.

Memory: the gradient goes into a new (N, V) tensor, as large as the logits (1.65 GB of bf16 at 125M's 16 x 1024
tokens), unless the caller passes overwrite_logits=True: then the kernel writes it over the logits, element by
element after reading them, so no second (N, V) tensor exists (the caller's promise that nothing reads the logits
afterwards; the checks that make it safe are in cross_entropy's docstring). The fused linear cross-entropy always
works that way, on a buffer of its own.

The launchers are registered as torch.library custom ops (smollm_stack::cross_entropy, the overwriting
smollm_stack::cross_entropy_overwrite_, which declares its write, and smollm_stack::scale_) with fake
implementations; autograd is a torch.autograd.Function around them (an op that writes an input cannot carry its
own), so torch.compile traces through them without a graph break.
"""

import torch
import triton
import triton.language as tl

from smollm_stack.kernels import _utils

SINGLE_TILE_MAX = 16384  # widest row kept whole in registers; tests lower it to reach the loop on small shapes
LOOP_BLOCK = 16384  # BLOCK_V of the loop path: two 16-byte vectors of bf16 a thread at LOOP_WARPS; tests lower it
LOOP_WARPS = 32  # a row's warps on the loop path: at most 2 rows an SM, so the second sweep reads L2


@triton.jit
def _lse_step(m, s, x):
    """One block of the online log-sum-exp: returns the new running max and sum of exp(x - max)."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    return m_new, s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)


@triton.jit
def _store_grad(src, dst, lanes, target_lane, mask, lse, scale):
    """One block of the gradient: dst = scale * (exp(logits - lse) - onehot) for the logits at src, the one-hot at
    lanes == target_lane (int32 lanes of the block, not int64 columns, which would double its registers); mask None
    for a full block."""
    if mask is None:
        x = tl.load(src)
    else:
        x = tl.load(src, mask=mask, other=0.0)
    grad = tl.exp(x.to(tl.float32) - lse) * scale - tl.where(lanes == target_lane, scale, 0.0)
    tl.store(dst, grad.to(dst.dtype.element_ty), mask=mask)


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
    WRITE_GRAD: tl.constexpr,  # False for a loss without backward (evaluation): skips the gradient
    SINGLE_TILE: tl.constexpr,  # BLOCK_V >= V: the row in registers, one read; else two sweeps
    GRAD_ALIGNED: tl.constexpr,  # stride_grad = stride_logits mod VEC, so grad rows share the logits' alignment
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,  # elements in 16 bytes
    REST_BLOCK: tl.constexpr,  # 2 VEC lanes: the loop path's < 2 VEC elements outside whole vectors
):
    row = tl.program_id(0).to(tl.int64)  # row * V may pass 2^31
    row_off = row * stride_logits
    grad_off = row * stride_grad
    target = tl.load(targets_ptr + row).to(tl.int64)
    ignored = target == ignore_index
    bad = (target < 0) | (target >= V)
    inv_n = 1.0 / tl.maximum(tl.load(n_valid_ptr).to(tl.float32), 1.0)
    scale = tl.where(ignored, 0.0, tl.where(bad, float("nan"), inv_n))  # NaN marks an out-of-range target
    target_logit = tl.load(logits_ptr + row_off + tl.where(bad, 0, target)).to(tl.float32)  # a scalar load
    cols = tl.arange(0, BLOCK_V)

    if SINGLE_TILE:
        mask = cols < V
        x = tl.load(logits_ptr + row_off + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=0)
        e = tl.exp(x - m)
        s = tl.sum(e, axis=0)
        tl.store(loss_ptr + row, (m + tl.log(s) - target_logit) * scale)
        if WRITE_GRAD:
            grad = e * (scale / s) - tl.where(cols == target, scale, 0.0)
            tl.store(grad_ptr + grad_off + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        # The row in three parts (module docstring): [head, tail) in full aligned blocks without masks, [tail, vend)
        # in whole 16-byte vectors masked per vector (n_tail is a multiple of VEC, so the loads stay vectors), and
        # the < 2 VEC elements of [vend, V) and [0, head) in one masked step of scalars.
        head = (VEC - row_off % VEC) % VEC
        tail = head + (V - head) // BLOCK_V * BLOCK_V
        vend = head + (V - head) // VEC * VEC
        n_tail = tl.multiple_of(vend - tail, VEC)
        body = tl.multiple_of(row_off + head, VEC)
        half = tl.arange(0, BLOCK_V // 2)
        rest = vend + tl.arange(0, REST_BLOCK)
        rest_mask = rest < V + head
        rest = tl.where(rest < V, rest, rest - V)
        m = float("-inf")
        s = 0.0
        for start in tl.range(0, tail - head, BLOCK_V):  # from 0, so the compiler knows start % BLOCK_V == 0
            m, s = _lse_step(m, s, tl.load(logits_ptr + body + start + cols).to(tl.float32))
        for start in tl.range(0, n_tail, BLOCK_V // 2):
            x = tl.load(logits_ptr + body + (tail - head) + start + half, mask=start + half < n_tail,
                        other=float("-inf"))
            m, s = _lse_step(m, s, x.to(tl.float32))
        x_rest = tl.load(logits_ptr + row_off + rest, mask=rest_mask, other=float("-inf"))
        m, s = _lse_step(m, s, x_rest.to(tl.float32))
        lse = m + tl.log(s)
        tl.store(loss_ptr + row, (lse - target_logit) * scale)

        if WRITE_GRAD:  # the same three parts again; their reads hit L2 (module docstring)
            if GRAD_ALIGNED:
                grad_body = tl.multiple_of(grad_off + head, VEC)
            else:
                grad_body = grad_off + head
            # target - (a block's first column) fits int32 for a valid target; an ignored or invalid one zeroes
            # or NaNs the whole row through scale, whatever lane it matches
            for start in tl.range(0, tail - head, BLOCK_V):
                _store_grad(logits_ptr + body + start + cols, grad_ptr + grad_body + start + cols, cols,
                            (target - head - start).to(tl.int32), None, lse, scale)
            for start in tl.range(0, n_tail, BLOCK_V // 2):
                offs = tail - head + start
                _store_grad(logits_ptr + body + offs + half, grad_ptr + grad_body + offs + half, half,
                            (target - tail - start).to(tl.int32), start + half < n_tail, lse, scale)
            _store_grad(logits_ptr + row_off + rest, grad_ptr + grad_off + rest, rest, target, rest_mask, lse, scale)


@triton.jit
def _scale_kernel(
    x_ptr,  # contiguous tensor scaled in place
    scale_ptr,  # () the scale, read on the device
    n_elements,
    BLOCK: tl.constexpr,
):
    scale = tl.load(scale_ptr).to(tl.float32)
    if scale != 1.0:  # the common case (loss.backward()) costs one scalar load per program, no traffic
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in tl.range(tl.program_id(0).to(tl.int64) * BLOCK, n_elements, step):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n_elements
            x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
            tl.store(x_ptr + offs, (x * scale).to(x_ptr.dtype.element_ty), mask=mask)


SCALE_BLOCK = 2048  # 4 KiB of bf16 per program and step: 16-byte vectors on every thread of 4 warps


@torch.library.custom_op("smollm_stack::scale_", mutates_args={"x"})
def scale_(x: torch.Tensor, scale: torch.Tensor) -> None:
    """x *= scale in place for a contiguous x we own and a one-element tensor scale, without a host sync."""
    programs = _utils.persistent_programs(x.device, triton.cdiv(x.numel(), SCALE_BLOCK))
    _scale_kernel[(programs,)](x, scale, x.numel(), BLOCK=SCALE_BLOCK, num_warps=4)


@scale_.register_fake
def _(x, scale):
    return None


def _tiling(V: int) -> tuple[bool, int, int]:
    """(single_tile, BLOCK_V, num_warps) for rows of width V (module docstring)."""
    if V <= SINGLE_TILE_MAX:
        block = triton.next_power_of_2(V)
        return True, block, _utils.num_warps_for(block)
    return False, LOOP_BLOCK, LOOP_WARPS


def cross_entropy_forward(
    logits2: torch.Tensor,
    targets: torch.Tensor,
    n_valid: torch.Tensor,
    ignore_index: int,
    grad: torch.Tensor | None,
) -> torch.Tensor:
    """Launch on a (N, V) view: write the gradient of the mean loss into grad (may be logits2, or None for no
    gradient); return the per-row losses, already divided by n_valid.

    The caller counted n_valid, so a chunked caller can pass the whole batch's count.
    """
    N, V = logits2.shape
    losses = _utils.empty((N,), torch.float32, logits2.device)
    single_tile, block_v, warps = _tiling(V)
    vec = 16 // logits2.element_size()
    _cross_entropy_kernel[(N,)](
        logits2, logits2 if grad is None else grad, targets, losses, n_valid, logits2.stride(0),
        0 if grad is None else grad.stride(0), V, ignore_index,
        WRITE_GRAD=grad is not None, SINGLE_TILE=single_tile,
        GRAD_ALIGNED=grad is None or (grad.stride(0) - logits2.stride(0)) % vec == 0,
        BLOCK_V=block_v, VEC=vec, REST_BLOCK=2 * vec, num_warps=warps,
    )  # fmt: skip
    return losses


@torch.library.custom_op("smollm_stack::cross_entropy", mutates_args=())
def _cross_entropy_op(
    logits2: torch.Tensor, targets: torch.Tensor, ignore_index: int, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, its gradient) for (N, V) logits2 and (N,) contiguous targets; the gradient is empty without
    with_grad."""
    n_valid = _utils.count_valid_targets(targets, ignore_index)
    grad = _utils.empty(logits2.shape, logits2.dtype, logits2.device) if with_grad else logits2.new_empty(0)
    return cross_entropy_forward(logits2, targets, n_valid, ignore_index, grad if with_grad else None).sum(), grad


@_cross_entropy_op.register_fake
def _(logits2, targets, ignore_index, with_grad):
    return logits2.new_empty((), dtype=torch.float32), logits2.new_empty(logits2.shape if with_grad else (0,))


@torch.library.custom_op("smollm_stack::cross_entropy_overwrite_", mutates_args={"logits2"})
def _cross_entropy_overwrite_op(logits2: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The mean loss of (N, V) logits2, which are overwritten with its gradient (declared, so the version counter of
    logits2 is bumped and torch.compile sees the write)."""
    n_valid = _utils.count_valid_targets(targets, ignore_index)
    return cross_entropy_forward(logits2, targets, n_valid, ignore_index, logits2).sum()


@_cross_entropy_overwrite_op.register_fake
def _(logits2, targets, ignore_index):
    return logits2.new_empty((), dtype=torch.float32)


class _CrossEntropy(torch.autograd.Function):
    """The gradient is complete after the forward, in a new tensor or over the logits; the backward only scales it."""

    @staticmethod
    def forward(ctx, logits2, targets, ignore_index, overwrite):
        if overwrite:
            loss, grad = _cross_entropy_overwrite_op(logits2, targets, ignore_index), logits2
        else:
            loss, grad = _cross_entropy_op(logits2, targets, ignore_index, True)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        # Scaled in place: a second backward through the same graph fails autograd's saved-tensor version check.
        (grad,) = ctx.saved_tensors
        scale_(grad, dloss)
        return grad, None, None, None


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, *, overwrite_logits: bool = False
) -> torch.Tensor:
    """Mean -log softmax(logits)[target] over non-ignored targets of any leading dims; a fp32 scalar (0 if none).

    A target outside [0, V) that is not ignore_index makes the loss NaN (checked on the device, no host sync).

    overwrite_logits=True writes the gradient over the logits instead of into a new (N, V) tensor (1.65 GB of bf16
    at 125M's 16 x 1024 tokens and V = 50257), for a caller that reads the logits no more after this call: they
    hold the gradient from then on. It applies only when a gradient is computed (logits requiring grad, grad mode
    on); logits whose rows are not contiguous are copied first and stay as they were. What it can check, it does:
    a leaf (a tensor the caller made, whose values are its own) is refused, and the write bumps the logits' version
    counter, so an autograd node that saved them (``exp``, a softcap's ``tanh`` output, ...) fails its backward
    with autograd's "modified by an inplace operation" error instead of computing from the gradient.
    """
    _utils.check_float("logits", logits)
    _utils.check_targets(targets)
    _utils.check_same_device(logits=logits, targets=targets)
    if logits.dim() == 0 or targets.shape != logits.shape[:-1] or logits.numel() == 0:
        raise ValueError(
            f"targets must have shape logits.shape[:-1]; "
            f"got logits {tuple(logits.shape)}, targets {tuple(targets.shape)}"
        )
    logits2, t = _utils.rows_of(logits), targets.reshape(-1).contiguous()  # the kernel reads targets[row] in order
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return _cross_entropy_op(logits2, t, ignore_index, False)[0]  # evaluation: the kernel skips the gradient
    if overwrite_logits and logits.is_leaf:
        raise ValueError("overwrite_logits=True needs logits computed in the graph: a leaf's values are its owner's")
    return _CrossEntropy.apply(logits2, t, ignore_index, overwrite_logits)
