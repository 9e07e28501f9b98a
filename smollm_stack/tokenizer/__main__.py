"""Command line: train a tokenizer, or encode a corpus with one.

    smollm tokenizer train CORPUS.txt --vocab-size 10000 --special-token '<|endoftext|>' --out tok/
    smollm tokenizer encode CORPUS.txt --tokenizer tok/ --out corpus.npy --workers 2

Neither overwrites an existing output without ``--force``.
"""

import argparse
import os
import sys
import time

from smollm_stack.tokenizer import Tokenizer, encode_file, train_bpe
from smollm_stack.tokenizer.tokenizer import META_FILE, TOKENIZER_FILES


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process and of its largest finished child (Linux reports KiB); None where the
    platform has no ``resource`` module (Windows)."""
    try:
        import resource
    except ModuleNotFoundError:
        return None
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, child) / 1024


def check_output(out: str, names: tuple[str, ...], force: bool):
    """Refuse to overwrite ``out`` (a file, or the ``names`` in a directory) unless ``force``; even then a tokenizer
    directory is replaced only when it is one of ours (it has our metadata file), never a foreign one."""
    existing = [p for p in ([os.path.join(out, n) for n in names] if names else [out]) if os.path.lexists(p)]
    if existing and not force:
        raise FileExistsError(f"{', '.join(existing)} already exists: choose another --out, or --force to replace it")
    if existing and names and not os.path.isfile(os.path.join(out, META_FILE)):
        raise ValueError(f"--out {out} holds files of another tokenizer ({', '.join(existing)}): not replacing them")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="smollm tokenizer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a byte-level BPE tokenizer on a UTF-8 text file")
    tr.add_argument("corpus")
    tr.add_argument("--vocab-size", type=int, required=True)
    tr.add_argument("--special-token", action="append", default=[], help="repeatable; ids 0.. in the given order")
    tr.add_argument("--out", required=True, help="directory for our files and HF's")
    tr.add_argument("--workers", type=int, default=None, help="pre-tokenization processes (default: all cores)")
    tr.add_argument("--force", action="store_true", help="overwrite a tokenizer already in --out")
    en = sub.add_parser("encode", help="encode a UTF-8 text file to a flat .npy of token ids")
    en.add_argument("corpus")
    en.add_argument("--tokenizer", required=True, help="directory written by `train`")
    en.add_argument("--out", required=True, help="output .npy (uint16 if the vocabulary fits, else uint32)")
    en.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    en.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be >= 1")

    t0 = time.perf_counter()
    try:
        if args.command == "train":
            check_output(args.out, TOKENIZER_FILES, args.force)
            vocab, merges = train_bpe(args.corpus, args.vocab_size, args.special_token, args.workers, progress=True)
            Tokenizer(vocab, merges, args.special_token).save(args.out, exclusive=not args.force)
            longest = max(vocab.values(), key=len) if not merges else max((a + b for a, b in merges), key=len)
            print(f"trained {len(vocab)} tokens ({len(merges)} merges) -> {args.out}")
            print(f"longest token: {longest!r} ({len(longest)} bytes)")
        else:
            check_output(args.out, (), args.force)
            ids = encode_file(args.corpus, Tokenizer.load(args.tokenizer), args.out, args.workers, replace=args.force)
            print(f"encoded {len(ids):,} tokens ({ids.dtype}) -> {args.out}")
    except (OSError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    peak = peak_rss_mb()
    print(f"wall time {time.perf_counter() - t0:.2f} s" + ("" if peak is None else f", peak memory {peak:.0f} MB"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
