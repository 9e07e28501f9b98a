"""Several projections of one input in one GEMM: (x W1^T, ..., x Wn^T) = split(x [W1; ...; Wn]^T), on a per-step copy.

The model's q, k, v (and SwiGLU's W1, W3) are separate (out_i, d) parameters, so their names, checkpoints, the CS336
adapters and the HF export stay as they are; the GEMM runs against their stacked copy in the compute dtype
(kernels/weight_cache.py: made once per optimizer step, not cast by autocast on every forward). Bytes, for k
weights of out_i rows (n = sum out_i), N tokens of width d and 2-byte activations, against k separate products:
    forward   x read once, not k times:                              saves 2 N d (k - 1), and k - 1 launches
    backward  dx = dy [W1; ...; Wk] in one GEMM: one dx written, not
              k of them summed by k - 1 adds (read 2, write 1 each):  saves 8 N d (k - 1), and 2 (k - 1) launches
              dW = dy^T x in one GEMM, x read once:                   saves 2 N d (k - 1), and k - 1 launches
              the fp32 weight gradients from one product:              k - 1 launches
Where the device has a GEMM from bf16 to fp32 (CUDA), dW comes out of it in fp32, with no cast after it: the cast
read the bf16 product and wrote fp32 (6 bytes a weight element), the GEMM writes 2 more, so 4 bytes a weight element
and a launch a projection are saved (48 launches a step at the 125M preset), and the gradient is no longer rounded
to bf16 on its way to the fp32 weights.
The outputs are views of the one (N, n) product; their gradients must come back as one (N, n) tensor. They already
are when the consumer wrote them side by side into one buffer (the Triton SwiGLU and RoPE-attention backwards do:
free), else one torch.cat copies them (4 N n bytes, one launch: the eager backend's case). For q, k, v (k = 3,
n = 3 d): 4 N d less in the forward, 20 N d less in the backward; for W1, W3 (k = 2): 2 N d and 10 N d less; no cat
for either (bench.step counts exactly these).

FLOPs are those of the separate products: 2 N n d each way for the activations, 2 N n d for dW.

The GEMM is a torch.library custom op (smollm_stack::stacked_linear) with a fake implementation and autograd, so
torch.compile traces through it without a graph break and the copy's cache is consulted at run time; so are the
backward's two GEMMs (smollm_stack::stacked_linear_backward), whose copy, traced, would be remade on every step (48
launches and 0.5 GB a 125M step, as bench.step --compile counted it). Its autograd saves the weights themselves, so
editing one in place between forward and backward fails as it would for F.linear. Compiled, the gradients of the
outputs come back through one torch.cat even where the consumer wrote them side by side: tracing cannot see that
they share a buffer (bench.step --compile counts 60 cat launches and 5 GB a 125M step); eager, they are free.
"""

import torch

from smollm_stack.kernels import _utils
from smollm_stack.kernels.cpu_blas import linear, mm
from smollm_stack.kernels.weight_cache import stacked_weight


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


