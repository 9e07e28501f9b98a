"""``python -m train [--flag value ...]``: parse a TrainConfig and run it. ``--help`` lists every option."""

import sys

from train.config import parse_args
from train.loop import PreflightError, run


def main(argv: list[str] | None = None) -> int:
    try:
        summary = run(parse_args(argv))
    except (ValueError, FileNotFoundError, TypeError, PreflightError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary["diverged"]:
        print(f"error: {summary['message']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
