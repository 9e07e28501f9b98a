"""``smollm experiments {run,report,list,webtext,budget}``: see each command's --help.

Trainer flags (anything ``smollm train`` accepts, ``--config FILE.toml`` included) set the base config of a
suite and of the web-text run; the experiments' own options come before or among them.
"""

import argparse
import json
import signal
import sys
from pathlib import Path

from smollm_stack.train.cli import build_parser as trainer_parser
from smollm_stack.train.cli import parse_args
from smollm_stack.train.config import make_config
from smollm_stack.train.experiments.budget import describe, gpu_flops_per_s, measured_flops_per_s, propose
from smollm_stack.train.experiments.report import build_report
from smollm_stack.train.experiments.runner import VARIANT_COMMAND, prepare, run_suite
from smollm_stack.train.experiments.suites import SUITES, resolve_suite
from smollm_stack.train.experiments.webtext import plan, webtext_config
from smollm_stack.train.loop import PreflightError, run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smollm experiments", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or continue) a suite; unknown flags are trainer flags for the base config")
    r.add_argument("suite", help=f"one of {', '.join(SUITES)}, or a .toml/.json spec file")
    r.add_argument("--out", help="suite directory (default: runs/experiments/<suite>)")
    r.add_argument("--jobs", type=int, default=1, help="variants at once (one GPU each, or cores/jobs CPU threads)")
    r.add_argument("--base", help="TOML file of the base TrainConfig (same as the trainer's --config)")
    r.add_argument("--no-report", action="store_true", help="skip building <suite dir>/report at the end")
    rep = sub.add_parser("report", help="build report.md, figures and results.json of a suite directory")
    rep.add_argument("suite_dir")
    rep.add_argument("--out", help="output folder (default: <suite dir>/report)")
    rep.add_argument("--notes", help="markdown file of discussion to include in report.md")
    ls = sub.add_parser("list", help="print a suite's variants and their overrides on the base config")
    ls.add_argument("suite")
    ls.add_argument("--base", help="TOML file of the base TrainConfig")
    w = sub.add_parser(
        "webtext",
        help="the web-text preset: print its plan, run its CPU smoke test, or run it",
        description="The web-text preset. Trainer flags (smollm train --help) override it, e.g. --out-dir DIR "
        "(default runs/webtext, or runs/webtext-smoke with --smoke; the same command again resumes the run there), "
        "--train-data, --val-data, --tokenizer, --steps.",
    )
    w.add_argument("--plan", action="store_true", help="print what a real run needs (tokens, data, GPU hours) and exit")
    w.add_argument("--smoke", action="store_true", help="the same recipe shrunk to seconds on a CPU")
    w.add_argument("--gpu", default="H100", help="GPU for the --plan estimate (default H100)")
    w.add_argument("--gpus", type=int, default=8, help="GPUs for the --plan estimate (default 8)")
    w.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilization for --plan (default 0.4)")
    b = sub.add_parser("budget", help="FLOP or wall-clock budget -> model size and tokens (20 tokens/parameter)")
    b.add_argument("--flops", type=float, help="training FLOP budget, e.g. 1e18")
    b.add_argument("--hours", type=float, help="wall-clock budget, with a throughput from one of the next options")
    b.add_argument("--flops-per-s", type=float, help="throughput in training FLOP/s")
    b.add_argument("--from-run", help="a finished run directory: its tokens/s x its FLOPs per token")
    b.add_argument("--gpu", help="a GPU name (H100, A100, ...): its bf16 peak x --mfu x --gpus")
    b.add_argument("--mfu", type=float, default=0.4, help="assumed MFU with --gpu (default 0.4)")
    b.add_argument("--gpus", type=int, default=1, help="GPUs with --gpu (default 1)")
    b.add_argument("--vocab-size", type=int, default=32000)
    b.add_argument("--context-length", type=int, default=1024)
    b.add_argument("--gpu-mem-gb", type=float, help="memory of one GPU: print the memory per GPU and what fits it")
    b.add_argument("--batch-size", type=int, default=16, help="micro-batch per GPU for --gpu-mem-gb (default 16)")
    return parser


def base_config(base_file: str | None, trainer_flags: list[str]):
    return parse_args((["--config", base_file] if base_file else []) + trainer_flags)


