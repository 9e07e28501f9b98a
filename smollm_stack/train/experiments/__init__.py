"""Experiments: suites of variants run through the trainer, their reports, the web-text preset and a budget helper.

    smollm experiments run ablations --jobs 2 [trainer flags, e.g. --steps 200 --batch-size 16]
    smollm experiments report runs/experiments/ablations --out experiments/cpu-tiny/ablations
    smollm experiments webtext --plan | --smoke | [trainer flags]
    smollm experiments budget --hours 8 --gpu H100 --mfu 0.4

See ``smollm experiments --help`` and docs/experiments.md.
"""

from smollm_stack.train.experiments.budget import propose
from smollm_stack.train.experiments.report import build_report, load_suite
from smollm_stack.train.experiments.runner import run_suite
from smollm_stack.train.experiments.suites import SUITES, Variant, load_spec, resolve_suite
from smollm_stack.train.experiments.webtext import plan, webtext_config

__all__ = [
    "SUITES",
    "Variant",
    "build_report",
    "load_spec",
    "load_suite",
    "plan",
    "propose",
    "resolve_suite",
    "run_suite",
    "webtext_config",
]
