"""The optimizer and gradient clipping: two small pieces with no state of their own
beyond what ``torch.optim.Optimizer`` keeps (so they checkpoint through ``optimizer.state_dict()``).

Two implementations of the optimizer step (AdamW and the clipping before it), chosen by ``TrainConfig.optimizer``:
"torch" (also the AdamW half of the default, Muon) is PyTorch's fastest for the device, its fused AdamW where it
has one (a single kernel per parameter for the whole update: on the 2-core CPU 5x faster than the foreach version
for the 17M preset) and ``clip_grad_norm_``; "ours" is the readable version below, the same update, kept and
tested equal to torch's.
"""

import math
from collections import defaultdict
from collections.abc import Iterable

import torch


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019), step for step the update of ``torch.optim.AdamW``.

    For each parameter p with gradient g, at step t (from 1):
        p <- p - lr * weight_decay * p                          (decay applied to the weights, not the gradient)
        m <- beta1 * m + (1 - beta1) * g
        v <- beta2 * v + (1 - beta2) * g^2
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    Each line is one ``torch._foreach_*`` call over all parameters of a group (at the same t), so a step costs a
    handful of kernel launches instead of a handful per parameter.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ):
        if lr < 0:
            raise ValueError(f"AdamW: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamW: betas must be in [0, 1), got {betas}")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"AdamW: eps and weight_decay must be >= 0, got eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            by_step = defaultdict(list)  # parameters that skipped steps (no grad) have their own t
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                by_step[state["step"]].append(p)
            for t, params in by_step.items():
                grads = [p.grad for p in params]
                m = [self.state[p]["exp_avg"] for p in params]
                v = [self.state[p]["exp_avg_sq"] for p in params]
                torch._foreach_mul_(params, 1 - lr * wd)
                torch._foreach_lerp_(m, grads, 1 - beta1)
                torch._foreach_mul_(v, beta2)
                torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
                denom = torch._foreach_sqrt(v)
                torch._foreach_div_(denom, math.sqrt(1 - beta2**t))
                torch._foreach_add_(denom, eps)
                torch._foreach_addcdiv_(params, m, denom, value=-lr / (1 - beta1**t))
        return loss


OPTIMIZERS = ("torch", "ours")
# Devices with a fused AdamW kernel in torch; elsewhere torch.optim.AdamW's foreach update is its fastest.
FUSED_ADAMW_DEVICES = ("cpu", "cuda", "mps", "xpu")


def make_adamw(name: str, param_groups: list[dict], device: torch.device, **hyper) -> torch.optim.Optimizer:
    """AdamW over param_groups: ours, or torch's (fused where the device has the kernel, foreach otherwise)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if name == "ours":
        return AdamW(param_groups, **hyper)
    fused = torch.device(device).type in FUSED_ADAMW_DEVICES
    return torch.optim.AdamW(param_groups, **hyper, fused=fused, foreach=None if fused else True)


def clip_gradients(name: str, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to max_norm with the chosen implementation; the norm before, as a tensor."""
    if name == "ours":
        return clip_grad_norm(params, max_norm)
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale all gradients together so that their global L2 norm is at most ``max_norm``; return the norm before.

    The norm is a fp32 tensor (no host sync): the scale min(1, max_norm / (norm + 1e-6)) is applied unconditionally
    rather than behind an ``if``, so the step never waits on the GPU. Parameters without a gradient are skipped.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads)]))
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, scale.to(grads[0].dtype))
    return norm
