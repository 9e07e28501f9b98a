"""Benchmark whole training steps of the trainer: tokens/s, ms/step and MFU with each provider.

    python -m smollm_stack.bench.train            # a GPU: bf16, the 17M preset at 128 x 256 and 125M at 16 x 1024
    python -m smollm_stack.bench.train            # a CPU: 17M at 8 x 256 and tiny at 16 x 128, vs the naive loop
    python -m smollm_stack.bench.train --dry-run  # a tiny model, eager, Triton (interpreter), naive: the plumbing
    python -m smollm_stack.bench.train --optimizer muon  # the trainer rows with Muon (the step and naive rows: AdamW)

Each trainer row is a short ``train.run`` on random tokens, so what is timed is the trainer's own step (batch
sampling, forward, backward, clipping, AdamW); tokens/s is the median (and 10th-90th percentile) over the steps after
the first two (on a GPU over 10-step intervals after the first), which hold torch.compile's and Triton's compilation.
Providers: ``eager`` (kernels.eager), ``triton`` (our kernels), ``compile`` (the eager model under torch.compile),
and, on a CPU, ``naive`` (bench/naive_train.py: the loop a student writes first, the same model in textbook
PyTorch), timed step by step on the same batches in turns with ``eager step`` (the trainer's step from its own
pieces, without its loop) and ``eager step, torch BLAS`` (the same on torch's BLAS: what kernels.cpu_blas's choice
of OpenBLAS is worth; nothing where it keeps torch's). Each is profiled for a few steps: the share of the step spent
in matmuls (self time of aten::mm/addmm/bmm/matmul/linear and of kernels.cpu_blas's OpenBLAS products), the part no
implementation can remove, and in SDPA's fused attention kernel (whose matmuls happen inside it).
"""

import datetime
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from smollm_stack.bench import env  # first: it sets what torch and triton read when they load
import torch

import numpy as np

from smollm_stack.bench.naive_train import naive_step_fn
from smollm_stack.kernels import cpu_blas
from smollm_stack.model import ModelConfig, TransformerLM
from smollm_stack.train import run as train_run
from smollm_stack.train.config import TrainConfig, make_config
from smollm_stack.train.data.tokens import BatchSampler
from smollm_stack.train.log import read_metrics
from smollm_stack.train.optim.adamw import clip_gradients, make_adamw


@dataclass
class BenchCase:
    preset: str
    batch: int
    context: int
    model_args: dict | None = None  # overrides of the preset (the dry run shrinks it)


GPU_CASES = (BenchCase("tinystories-17m", 128, 256), BenchCase("125m", 16, 1024))
# The tiny preset without its value embeddings: every provider, the naive loop too, races the same Llama.
CPU_CASES = (BenchCase("tinystories-17m", 8, 256), BenchCase("tiny", 16, 128, dict(value_embeddings=False)))
DRY_RUN_CASES = (BenchCase("tiny", 2, 16, dict(d_model=32, num_layers=1, num_heads=2, value_embeddings=False)),)
PROVIDERS = ("eager", "triton", "compile", "naive")
VOCAB = 2048  # random tokens below this; the presets' own vocabularies (the 17M's 10000) are kept
# AdamW's lr in every row (the naive loop's): at the Muon default's 1e-2 AdamW diverges on the 17M preset, and the
# denormal floats of a diverged run slowed the trainer's CPU steps by a quarter.
ADAMW_LR = 1e-3
WARMUP_STEPS = 2  # left out of the statistics: the first steps hold compilation and the allocator's growth
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "cpu_blas::mm")


def random_tokens(workdir: str) -> str:
    path = os.path.join(workdir, "tokens.npy")
    if not os.path.exists(path):
        np.save(path, np.random.default_rng(0).integers(0, VOCAB, size=1 << 20, dtype=np.uint16))
    return path


def model_config(case: BenchCase, backend: str = "eager") -> ModelConfig:
    vocab = {"vocab_size": VOCAB} if case.preset == "tiny" else {}
    return ModelConfig.preset(case.preset, **{**(case.model_args or {}), **vocab}, context_length=case.context,
                              backend=backend)  # fmt: skip


def stats(tokens_per_s: list[float]) -> dict:
    q = np.quantile(tokens_per_s, [0.1, 0.5, 0.9])
    return dict(tokens_per_s=float(q[1]), p10=float(q[0]), p90=float(q[2]))


