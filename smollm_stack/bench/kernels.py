"""Benchmark the memory-bound kernels against eager PyTorch and torch.compile: time, bandwidth and peak memory.

    python -m smollm_stack.bench.kernels               # a GPU: bf16 at the TinyStories-17M and 125M shapes
    python -m smollm_stack.bench.kernels --no-compile  # the same without the torch.compile provider (saves a minute)
    python -m smollm_stack.bench.kernels --dry-run     # tiny shapes on the CPU interpreter (CI runs it): the plumbing

Each op is timed forward (inputs requiring grad, as in training) and forward+backward, by three providers: ``triton``
(ours), ``eager`` (``kernels.ops("eager")``, the fastest PyTorch the model runs without Triton) and ``compile``
(that same eager op under ``torch.compile``). At the presets' sizes one op takes 10-100 us, about what launching it
costs the host, so on a GPU each is timed by replaying a CUDA graph of many calls
(``triton.testing.do_bench_cudagraph``); an op that synchronizes with the host cannot be captured and is timed with
events instead (``do_bench``), which the row says. Times are the 20/50/80% quantiles in ms. Graph replays do not
flush L2 (50 MB on an H100), so working sets that fit in it can read partly from cache.

GB/s comes from the minimum bytes each op must move (formulas in ``_cases``), and is also given as a percentage of
this card's device-to-device copy bandwidth, measured in the same run. The fused linear cross-entropy is
matmul-bound, so it is reported in TFLOP/s and peak memory instead. Our two losses finish their gradients in the
forward (the backward only scales them by the upstream gradient, which is skipped when it is 1), so our forward row
is credited with what that forward moves and computes: the gradient's bytes and the backward's FLOPs too (the
eager and compile rows keep the forward's minimum). The fused loss's memory is judged against the loss a plain
PyTorch model computes, the whole (N, V) logits materialised and F.cross_entropy on them, not against
``kernels.eager``'s fused loss, which is itself chunked; that same unchunked loss is its eager and compile row.
"""

import inspect
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from smollm_stack.bench import env  # first: it sets what torch and triton read when they load
import torch

import triton

from smollm_stack import kernels


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
QUANTILES = (0.2, 0.5, 0.8)
OPS_PER_SHAPE = 6  # len(_cases(...)) when kernels.rms_norm takes out_dtype; gpu_check's run-time estimate uses it


@dataclass
class Case:
    op: str
    dtype: str  # what the row says about dtypes, e.g. "bf16" or "fp32 -> bf16"
    triton: Callable
    eager: Callable
    inputs: list[torch.Tensor]  # float inputs get requires_grad; others (targets) are closed over
    fwd_bytes: int  # minimum bytes the forward must move
    bwd_bytes: int  # minimum bytes the backward must move
    fwd_flops: float = 0.0  # matmul FLOPs of the forward (the backward does twice as many)
    reference: Callable | None = None  # kernels.reference's op on the same inputs: the textbook baseline
    grads_in_forward: bool = False  # ours computes the gradients in its forward: credited there (module docstring)


def rms_norm_out_dtype_supported() -> bool:
    """Whether the installed kernels.rms_norm can take the fp32 residual stream and emit the compute dtype."""
    return "out_dtype" in inspect.signature(kernels.rms_norm).parameters


def narrow_dtype(dtype: torch.dtype) -> torch.dtype:
    """The output dtype of the fp32-in norm: the compute dtype (fp16 when the run itself is fp32, as in dry runs)."""
    return torch.float16 if dtype == torch.float32 else dtype


