"""Benchmark causal attention: our Triton FlashAttention against PyTorch's SDPA (flash backend) and the eager backend.

    python -m smollm_stack.bench.attention            # a GPU: bf16, head dims 64 and 128, T = 256..8192, the presets
    python -m smollm_stack.bench.attention --dry-run  # tiny shapes on the CPU interpreter (CI runs it): the plumbing

Batch x T is held at 16k tokens and H x d at 2048, as in the FlashAttention papers, so every row does the same work
per token except for the T x T part that attention adds. TFLOP/s counts the matmuls: forward 4·B·H·T·S·d, halved
when causal; the backward does 2.5x the forward (five matmuls to the forward's two), so forward+backward is 3.5x.

Before a shape is timed, ours runs forward and backward once at that shape (so the autotuner picks its configs on
the timed problem, not on a smaller one), and is then checked at the same T and head dim against an fp64 gold run
with the FlashAttention rule of ``kernels.check`` (error <= 2x eager attention's own error), on one sequence and at
most two K/V heads: every (sequence, head) is an independent problem. A shape that fails is not timed for ours.
Times are 20/50/80% quantiles (CUDA-graph replays where the call can be captured, see ``bench.kernels.time_ms``);
peak memory is what one call allocates beyond its inputs. The eager backend is skipped where the (T, S) scores of the
reference would not fit.
"""

import sys
from collections.abc import Iterator
from dataclasses import dataclass

from smollm_stack.bench import env  # first: it sets what torch and triton read when they load
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from smollm_stack import kernels
from smollm_stack.bench.kernels import Timing, peak_mib, time_ms
from smollm_stack.kernels import check, reference

TOKENS = 16384  # batch x T in the sweep
WIDTH = 2048  # heads x head dim in the sweep
SWEEP_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
SWEEP_HEAD_DIMS = (64, 128)
MODEL_PRESETS = ("tinystories-17m", "125m")
PROVIDERS = ("ours", "sdpa", "eager")


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    heads: int
    kv_heads: int
    seq_len: int
    head_dim: int

    def flops(self, mode: str, causal: bool = True) -> float:
        fwd = 4.0 * self.batch * self.heads * self.seq_len * self.seq_len * self.head_dim * (0.5 if causal else 1.0)
        return fwd * (3.5 if mode == "fwd+bwd" else 1.0)

    def eager_bytes(self) -> int:
        """About what the reference holds at once in fwd+bwd: ~6 fp32 (T, S) tensors per head."""
        return 6 * 4 * self.batch * self.heads * self.seq_len**2

    def dims(self) -> str:
        return f"{self.batch} x {self.heads}/{self.kv_heads} x {self.seq_len} x {self.head_dim}"