def measure_trainer(
    case: BenchCase, provider: str, steps: int, device: str, workdir: str, optimizer: str = "torch"
) -> dict:
    """Run the trainer for ``steps`` steps on random tokens; tokens/s per logged interval after warm-up.

    On a CPU every step is logged (a host sync costs nothing there); on a GPU every 10th, so the host queues ahead.
    """
    log_interval = 10 if device == "cuda" else 1
    data = random_tokens(workdir)
    out_dir = os.path.join(workdir, f"{case.preset}-{case.batch}x{case.context}-{provider}")
    cfg = make_config(
        train_data=data,
        val_data=data,
        vocab_size=VOCAB if case.preset == "tiny" else None,
        model=case.preset,
        model_args={**(case.model_args or {}), "backend": "eager" if provider == "compile" else provider},
        context_length=case.context,
        batch_size=case.batch,
        steps=steps,
        warmup_steps=2,
        max_lr=ADAMW_LR,
        min_lr=ADAMW_LR / 100,
        log_interval=log_interval,
        eval_interval=steps,
        eval_batches=1,
        ckpt_interval=steps,
        keep_ckpts=1,
        sample_tokens=0,
        compile=provider == "compile",
        optimizer=optimizer,  # by default AdamW, as in the step and naive rows: the rows race the same update
        device=device,
        progress=False,
        out_dir=out_dir,
    )
    train_run(cfg)
    rows = [r for r in read_metrics(out_dir) if r.get("tokens_per_s") is not None]
    rows = rows[max(1, WARMUP_STEPS // log_interval) :]
    mfu = [r["mfu"] for r in rows if r["mfu"] is not None]
    return {**stats([r["tokens_per_s"] for r in rows]), "mfu": statistics.median(mfu) if mfu else None}


def ours_step_fn(config: ModelConfig, blas: str = "auto"):
    """The trainer's step from its own pieces (model, fused loss, clip_gradients, make_adamw), for the profiler.

    Its row ("eager step") is timed in turns with the naive loop: the ratio the trainer row is checked by. ``blas``
    is kernels.cpu_blas's route; "torch" gives the same step on torch's BLAS, to show what the choice of BLAS is worth.
    """
    model = TransformerLM(config)
    decay = TrainConfig().optimizer.weight_decay
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": decay},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    optimizer = make_adamw("torch", groups, torch.device("cpu"), lr=ADAMW_LR, betas=(0.9, 0.95))
    params = list(model.parameters())

    def step(ids, targets):
        with cpu_blas.route(blas):
            loss = model(ids, targets)
            loss.backward()
        clip_gradients("torch", params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def time_steps(steps_by_name: dict, case: BenchCase, steps: int, workdir: str) -> dict:
    """tokens/s of each step function over ``steps`` steps on the trainer's batches, after warm-up.

    The functions take turns step by step, so a load that comes and goes on a shared machine hits them alike.
    """
    sampler = BatchSampler(np.load(random_tokens(workdir)), case.batch, case.context, seed=0, slots=1)
    rates = {name: [] for name in steps_by_name}
    for i in range(steps):
        ids, targets = sampler.batch(i, 0, "cpu")
        for name, step in steps_by_name.items():
            t0 = time.perf_counter()
            step(ids, targets)
            rates[name].append(case.batch * case.context / (time.perf_counter() - t0))
    return {name: {**stats(r[WARMUP_STEPS:]), "mfu": None} for name, r in rates.items()}


def profile_shares(step, case: BenchCase, steps: int, workdir: str) -> dict:
    """Shares of the wall time of ``steps`` profiled steps (after one warm-up step) in matmuls and in attention."""
    sampler = BatchSampler(np.load(random_tokens(workdir)), case.batch, case.context, seed=1, slots=1)
    step(*sampler.batch(0, 0, "cpu"))
    batches = [sampler.batch(i + 1, 0, "cpu") for i in range(steps)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for ids, targets in batches:
            step(ids, targets)
        wall_us = 1e6 * (time.perf_counter() - t0)
    events = prof.key_averages()
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    attention = sum(e.self_cpu_time_total for e in events if "flash_attention" in e.key)
    return dict(matmul_share=matmul / wall_us, attention_share=attention / wall_us)


def cpu_rows(case: BenchCase, providers, steps: int, workdir: str, optimizer: str) -> Iterable[tuple[str, dict]]:
    """The trainer with each provider, then its step and the naive loop's taking turns, each profiled."""
    for p in providers:
        if p != "naive":
            yield p, measure_trainer(case, p, steps, "cpu", workdir, optimizer)
    if "naive" in providers:
        step_fns = {"eager step": ours_step_fn(model_config(case)),
                    "eager step, torch BLAS": ours_step_fn(model_config(case), blas="torch"),
                    "naive": naive_step_fn(model_config(case), lr=ADAMW_LR)}  # fmt: skip
        for name, m in time_steps(step_fns, case, steps, workdir).items():
            yield name, {**m, **profile_shares(step_fns[name], case, 3, workdir)}


@dataclass(frozen=True)
class Setup:
    """What a run measures: its cases and providers on which device, how many steps each, the trainer's optimizer."""

    dry_run: bool
    cases: tuple
    providers: list
    steps: int
    device: str
    optimizer: str = "torch"  # the trainer rows' ("torch": AdamW, as the step and naive rows; or "muon")


def setup(dry_run: bool = False, providers=PROVIDERS, cuda: bool | None = None, optimizer: str = "torch") -> Setup:
    """The run's plan; cuda: whether a GPU runs it (default: whether there is one and this is no dry run)."""
    cuda = torch.cuda.is_available() and not dry_run if cuda is None else cuda
    if dry_run:
        cases, providers, steps = DRY_RUN_CASES, [p for p in providers if p != "compile"], 4
    elif cuda:
        cases, providers, steps = GPU_CASES, [p for p in providers if p != "naive"], 60
    else:  # the interpreter is far too slow for these shapes: Triton is a GPU provider
        cases, providers, steps = CPU_CASES, [p for p in providers if p != "triton"], 20
    return Setup(dry_run, cases, providers, steps, "cuda" if cuda else "cpu", optimizer)


def measure(s: Setup, workdir: str) -> Iterable[dict]:
    """One row per case and provider, yielded as each is measured (on a CPU the step rows come as one group)."""
    for case in s.cases:
        if s.device == "cuda":
            measured = ((p, measure_trainer(case, p, s.steps, s.device, workdir, s.optimizer)) for p in s.providers)
        else:
            measured = cpu_rows(case, s.providers, s.steps, workdir, s.optimizer)
        for provider, m in measured:
            yield dict(section="train", case=asdict(case), provider=provider, **m)


def format_table(s: Setup, rows: list[dict]) -> str:
    cuda = s.device == "cuda"
    card = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    dtype = "bfloat16 autocast" if s.device == "cuda" else "float32"
    date = datetime.date.today().isoformat()
    lines = [
        f"### Training steps: {card}, torch {torch.__version__}, {date}",
        "",
        f"{dtype}; `python -m smollm_stack.bench.train{' --dry-run' if s.dry_run else ''}`; tokens/s: median "
        "(p10-p90) of "
        f"{s.steps - WARMUP_STEPS} steps; trainer rows' optimizer: {'Muon' if s.optimizer == 'muon' else 'AdamW'}"
        + ("; CPU timings of a dry run check the plumbing only" if s.dry_run else ""),
        "",
        "| card | date | preset | batch x context | provider | tokens/s | p10-p90 | ms/step | MFU | matmul | attention "
        "| x eager | x naive |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        measured = {r["provider"]: r for r in rows if r["case"] == row["case"]}
        lines.append(table_row(card, date, BenchCase(**row["case"]), row["provider"], row, measured))
    return "\n".join(lines)


def run(dry_run: bool = False, providers=PROVIDERS, optimizer: str = "torch") -> str:
    """Benchmark each case with each provider; returns a markdown section."""
    s = setup(dry_run, providers, optimizer=optimizer)
    with tempfile.TemporaryDirectory() as workdir:
        return format_table(s, list(measure(s, workdir)))


def table_row(card: str, date: str, case: BenchCase, provider: str, m: dict, measured: dict) -> str:
    def ratio(base):
        rate = measured.get(base, {}).get("tokens_per_s")
        return f"{m['tokens_per_s'] / rate:.2f}" if rate else "-"

    def share(key):
        return f"{100 * m[key]:.0f}%" if key in m else "-"

    mfu = "n/a" if m["mfu"] is None else f"{100 * m['mfu']:.1f}%"
    ms = 1000 * case.batch * case.context / m["tokens_per_s"]
    return (
        f"| {card} | {date} | {case.preset} | {case.batch} x {case.context} | {provider} | {m['tokens_per_s']:,.0f} | "
        f"{m['p10']:,.0f}-{m['p90']:,.0f} | {ms:.1f} | {mfu} | {share('matmul_share')} | {share('attention_share')} | "
        f"{ratio('eager')} | {ratio('naive')} |"
    )



def main(argv=None) -> int:
    def optimizer_flag(parser):
        parser.add_argument("--optimizer", choices=("torch", "muon"), default="torch",
                            help="the trainer rows' optimizer (default AdamW; step and naive rows: AdamW)")  # fmt: skip

    args = env.parse_args("smollm_stack.bench.train", __doc__, argv, compile_flag=True, needs_cuda=False,
                          more=optimizer_flag)  # fmt: skip
    providers = [p for p in PROVIDERS if not (args.no_compile and p == "compile")]
    print(run(dry_run=args.dry_run, providers=providers, optimizer=args.optimizer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
