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
why the iteration runs in bf16 on a GPU (tensor cores). On a CPU it runs in bf16 only where that pays: where the
vector units multiply bf16 (AVX512-BF16, AMX; elsewhere torch emulates it, slower than fp32) and the matrix's smaller
side k is at least BF16_CPU_MIN_K = 256. There the iteration is a large share of a small CPU step (the 17M preset's
d_model 512 at 2,048 tokens: its 165 GFLOP against the forward and backward's ~220), and bf16 halves it; at the tiny
preset's k = 128 it is a few percent of the step, and fp32 keeps the default run where it was
(bench/records/2026-12-08-muon-cpu-auto). ``$SMOLLM_MUON_CPU_DTYPE`` (float32, bfloat16) overrides the choice.

Tall matrices are transposed first so X X^T is the smaller k x k Gram matrix, k = min(m, n): an iteration costs
4 k^2 max(m, n) + 2 k^3 FLOPs, at d_model 768 about 14 GFLOP for a square matrix's 5 iterations, against the
6 * 768^2 = 3.5 MFLOP per token of its forward and backward: small next to a step of 10^5 tokens or more.

The step is batched: matrices that iterate in one k x K shape (a tall one as its transpose) form one stack, and a
model has few (the 125M preset: 84 matrices, 2 stacks: 48 of 768 x 768, and the FFN's 24 tall 2048 x 768 beside its
12 768 x 2048). Each pass is argued by its bytes per hidden-matrix element (fp32: 4, the bf16 iteration: 2).
On CUDA (plain tensors; kernels/nesterov.py), per stack:
- one Triton launch updates every momentum, writes every look-ahead U into a kept bf16 buffer, each matrix in its
  own layout, and sums each tile of U's squares in fp64 (reads G and M, writes M and U: 8 + 4 + 2 = 14 bytes); the
  gradients keep G (the trainer drops them right after the step anyway); one torch sum over the tiles, in a fixed
  order, so the step is bitwise reproducible;
- one more divides each matrix by its Frobenius norm (2 + 2 = 4). One pass suffices: U is kept unscaled in bf16,
  which has fp32's exponent range, and no fp64 square of it overflows or underflows (the kernel's docstring argues
  it), so nothing needs dividing by the largest entry first.
Elsewhere (the CPU; FSDP's DTensors, the gathered path below), foreach launches over all matrices:
- one updates every momentum (reads M and G, writes M: 12 bytes);
- one more turns every gradient into its look-ahead U in place (reads G and M, writes G: 12), so the step leaves U in
  each ``p.grad``. Keeping G would put U elsewhere: stacking the gradients into an fp32 buffer, then the look-ahead
  there, moved 8 + 12;
- per stack, one foreach copy casts the U's into a kept bf16 buffer (4 + 2 = 6), each matrix in its own layout;
- each matrix of the stack is divided by its largest entry, then by its Frobenius norm, in place (2 + 4 + 2 + 4 = 12):
  two passes, so the squares in the norm neither overflow nor all underflow, at any gradient scale.
Then, on every device:
- 5 iterations of 3 batched GEMMs, each matrix scaled by its own norm, so stacking changes nothing but the GEMM
  kernel. The first iteration reads the tall matrices transposed in their layout (one more GEMM launch for X X^T and
  one for the update; then the stack has one layout). Each iteration is X <- P X with P = a I + b G + c G^2, a on
  P's diagonal (k numbers a matrix), not a X + (b G + c G^2) X: CUDA's baddbmm copies its addend into its output
  before the GEMM (an uncounted pass: 4 bytes an element an iteration; the GEMM making P from G still copies G, k^2
  a matrix). In the last iteration P = s (a I + b G + c G^2): the update's scale s rides in the GEMM that makes P,
  and P X writes the fp32 update (s O) straight in each parameter's layout (a tall one's is X^T P = (P X)^T, P
  symmetric), where a bf16 result, a cast to fp32 and a scaled add moved 2 + 6 more;
- one foreach launch applies every update with the weight decay folded in: W + lr wd (T - W), with
  T = s O = -(0.2 sqrt(max(m, n)) / wd) O, is W (1 - lr wd) - lr 0.2 sqrt(max(m, n)) O (reads W and T, writes W: 12;
  a decay pass and an add moved 8 + 12). Without decay it is W + T, T = -lr 0.2 sqrt(max(m, n)) O. T must stay
  finite, so a decay is 0 or at least MIN_WEIGHT_DECAY.