def shapes(dry_run: bool) -> list[Shape]:
    if dry_run:
        return [Shape("dry-run", 1, 2, 1, 24, 16)]
    sweep = [Shape(f"d{d}", TOKENS // T, WIDTH // d, WIDTH // d, T, d) for d in SWEEP_HEAD_DIMS for T in SWEEP_LENGTHS]
    from smollm_stack.model import ModelConfig

    presets = [ModelConfig.preset(name) for name in MODEL_PRESETS]
    return sweep + [
        Shape(name, max(1, TOKENS // c.context_length), c.num_heads, c.num_kv_heads, c.context_length, c.head_dim)
        for name, c in zip(MODEL_PRESETS, presets)
    ]


def sdpa_flash(q, k, v):
    """PyTorch's fused attention, its flash backend on CUDA. It takes equal head counts, so grouped K/V heads are
    repeated (outside the timed region: the benchmark hands it already-repeated K/V, see ``_inputs``)."""
    if q.is_cuda:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _inputs(shape: Shape, provider: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator(device).manual_seed(seed)
    q = torch.randn(shape.batch, shape.heads, shape.seq_len, shape.head_dim, generator=g, device=device, dtype=dtype)
    kv_shape = (shape.batch, shape.kv_heads, shape.seq_len, shape.head_dim)
    k = torch.randn(kv_shape, generator=g, device=device, dtype=dtype)
    v = torch.randn(kv_shape, generator=g, device=device, dtype=dtype)
    if provider == "sdpa" and shape.heads != shape.kv_heads:
        k, v = (t.repeat_interleave(shape.heads // shape.kv_heads, dim=1) for t in (k, v))
    return [t.requires_grad_() for t in (q, k, v)]


def check_shape(shape: Shape, dtype: torch.dtype, device: torch.device) -> list[check.CheckResult]:
    """Ours at the timed T and head dim, forward and gradients, on one sequence and at most two K/V heads."""
    kv_heads = min(shape.kv_heads, 2)
    small = Shape(shape.name, 1, kv_heads * (shape.heads // shape.kv_heads), kv_heads, shape.seq_len, shape.head_dim)
    q, k, v = (t.detach() for t in _inputs(small, "ours", dtype, device, seed=1))
    upstream = torch.randn_like(q)
    return check._compare("flash_attention", dtype, kernels.flash_attention, reference.flash_attention,
                          check.native_attention, {"q": q, "k": k, "v": v}, upstream)  # fmt: skip


def _measure(shape: Shape, provider: str, mode: str, dtype: torch.dtype, device: torch.device, dry_run: bool):
    """(timing, peak MiB) of one provider's forward or forward+backward, or None where it cannot run."""
    if provider == "eager" and device.type == "cuda":
        if shape.eager_bytes() > 0.4 * torch.cuda.get_device_properties(device).total_memory:
            return None
    fn = {"ours": kernels.flash_attention, "sdpa": sdpa_flash, "eager": kernels.ops("eager").flash_attention}[provider]
    leaves = _inputs(shape, provider, dtype, device)
    upstream = torch.randn_like(leaves[0])
    run = (lambda: fn(*leaves)) if mode == "fwd" else (lambda: fn(*leaves).backward(upstream))
    try:
        run()  # warm-up: Triton compiles and autotunes here, outside the timing
        # The eager backend's (T, S) temporaries would multiply in a graph of many calls: events suffice at its speed.
        return time_ms(run, device, leaves, dry_run, graph=provider != "eager"), peak_mib(run, device)
    except Exception as e:  # e.g. no flash backend for this card, dtype or head dim; out of memory
        print(f"bench.attention: {provider} {shape} {mode}: {str(e).splitlines()[0]}", file=sys.stderr)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None


def _row(shape: Shape, mode: str, checked: list[check.CheckResult], measured: dict) -> dict:
    row = dict(section="attention", shape=shape.name, dims=shape.dims(), seq_len=shape.seq_len,
               head_dim=shape.head_dim, mode=mode, check_ok=bool(checked) and all(r.ok for r in checked),
               check_worst=max((r.err / r.limit for r in checked), default=None))  # fmt: skip
    for p in PROVIDERS:
        m: tuple[Timing, float | None] | None = measured.get(p)
        row[f"{p}_ms"] = list(m[0].ms) if m else None
        row[f"{p}_timing"] = m[0].method if m else None
        row[f"{p}_tflops"] = shape.flops(mode) / m[0].median / 1e9 if m else None
        row[f"{p}_peak_mib"] = m[1] if m else None
    ours, sdpa = row["ours_tflops"], row["sdpa_tflops"]
    row["x_sdpa"] = ours / sdpa if ours and sdpa else None
    return row


def measure(dry_run: bool, dtype: torch.dtype, device: torch.device) -> Iterator[dict]:
    """Yield one row per (shape, mode), each shape checked before it is timed."""
    for shape in shapes(dry_run):
        try:
            warm = _inputs(shape, "ours", dtype, device)
            kernels.flash_attention(*warm).backward(torch.randn_like(warm[0]))  # autotune on the timed shape
            del warm
            checked, error = check_shape(shape, dtype, device), None
        except Exception as e:  # e.g. Triton's OutOfResources: say so, keep the other providers and shapes
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"bench.attention: {shape}: ours failed: {error}", file=sys.stderr)
            checked = []
        ok = bool(checked) and all(r.ok for r in checked)
        if not ok:
            print(f"bench.attention: {shape} FAILED its check, ours is not timed there", file=sys.stderr)
        for mode in ("fwd", "fwd+bwd"):
            providers = [p for p in PROVIDERS if p != "ours" or ok]
            measured = {p: m for p in providers if (m := _measure(shape, p, mode, dtype, device, dry_run))}
            yield {**_row(shape, mode, checked, measured), "error": error}
        if device.type == "cuda":
            torch.cuda.empty_cache()


def format_table(rows: list[dict], card: str, date: str) -> str:
    lines = [
        "| card | date | shape | B x H/Hkv x T x d | mode | checked (err / limit) | ours TFLOP/s | SDPA TFLOP/s "
        "| eager TFLOP/s | ours / SDPA | ours ms p20 / p50 / p80 | peak MiB ours / SDPA / eager |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        worst = f" ({r['check_worst']:.2f})" if r["check_worst"] is not None else " (did not run)"
        checked = ("ok" if r["check_ok"] else "**FAILED**") + worst
        tflops = [f"{r[f'{p}_tflops']:.4g}" if r[f"{p}_tflops"] else "-" for p in PROVIDERS]
        ours_ms = " / ".join(f"{t:.3f}" for t in r["ours_ms"]) if r["ours_ms"] else "-"
        peaks = " / ".join(f"{r[f'{p}_peak_mib']:.0f}" if r[f"{p}_peak_mib"] is not None else "-" for p in PROVIDERS)
        ratio = f"{r['x_sdpa']:.2f}" if r["x_sdpa"] else "-"
        cells = [card, date, r["shape"], r["dims"], r["mode"], checked, *tflops, ratio, ours_ms, peaks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def setup(dry_run: bool) -> tuple[torch.device, torch.dtype]:
    """bf16 on a GPU; the dry run's fp32 on the CPU interpreter, whose bf16 is unreliable."""
    if torch.cuda.is_available() and not dry_run:
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


NOTE = ("TFLOP/s with forward = 2·B·H·T²·d (causal), forward+backward 3.5x; SDPA = `scaled_dot_product_attention` "
        "(flash backend on CUDA); eager = `kernels.ops(\"eager\")`; peak MiB beyond the inputs")  # fmt: skip


def run(dry_run: bool = False) -> str:
    """Check and benchmark every shape; returns a markdown section."""
    device, dtype = setup(dry_run)
    card, date = env.card_name(device), env.today()
    rows = list(measure(dry_run, dtype, device))
    title = f"### Causal attention: {card}, {env.versions()}"
    return "\n\n".join([title, f"dtype {str(dtype).removeprefix('torch.')}; {NOTE}", format_table(rows, card, date)])


def main(argv=None) -> int:
    args = env.parse_args("smollm_stack.bench.attention", __doc__, argv, compile_flag=False, needs_cuda=True)
    if args is None:
        return 2
    print(run(dry_run=args.dry_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
