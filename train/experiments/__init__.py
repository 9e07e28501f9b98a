"""Experiments: suites of variants run through the trainer, their reports, the web-text preset and a budget helper.

    python -m train.experiments run ablations --jobs 2 [trainer flags, e.g. --steps 200 --batch-size 16]
    python -m train.experiments report runs/experiments/ablations --out experiments/cpu-tiny/ablations
    python -m train.experiments webtext --plan | --smoke | [trainer flags]
    python -m train.experiments budget --hours 8 --gpu H100 --mfu 0.4

See ``python -m train.experiments --help`` and docs/experiments.md.
"""

from train.experiments.budget import propose
from train.experiments.report import build_report, load_suite
from train.experiments.runner import run_suite
from train.experiments.suites import SUITES, Variant, load_spec, resolve_suite
from train.experiments.webtext import plan, webtext_config

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