That is 14 + 4 + 12 = 30 bytes an element besides the GEMMs on CUDA, in 3 launches a stack before the iteration (the
two kernels and the sum between them) and one for the update (54 on the foreach path, whose passes before the
iteration take 27 launches at the 125M preset where the kernels take 6; 74 before these fusions; reading G, M and W
and writing M and W once would be 20). On a CPU the stack is fp32 (the copy 8, the normalization 24). The
iteration's buffers are kept from step to step: a step allocates nothing but the kernel's table of addresses and
tile sums (on a CPU a fresh large allocation costs its page faults). bench/step.py counts the optimizer's launches
and bytes; tests/test_bench_step.py holds the counts of one step by hand.

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

from smollm_stack.kernels import _utils as kernel_utils

try:
    from smollm_stack.kernels import nesterov
except ImportError:  # no triton (no wheels off Linux): the foreach look-ahead everywhere
    nesterov = None

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # (a, b, c) of p(s) = a s + b s^3 + c s^5
NS_STEPS = 5
BAND = (0.68, 1.2024)  # where 5 iterations leave each singular value that started at >= 0.003 of the norm
RMS_MATCH = 0.2  # the update's RMS, as an AdamW update's
MIN_WEIGHT_DECAY = 1e-30  # below it, the step's target -(0.2 sqrt(max(m, n)) / wd) O could overflow


