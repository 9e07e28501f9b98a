"""Tokenizer benchmark: our trainer vs Hugging Face `tokenizers`, our encoder vs tiktoken, side by side.

    python -m bench.tokenizer [--corpus PATH] [--small-corpus PATH] [--gpt2-dir DIR] [--repeats N] [--dry-run]

Every measurement runs in a fresh subprocess, so peak RSS (ru_maxrss of the process and of its largest child) is
its own; times are medians over --repeats runs. Data defaults:
  --corpus        ~/.cache/english-corpus/out/corpus.txt (36 MB; build with ../shared/corpus/make_corpus.sh)
  --small-corpus  ~/.cache/english-corpus/out/corpus_5MB.txt (a 5 MB prefix of the same corpus)
  --gpt2-dir      ../shared/data/gpt2 (vocab.json + merges.txt, for the encoding race: both sides use GPT-2's BPE)
  --scale-mb      55: the memory-vs-size row also trains on a concatenation of at least this many MB (the corpus,
                  the TinyStories files next to the GPT-2 ones, then the Python standard library's sources): distinct
                  texts, never one text repeated, so the number of distinct pre-tokens grows as it would.
--dry-run uses the small test files in tests/data for everything (a smoke test for CI).
"""

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EOT = "<|endoftext|>"
CORPUS = Path.home() / ".cache/english-corpus/out/corpus.txt"
SMALL_CORPUS = Path.home() / ".cache/english-corpus/out/corpus_5MB.txt"
GPT2_DIR = REPO.parent / "shared/data/gpt2"
EXCERPT = REPO / "tests/data/tinystories_excerpt.txt"
SCALE_DIR = Path(tempfile.gettempdir()) / "bench_tokenizer"


# ---- measurements, each run in its own process -----------------------------------------------------------------


def _peak_rss_mb() -> tuple[float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def _train_ours(corpus, vocab_size, workers):
    from tokenizer.pretokenize import char_classes
    from tokenizer.trainer import count_file, merge_counts

    char_classes()  # a per-process constant (0.3 s), like the JIT cache load: not part of the algorithm's time
    t0 = time.perf_counter()
    counts = count_file(corpus, [EOT], workers, progress=False)
    t1 = time.perf_counter()
    vocab, _ = merge_counts(counts, vocab_size, [EOT])
    t2 = time.perf_counter()
    return {"time": t2 - t0, "pretokenize": t1 - t0, "merge": t2 - t1, "distinct": len(counts), "vocab": len(vocab)}


def _train_hf(corpus, vocab_size, workers):
    os.environ["RAYON_NUM_THREADS"] = str(workers)  # read when the thread pool starts, i.e. after this import
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # the GPT-2 regex
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    t0 = time.perf_counter()
    tok.train([str(corpus)], trainer)
    return {"time": time.perf_counter() - t0, "vocab": tok.get_vocab_size()}


def _encode_ours(corpus, gpt2_dir, workers):
    from tokenizer import Tokenizer, encode_file
    from tokenizer.pretokenize import char_classes

    tok = Tokenizer.from_files(Path(gpt2_dir) / "vocab.json", Path(gpt2_dir) / "merges.txt", [EOT])
    char_classes()
    tok.encode("warm up")
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        ids = encode_file(corpus, tok, Path(d) / "ids.npy", num_workers=workers, progress=False)
        return {"time": time.perf_counter() - t0, "tokens": len(ids)}


def _encode_tiktoken(corpus, gpt2_dir, workers):
    import tiktoken

    from tokenizer.pretokenize import GPT2_PATTERN
    from tokenizer.bytes_unicode import text_to_bytes

    vocab = json.loads((Path(gpt2_dir) / "vocab.json").read_text(encoding="utf-8"))
    ranks = {text_to_bytes(t, "vocab.json"): i for t, i in vocab.items() if t != EOT}
    enc = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: vocab[EOT]})
    text = Path(corpus).read_text(encoding="utf-8")
    t0 = time.perf_counter()
    if workers == 1:
        n = len(enc.encode(text, allowed_special="all"))
    else:  # tiktoken's own threaded batch API, on documents cut at the special token
        docs = text.split(EOT)
        n = sum(map(len, enc.encode_ordinary_batch(docs, num_threads=workers))) + len(docs) - 1
    return {"time": time.perf_counter() - t0, "tokens": n}


MEASURES = {
    "train_ours": _train_ours, "train_hf": _train_hf, "encode_ours": _encode_ours, "encode_tt": _encode_tiktoken,
}  # fmt: skip


