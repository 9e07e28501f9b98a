"""Benchmark causal attention: our Triton FlashAttention against PyTorch's SDPA (flash backend) and the eager reference.

    python -m bench.attention            # on a GPU: bf16, head dims 64 and 128, T = 256..8192, plus the model presets
    python -m bench.attention --dry-run  # tiny shapes on the CPU interpreter (what CI runs): checks the plumbing only

Batch x T is held at 16k tokens and H x d at 2048, as in the FlashAttention papers, so every row does the same work
per token except for the T x T part that attention adds. TFLOP/s counts the matmuls: forward 4·B·H·T·S·d, halved
when causal; the backward does 2.5x the forward (five matmuls to the forward's two), so forward+backward is 3.5x.
Times are medians of ``triton.testing.do_bench``; peak memory is what one call allocates beyond its inputs. The eager
reference materialises fp32 (T, S) scores and probabilities, so it is skipped where they would not fit.
"""

import datetime
import sys
from dataclasses import dataclass

import bench.env  # first: it sets what torch and triton read when they load
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import triton

import kernels
from bench.kernels import peak_mib, time_ms
from kernels import reference

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
        """About what the eager reference holds at once in fwd+bwd: ~6 fp32 (T, S) tensors per head."""
        return 6 * 4 * self.batch * self.heads * self.seq_len**2


def shapes(dry_run: bool) -> list[Shape]:
    if dry_run:
        return [Shape("dry-run", 1, 2, 1, 24, 16)]
    sweep = [Shape(f"d{d}", TOKENS // T, WIDTH // d, WIDTH // d, T, d) for d in SWEEP_HEAD_DIMS for T in SWEEP_LENGTHS]
    from model import ModelConfig

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


def _inputs(shape: Shape, provider: str, dtype: torch.dtype, device: torch.device):
    g = torch.Generator(device).manual_seed(0)
    q = torch.randn(shape.batch, shape.heads, shape.seq_len, shape.head_dim, generator=g, device=device, dtype=dtype)
    kv_shape = (shape.batch, shape.kv_heads, shape.seq_len, shape.head_dim)
    k = torch.randn(kv_shape, generator=g, device=device, dtype=dtype)
    v = torch.randn(kv_shape, generator=g, device=device, dtype=dtype)
    if provider == "sdpa" and shape.heads != shape.kv_heads:
        k, v = (t.repeat_interleave(shape.heads // shape.kv_heads, dim=1) for t in (k, v))
    return [t.requires_grad_() for t in (q, k, v)]


def _measure(shape: Shape, provider: str, mode: str, dtype: torch.dtype, device: torch.device, dry_run: bool):
    """(median ms, peak MiB) of one provider's forward or forward+backward, or None where it cannot run."""
    if provider == "eager" and device.type == "cuda":
        if shape.eager_bytes() > 0.4 * torch.cuda.get_device_properties(device).total_memory:
            return None
    fn = {"ours": kernels.flash_attention, "sdpa": sdpa_flash, "eager": reference.flash_attention}[provider]
    leaves = _inputs(shape, provider, dtype, device)
    upstream = torch.randn_like(leaves[0])
    run = (lambda: fn(*leaves)) if mode == "fwd" else (lambda: fn(*leaves).backward(upstream))
    try:
        run()  # warm-up: Triton compiles and autotunes here, outside the timing
    except RuntimeError as e:  # e.g. no flash backend for this card, dtype or head dim
        print(f"bench.attention: {provider} {shape} {mode}: {str(e).splitlines()[0]}", file=sys.stderr)
        return None
    return time_ms(run, device, leaves, dry_run), peak_mib(run, device)


def run(dry_run: bool = False, dtype: torch.dtype | None = None) -> str:
    """Benchmark every shape; returns a markdown section (dry_run: tiny shapes on the CPU interpreter)."""
    device = torch.device("cuda" if torch.cuda.is_available() and not dry_run else "cpu")
    # the interpreter's bf16 is unreliable, so the dry run uses fp32
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    card = bench.env.card_name(device)
    date = datetime.date.today().isoformat()
    lines = [
        f"### Causal attention: {card}, torch {torch.__version__}, triton {triton.__version__}, {date}",
        "",
        f"dtype {str(dtype).removeprefix('torch.')}; TFLOP/s with forward = 2·B·H·T²·d (causal), forward+backward 3.5x;"
        " SDPA = `scaled_dot_product_attention` (flash backend on CUDA); peak MiB beyond the inputs"
        + ("; CPU timings check the plumbing only, they say nothing about speed" if device.type == "cpu" else ""),
        "",
        "| card | date | shape | B x H/Hkv x T x d | mode | ours TFLOP/s | SDPA TFLOP/s | eager TFLOP/s | ours / SDPA "
        "| ours ms | peak MiB ours / SDPA / eager |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for shape in shapes(dry_run):
        dims = f"{shape.batch} x {shape.heads}/{shape.kv_heads} x {shape.seq_len} x {shape.head_dim}"
        for mode in ("fwd", "fwd+bwd"):
            measured = {p: _measure(shape, p, mode, dtype, device, dry_run) for p in PROVIDERS}
            tflops = {p: shape.flops(mode) / m[0] / 1e9 if m else None for p, m in measured.items()}
            ratio = tflops["ours"] / tflops["sdpa"] if tflops["ours"] and tflops["sdpa"] else None
            peaks = " / ".join(f"{m[1]:.0f}" if m and m[1] is not None else "-" for m in measured.values())
            cells = [f"{tflops[p]:.4g}" if tflops[p] else "-" for p in PROVIDERS]
            ours_ms = f"{measured['ours'][0]:.3f}" if measured["ours"] else "-"
            cells += [f"{ratio:.2f}" if ratio else "-", ours_ms, peaks]
            lines.append(f"| {card} | {date} | {shape.name} | {dims} | {mode} | " + " | ".join(cells) + " |")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return "\n".join(lines)


def main(argv=None) -> int:
    args = bench.env.parse_args(__doc__, argv, compile_flag=False, needs_cuda=True)
    if args is None:
        return 2
    print(run(dry_run=args.dry_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
