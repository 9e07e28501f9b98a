"""Turn a corpus, in the formats it ships in, into the encoded splits the trainer reads, with our BPE tokenizer.

    smollm prepare --train train.txt --val valid.txt --vocab-size 10000 --out data/tinystories
    smollm train --train-data data/tinystories/train.npy --val-data data/tinystories/val.npy \\
        --tokenizer data/tinystories/tokenizer --model tinystories-17m

    smollm prepare --train 'fineweb/train-*.parquet' --val fineweb/val.jsonl.gz --out data/fineweb
    smollm prepare --train hf:OWNER/NAME:data/train-* --val hf:OWNER/NAME:data/validation-* --out data/name

``--train`` and ``--val`` take any source of sources.py: a .txt, .jsonl / .jsonl.gz or .parquet file (the document
in its ``text`` field or column, or the one ``--text-field`` names), a directory or glob of such shards, or a Hub
dataset ``hf:REPO_ID:PATTERN``.
Writes ``OUT/tokenizer/`` (trained on the training source, or the one given with ``--tokenizer``) and per split
``OUT/<split>.npy`` from one text file (uint16 when the vocabulary fits), else the shard directory ``OUT/<split>/``
(one ``.npy`` per source file and a manifest: shards.py). A prepare that was stopped resumes where it stopped
when run again; a source changed meanwhile is an error. ``smollm train`` does the same by itself with its data
flags, caching the results; this command is for corpora you want to prepare once, in a place you choose. An OUT
that already holds any of the outputs is refused unless ``--force``, which replaces them only where they are what
prepare writes (a tokenizer directory of ours, ``.npy`` files, shard directories of ours), never another file.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from smollm_stack.files import make_dir, write_atomic
from smollm_stack.tokenizer.tokenizer import META_FILE
from smollm_stack.train.data.tokens import encode_text, train_tokenizer
from smollm_stack.train.data.shards import is_npy, read_manifest, write_shards
from smollm_stack.train.data.sources import TEXT_FIELD, is_text, resolve

REQUEST, REQUEST_FORMAT = "prepare.json", "smollm-prepare-request-1"


def prepare(train, val, out: Path, vocab_size: int, tokenizer: Path | None = None, progress=True, force=False,
            field: str = TEXT_FIELD) -> dict:
    """Write OUT/tokenizer and the train and val splits (documents in ``field`` of jsonl and parquet); return their
    paths. OUT/prepare.json records the request until it is done, so the same command resumes a stopped one."""
    sources = {"train": resolve(train), "val": resolve(val)}
    if tokenizer is not None and not (tokenizer / "vocab.json").is_file():
        raise FileNotFoundError(f"tokenizer dir {tokenizer} has no vocab.json (write one with Tokenizer.save)")
    paths = {"tokenizer": tokenizer or out / "tokenizer"}
    paths.update({split: out / (f"{split}.npy" if is_text(s) else split) for split, s in sources.items()})
    request = {"format": REQUEST_FORMAT, "train": str(train), "val": str(val), "vocab_size": vocab_size,
               "tokenizer": str(tokenizer) if tokenizer else None, "text_field": field}  # fmt: skip
    existing = [p for name, p in paths.items() if p.exists() and not (name == "tokenizer" and tokenizer)]
    left = _read_request(out)
    if left is None and os.path.lexists(out / REQUEST):
        raise ValueError(f"{out / REQUEST} is not a request of `smollm prepare`: choose another --out (or move it)")
    resume = not force and (left == request or any(_unfinished(p) for p in existing))
    if existing and not (force or resume):
        names = ", ".join(map(str, existing))
        raise ValueError(f"{names} already exist: choose another --out, or --force to replace them")
    for path in existing:
        if not _made_by_prepare(path):
            raise ValueError(f"{path} is not a tokenizer directory, .npy file or shard directory of ours: "
                             "--force does not replace it")  # fmt: skip
    make_dir(out, exist_ok=True)
    write_atomic(out / REQUEST, json.dumps(request, indent=1) + "\n")
    tok_dir = paths["tokenizer"]
    if tokenizer is None and not (resume and tok_dir.exists()):
        train_tokenizer(sources["train"], vocab_size, tok_dir, progress, replace=True, field=field)
    for split in ("train", "val"):
        if is_text(sources[split]) and not (resume and paths[split].exists()):
            encode_text(sources[split][0], tok_dir, paths[split], progress, replace=force)
        elif not is_text(sources[split]):
            write_shards(sources[split], tok_dir, paths[split], force, progress, field)
    (out / REQUEST).unlink()  # done: what is left is what it made
    return paths


def _read_request(out: Path) -> dict | None:
    """The request a stopped prepare left in ``out`` (None if none, or not ours)."""
    path = out / REQUEST
    if path.is_symlink() or not path.is_file():
        return None
    try:
        request = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return request if isinstance(request, dict) and request.get("format") == REQUEST_FORMAT else None


def _unfinished(path: Path) -> bool:
    """Whether ``path`` is a shard directory that a stopped prepare left half-finished."""
    manifest = read_manifest(path) if path.is_dir() else None
    return manifest is not None and not manifest.get("complete")


def _made_by_prepare(path: Path) -> bool:
    if path.is_symlink():
        return False
    if path.is_dir():
        return (path / META_FILE).is_file() or read_manifest(path) is not None
    return is_npy(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="smollm prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, help="training source: .txt, .jsonl(.gz), .parquet, dir, glob, hf:")
    parser.add_argument("--val", required=True, help="validation source, of the same kinds")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--vocab-size", type=int, default=10000, help="BPE vocabulary to train (default 10000)")
    parser.add_argument("--tokenizer", type=Path, help="use this saved tokenizer instead of training one")
    parser.add_argument("--text-field", default=TEXT_FIELD, metavar="NAME",
                        help=f"the jsonl field or parquet column holding each document (default {TEXT_FIELD})")
    parser.add_argument("--force", action="store_true", help="replace the outputs if OUT already holds them")
    args = parser.parse_args(argv)
    try:
        paths = prepare(args.train, args.val, args.out, args.vocab_size, args.tokenizer, force=args.force,
                        field=args.text_field)
    except (ValueError, TypeError, OSError) as e:  # OSError: a full or read-only disk
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"train with: smollm train --train-data {paths['train']} --val-data {paths['val']} "
          f"--tokenizer {paths['tokenizer']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
