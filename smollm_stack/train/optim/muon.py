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
why the iteration runs in bf16 on a GPU (tensor cores). On a CPU it runs in fp32: bf16 matmuls are emulated on most,
and where the vector units multiply bf16 (AVX512-BF16, AMX) ``$SMOLLM_MUON_CPU_DTYPE=bfloat16`` halves the 17M
preset's iteration but ends the tiny default run worse (bench/records/2026-12-08-cpu-step). Tall matrices are transposed
first so X X^T is the smaller k x k Gram matrix, k = min(m, n): an iteration costs 4 k^2 max(m, n) + 2 k^3 FLOPs,
at d_model 768 about 14 GFLOP for a square matrix's 5 iterations, against the 6 * 768^2 = 3.5 MFLOP per token of
its forward and backward: small next to a step of 10^5 tokens or more.

The step is batched, since a model has few distinct matrix shapes (the 125M preset: 84 matrices, 3 shapes): one
foreach launch updates every momentum and one decays every weight; then per shape the gradients are stacked into a
kept buffer, one foreach launch turns them into the Nesterov look-ahead, the stack goes through one iteration (5 x 3
batched matmuls, each matrix scaled by its own norm, so stacking changes nothing but the matmul kernel), and one
foreach launch adds the updates. Tall matrices iterate transposed, and the last iteration writes its result back in
the parameter's layout (X^T <- a X^T + X^T (b G + c G^2), the Gram matrix G being symmetric), so the update is
contiguous like its parameter. The iteration's buffers are kept from step to step: a step allocates nothing (on a
CPU a fresh large allocation costs its page faults). bench/step.py counts the optimizer's launches and bytes
(bench/records/2026-12-07-muon-batched): the Newton-Schulz matmuls and the passes over the fp32 momenta, weights
and gradients.

Only hidden 2-D weights go to Muon: the embedding is a lookup, not a linear map of its input, and the lm_head's
rows are scored against each other; both, and the norm gains, stay with AdamW (as in the write-up). In DDP every rank
all-reduces the gradients first and then computes the same orthogonalization, so the ranks stay identical.

Under FSDP2 (train/parallel/fsdp.py) each rank holds rows of every matrix: its parameter, gradient and momentum are
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

import functools
import math
import os

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # (a, b, c) of p(s) = a s + b s^3 + c s^5
NS_STEPS = 5
BAND = (0.68, 1.2024)  # where 5 iterations leave each singular value that started at >= 0.003 of the norm
RMS_MATCH = 0.2  # the update's RMS, as an AdamW update's


def orthogonalize(
    u: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype | None = None, workspace: dict | None = None
) -> torch.Tensor:
    """About P Q^T for u = P S Q^T (singular values in BAND), by ``steps`` Newton-Schulz quintic iterations.

    u: (m, n), or a stack (..., m, n) of matrices each orthogonalized on its own (each scaled by its own norm); any
    float dtype. The iteration runs in ``dtype`` (default: bf16 on CUDA, fp32 elsewhere) and the result has u's
    dtype. A zero matrix stays zero. ``workspace`` (a dict) keeps the iteration's buffers from call to call, so a
    step allocates nothing; the result may then be one of them, valid until the next call with the same workspace.
    """
    if u.dim() < 2:
        raise ValueError(f"orthogonalize: expected a matrix, got shape {tuple(u.shape)}")
    dtype = dtype or iteration_dtype(u)
    workspace = {} if workspace is None else workspace
    a, b, c = NS_COEFFICIENTS
    u3 = u.reshape(-1, *u.shape[-2:])  # (batch, m, n): baddbmm below wants one batch dim
    tall = u3.size(-2) > u3.size(-1)
    v = u3.mT if tall else u3  # (batch, k, K), k = min(m, n): the Gram matrix below is then k x k
    x, y = (buffer(workspace, name, v.shape, dtype, u.device) for name in ("x", "y"))
    gram, poly = (buffer(workspace, name, (*v.shape[:2], v.size(1)), dtype, u.device) for name in ("gram", "poly"))
    tiny = torch.finfo(dtype).tiny
    largest = torch.linalg.vector_norm(v, ord=math.inf, dim=(-2, -1), keepdim=True).clamp_min_(tiny)
    torch.div(v, largest, out=x)  # entries <= 1: the squares cannot overflow
    x.div_(torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp_min_(tiny))  # singular values in [0, 1]
    for i in range(steps):
        torch.bmm(x, x.mT, out=gram)
        torch.baddbmm(gram, gram, gram, beta=b, alpha=c, out=poly)  # b G + c G^2, the scalings inside the matmul
        if tall and i == steps - 1:  # the last one in u's layout: X^T <- a X^T + X^T (b G + c G^2), G symmetric
            x = torch.baddbmm(x.mT, x.mT, poly, beta=a, out=buffer(workspace, "out", u3.shape, dtype, u.device))
        else:
            x, y = torch.baddbmm(x, poly, x, beta=a, out=y), x  # a X + (b G + c G^2) X
    if tall and not steps:
        x = x.mT
    return x.reshape(u.shape).to(u.dtype)


