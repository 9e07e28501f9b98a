"""Benchmark the memory-bound kernels against eager PyTorch and torch.compile: time, bandwidth and peak memory.

    python -m bench.kernels            # on a GPU: bf16 at the TinyStories-17M and 125M shapes
    python -m bench.kernels --dry-run  # tiny shapes on the CPU interpreter (what CI runs): checks the plumbing only

Each op is timed forward (inputs requiring grad, as in training) and forward+backward, as the median of
``triton.testing.do_bench``. GB/s comes from the minimum bytes each op must move (formulas in ``_cases``), and is
also given as a percentage of this card's device-to-device copy bandwidth, measured in the same run. The fused
linear cross-entropy is matmul-bound, so it is reported in TFLOP/s and peak memory instead.
"""

import datetime
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import bench.env  # first: it sets what torch and triton read when they load
import torch
from tqdm import tqdm

import triton

import kernels
from kernels import reference


@dataclass
class BenchShape:
    name: str
    batch: int
    seq: int
    d_model: int
    d_ff: int
    heads: int
    vocab: int


SHAPES = (
    BenchShape("tinystories-17m", batch=128, seq=256, d_model=512, d_ff=1344, heads=16, vocab=10000),
    BenchShape("125m", batch=16, seq=1024, d_model=768, d_ff=2048, heads=12, vocab=50257),
)
DRY_RUN_SHAPE = BenchShape("dry-run", batch=2, seq=8, d_model=32, d_ff=48, heads=2, vocab=67)
PROVIDERS = ("triton", "eager", "compile")


@dataclass
class Case:
    op: str
    triton: Callable
    eager: Callable
    inputs: list[torch.Tensor]  # float inputs get requires_grad; others (targets) are closed over
    fwd_bytes: int  # minimum bytes the forward must move
    bwd_bytes: int  # minimum bytes the backward must move
    fwd_flops: float = 0.0  # matmul FLOPs of the forward (the backward does twice as many)


def _cases(s: BenchShape, dtype: torch.dtype, device: torch.device) -> list[Case]:
    es = dtype.itemsize
    N = s.batch * s.seq  # tokens
    hd = s.d_model // s.heads

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    targets = torch.randint(0, s.vocab, (N,), device=device)
    positions = torch.arange(s.seq, device=device)
    rope_x = randn(s.batch, s.heads, s.seq, hd)
    return [
        # read x, write y | read x and dy, write dx (the weight and per-row statistics are negligible)
        Case("rms_norm", kernels.rms_norm, reference.rms_norm, [randn(N, s.d_model), randn(s.d_model)],
             2 * N * s.d_model * es, 3 * N * s.d_model * es),
        # read gate and up, write y | read dy, gate and up, write dgate and dup
        Case("swiglu", kernels.swiglu, reference.swiglu, [randn(N, s.d_ff), randn(N, s.d_ff)],
             3 * N * s.d_ff * es, 5 * N * s.d_ff * es),
        # read x, write y | read dy, write dx (one of q or k)
        Case("apply_rope", lambda x: kernels.apply_rope(x, positions), lambda x: reference.apply_rope(x, positions),
             [rope_x], 2 * rope_x.numel() * es, 2 * rope_x.numel() * es),
        # read the logits | write dlogits (ours writes it during the forward, so its forward moves both)
        Case("cross_entropy", lambda x: kernels.cross_entropy(x, targets),
             lambda x: reference.cross_entropy(x, targets), [randn(N, s.vocab, scale=2.0)],
             N * s.vocab * es, N * s.vocab * es),
        # matmul-bound: 2 N d V FLOPs forward; bytes are not the measure
        Case("fused_linear_cross_entropy", lambda h, w: kernels.fused_linear_cross_entropy(h, w, targets),
             lambda h, w: reference.fused_linear_cross_entropy(h, w, targets),
             [randn(N, s.d_model), randn(s.vocab, s.d_model, scale=s.d_model**-0.5)], 0, 0,
             fwd_flops=2.0 * N * s.d_model * s.vocab),
    ]  # fmt: skip


def time_ms(fn: Callable, device: torch.device, leaves: list[torch.Tensor], dry_run: bool) -> float:
    """Median milliseconds of fn(): do_bench on a GPU, a few wall-clock runs on the CPU (plumbing only)."""
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=10, rep=40, grad_to_none=leaves, return_mode="median")
    times = []
    for _ in range(1 if dry_run else 3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_mib(fn: Callable, device: torch.device) -> float | None:
    """Peak memory fn() allocates beyond what is already held, in MiB (None off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 2**30) -> float | None:
    """Device-to-device copy bandwidth (read + write bytes per second) of this card, the ceiling for our kernels."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median")
    return 2 * nbytes / ms / 1e6


