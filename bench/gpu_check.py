"""One command for a lent GPU: kernel correctness, then every benchmark, written to one markdown file.

    python -m bench.gpu_check             # on a GPU, about 3-5 minutes
    python -m bench.gpu_check --dry-run   # tiny shapes on the CPU interpreter, seconds (CI runs this)

1. Correctness: ``kernels.check.check_kernels`` in bf16, fp16 and fp32 at the TinyStories-17M widths (fewer
   sequences than training, same shapes per sequence) and in bf16 at the 125M widths, with the FlashAttention rule.
2. Benchmarks: ``bench.kernels.run``, then ``bench.attention.run`` and ``bench.train.run`` when those modules exist.
The report goes to stdout and to ``--out`` (default ``bench/gpu_check_<date>.md``); a real GPU run also appends it
to ``bench/RESULTS.md``. Exit status 1 when any correctness check fails.
"""

import argparse
import datetime
import importlib
import sys
import time
from pathlib import Path

import bench.env  # first: it sets what torch and triton read when they load
import torch

import triton

from bench import kernels as bench_kernels
from kernels.check import check_kernels, format_check_table

RESULTS = Path(__file__).with_name("RESULTS.md")

# (label, check_kernels shape arguments, dtypes)
GPU_CHECKS = (
    ("tinystories-17m widths, 32 x 256 tokens",
     dict(batch_size=32, seq_len=256, d_model=512, d_ff=1344, num_heads=16, num_kv_heads=16, vocab_size=10000),
     (torch.bfloat16, torch.float16, torch.float32)),
    ("125m widths, 4 x 1024 tokens",
     dict(batch_size=4, seq_len=1024, d_model=768, d_ff=2048, num_heads=12, num_kv_heads=12, vocab_size=50257),
     (torch.bfloat16,)),
)  # fmt: skip
DRY_RUN_CHECKS = (
    ("dry run, 2 x 16 tokens",
     dict(batch_size=2, seq_len=16, d_model=64, d_ff=48, num_heads=4, num_kv_heads=2, vocab_size=101),
     (torch.float32, torch.float16)),  # the interpreter's bf16 is unreliable
)  # fmt: skip


def _correctness(checks, device: torch.device) -> tuple[str, bool]:
    sections, all_ok = [], True
    for label, shape, dtypes in checks:
        results = []
        for dtype in dtypes:
            results += check_kernels(**shape, dtype=dtype, device=device)
        all_ok &= all(r.ok for r in results)
        sections.append(f"#### {label}\n\n{format_check_table(results)}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return "\n\n".join(sections), all_ok


def _optional_bench(name: str, dry_run: bool) -> str | None:
    """bench.<name>.run(dry_run) when that module exists (other teams own it), else None."""
    try:
        module = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"bench.{name}":
            raise
        return None
    return module.run(dry_run=dry_run)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU interpreter")
    parser.add_argument("--out", type=Path, default=None, help="report path (default bench/gpu_check_<date>.md)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider (saves minutes)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device; run with --dry-run on a CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    date = datetime.date.today().isoformat()
    out = args.out or RESULTS.with_name(f"gpu_check_{date}.md")
    card = bench.env.card_name(device)
    start = time.perf_counter()

    def elapsed() -> str:
        return f"{time.perf_counter() - start:.0f} s"

    parts = [
        f"## GPU check: {card}, {date}",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}; command: `python -m bench.gpu_check "
        + " ".join(argv if argv is not None else sys.argv[1:])
        + "`",
    ]
    table, ok = _correctness(DRY_RUN_CHECKS if args.dry_run else GPU_CHECKS, device)
    parts += ["", "### Correctness (kernel error <= 2x eager's own error vs an fp64 gold run)", "", table]
    print(f"correctness {'passed' if ok else 'FAILED'} ({elapsed()})", file=sys.stderr)
    providers = [p for p in bench_kernels.PROVIDERS if not (args.no_compile and p == "compile")]
    parts += ["", bench_kernels.run(dry_run=args.dry_run, providers=providers)]
    print(f"kernel benchmarks done ({elapsed()})", file=sys.stderr)
    for name in ("attention", "train"):
        section = _optional_bench(name, args.dry_run)
        parts += ["", section if section is not None else f"(bench.{name} not present: skipped)"]
        print(f"bench.{name} done ({elapsed()})", file=sys.stderr)
    parts += ["", f"Total wall time {elapsed()}.", ""]

    report = "\n".join(parts)
    print(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    if not args.dry_run:
        with RESULTS.open("a") as f:
            f.write("\n" + report)
    print(f"wrote {out}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