def buffer(workspace: dict, name: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The tensor ``name`` of this shape, dtype and device in ``workspace``, made (uninitialized) the first time."""
    key = (name, tuple(shape), dtype, device)
    if key not in workspace:
        workspace[key] = torch.empty(shape, dtype=dtype, device=device)
    return workspace[key]


def same_shape_groups(tensors: list[torch.Tensor]) -> list[list[int]]:
    """Indices of the tensors grouped by (shape, dtype, device), in first-seen order; each DTensor alone."""
    groups: dict = {}
    for i, t in enumerate(tensors):
        key = ("dtensor", i) if isinstance(t, DTensor) else (t.shape, t.dtype, t.device)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def iteration_dtype(u: torch.Tensor) -> torch.dtype:
    """The dtype Newton-Schulz runs in by default: bf16 on CUDA (tensor cores); on a CPU, ``cpu_iteration_dtype``."""
    return torch.bfloat16 if u.device.type == "cuda" else cpu_iteration_dtype()


CPU_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@functools.cache
def cpu_iteration_dtype() -> torch.dtype:
    """fp32, or what ``$SMOLLM_MUON_CPU_DTYPE`` (float32, bfloat16) names: bf16 pays only on a CPU whose vector units
    multiply it (AVX512-BF16, AMX), and there it trades the default run's loss for the 17M preset's speed."""
    choice = os.environ.get("SMOLLM_MUON_CPU_DTYPE", "float32")
    if choice not in CPU_DTYPES:
        raise ValueError(f"$SMOLLM_MUON_CPU_DTYPE must be float32 or bfloat16, got {choice!r}")
    return CPU_DTYPES[choice]


def orthogonalize_sharded(u: DTensor) -> DTensor:
    """``orthogonalize`` of the whole matrix a DTensor ``u`` holds, sharded as ``u`` is (see the module docstring).

    Every rank gathers all of u, runs the same iteration on it, and keeps its own shard: no second collective.
    """
    whole = orthogonalize(u.to(iteration_dtype(u)).full_tensor()).to(u.dtype)  # the same matrix on every rank
    return distribute_tensor(whole, u.device_mesh, u.placements, src_data_rank=None)  # src None: slice locally


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters (see the module docstring): lr, Nesterov momentum ``momentum``, decoupled decay.

    The step is batched by matrix shape (module docstring); ``workspace`` holds its buffers between steps, outside
    the state, so checkpoints hold the momenta alone.
    """

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
        self.workspace: dict = {}

    @torch.no_grad()
    def step(self, closure=None):  # torch's checkpoint helpers call step(closure=None); Muon needs one gradient
        if closure is not None:
            raise ValueError("Muon.step takes no closure: compute the loss and its gradients first")
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads, momenta = [p.grad for p in params], [self._momentum(p) for p in params]
            torch._foreach_lerp_(momenta, grads, 1 - mu)  # M <- mu M + (1 - mu) G
            torch._foreach_mul_(params, 1 - lr * wd)
            for members in same_shape_groups(params):
                updates = self._orthogonalized([grads[i] for i in members], [momenta[i] for i in members], mu)
                alpha = -lr * RMS_MATCH * math.sqrt(max(params[members[0]].shape))
                torch._foreach_add_([params[i] for i in members], updates, alpha=alpha)

    def _momentum(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if not state:
            state["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["momentum"]

    def _orthogonalized(self, grads: list[torch.Tensor], momenta: list[torch.Tensor], mu: float) -> list:
        """The orthogonalized Nesterov look-ahead U = (1 - mu) G + mu M of each of these matrices of one shape."""
        if isinstance(grads[0], DTensor):  # FSDP: one sharded matrix (see the module docstring)
            return [orthogonalize_sharded(grads[0].lerp(momenta[0], mu))]
        u = torch.stack(grads, out=buffer(self.workspace, "u", (len(grads), *grads[0].shape), grads[0].dtype,
                                          grads[0].device))  # fmt: skip
        torch._foreach_lerp_(list(u.unbind(0)), momenta, mu)
        return list(orthogonalize(u, workspace=self.workspace).unbind(0))
