"""Muon: momentum, then the nearest semi-orthogonal matrix to it, as the update of each hidden weight matrix.

Muon (Keller Jordan et al., 2024, "Muon: An optimizer for hidden layers in neural networks"; the optimizer of the
modded-nanogpt speedruns) treats a weight matrix W (m x n) as a linear map and steps it along the orthogonalized
momentum. For gradient G at each step:

    M <- mu M + (1 - mu) G                           momentum (an average of the gradients)
    U <- (1 - mu) G + mu M                           Nesterov: look one momentum step ahead
    O <- orthogonalize(U) ~ P Q^T, where U = P S Q^T is the SVD: every singular value set to (about) 1
    W <- W (1 - lr wd) - lr * 0.2 sqrt(max(m, n)) * O

Why: the gradient of a matrix is typically close to low rank, so plain SGD or Adam spends the step along a few
dominant directions; O has the same singular vectors with all singular values equal, so rare directions get the same
step size as common ones. An m x n matrix with unit singular values has RMS 1 / sqrt(max(m, n)), so the scale
0.2 sqrt(max(m, n)) gives the update the RMS 0.2 of a typical AdamW update (Liu et al., 2025, "Muon is Scalable for
LLM Training"): one learning rate and one weight decay serve both optimizers, and ``--max-lr`` keeps its meaning.

Orthogonalizing without an SVD: the Newton-Schulz quintic. Divide U by its Frobenius norm, which puts every singular
value in [0, 1], then repeat X <- a X + b (X X^T) X + c (X X^T)^2 X. With X = P S Q^T, X X^T = P S^2 P^T, so one
iteration is P (a S + b S^3 + c S^5) Q^T: each singular value goes through the scalar polynomial
p(s) = a s + b s^3 + c s^5 and the singular vectors stay. The coefficients (a, b, c) = (3.4445, -4.7750, 2.0315) of
the Muon write-up trade exactness for speed: the slope p'(0) = 3.44 lifts small singular values fast, and in exchange
the iterates do not converge to 1 but into a band: p maps [0, 1] into [0, 1.2024] and [0.68, 1.2024] into itself, and
after 5 iterations every singular value that started at >= 0.003 of the norm lies in [0.68, 1.2024] (a grid over s
shows it; tests/test_muon.py checks it). Since the band is attracting, rounding errors do not accumulate, which is
why the iteration runs in bf16 on a GPU (tensor cores). On a CPU, where bf16 matmuls are emulated and slow, it runs
in fp32. Tall matrices are transposed first so X X^T is the smaller k x k Gram matrix, k = min(m, n): an iteration
costs 4 k^2 max(m, n) + 2 k^3 FLOPs, at d_model 768 about 14 GFLOP for a square matrix's 5 iterations, against the
6 * 768^2 = 3.5 MFLOP per token of its forward and backward: small next to a step of 10^5 tokens or more.

Only hidden 2-D weights go to Muon: the embedding is a lookup, not a linear map of its input, and the lm_head's
rows are scored against each other; both, and the norm gains, stay with AdamW (as in the write-up). In DDP every rank
all-reduces the gradients first and then computes the same orthogonalization, so the ranks stay identical.

Under FSDP2 (train/fsdp.py) each rank holds rows of every matrix: its parameter, gradient and momentum are
``Shard(0)`` DTensors, and the momentum stays that way (optimizer state is 1/W of the matrices on each of W ranks).
Orthogonalization is not row by row, so ``orthogonalize_sharded`` gathers the whole U on every rank
(``full_tensor``, in the iteration's dtype: bf16 on a GPU, half the bytes of fp32 for the same rounded input), runs
the same deterministic iteration everywhere, and keeps the rows of its own shard. Its cost, for the P hidden-matrix
elements (85M of the 125M preset's N = 124M) on W ranks, in bf16: each rank receives 2 P (W - 1) / W bytes a step
(150 MB at W = 8), next to the 8 N (W - 1) / W (870 MB) of FSDP's own two all-gathers of the bf16 parameters and
reduce-scatter of the fp32 gradients; and each rank runs every matrix's iteration (1.7 TFLOP a step for the 125M
preset), exactly as under DDP: about 12% of the forward and backward of 16 sequences of 1024 tokens a rank. The
cheaper design, modded-nanogpt's distributed Muon, gives each matrix an owner rank: the shards go to the owner, it
alone orthogonalizes, and the result goes back, so a rank receives 4 P (W - 1) / W^2 bytes (37 MB at W = 8) and
computes 1/W of the iterations. We chose the simple one: it needs no matrix-to-rank assignment, no load balancing of
unequal shapes and no point-to-point or all-to-all collectives, just one ``full_tensor`` per matrix, it is the
1-process update up to fp32 rounding (tests/test_fsdp_muon.py), and its cost is DDP Muon's. The owner scheme is the
step to take when the iteration shows in a profile (at large W and small batches a rank).
"""