@torch.library.custom_op("smollm_stack::stacked_linear", mutates_args=())
def _stacked_linear_op(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """x (..., d) @ cat(weights)^T in x's dtype: (..., sum of the weights' rows)."""
    with torch.autocast(x.device.type, enabled=False):  # x is in the compute dtype already, and so is the copy
        w = stacked_weight(weights, x.dtype)
        return mm(_rows(x), w.t()).view(*x.shape[:-1], w.shape[0])


@_stacked_linear_op.register_fake
def _(x, weights):
    return x.new_empty(*x.shape[:-1], sum(w.shape[0] for w in weights))


def _setup_context(ctx, inputs, output):
    x, weights = inputs
    ctx.save_for_backward(x, *weights)


@torch.library.custom_op("smollm_stack::stacked_linear_backward", mutates_args=())
def _stacked_linear_backward_op(
    dy: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor], need_dx: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx = dy [W1; ...; Wn] or an empty tensor, dW = dy^T x as one (sum of rows, d) tensor in the weights' dtype).

    An op of its own, as the forward is, so that under torch.compile the copy's cache is consulted when it runs: traced
    into the compiled backward, the stacking would be a copy of every weight on every step."""
    dy2 = _rows(dy)
    with torch.autocast(x.device.type, enabled=False):
        dx = mm(dy2, stacked_weight(weights, dy.dtype)).view(x.shape) if need_dx else dy.new_empty(0)
        return dx, weight_grad(dy2, _rows(x), weights[0].dtype)


@_stacked_linear_backward_op.register_fake
def _(dy, x, weights, need_dx):
    dx = dy.new_empty(x.shape if need_dx else (0,))
    return dx, weights[0].new_empty(sum(w.shape[0] for w in weights), x.shape[-1])


def _backward(ctx, dy):
    x, *weights = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    dx, dw = _stacked_linear_backward_op(dy, x, weights, need_dx)
    return dx if need_dx else None, list(dw.split([w.shape[0] for w in weights]))  # each grad a view of its rows


def weight_grad(dy2: torch.Tensor, x2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dy^T x in the weights' ``dtype``: where the device has a GEMM from the activation dtype to fp32 (cuBLAS's
    ``mm(out_dtype=)``), that one product, with no bf16 rounding of the gradient and no cast; else the product in
    the activation dtype and one cast."""
    if dy2.dtype != dtype and _utils.fp32_output_gemm(dy2.device):
        return torch.mm(dy2.t(), x2, out_dtype=dtype)
    return mm(dy2.t(), x2).to(dtype)


_stacked_linear_op.register_autograd(_backward, setup_context=_setup_context)


def _side_by_side(grads: list[torch.Tensor]) -> torch.Tensor | None:
    """The one tensor whose last dim the grads tile in order, if they are such views of one buffer, else None."""
    first = grads[0]
    offset, width = first.storage_offset(), 0
    for g in grads:
        if (not torch._C._is_alias_of(g, first) or g.stride() != first.stride() or g.shape[:-1] != first.shape[:-1]
                or g.stride(-1) != 1 or g.storage_offset() != offset + width):  # fmt: skip
            return None
        width += g.shape[-1]
    return first.as_strided((*first.shape[:-1], width), first.stride(), offset)


class _SplitLast(torch.autograd.Function):
    """y.split(sizes, -1) as views; the backward gives back the buffer its gradients already share, else a cat."""

    @staticmethod
    def forward(ctx, y, sizes):
        return tuple(y.split(sizes, -1))  # an unused output's gradient comes as zeros (materialize_grads)

    @staticmethod
    def backward(ctx, *grads):
        packed = None if torch.compiler.is_compiling() else _side_by_side(grads)  # compiled: a cat (docstring)
        return (torch.cat(grads, -1) if packed is None else packed), None


def stacked_linear(x: torch.Tensor, weights) -> tuple[torch.Tensor, ...]:
    """(x W1^T, ..., x Wn^T) for x (..., d) and (out_i, d) weights, from one GEMM on their per-step stacked copy.

    Under autocast the product runs in the autocast dtype, as F.linear's would; the outputs are views of one
    (..., sum out_i) tensor. A single weight already in the compute dtype needs no copy: it is plain ``linear``.
    """
    weights = list(weights)
    if not weights or any(w.dim() != 2 or w.shape[1] != x.shape[-1] for w in weights):
        raise ValueError(f"stacked_linear needs x (..., d) and (out, d) weights; got {tuple(x.shape)}, "
                         f"{[tuple(w.shape) for w in weights]}")  # fmt: skip
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    if len(weights) == 1 and weights[0].dtype == dtype:
        return (linear(x.to(dtype), weights[0]),)
    y = _stacked_linear_op(x.to(dtype), weights)
    return _SplitLast.apply(y, [w.shape[0] for w in weights]) if len(weights) > 1 else (y,)
