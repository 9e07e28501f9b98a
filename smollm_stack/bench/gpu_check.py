"""One command for a lent GPU: kernel correctness, then every benchmark, within a time budget, never empty-handed.

    python -m smollm_stack.bench.gpu_check --out $OUT/gpu_check    # a GPU: every section that fits --budget-s (420 s)
    python -m smollm_stack.bench.gpu_check --no-compile            # nothing under torch.compile (saves about 2 minutes)
    python -m smollm_stack.bench.gpu_check --only check,attention  # some sections (names below)
    python -m smollm_stack.bench.gpu_check --dry-run               # tiny shapes on the CPU interpreter (CI runs this)
    python -m smollm_stack.bench.gpu_check --plan                  # each section's estimate, and what the budget runs

Sections, in order of what a short slot must bring back first:

    device     capability, shared memory, SMs, the autocast dtype, the attention configs the autotuner will keep
    env        card, versions, device-to-device copy bandwidth, matmul rate in the training dtype (the two ceilings)
    check      the ops (and rms_norm fp32 -> it) against an fp64 gold run in the card's training dtype (bf16; fp16
               below capability 8.0, as --dtype auto), at bench.kernels' timed shapes
    kernels    bench.kernels: memory-bound ops vs kernels.ops("eager") and torch.compile, CUDA-graph timed
    attention  bench.attention: each shape checked (head dims 32/64/128), then timed vs SDPA flash
    train      bench.train: whole training steps per provider
    dtypes     the correctness check in the card's other dtypes (fp16 and fp32) at the TinyStories-17M shape

``--device-report`` runs the device section alone: what a first run on any card should print before anything else.

Output, in the ``--out`` directory (default ``runs/gpu_check/<date-time>/``, never inside the package):
``rows.jsonl``, one JSON object per measured row, appended and flushed as each is measured, and ``report.md``,
rewritten atomically after every section; a run killed at any point keeps everything it finished. The report ends
with one screen of ratios against issue 10's targets, pass or miss per row, also printed to stdout.

Bare machines: this module and what it imports need only torch, triton and numpy. The trainer draws no progress
bar without tqdm and no loss plots without matplotlib; a section whose own imports fail for a missing package is
skipped with a line that names it, and the others run.

Budget: before each section its cost is estimated from how many Triton compiles, autotune trials, torch.compile
compiles and timed rows it needs (``UnitCosts`` times each section's counts; later estimates are scaled by how the
finished sections compared with theirs); a section that no longer fits runs without torch.compile if that fits,
else it is skipped, and the report says so. Every section checks the budget after each row it measures and stops
there once it is spent.

Estimated run time: ``--plan`` prints, with no GPU, each section's estimate on one H100 from a cold Triton and
inductor cache (``GPU_COSTS`` times the counts of today's code) and what ``--budget-s`` runs; each run writes every
section's estimate and actual seconds to rows.jsonl, to correct the unit costs.

Exit status 1 when any correctness check or any section fails, 2 on bad flags or no GPU.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from smollm_stack.bench import env  # first: it sets what torch and triton read when they load
import torch

import triton

from smollm_stack import kernels
from smollm_stack.bench import attention as bench_attention
from smollm_stack.bench import cli
from smollm_stack.bench import kernels as bench_kernels
from smollm_stack.bench import targets
from smollm_stack.kernels import attention, check, reference

DEFAULT_OUT = Path("runs") / "gpu_check"
SECTIONS = ("device", "env", "check", "kernels", "attention", "train", "dtypes")


@dataclass(frozen=True)
class UnitCosts:
    """Seconds per unit of work, from which each section's cost is estimated before it starts."""

    env: float  # one of the two ceilings (copy bandwidth, matmul rate)
    kernel_compile: float  # one memory-bound Triton kernel (a few hundred lines of PTX)
    attention_compile: float  # one attention autotune config (forward or one of the two backward kernels)
    autotune_trial: float  # do_bench of one config: 25 ms warm-up + 100 ms of repeats, plus launch overhead
    op_check: float  # one op's fp64 gold, eager and kernel runs, forward and backward
    inductor_compile: float  # torch.compile of one op, forward and backward graphs (cold inductor cache)
    timed_row: float  # one timed row: warm-up, sync probe, graph capture, 10 replays of 20 ms, peak-memory run
    train_row: float  # one bench.train row (60 steps, eval, checkpoint), beyond compiles
    model_compile: float  # torch.compile of one whole model