def _measure(case: Case, provider: str, mode: str, device: torch.device, dry_run: bool):
    """(median ms, peak MiB) of one provider's forward or forward+backward."""
    fn = {"triton": case.triton, "eager": case.eager}.get(provider) or torch.compile(case.eager, dynamic=False)
    leaves = [t.detach().clone().requires_grad_() for t in case.inputs]
    # One shared upstream gradient, a real (not expanded) tensor; 1 for a loss, as when it is the root of the graph.
    out = case.eager(*case.inputs)
    upstream = torch.ones_like(out) if out.dim() == 0 else torch.randn_like(out)
    if mode == "fwd":
        run = lambda: fn(*leaves)
    else:
        run = lambda: fn(*leaves).backward(upstream)
    run()  # warm-up: Triton and torch.compile compile here, outside the timing
    ms = time_ms(run, device, leaves, dry_run)
    return ms, peak_mib(run, device)


def _cells(ms, nbytes, flops, copy_bw, eager_ms, peak, eager_peak) -> str:
    """The measured columns of one row, "-" where a figure does not apply."""
    gbs = nbytes / ms / 1e6 if nbytes else None
    cells = [
        f"{ms:.3f}",
        f"{gbs:.4g}" if gbs else "-",
        f"{100 * gbs / copy_bw:.0f}%" if gbs and copy_bw else "-",
        f"{flops / ms / 1e9:.1f}" if flops else "-",
        f"{eager_ms / ms:.2f}" if eager_ms else "-",
        f"{peak:.0f}" if peak is not None else "-",
        f"{100 * peak / eager_peak:.0f}%" if peak is not None and eager_peak else "-",
    ]
    return " | ".join(cells) + " |"


def run(dry_run: bool = False, shapes=None, providers=PROVIDERS, dtype: torch.dtype | None = None) -> str:
    """Benchmark every case; returns a markdown section (dry_run: tiny shapes on the CPU, eager and Triton only)."""
    device = torch.device("cuda" if torch.cuda.is_available() and not dry_run else "cpu")
    if device.type == "cpu":
        shapes, providers = shapes or (DRY_RUN_SHAPE,), [p for p in providers if p != "compile"]
        dtype = dtype or torch.float32  # the interpreter's bf16 math is unreliable
    shapes, dtype = shapes or SHAPES, dtype or torch.bfloat16
    copy_bw = copy_bandwidth_gbs(device)
    card = bench.env.card_name(device)
    date = datetime.date.today().isoformat()
    lines = [
        f"### Memory-bound kernels: {card}, torch {torch.__version__}, triton {triton.__version__}, {date}",
        "",
        f"dtype {str(dtype).removeprefix('torch.')}; device-to-device copy bandwidth: "
        + (f"{copy_bw:.0f} GB/s" if copy_bw else "n/a (CPU)")
        + ("; CPU timings check the plumbing only, they say nothing about speed" if device.type == "cpu" else ""),
        "",
        "| card | date | shape | op | mode | provider | median ms | GB/s | % of copy | TFLOP/s | x eager | peak MiB "
        "| % of eager peak |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    todo = [(shape, mode) for shape in shapes for mode in ("fwd", "fwd+bwd")]
    with tqdm(total=len(todo) * 5 * len(providers), desc="bench.kernels", disable=dry_run) as bar:
        for shape in shapes:
            for case in _cases(shape, dtype, device):
                for mode in ("fwd", "fwd+bwd"):
                    nbytes = case.fwd_bytes + (case.bwd_bytes if mode == "fwd+bwd" else 0)
                    flops = case.fwd_flops * (3 if mode == "fwd+bwd" else 1)
                    measured = {}
                    for provider in providers:
                        measured[provider] = _measure(case, provider, mode, device, dry_run)
                        bar.update()
                    eager_ms, eager_peak = measured.get("eager", (None, None))
                    for provider, (ms, peak) in measured.items():
                        lines.append(f"| {card} | {date} | {shape.name} | {case.op} | {mode} | {provider} | "
                                     + _cells(ms, nbytes, flops, copy_bw, eager_ms, peak, eager_peak))  # fmt: skip
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return "\n".join(lines)


def main(argv=None) -> int:
    args = bench.env.parse_args(__doc__, argv, compile_flag=True, needs_cuda=True)
    if args is None:
        return 2
    providers = [p for p in PROVIDERS if not (args.no_compile and p == "compile")]
    print(run(dry_run=args.dry_run, providers=providers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
