"""Compile-only report per architecture: every kernel lowered for a T4, A100, RTX 3090, L4 and H100 (sm_75, sm_80,
sm_86, sm_89, sm_90a) through the real launch path, no GPU needed.

    python -m smollm_stack.bench.lowering                        # every kernel, every architecture, both dtypes
    python -m smollm_stack.bench.lowering --arch sm_75,sm_80     # some architectures
    python -m smollm_stack.bench.lowering --only attention       # cases whose name holds one of these words
    python -m smollm_stack.bench.lowering --presets              # the presets' shapes only (the gates')

Each case calls an op's public launcher (forward, then backward) on CPU stand-in tensors of the training shape, in bf16
where the card has it (capability 8.0 and up) and in fp16 on every card, inside
``kernels.tooling.lowering.compile_only(card)``: Triton specializes the arguments as a launch on that card would,
compiles with ptxas, records the grid and launches nothing; an autotuned kernel compiles every config its pruner keeps
for the card. One line per kernel x config (columns in ``kernels.tooling.lowering``'s docstring): registers, spill
instructions (STL + LDL), shared memory, the dots on tensor cores, wgmma / mma.sync and cp.async / TMA counts in the
PTX, the share of 16-byte global loads and stores, the grid, the CTAs and warps one SM can hold, and the waves the grid
takes on the card's SMs. A config that does not fit the card's shared memory shows "cannot launch".

Shapes: the TinyStories-17M preset at batch 128 x 256 tokens and the 125M preset at 16 x 1024 (bench.kernels'), and
causal attention at T = 4096 with 16384 tokens and 2048 = heads x head dim (bench.attention's), head dims 32/64/128.
Persistent kernels size their grid from the device's SM count only on CUDA, so on the CPU stand-ins they show the
CPU grid. Takes a few minutes an architecture and dtype from a cold Triton cache (every compile is a real ptxas
run; sm_75, whose compiles of the larger tiles are the slowest, the longest).
"""

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

import triton

from smollm_stack.bench import cli

ATTENTION_T = 4096
ATTENTION_TOKENS = 16384
ATTENTION_WIDTH = 2048
PRESET_BATCH = {"tinystories-17m": 128, "125m": 16}  # bench.kernels' batch sizes


@dataclass
class Case:
    name: str  # op and shape, e.g. "rms_norm 125m"
    run: Callable[[], None]  # forward and backward through the op's launcher


def _empty(*shape, dtype, grad=False):
    return torch.empty(*shape, dtype=dtype).requires_grad_(grad)


def _fwd_bwd(fn, *inputs):
    def run():
        out = fn(*inputs)
        out.backward(torch.empty_like(out) if out.dim() else None)

    return run


def _attention(B, H, Hkv, T, d, dtype):
    from smollm_stack import kernels

    q = _empty(B, H, T, d, dtype=dtype, grad=True)
    k, v = _empty(B, Hkv, T, d, dtype=dtype, grad=True), _empty(B, Hkv, T, d, dtype=dtype, grad=True)
    return _fwd_bwd(kernels.flash_attention, q, k, v)


def _flce_chunk(N, V, dtype):
    """The cross-entropy launch inside fused_linear_cross_entropy: rows of its 64-padded logits buffer."""
    from smollm_stack.kernels.linear_cross_entropy import chunk_rows, cross_entropy_forward, padded_width

    rows = chunk_rows(N, V, dtype)
    logits = _empty(rows, padded_width(V), dtype=dtype)[:, :V]
    targets = torch.zeros(rows, dtype=torch.int64)
    return lambda: cross_entropy_forward(logits, targets, torch.tensor(N), -100, logits)


def cases(dtype: torch.dtype, presets_only: bool = False) -> list[Case]:
    from smollm_stack import kernels
    from smollm_stack.model.config import ModelConfig

    out = []
    for d in () if presets_only else (32, 64, 128):
        B, H = ATTENTION_TOKENS // ATTENTION_T, ATTENTION_WIDTH // d
        out.append(Case(f"attention d{d} T{ATTENTION_T}", _attention(B, H, H, ATTENTION_T, d, dtype)))
    for preset, batch in PRESET_BATCH.items():
        c = ModelConfig.preset(preset)
        B, T, N = batch, c.context_length, batch * c.context_length
        empty = lambda *shape, dtype=dtype: _empty(*shape, dtype=dtype, grad=True)
        out += [
            Case(f"attention {preset}", _attention(B, c.num_heads, c.num_kv_heads, T, c.head_dim, dtype)),
            Case(f"rms_norm {preset}", _fwd_bwd(kernels.rms_norm, empty(N, c.d_model),
                                                empty(c.d_model, dtype=torch.float32))),
            Case(f"swiglu {preset}", _fwd_bwd(kernels.swiglu, empty(N, c.d_ff), empty(N, c.d_ff))),
            Case(f"rope {preset}", _fwd_bwd(kernels.apply_rope, empty(B, c.num_heads, T, c.head_dim),
                                            torch.arange(T))),
            Case(f"cross_entropy {preset}", _fwd_bwd(kernels.cross_entropy, empty(N, c.vocab_size),
                                                     torch.zeros(N, dtype=torch.int64))),
            Case(f"flce_chunk {preset}", _flce_chunk(N, c.vocab_size, dtype)),
        ]  # fmt: skip
    return out


def dtypes(capability: int) -> tuple[torch.dtype, ...]:
    """bf16 where the card has bf16 tensor cores (8.0 and up), fp16 on every card."""
    return (torch.bfloat16, torch.float16) if capability >= 80 else (torch.float16,)


def report(archs: list[str], words: list[str], presets_only: bool) -> str:
    from smollm_stack.kernels.tooling import lowering

    lines = [f"triton {triton.__version__}"]
    print(lines[0], flush=True)
    for arch in archs:
        card = lowering.DEVICES[arch]
        for dtype in dtypes(card.capability):
            head = (f"# {arch} ({card.name}, {card.sms} SMs, {card.smem_per_block // 1024} KB shared memory a block), "
                    f"{str(dtype).removeprefix('torch.')}, ptxas {lowering.ptxas_version(card)}")  # fmt: skip
            lines += ["", head]
            print("\n" + head, flush=True)
            for case in [c for c in cases(dtype, presets_only) if not words or any(w in c.name for w in words)]:
                with lowering.compile_only(card) as launches:
                    case.run()
                lines += ["", f"## {case.name}", lowering.table(launches)]
                print("\n".join(lines[-3:]), flush=True)
    return "\n".join(lines)


def main(argv=None) -> int:
    from smollm_stack.kernels.tooling.lowering import DEVICES

    parser = cli.parser("smollm_stack.bench.lowering", __doc__)
    parser.add_argument("--arch", default=",".join(DEVICES), help=f"comma-separated targets of {', '.join(DEVICES)}")
    parser.add_argument("--only", default="", help="comma-separated words; run the cases whose name contains one")
    parser.add_argument("--presets", action="store_true", help="only the presets' shapes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: TRITON_INTERPRET=1 is set; unset it, the report needs Triton's real compiler", file=sys.stderr)
        return 2
    archs, words = [a for a in args.arch.split(",") if a], [w for w in args.only.split(",") if w]
    if unknown := [a for a in archs if a not in DEVICES]:
        print(f"error: --arch {unknown[0]!r} is none of {', '.join(DEVICES)}", file=sys.stderr)
        return 2
    if not any(not words or any(w in c.name for w in words) for c in cases(torch.float16, args.presets)):
        print(f"error: --only {args.only!r} matches no case", file=sys.stderr)
        return 2
    report(archs, words, args.presets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