GPU_COSTS = UnitCosts(env=2.5, kernel_compile=1.0, attention_compile=2.0, autotune_trial=0.15, op_check=0.5,
                      inductor_compile=6.0, timed_row=0.5, train_row=20, model_compile=60)  # fmt: skip
DRY_RUN_COSTS = UnitCosts(env=0.05, kernel_compile=0.0, attention_compile=0.0, autotune_trial=0.0, op_check=0.6,
                          inductor_compile=0.0, timed_row=0.1, train_row=5, model_compile=0)  # fmt: skip
KERNELS_PER_SHAPE = 10  # Triton kernels the memory-bound ops compile per shape and dtype (fwd, bwd, CE's variants)


@dataclass
class Plan:
    """What every section needs to know about the run."""

    dry_run: bool
    device: torch.device
    compile: bool  # whether torch.compile providers run
    costs: UnitCosts
    done: set[str] = field(default_factory=set)  # sections already run (their compiles are cached)
    copy_gbs: float | None = None  # measured by env
    dtype: torch.dtype = torch.bfloat16  # what --dtype auto trains in here: fp16 below capability 8.0, fp32 on a CPU


def _check_dtypes(plan: Plan) -> tuple[torch.dtype, tuple[torch.dtype, ...]]:
    """(dtype of the check section: the card's training dtype, dtypes of the dtypes section: the others it runs);
    the interpreter's bf16 is unreliable."""
    if plan.dry_run:
        return torch.float32, (torch.float16,)
    return plan.dtype, tuple(d for d in (torch.float16, torch.float32) if d != plan.dtype)


# The attention kernels this check runs: the forward and the default two-pass backward (not the opt-in atomic one)
ATTENTION_KERNELS = [kernel for kernel in attention.TUNING if kernel != "_attn_bwd_atomic"]


def _attention_configs() -> int:
    """Autotune configs of the attention kernels on a GPU: at most the compiles per head dim and trials per key."""
    return sum(len(attention.TUNING[kernel].gpu) for kernel in ATTENTION_KERNELS)


def _kernel_shapes(plan: Plan):
    return (bench_kernels.DRY_RUN_SHAPE,) if plan.dry_run else bench_kernels.SHAPES


def _attention_head_dims(shapes) -> set[int]:
    return {s.d_model // s.heads for s in shapes}


# Sections: each yields JSON rows as it measures them, and renders them as markdown at the end. -----------------------


def device_rows(plan: Plan) -> Iterable[dict]:
    dtype = plan.dtype
    row = dict(section="device", card=env.card_name(plan.device), autocast=str(dtype).removeprefix("torch."))
    if plan.device.type == "cuda":
        p = torch.cuda.get_device_properties(plan.device)
        row.update(capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   regs_per_sm=p.regs_per_multiprocessor, smem_per_block_kib=p.shared_memory_per_block_optin / 1024,
                   smem_per_sm_kib=p.shared_memory_per_multiprocessor / 1024)  # fmt: skip
        ours = kernels.ops("triton", plan.device).flash_attention is kernels.flash_attention
        row["model_attention"] = "triton" if ours else "eager (no tensor-core dots below capability 8.0)"
    yield row
    for kernel in ATTENTION_KERNELS:
        for head_dim in (32, 64, 128):
            for docs in (False, True):
                configs = attention.kept_configs(kernel, dtype, head_dim, docs)
                yield dict(section="device", kernel=kernel, head_dim=head_dim, docs=docs,
                           configs=[f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}"
                                    for c in configs])  # fmt: skip


def device_render(plan: Plan, rows: list[dict]) -> str:
    card = rows[0]
    what = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in card.items() if k != "section")
    lines = ["| kernel | head dim | documents | configs the autotuner keeps (BLOCK_M x BLOCK_N, warps, stages) |",
             "|---|---:|---|---|"]  # fmt: skip
    lines += [f"| {r['kernel']} | {r['head_dim']} | {'yes' if r['docs'] else 'no'} | {'; '.join(r['configs'])} |"
              for r in rows[1:]]  # fmt: skip
    return what + "\n\n" + "\n".join(lines)


