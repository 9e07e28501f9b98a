"""``smollm train [--flag value ...]``: parse a TrainConfig and run it. ``--help`` lists every option.

Exit status: 0 done, 1 diverged, 2 bad input (one line ``error: ...`` naming the flag or file), 130 / 143 stopped
by SIGINT (Ctrl-C) / SIGTERM (one line saying what was saved and how to resume).
"""

import sys

from smollm_stack.train.cli import parse_args
from smollm_stack.train.loop import Interrupted, PreflightError, run


def main(argv: list[str] | None = None) -> int:
    try:
        summary = run(parse_args(argv))
    except (ValueError, OSError, TypeError, PreflightError) as e:  # OSError: a full disk, a missing file
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(e, file=sys.stderr)
        return 128 + e.signum
    if summary["diverged"]:
        print(f"error: {summary['message']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
