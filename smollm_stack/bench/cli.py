"""The benchmarks' command line: each runs as `python -m smollm_stack.bench.<name>`, and most take --dry-run, a tiny
run on the CPU that checks the plumbing (CI runs them so). Torch-free, because bench.tokenizer's measured processes
must not load torch; the torch benchmarks add their checks in bench.env.parse_args.
"""

import argparse


def parser(module: str, doc: str, dry_run: str | None = None) -> argparse.ArgumentParser:
    """A parser for `python -m <module>`, described by the first line of its docstring `doc`, with --dry-run
    described by `dry_run` (no such flag when None). Its usage line names the command, where argparse alone would
    say `kernels.py`."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.splitlines()[0])
    if dry_run is not None:
        parser.add_argument("--dry-run", action="store_true", help=dry_run)
    return parser