def env_rows(plan: Plan) -> Iterable[dict]:
    row = dict(section="env", card=env.card_name(plan.device), torch=torch.__version__,
               triton=triton.__version__, python=platform.python_version(), cuda=torch.version.cuda)  # fmt: skip
    if plan.device.type == "cuda":
        props = torch.cuda.get_device_properties(plan.device)
        row.update(sms=props.multi_processor_count, memory_gib=props.total_memory / 2**30)
        row["copy_gbs"] = plan.copy_gbs = bench_kernels.copy_bandwidth_gbs(plan.device)
        a, b = (torch.randn(8192, 8192, device=plan.device, dtype=plan.dtype) for _ in range(2))
        ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=100, return_mode="median")
        row.update(matmul_tflops=2 * 8192**3 / ms / 1e9, matmul_dtype=str(plan.dtype).removeprefix("torch."))
    yield row


def env_render(plan: Plan, rows: list[dict]) -> str:
    r = rows[0]
    lines = [f"{r['card']}; {env.versions()}, Python {r['python']}, CUDA {r['cuda']}"]
    if "copy_gbs" in r:
        lines.append(f"{r['sms']} SMs, {r['memory_gib']:.0f} GiB; device-to-device copy {r['copy_gbs']:.0f} GB/s "
                     f"(read + write); {r['matmul_dtype']} 8192^3 matmul {r['matmul_tflops']:.0f} TFLOP/s")  # fmt: skip
    return "\n\n".join(lines)


def _check_rows(label: str, results: list[check.CheckResult]) -> Iterable[dict]:
    for r in results:
        yield dict(section="check", shape=label, op=r.op, quantity=r.quantity, dtype=r.dtype, err=r.err,
                   eager_err=r.eager_err, limit=r.limit, ok=r.ok)  # fmt: skip


def _narrowing_check(s, dtype: torch.dtype, device: torch.device) -> list[check.CheckResult]:
    """rms_norm with the fp32 residual stream in and the compute dtype out, against eager in fp32 then rounded."""
    out, eager = bench_kernels.narrow_dtype(dtype), kernels.ops("eager")
    g = torch.Generator(device).manual_seed(2)
    x = torch.randn(s.batch, s.seq, s.d_model, generator=g, device=device)
    weight = torch.randn(s.d_model, generator=g, device=device) * 0.2 + 1
    upstream = torch.randn(x.shape, generator=g, device=device).to(out)
    ours = lambda x, weight: kernels.rms_norm(x, weight, out_dtype=out)
    rounded = lambda x, weight: eager.rms_norm(x, weight).to(out)
    name = f"rms_norm (out {str(out).removeprefix('torch.')})"
    return check._compare(name, torch.float32, ours, reference.rms_norm, rounded, {"x": x, "weight": weight}, upstream)


def _check_at(plan: Plan, shapes, dtypes, narrowing: bool) -> Iterable[dict]:
    for s in shapes:
        label = f"{s.name}, {s.batch} x {s.seq} tokens"
        for dtype in dtypes:
            results = check.check_kernels(batch_size=s.batch, seq_len=s.seq, d_model=s.d_model, d_ff=s.d_ff,
                                          num_heads=s.heads, num_kv_heads=s.heads, vocab_size=s.vocab, dtype=dtype,
                                          device=plan.device)  # fmt: skip
            if narrowing and bench_kernels.rms_norm_out_dtype_supported():
                results += _narrowing_check(s, dtype, plan.device)
            yield from _check_rows(label, results)
            if plan.device.type == "cuda":
                torch.cuda.empty_cache()


def check_rows(plan: Plan) -> Iterable[dict]:
    return _check_at(plan, _kernel_shapes(plan), _check_dtypes(plan)[:1], narrowing=True)


def dtypes_rows(plan: Plan) -> Iterable[dict]:
    return _check_at(plan, _kernel_shapes(plan)[:1], _check_dtypes(plan)[1], narrowing=False)


