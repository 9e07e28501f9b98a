"""``smollm COMMAND [args ...]`` (or ``python -m smollm_stack COMMAND``): one command for the tools.

Each command is a module's own command line, run with the remaining arguments: ``smollm train --steps 100`` is
``python -m smollm_stack.train --steps 100``. The benchmarks are not here (nothing imports bench): run them as
``python -m smollm_stack.bench.<name>``.
"""

import importlib
import sys

from smollm_stack import __version__

# command -> (module whose main(argv) runs it, what it does)
COMMANDS = {
    "train": ("smollm_stack.train.__main__", "train a model (the default: the whole pipeline on the embedded corpus)"),
    "tokenizer": ("smollm_stack.tokenizer.__main__", "train a BPE tokenizer, or encode a text file with one"),
    "prepare": ("smollm_stack.train.data.prepare", "train a tokenizer and encode the train and validation splits"),
    "lm": ("smollm_stack.train.lm", "sample from a run, export it to Hugging Face, or import a Llama"),
    "eval": ("smollm_stack.train.eval", "score a run on downstream tasks (HellaSwag, ARC, PIQA, OpenBookQA)"),
    "experiments": ("smollm_stack.train.experiments.__main__", "run suites of variants and report them"),
    "consolidate": ("smollm_stack.train.store.consolidate", "turn a sharded (FSDP) checkpoint into one file"),
    "download": ("smollm_stack.train.data.download", "download a public corpus (TinyStories, OpenWebText)"),
}


def usage() -> str:
    rows = "\n".join(f"  {name:<12} {what}" for name, (_, what) in COMMANDS.items())
    return f"usage: smollm COMMAND [args ...]   (smollm COMMAND --help for its options)\n\ncommands:\n{rows}\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"smollm-stack {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}: choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
