"""Turn text files into the encoded ``.npy`` splits the trainer reads, with the project's BPE tokenizer.

    smollm prepare --train train.txt --val valid.txt --vocab-size 10000 --out data/tinystories
    smollm train --train-data data/tinystories/train.npy --val-data data/tinystories/val.npy \\
        --tokenizer data/tinystories/tokenizer --model tinystories-17m

writes ``OUT/tokenizer/`` (trained on the training text, or the one given with ``--tokenizer``), ``OUT/train.npy``
and ``OUT/val.npy`` (uint16 when the vocabulary fits). ``smollm train`` does the same by itself when given text
files, caching the results; this command is for corpora you want to prepare once, in a place you choose. An OUT
that already holds any of the three is refused unless ``--force``, which replaces them only where they are what
prepare writes (a tokenizer directory of ours, ``.npy`` files), never another file.
"""

import argparse
import sys
from pathlib import Path

from smollm_stack.tokenizer.tokenizer import META_FILE
from smollm_stack.train.dataset import encode_text, train_tokenizer


def prepare(
    train: Path, val: Path, out: Path, vocab_size: int, tokenizer: Path | None = None, progress=True, force=False
) -> dict:
    """Write OUT/tokenizer, OUT/train.npy and OUT/val.npy; return their paths."""
    for path in (train, val):
        if not path.is_file():
            raise FileNotFoundError(f"text file not found: {path}")
    if tokenizer is not None and not (tokenizer / "vocab.json").is_file():
        raise FileNotFoundError(f"tokenizer dir {tokenizer} has no vocab.json (write one with Tokenizer.save)")
    paths = {"tokenizer": tokenizer or out / "tokenizer", "train": out / "train.npy", "val": out / "val.npy"}
    existing = [str(p) for name, p in paths.items() if p.exists() and not (name == "tokenizer" and tokenizer)]
    if existing and not force:
        raise ValueError(f"{', '.join(existing)} already exist: choose another --out, or --force to replace them")
    for path in map(Path, existing):
        if not _made_by_prepare(path):
            raise ValueError(f"{path} is not a tokenizer directory or .npy file of ours: --force does not replace it")
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = paths["tokenizer"]
    if tokenizer is None:
        train_tokenizer(train, vocab_size, tok_dir, progress, replace=True)
    encode_text(train, tok_dir, paths["train"], progress, replace=force)
    encode_text(val, tok_dir, paths["val"], progress, replace=force)
    return paths


def _made_by_prepare(path: Path) -> bool:
    if path.is_symlink():
        return False
    if path.is_dir():
        return (path / META_FILE).is_file()
    with open(path, "rb") as f:
        return f.read(6) == b"\x93NUMPY"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="smollm prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, required=True, help="training text (UTF-8, <|endoftext|> separated)")
    parser.add_argument("--val", type=Path, required=True, help="validation text")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--vocab-size", type=int, default=10000, help="BPE vocabulary to train (default 10000)")
    parser.add_argument("--tokenizer", type=Path, help="use this saved tokenizer instead of training one")
    parser.add_argument("--force", action="store_true", help="replace the outputs if OUT already holds them")
    args = parser.parse_args(argv)
    try:
        paths = prepare(args.train, args.val, args.out, args.vocab_size, args.tokenizer, force=args.force)
    except (ValueError, TypeError, OSError) as e:  # OSError: a full or read-only disk
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"train with: smollm train --train-data {paths['train']} --val-data {paths['val']} "
          f"--tokenizer {paths['tokenizer']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