def check_render(plan: Plan, rows: list[dict]) -> str:
    parts = []
    for label in dict.fromkeys(r["shape"] for r in rows):
        fields = ("op", "quantity", "dtype", "err", "eager_err", "limit", "ok")
        results = [check.CheckResult(**{k: r[k] for k in fields}) for r in rows if r["shape"] == label]
        parts.append(f"#### {label}\n\n{check.format_check_table(results)}")
    return "Kernel error <= 2x eager's own error vs an fp64 gold run (`kernels.check`).\n\n" + "\n\n".join(parts)


def _kernel_providers(plan: Plan) -> list[str]:
    return [p for p in bench_kernels.PROVIDERS if plan.compile and not plan.dry_run or p != "compile"]


def kernels_rows(plan: Plan) -> Iterable[dict]:
    device, shapes, providers, dtype = bench_kernels.setup(plan.dry_run, _kernel_providers(plan))
    if plan.copy_gbs is None:
        plan.copy_gbs = bench_kernels.copy_bandwidth_gbs(device)
    return bench_kernels.measure(shapes, providers, dtype, device, plan.dry_run, plan.copy_gbs)


def kernels_render(plan: Plan, rows: list[dict]) -> str:
    device, _, _, dtype = bench_kernels.setup(plan.dry_run, ())
    table = bench_kernels.format_table(rows, env.card_name(device), env.today())
    return "\n\n".join([*bench_kernels.notes(device, dtype, plan.copy_gbs), table])


def attention_rows(plan: Plan) -> Iterable[dict]:
    device, dtype = bench_attention.setup(plan.dry_run)
    return bench_attention.measure(plan.dry_run, dtype, device)


def attention_render(plan: Plan, rows: list[dict]) -> str:
    device, dtype = bench_attention.setup(plan.dry_run)
    table = bench_attention.format_table(rows, env.card_name(device), env.today())
    return f"dtype {str(dtype).removeprefix('torch.')}; {bench_attention.NOTE}\n\n{table}"


def _train_setup(plan: Plan):
    """bench.train's setup, imported here: the trainer is the one section that needs more than torch and triton."""
    from smollm_stack.bench import train as bench_train

    providers = [p for p in bench_train.PROVIDERS if plan.compile or p != "compile"]
    return bench_train, bench_train.setup(plan.dry_run, providers, cuda=not plan.dry_run)


def train_rows(plan: Plan) -> Iterable[dict]:
    bench_train, setup = _train_setup(plan)
    with tempfile.TemporaryDirectory() as workdir:
        yield from bench_train.measure(setup, workdir)


def train_render(plan: Plan, rows: list[dict]) -> str:
    bench_train, setup = _train_setup(plan)
    return bench_train.format_table(setup, rows)


# Estimates: each section's counts of compiles, trials and timed rows, which UnitCosts turn into seconds. ------------

Counts = dict[str, int]  # a UnitCosts field -> how many of that unit a section needs
UNITS = dict(env="ceilings", kernel_compile="kernel compiles", attention_compile="attention compiles",
             autotune_trial="autotune trials", op_check="op checks", inductor_compile="torch.compile compiles",
             timed_row="timed rows", train_row="trainer rows", model_compile="whole-model compiles")  # fmt: skip


def seconds(costs: UnitCosts, counts: Counts) -> float:
    return sum(getattr(costs, unit) * n for unit, n in counts.items())


def device_counts(plan: Plan) -> Counts:
    return {}


def env_counts(plan: Plan) -> Counts:
    return dict(env=2)


def _check_counts(plan: Plan, shapes, n_dtypes: int) -> Counts:
    configs, n = _attention_configs(), n_dtypes * len(shapes)
    return dict(kernel_compile=KERNELS_PER_SHAPE * n,
                attention_compile=n_dtypes * configs * len(_attention_head_dims(shapes)),
                autotune_trial=configs * n, op_check=bench_kernels.OPS_PER_SHAPE * n)  # fmt: skip


def check_counts(plan: Plan) -> Counts:
    return _check_counts(plan, _kernel_shapes(plan), 1)


def dtypes_counts(plan: Plan) -> Counts:
    return _check_counts(plan, _kernel_shapes(plan)[:1], len(_check_dtypes(plan)[1]))