import math

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # (a, b, c) of p(s) = a s + b s^3 + c s^5
NS_STEPS = 5
BAND = (0.68, 1.2024)  # where 5 iterations leave each singular value that started at >= 0.003 of the norm
RMS_MATCH = 0.2  # the update's RMS, as an AdamW update's


def orthogonalize(u: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype | None = None) -> torch.Tensor:
    """About P Q^T for u = P S Q^T (singular values in BAND), by ``steps`` Newton-Schulz quintic iterations.

    u: (m, n), or a stack (..., m, n) of matrices each orthogonalized on its own; any float dtype. The iteration
    runs in ``dtype`` (default: bf16 on CUDA, fp32 elsewhere) and the result has u's dtype. A zero matrix stays zero.
    """
    if u.dim() < 2:
        raise ValueError(f"orthogonalize: expected a matrix, got shape {tuple(u.shape)}")
    dtype = dtype or iteration_dtype(u)
    a, b, c = NS_COEFFICIENTS
    x = u.to(dtype).reshape(-1, *u.shape[-2:])  # (batch, m, n): baddbmm below wants one batch dim
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT  # (n, m): the Gram matrix below is then n x n
    tiny = torch.finfo(dtype).tiny
    x = x / x.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(tiny)  # entries <= 1: the squares cannot overflow
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp_min(tiny)  # singular values into [0, 1]; zero stays zero
    for _ in range(steps):
        gram = x @ x.mT  # (k, k), k = min(m, n)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b G + c G^2, the scalings inside the matmul
        x = torch.baddbmm(x, poly, x, beta=a)  # a X + (b G + c G^2) X
    return (x.mT if tall else x).reshape(u.shape).to(u.dtype)


def orthogonalize_all(updates: list[torch.Tensor]) -> list[torch.Tensor]:
    """``orthogonalize`` of each update; the plain tensors of one shape go through one batched iteration.

    A model has few distinct matrix shapes (the tiny preset: 28 matrices, 3 shapes), and on a CPU the iteration of
    a small matrix is dominated by each op's fixed cost: the tiny preset's 28 updates orthogonalized 1.5-2x faster
    stacked than one by one (bench/RESULTS.md). Each matrix is scaled by its own norm, so the batch changes
    nothing but the matmul kernel.
    """
    out: list = [orthogonalize_sharded(u) if isinstance(u, DTensor) else None for u in updates]
    groups: dict[tuple, list[int]] = {}
    for i, u in enumerate(updates):
        if out[i] is None:
            groups.setdefault((u.shape, u.dtype, u.device), []).append(i)
    for members in groups.values():
        for i, o in zip(members, orthogonalize(torch.stack([updates[i] for i in members]))):
            out[i] = o
    return out


def iteration_dtype(u: torch.Tensor) -> torch.dtype:
    """The dtype Newton-Schulz runs in by default: bf16 on CUDA (tensor cores), fp32 elsewhere (bf16 is emulated)."""
    return torch.bfloat16 if u.device.type == "cuda" else torch.float32


def orthogonalize_sharded(u: DTensor) -> DTensor:
    """``orthogonalize`` of the whole matrix a DTensor ``u`` holds, sharded as ``u`` is (see the module docstring).

    Every rank gathers all of u, runs the same iteration on it, and keeps its own shard: no second collective.
    """
    whole = orthogonalize(u.to(iteration_dtype(u)).full_tensor()).to(u.dtype)  # the same matrix on every rank
    return distribute_tensor(whole, u.device_mesh, u.placements, src_data_rank=None)  # src None: slice locally


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters (see the module docstring): lr, Nesterov momentum ``momentum``, decoupled decay."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(
                f"Muon: need lr >= 0, 0 <= momentum < 1, weight_decay >= 0; got {lr}, {momentum}, {weight_decay}"
            )
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes matrices only, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):  # torch's checkpoint helpers call step(closure=None); Muon needs one gradient
        if closure is not None:
            raise ValueError("Muon.step takes no closure: compute the loss and its gradients first")
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            for p, update in zip(params, orthogonalize_all([self._nesterov(p, mu) for p in params])):
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr * RMS_MATCH * math.sqrt(max(p.shape)))

    def _nesterov(self, p: torch.Tensor, mu: float) -> torch.Tensor:
        """Updates p's momentum with its gradient and returns the Nesterov look-ahead U (module docstring)."""
        state = self.state[p]
        if not state:
            state["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        m = state["momentum"]
        m.lerp_(p.grad, 1 - mu)
        return p.grad.lerp(m, mu)


class Optimizers:
    """Several optimizers stepped, zeroed, checkpointed and scheduled as one (``param_groups`` spans them all)."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict):
        saved = state.get("optimizers")
        if saved is None or len(saved) != len(self.optimizers):
            raise ValueError("the checkpoint's optimizer state is not this optimizer's (was it --optimizer ours?)")
        for o, s in zip(self.optimizers, saved):
            o.load_state_dict(s)