def explicit_flags(trainer_flags: list[str]) -> dict:
    """Trainer flags given, as TrainConfig fields (model flags in model_args): they override a preset."""
    given = vars(trainer_parser().parse_args(trainer_flags))  # the parser leaves flags not given out
    if "config_file" in given or "resume" in given:
        raise ValueError("the web-text preset takes flags, not --config or --resume (the same command again resumes)")
    model_args = {k.removeprefix("model."): given.pop(k) for k in list(given) if k.startswith("model.")}
    return {**given, "model_args": model_args}


def budget(args) -> str:
    sources = [s for s in ("flops_per_s", "from_run", "gpu") if getattr(args, s) is not None]
    if (args.flops is None) == (args.hours is None):
        raise ValueError("give exactly one of --flops or --hours")
    if args.hours is not None and len(sources) != 1:
        raise ValueError("--hours needs exactly one throughput: --flops-per-s, --from-run or --gpu")
    throughput = None
    if sources:
        if args.from_run:
            throughput = measured_flops_per_s(args.from_run)
        elif args.gpu:
            throughput = gpu_flops_per_s(args.gpu, args.mfu, args.gpus)
        else:
            throughput = args.flops_per_s
        if not throughput > 0:
            raise ValueError(f"the throughput must be positive, got {throughput}")
    flops = args.flops if args.flops is not None else args.hours * 3600 * throughput
    config, tokens = propose(flops, args.vocab_size, args.context_length)
    if args.gpu_mem_gb is not None and not (args.gpu_mem_gb > 0 and args.batch_size > 0 and args.gpus > 0):
        raise ValueError("--gpu-mem-gb, --batch-size and --gpus must be positive")
    memory = None if args.gpu_mem_gb is None else (args.batch_size, args.gpus, args.gpu_mem_gb)
    return describe(flops, config, tokens, throughput, memory)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        # The runner's subprocess, no command of ours: dispatched before the parser, whose --help lists every one.
        if argv[:1] == [VARIANT_COMMAND]:
            if len(argv) != 2:
                raise ValueError(f"{VARIANT_COMMAND} takes one argument, a TrainConfig as JSON")
            run(make_config(json.loads(argv[1])))  # a diverged run is a result, not an error: exit 0
            return 0
        args, rest = build_parser().parse_known_args(argv)
        if rest and args.command not in ("run", "list", "webtext"):
            raise ValueError(f"unrecognized arguments: {' '.join(rest)}")
        if args.command == "run":
            # A plain kill (SIGTERM) unwinds like Ctrl-C, so the runner stops the variants it started.
            previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
            try:
                suite_dir, rows = run_suite(args.suite, base_config(args.base, rest), args.out, args.jobs)
            finally:
                signal.signal(signal.SIGTERM, previous)
            for row in rows:
                print(
                    f"{row['name']:>20}: {row['status']}"
                    + (f" ({row['message']})" if row["status"] != "finished" else "")
                )
            if not args.no_report:
                print(f"report: {build_report(suite_dir)}")
        elif args.command == "report":
            if args.notes and not Path(args.notes).is_file():
                raise FileNotFoundError(f"notes file not found: {args.notes}")
            notes = Path(args.notes).read_text() if args.notes else None
            print(build_report(args.suite_dir, args.out, notes))
        elif args.command == "list":
            name, variants = resolve_suite(args.suite, base_config(args.base, rest))
            for v in variants:
                print(f"{name}/{v.name}: {json.dumps(v.overrides)}" + (f"  # {v.note}" if v.note else ""))
        elif args.command == "webtext":
            if args.plan:
                print(plan(args.gpu, args.mfu, args.gpus))
                return 0
            cfg = webtext_config(smoke=args.smoke, **explicit_flags(rest))
            if prepare(cfg) == "done":  # like a suite's variant: resume an interrupted run, skip a finished one
                print(f"{cfg.checkpoint.out_dir} already holds a finished run: choose another --out-dir to train again")
                return 0
            summary = run(cfg)
            return 1 if summary["diverged"] else 0
        elif args.command == "budget":
            print(budget(args))
    except (ValueError, OSError, TypeError, PreflightError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
