"""Matrix products on the CPU: torch's BLAS against kernels.cpu_blas's OpenBLAS route, shape by shape.

    python -m smollm_stack.bench.cpu_blas            # the tiny and 17M presets' products at 2048 tokens, in turns
    python -m smollm_stack.bench.cpu_blas --dry-run  # small shapes, a few repeats: the plumbing

First table: each distinct product of a training step, a linear layer's (forward y = x W^T, backward dx = dy W and
dW = dy^T x, the operands laid out as autograd hands them over) and the loss's (one chunk of
kernels.eager.CPU_CHUNK_ROWS rows); "auto" says which BLAS kernels.cpu_blas takes for it on this machine. Second:
the fused loss forward and backward over 2048 rows by rows per chunk, the constant CPU_CHUNK_ROWS was picked by.
The routes (and the chunk sizes) take turns repeat by repeat, so a load that comes and goes hits them alike; each
reports the median over the repeats after the first two.
"""

import statistics
import sys
import time

from smollm_stack.bench import env  # first: it sets what torch reads when it loads
import torch

from smollm_stack.kernels import cpu_blas
from smollm_stack.kernels.eager import CPU_CHUNK_ROWS, fused_linear_cross_entropy
from smollm_stack.model import ModelConfig

TOKENS = 2048  # the default run's 16 x 128 and the 17M benchmark's 8 x 256
ROUTES = ("torch", "openblas")
CHUNKS = (256, 512, 1024, 2048)


def products(preset: str, rows: int = TOKENS) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, a, b) of each distinct product of the preset's training step at ``rows`` tokens."""
    c = ModelConfig.preset(preset)
    layers = {"attention proj": (c.d_model, c.d_model), "w1, w3": (c.d_model, c.d_ff), "w2": (c.d_ff, c.d_model)}
    out = []
    for name, (n_in, n_out) in layers.items():
        x, w, dy = torch.randn(rows, n_in), torch.randn(n_out, n_in), torch.randn(rows, n_out)
        out += [(f"{name} y = x W^T", x, w.t()), (f"{name} dx = dy W", dy, w), (f"{name} dW = dy^T x", dy.t(), x)]
    h, w = torch.randn(CPU_CHUNK_ROWS, c.d_model), torch.randn(c.vocab_size, c.d_model)
    g = torch.randn(CPU_CHUNK_ROWS, c.vocab_size)
    return out + [("loss chunk logits", h, w.t()), ("loss chunk dh", g, w), ("loss chunk dW", g.t(), h)]


def measure(a: torch.Tensor, b: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median GFLOP/s of a @ b through each route, the routes taking turns."""
    seconds = {r: [] for r in ROUTES}
    for _ in range(repeats):
        for r in ROUTES:
            with cpu_blas.route(r):
                t0 = time.perf_counter()
                cpu_blas.mm(a, b)
                seconds[r].append(time.perf_counter() - t0)
    flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
    return {r: flops / statistics.median(s[2:]) / 1e9 for r, s in seconds.items()}


def loss_chunks(preset: str, rows: int, chunks, repeats: int) -> dict[tuple[str, int], float]:
    """Median ms of the fused loss's forward and backward over ``rows`` rows, by route and rows per chunk."""
    c = ModelConfig.preset(preset)
    h = torch.randn(rows, c.d_model, requires_grad=True)
    w = (0.02 * torch.randn(c.vocab_size, c.d_model)).requires_grad_()
    targets = torch.randint(0, c.vocab_size, (rows,))
    seconds = {(r, n): [] for r in ROUTES for n in chunks}
    for _ in range(repeats):
        for r, n in seconds:
            with cpu_blas.route(r):
                t0 = time.perf_counter()
                fused_linear_cross_entropy(h, w, targets, chunk_size=n).backward()
                seconds[(r, n)].append(time.perf_counter() - t0)
            h.grad = w.grad = None
    return {key: 1000 * statistics.median(s[2:]) for key, s in seconds.items()}


def run(dry_run: bool = False) -> str:
    presets, repeats = (["tiny"], 4) if dry_run else (["tiny", "tinystories-17m"], 25)
    lines = [
        f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}; `python -m smollm_stack.bench.cpu_blas"
        f"{' --dry-run' if dry_run else ''}`; median GFLOP/s of {repeats - 2} repeats, the routes in turns",
        "",
        "| preset | product | m x k x n | torch | OpenBLAS | OpenBLAS / torch | auto |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for preset in presets:
        for name, a, b in products(preset, rows=64 if dry_run else TOKENS)[: 2 if dry_run else None]:
            rate = measure(a, b, repeats)
            with cpu_blas.route("auto"):
                auto = "OpenBLAS" if cpu_blas._use_openblas(a, *a.shape, b.shape[1]) else "torch"
            shape = f"{a.shape[0]} x {a.shape[1]} x {b.shape[1]}"
            lines.append(f"| {preset} | {name} | {shape} | {rate['torch']:.0f} | {rate['openblas']:.0f} | "
                         f"{rate['openblas'] / rate['torch']:.2f} | {auto} |")  # fmt: skip
    chunks, rows = ((16, 32), 64) if dry_run else (CHUNKS, TOKENS)
    lines += [
        "",
        f"The fused loss, forward and backward of {rows} rows, ms by rows per chunk (default {CPU_CHUNK_ROWS}):",
        "",
        "| preset | BLAS | " + " | ".join(map(str, chunks)) + " |",
        "|---|---|" + "---:|" * len(chunks),
    ]
    for preset in presets:
        ms = loss_chunks(preset, rows, chunks, repeats=4 if dry_run else 11)
        for r in ROUTES:
            lines.append(f"| {preset} | {r} | " + " | ".join(f"{ms[(r, n)]:.0f}" for n in chunks) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = env.parse_args("smollm_stack.bench.cpu_blas", __doc__, argv, compile_flag=False, needs_cuda=False)
    if not cpu_blas._openblas():
        print("error: numpy is not built with OpenBLAS (or threadpoolctl is missing): nothing to race", file=sys.stderr)
        return 2
    print(run(dry_run=args.dry_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
