"""RoPE on q and k, then attention, as one op whose backward hands dq, dk, dv back side by side in one buffer.

The model's q, k, v are views of one (B, T, (H + 2 Hkv) d) projection output (kernels/stacked_linear.py), so their
gradients must come back as one tensor of that layout. Run as two ops, RoPE's backward writes dq and dk into buffers
of their own and attention's writes dv into a third, and the projection's backward joins them with a torch.cat: it
reads and writes the (B, T, (H + 2 Hkv) d) gradient once more, 4 B T (H + 2 Hkv) d bytes in bf16 (at 125M, B 16, T 1024,
H = Hkv = 12, d 64: 151 MB a layer, 1.81 GB and 12 launches a step, bench.step).

Here the backward allocates that one (B, T, H + 2 Hkv, d) buffer, the attention backward kernels write dq and dk (still
rotated) and dv straight into its head slices (they address every tensor by its strides, kernels/attention.py's
"Layouts"), and the inverse rotation then runs in place on the dq and dk slices: RoPE is elementwise per pair, and
the op owns the buffer. The bytes of the kernels are unchanged (attention writes dq, dk, dv once, RoPE reads and
writes dq, dk once), the cat is gone. The backward op returns the whole buffer, so no output aliases another or an
input (torch.library's rule); its three head slices are taken outside it, by the autograd formula, as views, and
_SplitLast finds them side by side (eager mode; under torch.compile Inductor plans the gradients itself).

The forward is the two launches of apply_rope_qk and flash_attention; it also returns the rotated q and k, which the
backward needs (as the separate ops saved them), and asks autograd for no zero-filled gradients of the outputs
nobody differentiates: the rotated q and k, and the log-sum-exp, whose zeros the separate attention op's autograd
made (one launch and 4 B H T bytes a layer: 12 launches, 9.4 MB a step at 125M).
"""

import torch

from smollm_stack.kernels import attention, rope
from smollm_stack.kernels._utils import empty


def _heads(qkv: torch.Tensor, H: int, Hkv: int) -> list[torch.Tensor]:
    """The (B, H, T, d), (B, Hkv, T, d), (B, Hkv, T, d) views of a (B, T, H + 2 Hkv, d) tensor's heads."""
    return [x.transpose(1, 2) for x in qkv.split([H, Hkv, Hkv], 2)]


@torch.library.custom_op("smollm_stack::rope_flash_attention", mutates_args=())
def _rope_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, theta: float,
    doc_start: torch.Tensor | None, doc_end: torch.Tensor | None, causal: bool, scale: float, atomic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(O, LSE, rotated q, rotated k)."""
    q_rot, k_rot = rope.rope_launch(q, k, positions, theta, False)
    return *attention._forward(q_rot, k_rot, v, causal, scale, doc_start), q_rot, k_rot


@_rope_attention_op.register_fake
def _(q, k, v, positions, theta, doc_start, doc_end, causal, scale, atomic):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32), torch.empty_like(q), torch.empty_like(k)


@torch.library.custom_op("smollm_stack::rope_flash_attention_backward", mutates_args=())
def _rope_attention_backward_op(
    do: torch.Tensor, q_rot: torch.Tensor, k_rot: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    positions: torch.Tensor, theta: float, doc_start: torch.Tensor | None, doc_end: torch.Tensor | None, causal: bool,
    scale: float, atomic: bool,
) -> torch.Tensor:
    """(B, T, H + 2 Hkv, d): dq, dk, dv side by side, each head's row of d contiguous."""
    B, H, T, d = q_rot.shape
    Hkv = k_rot.shape[1]
    dqkv = empty((B, T, H + 2 * Hkv, d), q_rot.dtype, q_rot.device)
    dq, dk, dv = _heads(dqkv, H, Hkv)
    attention._backward(do, q_rot, k_rot, v, o, lse, causal, scale, doc_start, doc_end, atomic, out=(dq, dk, dv))
    rope.rope_launch(dq, dk, positions, theta, True, out=(dq, dk))  # un-rotate in place
    return dqkv


@_rope_attention_backward_op.register_fake
def _(do, q_rot, k_rot, v, o, lse, positions, theta, doc_start, doc_end, causal, scale, atomic):
    B, H, T, d = q_rot.shape
    return q_rot.new_empty(B, T, H + 2 * k_rot.shape[1], d)


def _setup_context(ctx, inputs, output):
    _, _, v, positions, ctx.theta, doc_start, doc_end, ctx.causal, ctx.scale, ctx.atomic = inputs
    o, lse, q_rot, k_rot = output
    ctx.save_for_backward(q_rot, k_rot, v, o, lse, positions, doc_start, doc_end)
    ctx.set_materialize_grads(False)  # the rotated q, k are outputs only to be saved: no zeros for their gradients


def _backward(ctx, do, _dlse, _dq_rot, _dk_rot):
    q_rot, k_rot, v, o, lse, positions, doc_start, doc_end = ctx.saved_tensors
    dqkv = _rope_attention_backward_op(do, q_rot, k_rot, v, o, lse, positions, ctx.theta, doc_start, doc_end,
                                       ctx.causal, ctx.scale, ctx.atomic)  # fmt: skip
    return *_heads(dqkv, q_rot.shape[1], k_rot.shape[1]), *(None,) * 7


_rope_attention_op.register_autograd(_backward, setup_context=_setup_context)


def rope_flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0,
    causal: bool = True, scale: float | None = None, doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """flash_attention(*apply_rope_qk(q, k, positions, theta), v, causal, scale, doc_ids), with one buffer for the
    gradients of q, k, v: q (B, H, T, d), k and v (B, Hkv, T, d), positions (T,) or (B, T)."""
    rope.check_qk(q, k, positions)
    doc_start, doc_end, scale = attention.checked(q, k, v, causal, scale, doc_ids)
    q, k = rope._as_bhtd(q), rope._as_bhtd(k)
    return _rope_attention_op(q, k, v, positions, theta, doc_start, doc_end, causal, scale,
                              attention._atomic_backward())[0]  # fmt: skip