def kernels_counts(plan: Plan) -> Counts:
    shapes, providers = _kernel_shapes(plan), _kernel_providers(plan)
    ops = bench_kernels.OPS_PER_SHAPE * len(shapes)
    return dict(timed_row=ops * 2 * len(providers), inductor_compile=ops if "compile" in providers else 0,
                kernel_compile=0 if "check" in plan.done else KERNELS_PER_SHAPE * len(shapes))  # fmt: skip


def attention_counts(plan: Plan) -> Counts:
    configs, shapes = _attention_configs(), bench_attention.shapes(plan.dry_run)
    compiled = _attention_head_dims(_kernel_shapes(plan)) if "check" in plan.done else set()
    new_dims = {s.head_dim for s in shapes} - compiled
    keys = {(s.head_dim, min(triton.next_power_of_2(s.seq_len), 4096)) for s in shapes}  # as kernels.attention keys
    return dict(attention_compile=len(new_dims) * configs, autotune_trial=len(keys) * configs,
                timed_row=len(shapes) * 2 * len(bench_attention.PROVIDERS), op_check=len(shapes))  # fmt: skip


def train_counts(plan: Plan) -> Counts:
    setup = _train_setup(plan)[1]
    return dict(train_row=len(setup.cases) * len(setup.providers),
                model_compile=len(setup.cases) if "compile" in setup.providers else 0)  # fmt: skip


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    counts: Callable[[Plan], Counts]
    rows: Callable[[Plan], Iterable[dict]]
    render: Callable[[Plan, list[dict]], str]
    uses_compile: bool = False  # whether dropping torch.compile makes it cheaper


ALL_SECTIONS = {
    s.name: s
    for s in (
        Section("device", "Device", device_counts, device_rows, device_render),
        Section("env", "Environment", env_counts, env_rows, env_render),
        Section("check", "Correctness at the timed shapes", check_counts, check_rows, check_render),
        Section("kernels", "Memory-bound kernels", kernels_counts, kernels_rows, kernels_render, True),
        Section("attention", "Causal attention", attention_counts, attention_rows, attention_render),
        Section("train", "Training steps", train_counts, train_rows, train_render, True),
        Section("dtypes", "Correctness in fp16 and fp32", dtypes_counts, dtypes_rows, check_render),
    )
}
assert tuple(ALL_SECTIONS) == SECTIONS


STARTUP_S = 15.0  # before the first section: import torch and triton, the CUDA context


def cost_table() -> str:
    """Each section's counts on a GPU and its seconds at GPU_COSTS, in run order, every section before it done."""
    lines = []
    plans = {flag: Plan(False, torch.device("cuda"), flag, GPU_COSTS) for flag in (True, False)}
    for name in SECTIONS:
        section = ALL_SECTIONS[name]
        counts = {unit: n for unit, n in section.counts(plans[True]).items() if n}
        what = ", ".join(f"{n} {UNITS[unit]}" for unit, n in counts.items())
        cost = f"~{seconds(GPU_COSTS, counts):.0f} s"
        if section.uses_compile:
            cost += f" (~{seconds(GPU_COSTS, section.counts(plans[False])):.0f} s --no-compile)"
        lines.append(f"    {name:<10} {what:<75} {cost}".rstrip())
        for plan in plans.values():
            plan.done.add(name)
    return "\n".join(lines)


def budget_plan(budget_s: float, compile_: bool, names=SECTIONS) -> dict[str, tuple[str, float]]:
    """{section: (how it runs, seconds from the start once it ends)} for a GPU run at GPU_COSTS, decided as main()
    decides (_fit) if every estimate held: "as planned", "without torch.compile" or "skipped"."""
    plan, spent, runs = Plan(False, torch.device("cuda"), compile_, GPU_COSTS), STARTUP_S, {}
    for name in (n for n in SECTIONS if n in names):
        estimate, note = _fit(ALL_SECTIONS[name], plan, 1.0, budget_s - spent)
        plan.compile = compile_
        if note is not None:
            spent += estimate
            plan.done.add(name)
        runs[name] = ("skipped" if note is None else "without torch.compile" if note else "as planned", spent)
    return runs