def _short(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def _rms_norm_narrowing_case(s: BenchShape, dtype: torch.dtype, device: torch.device) -> Case:
    """RMSNorm as training runs it under autocast: the fp32 residual stream in, the compute dtype out."""
    eager, out = kernels.ops("eager"), narrow_dtype(dtype)
    if "out_dtype" in inspect.signature(eager.rms_norm).parameters:
        eager_fn = lambda x, w: eager.rms_norm(x, w, out_dtype=out)
    else:
        eager_fn = lambda x, w: eager.rms_norm(x, w).to(out)
    N, d, es = s.batch * s.seq, s.d_model, out.itemsize
    # read fp32 x, write y | read dy, read fp32 x, write fp32 dx
    return Case("rms_norm", f"fp32 -> {_short(out)}", lambda x, w: kernels.rms_norm(x, w, out_dtype=out), eager_fn,
                [torch.randn(N, d, device=device), torch.randn(d, device=device)],
                N * d * (4 + es), N * d * (es + 4 + 4))  # fmt: skip


def _cases(s: BenchShape, dtype: torch.dtype, device: torch.device) -> list[Case]:
    es, name = dtype.itemsize, _short(dtype)
    N = s.batch * s.seq  # tokens
    hd = s.d_model // s.heads
    eager, ref = kernels.ops("eager"), kernels.reference

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    targets = torch.randint(0, s.vocab, (N,), device=device)
    positions = torch.arange(s.seq, device=device)
    rope_x = randn(s.batch, s.heads, s.seq, hd)
    cases = [
        # read x, write y | read x and dy, write dx (the weight and per-row statistics are negligible)
        Case("rms_norm", name, kernels.rms_norm, eager.rms_norm, [randn(N, s.d_model), randn(s.d_model)],
             2 * N * s.d_model * es, 3 * N * s.d_model * es, reference=ref.rms_norm),
        # read gate and up, write y | read dy, gate and up, write dgate and dup
        Case("swiglu", name, kernels.swiglu, eager.swiglu, [randn(N, s.d_ff), randn(N, s.d_ff)],
             3 * N * s.d_ff * es, 5 * N * s.d_ff * es, reference=ref.swiglu),
        # read x, write y | read dy, write dx (one of q or k)
        Case("apply_rope", name, lambda x: kernels.apply_rope(x, positions), lambda x: eager.apply_rope(x, positions),
             [rope_x], 2 * rope_x.numel() * es, 2 * rope_x.numel() * es,
             reference=lambda x: ref.apply_rope(x, positions)),
        # read the logits | write dlogits (ours writes it during the forward, so its forward moves both)
        Case("cross_entropy", name, lambda x: kernels.cross_entropy(x, targets),
             lambda x: eager.cross_entropy(x, targets), [randn(N, s.vocab, scale=2.0)],
             N * s.vocab * es, N * s.vocab * es, reference=lambda x: ref.cross_entropy(x, targets),
             grads_in_forward=True),
        # matmul-bound: 2 N d V FLOPs forward; bytes are not the measure. Eager: the logits whole, then the loss
        Case("fused_linear_cross_entropy", name, lambda h, w: kernels.fused_linear_cross_entropy(h, w, targets),
             lambda h, w: eager.cross_entropy(h @ w.t(), targets),
             [randn(N, s.d_model), randn(s.vocab, s.d_model, scale=s.d_model**-0.5)], 0, 0,
             fwd_flops=2.0 * N * s.d_model * s.vocab,
             reference=lambda h, w: ref.fused_linear_cross_entropy(h, w, targets), grads_in_forward=True),
    ]  # fmt: skip
    if rms_norm_out_dtype_supported():
        cases.insert(1, _rms_norm_narrowing_case(s, dtype, device))
    return cases


@dataclass
class Timing:
    ms: tuple[float, float, float]  # the QUANTILES of the time per call
    method: str  # "graph" (CUDA-graph replays), "events" (do_bench: the call syncs with the host), "wall" (CPU)

    @property
    def median(self) -> float:
        return self.ms[1]


def host_syncs(fn: Callable) -> bool:
    """Whether fn() makes the host wait for the GPU (e.g. ``.item()``), which a CUDA graph cannot capture."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError:
        return True
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return False


def time_ms(fn: Callable, device: torch.device, leaves: list[torch.Tensor], dry_run: bool, graph: bool) -> Timing:
    """Quantiles of fn()'s time: CUDA-graph replays (graph=True, when fn can be captured) or do_bench on a GPU, a few
    wall-clock runs on the CPU (plumbing only). Call fn once before, so compilation stays out of the numbers."""
    if device.type == "cuda":
        if graph and not host_syncs(fn):
            try:
                ms = triton.testing.do_bench_cudagraph(fn, rep=20, grad_to_none=leaves, quantiles=list(QUANTILES))
                return Timing(tuple(ms), "graph")
            except RuntimeError as e:  # capture refused something the sync probe did not see
                print(f"bench: CUDA graph capture failed, timed with events: {str(e).splitlines()[0]}", file=sys.stderr)
                torch.cuda.synchronize()
        ms = triton.testing.do_bench(fn, warmup=10, rep=40, grad_to_none=leaves, quantiles=list(QUANTILES))
        return Timing(tuple(ms), "events")
    times = []
    for _ in range(1 if dry_run else 3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    p = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return Timing((p[1], statistics.median(times), p[7]), "wall")


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
    src = torch.randn(nbytes // 4, device=device)  # random bits, never zeros
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median")
    return 2 * nbytes / ms / 1e6


def _measure(case: Case, fn: Callable, mode: str, device: torch.device, dry_run: bool) -> tuple[Timing, float | None]:
    """(timing, peak MiB) of one provider's forward or forward+backward."""
    leaves = [t.detach().clone().requires_grad_() for t in case.inputs]
    # One shared upstream gradient, a real (not expanded) tensor; 1 for a loss, as when it is the root of the graph.
    out = case.eager(*case.inputs)
    upstream = torch.ones_like(out) if out.dim() == 0 else torch.randn_like(out)
    if mode == "fwd":
        run = lambda: fn(*leaves)
    else:
        run = lambda: fn(*leaves).backward(upstream)
    run()  # warm-up: Triton and torch.compile compile here, outside the timing
    timing = time_ms(run, device, leaves, dry_run, graph=True)
    return timing, peak_mib(run, device)


def _row(shape, case, mode, provider, timing, peak, copy_bw) -> dict:
    """One results row (JSON-ready); the ratios between providers are added by ``measure``."""
    whole = mode == "fwd+bwd" or (provider == "triton" and case.grads_in_forward)  # the backward's work done
    nbytes = case.fwd_bytes + (case.bwd_bytes if whole else 0)
    flops = case.fwd_flops * (3 if whole else 1)
    ms = timing.median
    gbs = nbytes / ms / 1e6 if nbytes else None
    return dict(section="kernels", shape=shape.name, op=case.op, dtype=case.dtype, mode=mode, provider=provider,
                ms=list(timing.ms), timing=timing.method, gbs=gbs, pct_copy=100 * gbs / copy_bw if gbs and copy_bw
                else None, tflops=flops / ms / 1e9 if flops else None, peak_mib=peak)  # fmt: skip


def measure(shapes, providers, dtype: torch.dtype, device: torch.device, dry_run: bool, copy_bw) -> Iterator[dict]:
    """Yield one row per (shape, op, mode, provider), in groups of one (shape, op, mode) as each is done."""
    for shape in shapes:
        for case in _cases(shape, dtype, device):
            fns = {"triton": case.triton, "eager": case.eager}
            if "compile" in providers:  # one compile per op and shape, shared by both modes
                fns["compile"] = torch.compile(case.eager, dynamic=False)
            for mode in ("fwd", "fwd+bwd"):
                group = {}
                for provider in providers:
                    try:
                        timing, peak = _measure(case, fns[provider], mode, device, dry_run)
                    except Exception as e:  # one broken provider must not lose the rest of the table
                        print(f"bench.kernels: {shape.name} {case.op} {mode} {provider}: {e!r}", file=sys.stderr)
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        continue
                    group[provider] = _row(shape, case, mode, provider, timing, peak, copy_bw)
                for row in group.values():
                    for base in ("eager", "compile"):
                        other = group.get(base)
                        row[f"x_{base}"] = other["ms"][1] / row["ms"][1] if other else None
                    eager_peak, peak = group.get("eager", {}).get("peak_mib"), row["peak_mib"]
                    row["pct_eager_peak"] = 100 * peak / eager_peak if eager_peak and peak is not None else None
                    yield row
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_table(rows: list[dict], card: str, date: str) -> str:
    """The markdown table of ``measure``'s rows, the card and date in every row as RESULTS.md wants them."""
    lines = [
        "| card | date | shape | op | dtype | mode | provider | ms p20 / p50 / p80 | timed by | GB/s | % of copy "
        "| TFLOP/s | x eager | x compile | peak MiB | % of eager peak |",
        "|---|---|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ms = " / ".join(f"{t:.4f}" for t in r["ms"])
        cells = [card, date, r["shape"], r["op"], r["dtype"], r["mode"], r["provider"], ms, r["timing"],
                 _fmt(r["gbs"], ".4g"), _fmt(r["pct_copy"], ".0f", "%"), _fmt(r["tflops"], ".1f"),
                 _fmt(r["x_eager"], ".2f"), _fmt(r["x_compile"], ".2f"), _fmt(r["peak_mib"], ".0f"),
                 _fmt(r["pct_eager_peak"], ".0f", "%")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def setup(dry_run: bool, providers) -> tuple[torch.device, tuple, list[str], torch.dtype]:
    """(device, shapes, providers, dtype) of a run: bf16 at SHAPES on a GPU; the dry run's tiny fp32 shape on the CPU,
    without torch.compile (the interpreter's bf16 math is unreliable, and compiling would take most of the run)."""
    if torch.cuda.is_available() and not dry_run:
        return torch.device("cuda"), SHAPES, list(providers), torch.bfloat16
    return torch.device("cpu"), (DRY_RUN_SHAPE,), [p for p in providers if p != "compile"], torch.float32


def notes(device: torch.device, dtype: torch.dtype, copy_bw: float | None) -> list[str]:
    """What a reader of the table must know: dtype, the copy ceiling, what was left out."""
    lines = [
        f"dtype {_short(dtype)}; device-to-device copy bandwidth: "
        + (f"{copy_bw:.0f} GB/s" if copy_bw else "n/a (CPU)")
        + ("; CPU timings check the plumbing only, they say nothing about speed" if device.type == "cpu" else "")
    ]
    if not rms_norm_out_dtype_supported():
        lines.append(
            "rms_norm fp32 -> compute dtype: not run, the installed kernels.rms_norm has no out_dtype parameter"
        )
    return lines


def run(dry_run: bool = False, providers=PROVIDERS) -> str:
    """Benchmark every case; returns a markdown section."""
    device, shapes, providers, dtype = setup(dry_run, providers)
    copy_bw = copy_bandwidth_gbs(device)
    rows = list(measure(shapes, providers, dtype, device, dry_run, copy_bw))
    card = env.card_name(device)
    title = f"### Memory-bound kernels: {card}, {env.versions()}"
    return "\n\n".join([title, *notes(device, dtype, copy_bw), format_table(rows, card, env.today())])


def main(argv=None) -> int:
    args = env.parse_args("smollm_stack.bench.kernels", __doc__, argv, compile_flag=True, needs_cuda=True)
    if args is None:
        return 2
    print(run(dry_run=args.dry_run, providers=[p for p in PROVIDERS if not (args.no_compile and p == "compile")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
