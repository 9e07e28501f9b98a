"""Imported first by the torch benchmarks, to set what they need before torch and triton load.

Passive OpenMP waiting, since spin-waiting threads collapse CPU throughput on shared cores; and, without a GPU,
Triton's interpreter, the only way its kernels run on a CPU.
"""

import datetime
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

from smollm_stack.bench import cli  # noqa: E402


def versions() -> str:
    """The software a results row depends on."""
    return f"torch {torch.__version__}, triton {triton.__version__}"


def today() -> str:
    return datetime.date.today().isoformat()


def card_name(device: torch.device) -> str:
    """What a results row says it ran on: the GPU's name, or the CPU and how the kernels ran there."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, Triton interpreter)"


def parse_args(module: str, doc: str, argv: list[str] | None, *, compile_flag: bool, needs_cuda: bool, more=None):
    """The torch benchmarks' shared flags (--dry-run, and --no-compile where there is a compiled provider) for
    `python -m <module>`, whose docstring is `doc`; ``more(parser)``, if given, adds the benchmark's own.

    Returns None, after printing why, when the full run needs a GPU and there is none.
    """
    parser = cli.parser(module, doc, dry_run="tiny shapes on the CPU (Triton on its interpreter)")
    if compile_flag:
        parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    if more is not None:
        more(parser)
    args = parser.parse_args(argv)
    if needs_cuda and not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device; use --dry-run on a CPU", file=sys.stderr)
        return None
    return args
