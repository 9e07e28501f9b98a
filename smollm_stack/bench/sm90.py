"""Compile-only Hopper report: every kernel lowered for an H100 (sm_90a) through the real launch path, no GPU needed.

    python -m smollm_stack.bench.sm90                   # every kernel at both presets' and the attention bench's shapes
    python -m smollm_stack.bench.sm90 --only attention  # kernels whose case name holds one of the comma-separated words

Each case calls an op's public launcher (forward, then backward) on CPU stand-in tensors of the training shape, in
bf16, inside ``kernels.sm90.compile_only()``: Triton specializes the arguments as an H100 launch would, compiles with
ptxas, records the grid and launches nothing; an autotuned kernel compiles every config its pruner keeps. One line
per kernel x config (columns in ``kernels.sm90``'s docstring): registers, spill instructions (STL + LDL), shared
memory, wgmma / mma.sync and cp.async / TMA counts in the PTX, the share of 16-byte global loads and stores, the grid,
the CTAs and warps one SM can hold, and the waves the grid takes on 132 SMs.

Shapes: the TinyStories-17M preset at batch 128 x 256 tokens and the 125M preset at 16 x 1024 (bench.kernels'), and
causal attention at T = 4096 with 16384 tokens and 2048 = heads x head dim (bench.attention's), head dims 32/64/128.
Persistent kernels size their grid from the device's SM count only on CUDA, so on the CPU stand-ins they show the
CPU grid. Takes a few minutes from a cold Triton cache (every compile is a real ptxas run).
"""

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

import triton

from smollm_stack.bench import cli

DTYPE = torch.bfloat16
ATTENTION_T = 4096
ATTENTION_TOKENS = 16384
ATTENTION_WIDTH = 2048
PRESET_BATCH = {"tinystories-17m": 128, "125m": 16}  # bench.kernels' batch sizes


@dataclass
class Case:
    name: str  # op and shape, e.g. "rms_norm 125m"
    run: Callable[[], None]  # forward and backward through the op's launcher


def _empty(*shape, dtype=DTYPE, grad=False):
    return torch.empty(*shape, dtype=dtype).requires_grad_(grad)


def _fwd_bwd(fn, *inputs):
    def run():
        out = fn(*inputs)
        out.backward(torch.empty_like(out) if out.dim() else None)

    return run


def _attention(B, H, Hkv, T, d):
    from smollm_stack import kernels

    q, k, v = _empty(B, H, T, d, grad=True), _empty(B, Hkv, T, d, grad=True), _empty(B, Hkv, T, d, grad=True)
    return _fwd_bwd(kernels.flash_attention, q, k, v)


def _flce_chunk(N, V):
    """The cross-entropy launch inside fused_linear_cross_entropy: rows of its 64-padded logits buffer."""
    from smollm_stack.kernels.linear_cross_entropy import chunk_rows, cross_entropy_forward

    rows = min(N, chunk_rows(N, V, DTYPE, torch.device("cuda")) if torch.cuda.is_available() else 8192)
    logits = _empty(rows, 64 * triton.cdiv(V, 64))[:, :V]
    targets = torch.zeros(rows, dtype=torch.int64)
    return lambda: cross_entropy_forward(logits, targets, torch.tensor(N), -100, logits)


def cases() -> list[Case]:
    from smollm_stack import kernels
    from smollm_stack.model.config import ModelConfig

    out = []
    for d in (32, 64, 128):
        B, H = ATTENTION_TOKENS // ATTENTION_T, ATTENTION_WIDTH // d
        out.append(Case(f"attention d{d} T{ATTENTION_T}", _attention(B, H, H, ATTENTION_T, d)))
    for preset, batch in PRESET_BATCH.items():
        c = ModelConfig.preset(preset)
        B, T, N = batch, c.context_length, batch * c.context_length
        out += [
            Case(f"attention {preset}", _attention(B, c.num_heads, c.num_kv_heads, T, c.head_dim)),
            Case(f"rms_norm {preset}", _fwd_bwd(kernels.rms_norm, _empty(N, c.d_model, grad=True),
                                                _empty(c.d_model, dtype=torch.float32, grad=True))),
            Case(f"swiglu {preset}", _fwd_bwd(kernels.swiglu, _empty(N, c.d_ff, grad=True),
                                              _empty(N, c.d_ff, grad=True))),
            Case(f"rope {preset}", _fwd_bwd(kernels.apply_rope, _empty(B, c.num_heads, T, c.head_dim, grad=True),
                                            torch.arange(T))),
            Case(f"cross_entropy {preset}", _fwd_bwd(kernels.cross_entropy, _empty(N, c.vocab_size, grad=True),
                                                     torch.zeros(N, dtype=torch.int64))),
            Case(f"flce_chunk {preset}", _flce_chunk(N, c.vocab_size)),
        ]  # fmt: skip
    return out


def report(selected: list[Case]) -> str:
    from smollm_stack.kernels import sm90

    lines = [f"triton {triton.__version__}, ptxas {sm90.ptxas_version()}, target sm_90a ({sm90.H100.name}, "
             f"{sm90.H100.sms} SMs), bf16"]
    print(lines[0], flush=True)
    for case in selected:
        with sm90.compile_only() as launches:
            case.run()
        lines += ["", f"## {case.name}", sm90.table(launches)]
        print("\n".join(lines[-3:]), flush=True)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = cli.parser("smollm_stack.bench.sm90", __doc__)
    parser.add_argument("--only", default="", help="comma-separated words; run the cases whose name contains one")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: TRITON_INTERPRET=1 is set; unset it, the report needs Triton's real compiler", file=sys.stderr)
        return 2
    words = [w for w in args.only.split(",") if w]
    selected = [c for c in cases() if not words or any(w in c.name for w in words)]
    if not selected:
        print(f"error: --only {args.only!r} matches no case", file=sys.stderr)
        return 2
    report(selected)
    return 0


if __name__ == "__main__":
    sys.exit(main())