def measure(kind: str, *args, repeats: int = 1) -> dict:
    """Median time (and its other fields from the median run) of `repeats` fresh processes, plus peak RSS."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-m", "bench.tokenizer", "--_measure", json.dumps([kind, *map(str, args)])],
            cwd=REPO, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"{kind} failed:\n{out.stderr[-2000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    runs.sort(key=lambda r: r["time"])
    best = dict(runs[len(runs) // 2])
    best["times"] = [r["time"] for r in runs]
    best["rss"] = max(r["rss"] for r in runs)
    best["rss_child"] = max(r["rss_child"] for r in runs)
    return best


# ---- the report --------------------------------------------------------------------------------------------------


def concatenated_corpus(corpus, gpt2_dir, target_mb: float) -> Path:
    """A file of >= target_mb MB: the corpus, then TinyStories, then Python standard-library sources (UTF-8 ones)."""
    out = SCALE_DIR / f"corpus_{target_mb:g}MB.txt"
    if out.exists():
        return out
    tinystories = Path(gpt2_dir).parent / "tinystories"
    sources = [Path(corpus), *sorted(tinystories.glob("*.txt")), *sorted(Path(os.__file__).parent.rglob("*.py"))]
    SCALE_DIR.mkdir(exist_ok=True)
    with open(out, "wb") as f:
        for path in sources:
            if f.tell() >= target_mb * 1e6:
                break
            raw = path.read_bytes()
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                continue
            f.write(raw + b"\n")
    return out


def run(dry_run: bool = False, corpus=CORPUS, small_corpus=SMALL_CORPUS, gpt2_dir=GPT2_DIR, repeats=3,
        scale_mb=55.0) -> str:  # fmt: skip
    """Markdown tables of training and encoding, ours vs Hugging Face tokenizers vs tiktoken, on this machine."""
    workers = os.cpu_count() or 1
    if dry_run:  # tiny and self-contained: the test excerpt and the gzipped GPT-2 files from tests/data
        corpus = small_corpus = EXCERPT
        repeats, vocab_sizes = 1, [300]
        gpt2_dir = SCALE_DIR / "gpt2"
        gpt2_dir.mkdir(parents=True, exist_ok=True)
        for name in ("vocab.json", "merges.txt"):
            (gpt2_dir / name).write_bytes(gzip.decompress((REPO / f"tests/data/gpt2_{name}.gz").read_bytes()))
    else:
        vocab_sizes = [10_000, 32_000]
    for path in (corpus, small_corpus, Path(gpt2_dir) / "vocab.json"):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} not found (see `python -m bench.tokenizer --help` for the data options)")
    mb = Path(corpus).stat().st_size / 1e6
    date = time.strftime("%Y-%m-%d %H:%M")
    load = os.getloadavg()[0]
    lines = [
        f"Tokenizer, {date}, CPU with {workers} cores (load average {load:.1f} at the start: other jobs share it), "
        f"`python -m bench.tokenizer{' --dry-run' if dry_run else ''}`, "
        f"corpus {Path(corpus).name} ({mb:.1f} MB), median of {repeats}; "
        "peak RSS = main process / largest worker.",
        "",
        "| task | vocab | ours | HF tokenizers | ours / HF | ours: pre-tokenize + merge | peak RSS ours | RSS HF |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for vocab_size in vocab_sizes:
        ours = measure("train_ours", corpus, vocab_size, workers, repeats=repeats)
        hf = measure("train_hf", corpus, vocab_size, workers, repeats=repeats)
        lines.append(
            f"| train, {workers} cores | {vocab_size} | {ours['time']:.2f} s | {hf['time']:.2f} s | "
            f"{ours['time'] / hf['time']:.2f}x | {ours['pretokenize']:.2f} + {ours['merge']:.2f} s | "
            f"{ours['rss']:.0f} / {ours['rss_child']:.0f} MB | {hf['rss']:.0f} MB |"
        )
    lines += [
        "",
        f"Encoding {Path(corpus).name} with GPT-2's vocabulary (both sides built from the same vocab.json/merges.txt);"
        " ours = encode_file to .npy, tiktoken = encode on the text in memory (batched over documents for >1 thread).",
        "",
        "| encode | ours MB/s | tiktoken MB/s | ours / tiktoken 1 thread | peak RSS ours | peak RSS tiktoken |",
        "|---|---|---|---|---|---|",
    ]
    tt1 = measure("encode_tt", corpus, gpt2_dir, 1, repeats=repeats)
    for w in sorted({1, workers}):
        ours = measure("encode_ours", corpus, gpt2_dir, w, repeats=repeats)
        tt = tt1 if w == 1 else measure("encode_tt", corpus, gpt2_dir, w, repeats=repeats)
        assert ours["tokens"] == tt["tokens"], (ours["tokens"], tt["tokens"])
        lines.append(
            f"| {w} worker(s) | {mb / ours['time']:.1f} | {mb / tt['time']:.1f} | {tt1['time'] / ours['time']:.2f}x | "
            f"{ours['rss']:.0f} / {ours['rss_child']:.0f} MB | {tt['rss']:.0f} MB |"
        )
    lines += [
        "",
        f"Training memory vs corpus size (ours, vocab {vocab_sizes[0]}, {workers} workers): "
        "it follows distinct pre-tokens.",
        "",
        "| corpus | MB | distinct pre-tokens | time | peak RSS main / worker |",
        "|---|---|---|---|---|",
    ]
    scale = [] if dry_run else [concatenated_corpus(corpus, gpt2_dir, scale_mb)]
    for path in dict.fromkeys((small_corpus, corpus, *scale)):
        r = measure("train_ours", path, vocab_sizes[0], workers, repeats=1)
        size = Path(path).stat().st_size / 1e6
        lines.append(
            f"| {Path(path).name} | {size:.1f} | {r['distinct']:,} | {r['time']:.2f} s | "
            f"{r['rss']:.0f} / {r['rss_child']:.0f} MB |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=CORPUS)
    parser.add_argument("--small-corpus", default=SMALL_CORPUS)
    parser.add_argument("--gpt2-dir", default=GPT2_DIR)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale-mb", type=float, default=55.0)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--_measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._measure:
        kind, *rest = json.loads(args._measure)
        fn = MEASURES[kind]
        result = fn(rest[0], *[int(a) if a.isdigit() else a for a in rest[1:]])
        result["rss"], result["rss_child"] = _peak_rss_mb()
        print(json.dumps(result))
        return
    try:
        print(run(args.dry_run, args.corpus, args.small_corpus, args.gpt2_dir, args.repeats, args.scale_mb))
    except (FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
