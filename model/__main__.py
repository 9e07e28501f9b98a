"""`python -m model` used to sample, export-hf and import-hf. Those commands need the tokenizer, which the model
package does not import, so they moved beside the trainer: `python -m train.lm` (same names and flags, plus --run).
"""

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m train.lm", *argv[:1]])
    print(f"error: the model commands moved: run `{command} ...` (same flags; see --help there)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