def print_plan(budget_s: float, compile_: bool, names) -> None:
    print(f"Estimated run time on one H100 from a cold Triton and inductor cache (GPU_COSTS times today's counts),\n"
          f"after ~{STARTUP_S:.0f} s of start-up:\n\n{cost_table()}\n")  # fmt: skip
    print(f"What --budget-s {budget_s:.0f}{'' if compile_ else ' --no-compile'} runs if every estimate holds:\n")
    for name, (how, spent) in budget_plan(budget_s, compile_, names).items():
        print(f"    {name:<10} {how:<22} {'' if how == 'skipped' else f'done at ~{spent:.0f} s'}".rstrip())


# The run: sections within the budget, each written out as it finishes. ------------------------------------------------


def seconds_since_process_start() -> float:
    """Wall time since this process started, imports included (0 where /proc cannot say)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class Report:
    """The --out directory: rows.jsonl appended and flushed row by row, report.md rewritten whole (atomically)."""

    def __init__(self, out: Path, header: str):
        out.mkdir(parents=True, exist_ok=True)
        self.markdown, self.rows = out / "report.md", out / "rows.jsonl"
        self.rows_fd = os.open(self.rows, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.parts = [header]
        self.write()

    def row(self, row: dict) -> None:
        """One line, unbuffered, in one write as a rule: a kill leaves whole lines, at most a torn last one."""
        line = (json.dumps(row) + "\n").encode()
        while line:
            line = line[os.write(self.rows_fd, line) :]

    def add(self, text: str) -> None:
        self.parts.append(text)
        self.write()

    def write(self) -> None:
        tmp = self.markdown.with_name(self.markdown.name + ".tmp")
        tmp.write_text("\n\n".join(self.parts) + "\n")
        os.replace(tmp, self.markdown)


def _fit(section: Section, plan: Plan, scale: float, left: float) -> tuple[float, str | None]:
    """(estimate, note) of running the section: as planned, or without torch.compile to fit; note None: skip it."""
    estimate = seconds(plan.costs, section.counts(plan)) * scale
    if estimate <= left:
        return estimate, ""
    if section.uses_compile and plan.compile:
        plan.compile = False
        cheaper = seconds(plan.costs, section.counts(plan)) * scale
        if cheaper <= left:
            return cheaper, f"; without torch.compile, since with it it needs ~{estimate:.0f} s"
        plan.compile = True
    return estimate, None


def _run_section(section: Section, plan: Plan, report: Report, deadline: Callable[[], bool]) -> tuple[list, str]:
    """Run one section, every row written as it comes; (rows, "done" or why it stopped)."""
    rows, ended = [], "done"
    try:
        for row in section.rows(plan):
            report.row(row)
            rows.append(row)
            if deadline():
                ended = "stopped after this row: over the budget"
                break
    except Exception as e:  # a broken section must not lose the others
        import traceback

        traceback.print_exc()
        ended = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if plan.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, ended


def _parse_args(argv) -> argparse.Namespace | None:
    parser = cli.parser("smollm_stack.bench.gpu_check", __doc__, dry_run="tiny shapes on the CPU interpreter")
    parser.add_argument("--out", type=Path, default=None, help="new directory for report.md and rows.jsonl "
                        f"(default {DEFAULT_OUT}/<date-time>)")  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall seconds for the whole run (default 420)")
    parser.add_argument("--no-compile", action="store_true", help="no torch.compile anywhere (saves minutes)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of sections: {','.join(SECTIONS)}")
    parser.add_argument("--device-report", action="store_true", help="the device section alone (--only device)")
    parser.add_argument("--plan", action="store_true", help="print each section's estimate and what the budget runs, "
                        "then exit (no GPU needed)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.device_report:
        args.only = "device"
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in args.only if name not in SECTIONS]
    out = args.out or DEFAULT_OUT / datetime.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    if unknown or not args.only:
        error = f"--only: unknown section {unknown[0]!r}" if unknown else "--only: no section named"
        error += f" (choose from {', '.join(SECTIONS)})"
    elif not args.budget_s >= 0:
        error = f"--budget-s must be a number of seconds >= 0, got {args.budget_s}"
    elif out.exists() and not out.is_dir():
        error = f"--out {out} is a file, not a directory"
    elif (out / "report.md").exists() or (out / "rows.jsonl").exists():
        error = f"--out {out} already holds a gpu_check report; name a new directory"
    elif not (args.dry_run or args.plan) and not torch.cuda.is_available():
        error = "no CUDA device; run with --dry-run on a CPU"
    else:
        args.out = out
        return args
    print(f"error: {error}", file=sys.stderr)
    return None


def main(argv=None) -> int:
    args = _parse_args(argv)
    if args is None:
        return 2
    if args.plan:
        print_plan(args.budget_s, not args.no_compile, args.only)
        return 0
    device = torch.device("cpu" if args.dry_run else "cuda")
    from smollm_stack.train.precision import resolve_dtype

    plan = Plan(args.dry_run, device, not args.no_compile, DRY_RUN_COSTS if args.dry_run else GPU_COSTS,
                dtype=resolve_dtype("auto", device))  # fmt: skip
    command = "python -m smollm_stack.bench.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:])
    report = Report(args.out, f"## GPU check: {env.card_name(device)}, {env.today()}\n\n"
                    f"{env.versions()}; `{command}`; budget {args.budget_s:.0f} s")  # fmt: skip
    # From the command line (argv None) the budget holds the process's start-up too; a caller's time is its own.
    started = time.monotonic() - (seconds_since_process_start() if argv is None else 0.0)
    elapsed = lambda: time.monotonic() - started
    all_rows, outcomes, spent_total, estimated_total = [], {}, 0.0, 0.0
    for name in (n for n in SECTIONS if n in args.only):
        section = ALL_SECTIONS[name]
        # Later estimates follow how the finished sections compared with theirs (env is one-off CUDA start-up).
        scale = min(2.0, max(0.5, spent_total / estimated_total)) if estimated_total >= 30 else 1.0
        left = args.budget_s - elapsed()
        try:
            estimate, note = _fit(section, plan, scale, left)
            why = f"skipped: needs ~{estimate:.0f} s, {max(0.0, left):.0f} s of the {args.budget_s:.0f} s budget left"
        except ModuleNotFoundError as e:  # a section's own imports come with its estimate
            estimate, note, why = 0.0, None, f"skipped: needs the {e.name} package, which is not installed"
        if note is None:
            print(f"gpu_check: {name} {why}", file=sys.stderr)
            report.row(dict(section="gpu_check", name=name, status="skipped", estimate_s=estimate, left_s=left))
            report.add(f"### {section.title}\n\n_{why}_")
            outcomes[name] = "skipped"
            continue
        print(f"gpu_check: {name} (estimate {estimate:.0f} s, {left:.0f} s left) ...", file=sys.stderr)
        start = time.monotonic()
        rows, ended = _run_section(section, plan, report, lambda: elapsed() > args.budget_s)
        spent = time.monotonic() - start
        plan.compile = not args.no_compile
        outcomes[name] = ended
        if ended == "done":
            plan.done.add(name)
        if name != "env":
            spent_total, estimated_total = spent_total + spent, estimated_total + estimate
        report.row(dict(section="gpu_check", name=name, status=ended, estimate_s=estimate, spent_s=spent))
        body = section.render(plan, rows) if rows else "(no rows)"
        how = "" if ended == "done" else f"; **{ended}**"
        report.add(f"### {section.title}\n\n_{spent:.0f} s (estimate {estimate:.0f} s){note}{how}_\n\n{body}")
        all_rows += rows
        print(f"gpu_check: {name} {ended} in {spent:.0f} s", file=sys.stderr)
    not_done = ", ".join(f"{name} {status.split(':')[0]}" for name, status in outcomes.items() if status != "done")
    summary = targets.render(all_rows, judged=not args.dry_run)
    summary = (f"sections not done: {not_done}\n\n" if not_done else "") + summary
    report.add(f"### Targets (issue 10)\n\nTotal wall time {elapsed():.0f} s of the {args.budget_s:.0f} s budget.\n\n"
               + summary)  # fmt: skip
    print(summary)
    print(f"wrote {report.markdown} and {report.rows}", file=sys.stderr)
    os.close(report.rows_fd)
    failed = [r for r in all_rows if r.get("ok") is False or r.get("check_ok") is False]
    return 1 if failed or any(status.startswith("failed") for status in outcomes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
