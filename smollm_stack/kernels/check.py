"""Correctness check of every Triton kernel against its reference, at the shapes a model really uses.

The rule is FlashAttention's: in a low-precision dtype neither the kernel nor eager PyTorch is exact, so each is
compared with a high-precision "gold" run of the reference (fp64 inputs), and the kernel passes when its error is at
most twice eager PyTorch's own error in the same dtype, plus a tiny floor for quantities eager gets exactly right.
Forward outputs and every input gradient are checked, all driven by one shared upstream gradient.

Used by ``python -m smollm_stack.bench.gpu_check`` and by the trainer's preflight.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from smollm_stack import kernels
from smollm_stack.kernels import reference

# Error may exceed 2x eager's by this much, relative to the quantity's largest magnitude: covers quantities eager
# computes (nearly) exactly, e.g. an fp32 loss, where "2x of ~0" would demand bit-exactness.
RELATIVE_FLOOR = 1e-6


@dataclass
class CheckResult:
    op: str  # e.g. "rms_norm"
    quantity: str  # "out", "loss" or "d<input>"
    dtype: str  # input dtype, e.g. "bfloat16"
    err: float  # max |kernel - gold|
    eager_err: float  # max |eager - gold|, same dtype as the kernel
    limit: float  # 2 * eager_err + floor
    ok: bool


def _run(fn: Callable, inputs: dict[str, torch.Tensor], upstream: torch.Tensor) -> dict[str, torch.Tensor]:
    """fn on fresh leaves, then backward with the upstream gradient; returns the output and each float input's grad."""
    # Integer inputs (targets, positions) stay leaves without grad.
    leaves = {name: t.detach().clone().requires_grad_(t.is_floating_point()) for name, t in inputs.items()}
    out = fn(**leaves)
    out.backward(upstream.to(out.dtype))
    results = {"out": out.detach()}
    results.update({f"d{name}": t.grad for name, t in leaves.items() if t.is_floating_point()})
    return results


def native_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention as plain eager PyTorch code runs it: both matmuls and the softmax in the input dtype.

    This is the baseline of the FlashAttention rule. Our reference upcasts to fp32 inside, so its low-precision
    error is only the final rounding: far stricter than what eager attention in bf16 achieves.
    """
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~reference.causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _compare(op: str, dtype: torch.dtype, fn_kernel, fn_ref, fn_eager, inputs, upstream) -> list[CheckResult]:
    gold_inputs = {n: t.double() if t.is_floating_point() else t for n, t in inputs.items()}
    gold = _run(fn_ref, gold_inputs, upstream.double())
    eager = _run(fn_eager, inputs, upstream)
    ours = _run(fn_kernel, inputs, upstream)
    results = []
    for quantity, g in gold.items():
        err = (ours[quantity].double() - g).abs().max().item()
        eager_err = (eager[quantity].double() - g).abs().max().item()
        limit = 2 * eager_err + RELATIVE_FLOOR * max(1.0, g.abs().max().item())
        name = "loss" if quantity == "out" and g.dim() == 0 else quantity
        results.append(CheckResult(op, name, str(dtype).removeprefix("torch."), err, eager_err, limit, err <= limit))
    return results


def check_kernels(
    *,
    batch_size: int,
    seq_len: int,
    d_model: int,
    d_ff: int,
    num_heads: int,
    num_kv_heads: int,
    vocab_size: int,
    rope_theta: float = 10000.0,
    dtype: torch.dtype,
    device: torch.device | str,
    seed: int = 0,
) -> list[CheckResult]:
    """Check every Triton op (forward and gradients) against the references at one model's shapes."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    B, T, H, Hkv = batch_size, seq_len, num_heads, num_kv_heads
    hd = d_model // num_heads
    targets = torch.randint(0, vocab_size, (B, T), generator=gen, device=device)
    targets[:, -1] = -100  # the usual padding pattern: some ignored positions
    positions = torch.arange(T, device=device)
    logits_scale = 2.0  # logits of a partly trained model: softmax neither uniform nor one-hot

    # Inputs are built one op at a time (lambdas), so the fp64 gold runs of the big ones never coexist.
    cases = [
        ("rms_norm", kernels.rms_norm, reference.rms_norm, (B, T, d_model),
         lambda: {"x": randn(B, T, d_model), "weight": randn(d_model, scale=0.2) + 1}),
        ("add_rms_norm", lambda x, r, weight: torch.stack(kernels.add_rms_norm(x, r, weight)),
         lambda x, r, weight: torch.stack(reference.add_rms_norm(x, r, weight)), (2, B, T, d_model),  # (h, y)
         lambda: {"x": randn(B, T, d_model), "r": randn(B, T, d_model), "weight": randn(d_model, scale=0.2) + 1}),
        ("swiglu", kernels.swiglu, reference.swiglu, (B, T, d_ff),
         lambda: {"gate": randn(B, T, d_ff), "up": randn(B, T, d_ff)}),
        ("apply_rope", lambda x, positions: kernels.apply_rope(x, positions, rope_theta),
         lambda x, positions: reference.apply_rope(x, positions, rope_theta), (B, H, T, hd),
         lambda: {"x": randn(B, H, T, hd), "positions": positions}),
        ("cross_entropy", kernels.cross_entropy, reference.cross_entropy, (),
         lambda: {"logits": randn(B * T, vocab_size, scale=logits_scale), "targets": targets.view(-1)}),
        ("fused_linear_cross_entropy", kernels.fused_linear_cross_entropy, reference.fused_linear_cross_entropy, (),
         lambda: {"hidden": randn(B, T, d_model), "targets": targets,
                  "weight": randn(vocab_size, d_model, scale=logits_scale * d_model**-0.5)}),
        ("flash_attention", kernels.flash_attention, reference.flash_attention, (B, H, T, hd),
         lambda: {"q": randn(B, H, T, hd), "k": randn(B, Hkv, T, hd), "v": randn(B, Hkv, T, hd)}),
    ]  # fmt: skip
    results = []
    for op, fn_kernel, fn_ref, out_shape, make_inputs in cases:
        # Losses get the usual upstream gradient of 1 (fp32); other outputs a random one in their dtype.
        upstream = randn(*out_shape) if out_shape else torch.ones((), device=device)
        fn_eager = native_attention if op == "flash_attention" else fn_ref
        results += _compare(op, dtype, fn_kernel, fn_ref, fn_eager, make_inputs(), upstream)
    return results


def format_check_table(results: list[CheckResult]) -> str:
    """A markdown table, one row per checked quantity."""
    lines = [
        "| op | quantity | dtype | error | eager error | limit | ok |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.op} | {r.quantity} | {r.dtype} | {r.err:.3g} | {r.eager_err:.3g} | {r.limit:.3g} | "
            f"{'yes' if r.ok else '**NO**'} |"
        )
    return "\n".join(lines)