def orthogonalize(u: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """About P Q^T for u = P S Q^T (singular values in BAND), by NS_STEPS Newton-Schulz quintic iterations.

    u: (m, n), or a stack (..., m, n) of matrices each orthogonalized on its own (each scaled by its own norm); any
    float dtype. The iteration runs in ``dtype`` (default: bf16 on CUDA, fp32 elsewhere); the result has u's dtype.
    A zero matrix stays zero.
    """
    if u.dim() < 2:
        raise ValueError(f"orthogonalize: expected a matrix, got shape {tuple(u.shape)}")
    batch, (m, n) = math.prod(u.shape[:-2]), u.shape[-2:]
    stack = (batch, min(m, n), max(m, n))  # one batch dim for the GEMMs; a tall matrix stored as it is, (m, n)
    x = u.to(dtype or iteration_dtype(u), memory_format=torch.contiguous_format, copy=True).view(stack)  # overwritten
    out = torch.empty(stack, dtype=u.dtype, device=u.device)
    return newton_schulz_(normalize_(x), out, batch if m > n else 0).view(u.shape)


def newton_schulz_(x: torch.Tensor, out: torch.Tensor, tall: int = 0, scale: float = 1.0, workspace=None):
    """out <- scale * (about P Q^T) for each matrix X = P S Q^T of the stack x (batch, k, K), k <= K; returns out.

    x holds X_0, each matrix divided by its Frobenius norm (every singular value in [0, 1]: ``normalize_``). The
    last ``tall`` matrices are tall ones stored in their own layout, x[i].view(K, k) holding X^T; out holds
    their results likewise. The iteration runs in x's dtype and overwrites x; out has x's dtype or, for a bf16 x,
    fp32 (the last GEMM writes it). ``workspace`` (a dict) keeps the other buffers from call to call.
    """
    workspace = {} if workspace is None else workspace
    a, b, c = NS_COEFFICIENTS
    batch, k, K = x.shape
    wide, stored = slice(0, batch - tall), slice(batch - tall, batch)
    gram, poly = (buffer(workspace, name, (batch, k, k), x.dtype, x.device) for name in ("gram", "poly"))
    spare = (buffer(workspace, "y", x.shape, x.dtype, x.device), x)  # x is free after the first iteration
    # X_0 of the wide matrices and of the tall ones (their stored transposes, seen transposed), each (n, k, K)
    parts = [(span, v) for span, v in ((wide, x[wide]), (stored, x[stored].view(tall, K, k).mT)) if len(v)]
    for i in range(NS_STEPS):
        s = scale if i == NS_STEPS - 1 else 1.0
        for span, v in parts:
            torch.bmm(v, v.mT, out=gram[span])
        torch.baddbmm(gram, gram, gram, beta=b * s, alpha=c * s, out=poly)  # s (b G + c G^2): scalings in the GEMM
        poly.diagonal(dim1=-2, dim2=-1).add_(a * s)  # P = s (a I + b G + c G^2): the iteration is X <- P X
        if i < NS_STEPS - 1:
            y = spare[i % 2]
            for span, v in parts:
                torch.bmm(poly[span], v, out=y[span])
            parts = [(slice(0, batch), y)]  # one layout from here on: one launch for all
    v = parts[0][1]
    if tall < batch:
        gemm_into(poly[wide], v[wide], out[wide])
    if tall:  # X^T P = (P X)^T, P symmetric: the tall results in their own layout
        gemm_into(v[stored].mT, poly[stored], out[stored].view(tall, K, k))
    return out


def normalize_(x: torch.Tensor) -> torch.Tensor:
    """Divide each matrix of the stack x (batch, m, n) by its Frobenius norm, in place; a zero matrix stays zero.

    The largest entry goes to 1 first, so the squares in the norm neither overflow nor all underflow.
    """
    tiny = torch.finfo(x.dtype).tiny
    x.div_(torch.linalg.vector_norm(x, ord=math.inf, dim=(-2, -1), keepdim=True).clamp_min_(tiny))
    return x.div_(torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp_min_(tiny))


def gemm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out <- a @ b for stacks; out may be fp32 for bf16 a and b: one GEMM where the device has one that writes fp32
    from bf16 (``kernels._utils.fp32_output_gemm``), else the product in a's dtype and a cast."""
    if out.dtype == a.dtype:
        return torch.bmm(a, b, out=out)
    if kernel_utils.fp32_output_gemm(a.device):
        return torch.bmm(a, b, out_dtype=out.dtype, out=out)
    return out.copy_(torch.bmm(a, b))


def buffer(workspace: dict, name: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The tensor ``name`` of this shape, dtype and device in ``workspace``, made (uninitialized) the first time."""
    key = (name, tuple(shape), dtype, device)
    if key not in workspace:
        workspace[key] = torch.empty(shape, dtype=dtype, device=device)
    return workspace[key]


def iteration_groups(tensors: list[torch.Tensor]) -> list[list[int]]:
    """Indices of the matrices grouped by the shape they iterate in, (min(m, n), max(m, n)), dtype and device, in
    first-seen order, the wide (m <= n) before the tall in each group; each DTensor alone."""
    groups: dict = {}
    for i, t in enumerate(tensors):
        key = ("dtensor", i) if isinstance(t, DTensor) else (min(t.shape), max(t.shape), t.dtype, t.device)
        groups.setdefault(key, []).append(i)
    return [sorted(g, key=lambda i: tensors[i].size(0) > tensors[i].size(1)) for g in groups.values()]


def look_ahead_kernel(tensors: list[torch.Tensor]) -> bool:
    """Whether the look-ahead of these gradients and momenta runs in kernels/nesterov.py's Triton launches: plain
    (not FSDP's DTensor) contiguous fp32 matrices, triton installed, a device that runs it (``triton_device``)."""
    plain = all(not isinstance(t, DTensor) and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
    return plain and nesterov is not None and triton_device(tensors[0].device)


def triton_device(device: torch.device) -> bool:
    """Whether Triton kernels run on ``device`` for Muon: CUDA (a test puts the CPU's interpreter in its place)."""
    return device.type == "cuda"


def iteration_dtype(u: torch.Tensor) -> torch.dtype:
    """The dtype Newton-Schulz runs in by default for a matrix (or stack) like ``u``: bf16 on CUDA (tensor cores); on
    a CPU, what ``$SMOLLM_MUON_CPU_DTYPE`` names (auto, float32, bfloat16). Auto is bf16 where the CPU multiplies
    bf16 (``cpu_multiplies_bf16``) and the matrix's smaller side is at least BF16_CPU_MIN_K, else fp32."""
    if u.device.type == "cuda":
        return torch.bfloat16
    choice = os.environ.get("SMOLLM_MUON_CPU_DTYPE", "auto")
    if choice not in CPU_DTYPES:
        raise ValueError(f"$SMOLLM_MUON_CPU_DTYPE must be one of {tuple(CPU_DTYPES)}, got {choice!r}")
    if choice == "auto":
        return torch.bfloat16 if min(u.shape[-2:]) >= BF16_CPU_MIN_K and cpu_multiplies_bf16() else torch.float32
    return CPU_DTYPES[choice]


CPU_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
# Below it the iteration is a few percent of a CPU step, too little to trade for bf16's rounding (module docstring).
BF16_CPU_MIN_K = 256


@functools.cache
def cpu_multiplies_bf16() -> bool:
    """Whether this CPU's vector units multiply bf16 (AVX512-BF16 or AMX), where a bf16 GEMM runs at about twice
    fp32's rate; elsewhere torch emulates bf16 products, slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's private probes: absent is no
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def orthogonalize_sharded(u: DTensor, scale: float = 1.0) -> DTensor:
    """``scale`` times ``orthogonalize`` of the whole matrix a DTensor ``u`` holds, sharded as ``u`` is (see the module
    docstring).

    Every rank gathers all of u, runs the same iteration on it, and keeps its own shard: no second collective.
    """
    m, n = u.shape
    whole = u.to(iteration_dtype(u)).full_tensor()  # the same matrix on every rank; the iteration may overwrite it
    stack = (1, min(m, n), max(m, n))  # a tall matrix is stored as its transpose: the same bytes
    out = torch.empty(stack, dtype=u.dtype, device=whole.device)
    newton_schulz_(normalize_(whole.view(stack)), out, int(m > n), scale)
    return distribute_tensor(out.view(m, n), u.device_mesh, u.placements, src_data_rank=None)  # src None: slice here


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters (see the module docstring): lr, Nesterov momentum ``momentum``, decoupled decay.

    The step is batched by iteration shape; on the foreach path (the CPU, FSDP) it leaves each gradient holding its
    look-ahead U (module docstring). ``workspace`` holds its buffers between steps, outside the state, so
    checkpoints hold the momenta alone.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0):
        if lr < 0 or not 0 <= momentum < 1 or not (weight_decay == 0 or weight_decay >= MIN_WEIGHT_DECAY):
            raise ValueError(
                f"Muon: need lr >= 0, 0 <= momentum < 1, weight_decay 0 or >= {MIN_WEIGHT_DECAY}; got {lr}, "
                f"{momentum}, {weight_decay}"
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
            nesterov_mu = mu if look_ahead_kernel(grads + momenta) else None  # the kernel: both lerps, per stack
            if nesterov_mu is None:  # the foreach path
                torch._foreach_lerp_(momenta, grads, 1 - mu)  # M <- mu M + (1 - mu) G
                torch._foreach_lerp_(grads, momenta, mu)  # G <- (1 - mu) G + mu M: the look-ahead U, in G's place
            if lr * wd:  # W <- W + lr wd (T - W), T = -(0.2 sqrt(max(m, n)) / wd) O: the decay and step in one pass
                torch._foreach_lerp_(params, self._updates(grads, momenta, nesterov_mu, -1 / wd), lr * wd)
            else:  # W <- W + T, T = -lr 0.2 sqrt(max(m, n)) O
                torch._foreach_add_(params, self._updates(grads, momenta, nesterov_mu, -lr))

    def _momentum(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if not state:
            state["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["momentum"]

    def _updates(self, grads: list[torch.Tensor], momenta: list[torch.Tensor], mu: float | None,
                 factor: float) -> list[torch.Tensor]:
        """``factor`` 0.2 sqrt(max(m, n)) orthogonalize(U) for each look-ahead U, batched (module docstring): U from
        G and M by kernels/nesterov.py where ``mu`` is given, else the U that ``grads`` hold.

        The results are views of the workspace, valid until the next step."""
        updates: list = [None] * len(grads)
        for members in iteration_groups(grads):
            gs = [grads[i] for i in members]
            scale = factor * RMS_MATCH * math.sqrt(max(gs[0].shape))
            if isinstance(gs[0], DTensor):  # FSDP: one sharded matrix (see the module docstring)
                outs = [orthogonalize_sharded(gs[0], scale)]
            else:
                x = self._stack(gs, [momenta[i] for i in members], mu)
                out = buffer(self.workspace, "out", x.shape, gs[0].dtype, x.device)
                newton_schulz_(x, out, sum(g.size(0) > g.size(1) for g in gs), scale, self.workspace)
                outs = [out[j].view(g.shape) for j, g in enumerate(gs)]
            for i, update in zip(members, outs, strict=True):
                updates[i] = update
        return updates

    def _stack(self, gs: list[torch.Tensor], ms: list[torch.Tensor], mu: float | None) -> torch.Tensor:
        """X_0 of one iteration stack: each matrix's look-ahead U in the iteration dtype, in its own layout, divided
        by its norm; made from G and M by kernels/nesterov.py where ``mu`` is given, else cast from the U's in gs."""
        stack, device = (len(gs), min(gs[0].shape), max(gs[0].shape)), gs[0].device
        x = buffer(self.workspace, "x", stack, iteration_dtype(gs[0]), device)
        if mu is None:
            torch._foreach_copy_([x[j].view(u.shape) for j, u in enumerate(gs)], gs)  # cast and stacked
            return normalize_(x)
        ssq = buffer(self.workspace, "ssq", stack[:1], torch.float64, device)
        return nesterov.divide_by_norm_(x, nesterov.nesterov_(gs, ms, x, ssq, mu))
