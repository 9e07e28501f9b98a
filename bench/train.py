"""Benchmark whole training steps of the trainer: tokens/s, ms/step and MFU with each kernel provider.

    python -m bench.train            # on a GPU: bf16, the TinyStories-17M preset at 128 x 256 and 125M at 16 x 1024
    python -m bench.train            # on a CPU: the tiny preset at 16 x 128, eager vs torch.compile
    python -m bench.train --dry-run  # a tiny model on the CPU, eager and Triton (interpreter): checks the plumbing

Each row is a short ``train.run`` on random tokens, so what is timed is the trainer's own step (batch sampling,
forward, backward, clipping, AdamW); tokens/s is the median over the logged intervals after the first, which
holds torch.compile's and Triton's compilation. Providers: ``eager`` (the model's eager PyTorch ops), ``triton``
(our kernels), ``compile`` (the eager model under torch.compile).
"""

import datetime
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass

import bench.env  # first: it sets what torch and triton read when they load
import torch

import numpy as np

from train import run as train_run
from train.config import make_config
from train.log import read_metrics


@dataclass
class BenchCase:
    preset: str
    batch: int
    context: int
    model_args: dict | None = None  # overrides of the preset (the dry run shrinks it)


GPU_CASES = (BenchCase("tinystories-17m", 128, 256), BenchCase("125m", 16, 1024))
CPU_CASES = (BenchCase("tiny", 16, 128),)
DRY_RUN_CASES = (BenchCase("tiny", 2, 16, dict(d_model=32, num_layers=1, num_heads=2)),)
PROVIDERS = ("eager", "triton", "compile")


def measure(case: BenchCase, provider: str, steps: int, log_interval: int, device: str, workdir: str) -> dict:
    """Run the trainer for ``steps`` steps on random tokens; its tokens/s, ms/step and MFU after warm-up."""
    data = os.path.join(workdir, "tokens.npy")
    if not os.path.exists(data):
        np.save(data, np.random.default_rng(0).integers(0, 2048, size=1 << 20, dtype=np.uint16))
    out_dir = os.path.join(workdir, f"{case.preset}-{case.batch}x{case.context}-{provider}")
    cfg = make_config(
        train_data=data,
        val_data=data,
        vocab_size=2048 if case.preset == "tiny" else None,
        model=case.preset,
        model_args={**(case.model_args or {}), "kernels": "eager" if provider == "compile" else provider},
        context_length=case.context,
        batch_size=case.batch,
        steps=steps,
        warmup_steps=2,
        log_interval=log_interval,
        eval_interval=steps,
        eval_batches=1,
        ckpt_interval=steps,
        keep_ckpts=1,
        sample_tokens=0,
        compile=provider == "compile",
        device=device,
        progress=False,
        out_dir=out_dir,
    )
    train_run(cfg)
    rows = [r for r in read_metrics(out_dir) if r.get("tokens_per_s") is not None][1:]  # the first holds warm-up
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in rows)
    mfu = [r["mfu"] for r in rows if r["mfu"] is not None]
    return dict(tokens_per_s=tokens_per_s, ms=1000 * case.batch * case.context / tokens_per_s,
                mfu=statistics.median(mfu) if mfu else None)  # fmt: skip


def run(dry_run: bool = False, providers=PROVIDERS) -> str:
    """Benchmark each case with each provider; returns a markdown section."""
    cuda = torch.cuda.is_available() and not dry_run
    device = "cuda" if cuda else "cpu"
    if dry_run:
        cases, providers, steps, interval = DRY_RUN_CASES, [p for p in providers if p != "compile"], 4, 2
    elif cuda:
        cases, steps, interval = GPU_CASES, 60, 10
    else:  # the interpreter is far too slow for the tiny preset: Triton is a GPU provider
        cases, providers, steps, interval = CPU_CASES, [p for p in providers if p != "triton"], 30, 10
    card = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    dtype = "bfloat16 autocast" if cuda else "float32"
    date = datetime.date.today().isoformat()
    lines = [
        f"### Training steps: {card}, torch {torch.__version__}, {date}",
        "",
        f"{dtype}; `python -m bench.train{' --dry-run' if dry_run else ''}`"
        + ("; CPU timings of a dry run check the plumbing only" if dry_run else ""),
        "",
        "| card | date | preset | batch x context | provider | tokens/s | ms/step | MFU | x eager |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as workdir:
        for case in cases:
            measured = {p: measure(case, p, steps, interval, device, workdir) for p in providers}
            eager = measured.get("eager", {}).get("tokens_per_s")
            for provider, m in measured.items():
                mfu = "n/a" if m["mfu"] is None else f"{100 * m['mfu']:.1f}%"
                ratio = f"{m['tokens_per_s'] / eager:.2f}" if eager else "-"
                lines.append(
                    f"| {card} | {date} | {case.preset} | {case.batch} x {case.context} | {provider} | "
                    f"{m['tokens_per_s']:,.0f} | {m['ms']:.1f} | {mfu} | {ratio} |"
                )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = bench.env.parse_args(__doc__, argv, compile_flag=True, needs_cuda=False)
    providers = [p for p in PROVIDERS if not (args.no_compile and p == "compile")]
    print(run(dry_run=args.dry_run, providers=providers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
