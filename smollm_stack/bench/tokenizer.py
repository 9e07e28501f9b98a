"""Tokenizer benchmark: our trainer vs Hugging Face `tokenizers`, our encoder vs tiktoken, side by side.

    python -m smollm_stack.bench.tokenizer --corpus PATH  # e.g. a 36 MB English corpus (RESULTS.md says which)
    python -m smollm_stack.bench.tokenizer --dry-run      # the small test files in tests/data, seconds (a smoke test)
    python -m smollm_stack.bench.tokenizer --first-call --corpus PATH  # a fresh install's first train_bpe, cold vs warm

Every measurement runs in a fresh process, so peak RSS (the process's high-water mark, and ru_maxrss of its largest
child) is its own; times are medians over --repeats runs. The encoding race reads GPT-2's vocab.json and merges.txt
on both sides (by default the gzipped copies in tests/data). The memory-vs-size table also trains on --small-corpus
(by default the first 5 MB of the corpus) and on a concatenation of at least --scale-mb MB: the corpus, the
TinyStories text in train/data, then the Python standard library's sources; distinct texts, never one text
repeated, so the number of distinct pre-tokens grows as it would. With --sizes, the report is the size curve
instead: training at vocab 32000 on --corpus and on each larger corpus (ours beside HF), and encoding the largest.
The report goes to stdout and to report.md in --out.
"""

import codecs
import datetime
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from smollm_stack.bench import cli
from smollm_stack.files import write_atomic

PACKAGE = Path(__file__).resolve().parents[1]
REPO = PACKAGE.parent  # a clone: its tests/data
EOT = "<|endoftext|>"
DATA = REPO / "tests/data"
EXCERPT = DATA / "tinystories_excerpt.txt"
GPT2_VOCAB, GPT2_MERGES = DATA / "gpt2_vocab.json.gz", DATA / "gpt2_merges.txt.gz"
DEFAULT_OUT = Path("runs") / "bench_tokenizer"
SMALL_CORPUS_MB = 5


# ---- measurements, each run in its own process -----------------------------------------------------------------


def peak_rss_mb() -> tuple[float, float]:
    """Peak resident MB of this process and of its largest waited-for child.

    On Linux this process's own peak is its memory map's high-water mark (VmHWM), which starts afresh at exec:
    ru_maxrss would also hold the peak of the parent that spawned it (exec keeps it), so a benchmark that once read
    a large file would see that figure in every measurement it starts.
    """
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        with open("/proc/self/status") as f:
            own = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        pass
    return own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


# Each provider's setup (loading vocabularies, warming a JIT) runs once; the callable it returns is what is timed.
# The report times one call per fresh process (measure); benchmarks/ times the same callables under pytest-benchmark.


def train_ours(corpus, vocab_size, workers) -> Callable[[], dict]:
    from smollm_stack.tokenizer.pretokenize import char_classes
    from smollm_stack.tokenizer.trainer import count_file, merge_counts

    char_classes()  # a per-process constant (0.3 s), like the JIT cache load: not part of the algorithm's time

    def run():
        t0 = time.perf_counter()
        counts = count_file(corpus, [EOT], workers, progress=False)
        t1 = time.perf_counter()
        vocab, _ = merge_counts(counts, vocab_size, [EOT])
        return {"pretokenize": t1 - t0, "merge": time.perf_counter() - t1, "distinct": len(counts), "vocab": len(vocab)}

    return run


def train_hf(corpus, vocab_size, workers) -> Callable[[], dict]:
    os.environ["RAYON_NUM_THREADS"] = str(workers)  # read when the thread pool starts, i.e. after this import
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    def run():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # the GPT-2 regex
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )  # fmt: skip
        tok.train([str(corpus)], trainer)
        return {"vocab": tok.get_vocab_size()}

    return run


def encode_ours(corpus, vocab, merges, workers) -> Callable[[], dict]:
    from smollm_stack.tokenizer import Tokenizer, encode_file
    from smollm_stack.tokenizer.pretokenize import char_classes

    tok = Tokenizer.from_files(vocab, merges, [EOT])
    char_classes()
    tok.encode("warm up")

    def run():
        with tempfile.TemporaryDirectory() as d:
            return {"tokens": len(encode_file(corpus, tok, Path(d) / "ids.npy", num_workers=workers, progress=False))}

    return run


def encode_tiktoken(corpus, vocab_path, merges, workers) -> Callable[[], dict]:
    import tiktoken

    from smollm_stack.tokenizer.bytes_unicode import text_to_bytes
    from smollm_stack.tokenizer.pretokenize import GPT2_PATTERN

    with (gzip.open if vocab_path.endswith(".gz") else open)(vocab_path, "rt", encoding="utf-8") as f:
        vocab = json.load(f)  # tiktoken's ranks are the vocab ids: it needs no merges file
    ranks = {text_to_bytes(t, vocab_path): i for t, i in vocab.items() if t != EOT}
    enc = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: vocab[EOT]})

    def run():  # blocks of whole documents, so memory stays bounded on a corpus of any size, as ours is
        tokens = 0
        for block in document_blocks(Path(corpus)):
            if workers == 1:
                tokens += len(enc.encode(block, allowed_special="all"))
            else:  # tiktoken's own threaded batch API, on documents cut at the special token
                docs = block.split(EOT)
                tokens += sum(map(len, enc.encode_ordinary_batch(docs, num_threads=workers))) + len(docs) - 1
        return {"tokens": tokens}

    return run


def document_blocks(path: Path, size: int = 64 << 20):
    """The text of ``path`` in blocks of about ``size`` bytes, each cut just after an end-of-text marker."""
    marker, rest = EOT.encode(), b""
    with open(path, "rb") as f:
        while chunk := f.read(size):
            data = rest + chunk
            cut = data.rfind(marker) + len(marker) if marker in data else 0
            if cut:
                yield data[:cut].decode("utf-8")
            rest = data[cut:]
    if rest:
        yield rest.decode("utf-8")


MEASURES = {"train_ours": train_ours, "train_hf": train_hf, "encode_ours": encode_ours, "encode_tt": encode_tiktoken}


def measure_in_this_process(request: str):
    """The body of one measuring process: run MEASURES[kind](*args) and print its result, with peak RSS, as JSON."""
    kind, *args = json.loads(request)
    run = MEASURES[kind](*args)
    t0 = time.perf_counter()
    result = run()
    result["time"] = time.perf_counter() - t0
    result["rss"], result["rss_child"] = peak_rss_mb()
    print(json.dumps(result))


def measure(kind: str, *args, repeats: int = 1) -> dict:
    """Median time (and its other fields from the median run) of `repeats` fresh processes, plus peak RSS."""
    code = "import sys; from smollm_stack.bench.tokenizer import measure_in_this_process as m; m(sys.argv[1])"
    request = json.dumps([kind, *(str(a) if isinstance(a, Path) else a for a in args)])
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", code, request], cwd=REPO, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{kind} failed:\n{out.stderr[-2000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    runs.sort(key=lambda r: r["time"])
    best = dict(runs[len(runs) // 2])
    best["times"] = [r["time"] for r in runs]
    best["rss"] = max(r["rss"] for r in runs)
    best["rss_child"] = max(r["rss_child"] for r in runs)
    return best


# ---- inputs the report derives from the corpus ------------------------------------------------------------------


def corpus_prefix(corpus: Path, nbytes: int, out: Path) -> Path:
    """The corpus's first ~nbytes, cut after a newline (so never inside a UTF-8 character), written to out."""
    with open(corpus, "rb") as f:
        raw = f.read(nbytes)
    out.write_bytes(raw[: raw.rfind(b"\n") + 1] or raw)
    return out


def concatenated_corpus(corpus: Path, target_mb: float, out: Path) -> Path:
    """A file of >= target_mb MB at out: the corpus, then train/data's TinyStories, then standard-library sources."""
    sources = [corpus, *sorted((PACKAGE / "train/data").glob("*.txt")), *sorted(Path(os.__file__).parent.rglob("*.py"))]
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


# ---- the report --------------------------------------------------------------------------------------------------


def train_rows(corpora, vocab_sizes, workers: int, repeats: int) -> list[str]:
    lines = [
        f"Training on {workers} cores, ours vs Hugging Face tokenizers; peak RSS ours = main process / largest worker.",
        "",
        "| corpus | MB | vocab | ours | HF tokenizers | ours / HF | ours: pre-tokenize + merge | distinct pre-tokens "
        "| peak RSS ours | RSS HF |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for corpus in corpora:
        for vocab_size in vocab_sizes:
            ours = measure("train_ours", corpus, vocab_size, workers, repeats=repeats)
            hf = measure("train_hf", corpus, vocab_size, workers, repeats=repeats)
            lines.append(
                f"| {corpus.name} | {corpus.stat().st_size / 1e6:.1f} | {vocab_size} | {ours['time']:.2f} s | "
                f"{hf['time']:.2f} s | {ours['time'] / hf['time']:.2f}x | {ours['pretokenize']:.2f} + "
                f"{ours['merge']:.2f} s | {ours['distinct']:,} | {ours['rss']:.0f} / {ours['rss_child']:.0f} MB | "
                f"{hf['rss']:.0f} MB |"
            )
    return lines


def encode_rows(corpus: Path, vocab: Path, merges: Path, workers: int, repeats: int) -> list[str]:
    mb = corpus.stat().st_size / 1e6
    lines = [
        f"Encoding {corpus.name} with GPT-2's vocabulary (both sides built from the same vocab.json/merges.txt);"
        " ours = encode_file to .npy, tiktoken = encode on 64 MB blocks of whole documents (batched over documents"
        " for >1 thread).",
        "",
        "| encode | ours MB/s | tiktoken MB/s | ours / tiktoken 1 thread | peak RSS ours | peak RSS tiktoken |",
        "|---|---|---|---|---|---|",
    ]
    tt1 = measure("encode_tt", corpus, vocab, merges, 1, repeats=repeats)
    for w in sorted({1, workers}):
        ours = measure("encode_ours", corpus, vocab, merges, w, repeats=repeats)
        tt = tt1 if w == 1 else measure("encode_tt", corpus, vocab, merges, w, repeats=repeats)
        if ours["tokens"] != tt["tokens"]:
            raise RuntimeError(f"{w} worker(s): ours gave {ours['tokens']} tokens, tiktoken {tt['tokens']}")
        lines.append(
            f"| {w} worker(s) | {mb / ours['time']:.1f} | {mb / tt['time']:.1f} | {tt1['time'] / ours['time']:.2f}x | "
            f"{ours['rss']:.0f} / {ours['rss_child']:.0f} MB | {tt['rss']:.0f} MB |"
        )
    return lines


def scale_rows(corpora, vocab_size: int, workers: int) -> list[str]:
    lines = [
        f"Training memory vs corpus size (ours, vocab {vocab_size}, {workers} workers): "
        "it follows distinct pre-tokens.",
        "",
        "| corpus | MB | distinct pre-tokens | time | peak RSS main / worker |",
        "|---|---|---|---|---|",
    ]
    for path in dict.fromkeys(corpora):
        r = measure("train_ours", path, vocab_size, workers, repeats=1)
        lines.append(
            f"| {path.name} | {path.stat().st_size / 1e6:.1f} | {r['distinct']:,} | {r['time']:.2f} s | "
            f"{r['rss']:.0f} / {r['rss_child']:.0f} MB |"
        )
    return lines


def first_call_rows(corpus: Path, vocab_size: int, repeats: int) -> list[str]:
    """A fresh process's first ``train_bpe`` (import included), with Numba's cache empty (a fresh install) or warm."""
    lines = [
        f"First call of `train_bpe` on {corpus.name} ({corpus.stat().st_size / 1e6:.1f} MB, vocab {vocab_size}), "
        "a fresh process each, import included; cold: Numba's cache empty, as on a fresh install.",
        "",
        "| path | cold | warm cache |",
        "|---|---|---|",
    ]
    for jit, name in ((None, "default (by input size)"), (True, "Numba JIT forced")):
        with tempfile.TemporaryDirectory(prefix="numba-cache-") as cache:
            cold = [first_call(corpus, vocab_size, jit, Path(cache) / f"cold{i}") for i in range(repeats)]
            warm = [first_call(corpus, vocab_size, jit, Path(cache) / "cold0") for _ in range(repeats)]
        lines.append(f"| {name} | {_median_s(cold)} | {_median_s(warm)} |")
    return lines


FIRST_CALL = """import sys, time
t0 = time.perf_counter()
from smollm_stack.tokenizer import train_bpe
train_bpe(sys.argv[1], int(sys.argv[2]), ["<|endoftext|>"], jit={"none": None, "jit": True}[sys.argv[3]])
print(time.perf_counter() - t0)"""


def first_call(corpus: Path, vocab_size: int, jit, numba_cache: Path) -> float:
    """Seconds of a fresh process's import and first ``train_bpe``, with Numba's cache in ``numba_cache``."""
    command = [sys.executable, "-c", FIRST_CALL, str(corpus), str(vocab_size), "jit" if jit else "none"]
    env = {**os.environ, "NUMBA_CACHE_DIR": str(numba_cache)}
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"first call failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def _median_s(times) -> str:
    times = sorted(times)
    return f"{times[len(times) // 2]:.2f} s ({', '.join(f'{t:.2f}' for t in times)})"


def run(args, command: str) -> str:
    """Markdown tables of training and encoding, ours vs Hugging Face tokenizers vs tiktoken, on this machine."""
    workers = os.cpu_count() or 1
    vocab_sizes, repeats = ([300], 1) if args.dry_run else ([10_000, 32_000], args.repeats)
    mb = args.corpus.stat().st_size / 1e6
    header = (
        f"Tokenizer, {time.strftime('%Y-%m-%d %H:%M')}, CPU with {workers} cores (load average "
        f"{os.getloadavg()[0]:.1f} at the start: other jobs share it), `{command}`, corpus {args.corpus.name} "
        f"({mb:.1f} MB), median of {repeats}; peak RSS = main process / largest worker."
    )
    if args.first_call:
        return "\n\n".join([header, "\n".join(first_call_rows(args.corpus, 500, repeats))])
    if args.sizes:  # the size curve: training at each size, encoding the largest
        corpora = [args.corpus, *args.sizes]
        sections = [[header], train_rows(corpora, [32_000], workers, repeats),
                    encode_rows(corpora[-1], args.gpt2_vocab, args.gpt2_merges, workers, repeats)]
        return "\n\n".join("\n".join(lines) for lines in sections)
    with tempfile.TemporaryDirectory(prefix="bench_tokenizer-") as tmp:  # the derived corpora, deleted at the end
        prefix = Path(tmp) / f"corpus_{SMALL_CORPUS_MB}MB.txt"
        small = args.small_corpus or corpus_prefix(args.corpus, SMALL_CORPUS_MB * 10**6, prefix)
        scale = [] if args.dry_run else [concatenated_corpus(args.corpus, args.scale_mb, Path(tmp) / "mixed.txt")]
        sections = [
            [header],
            train_rows([args.corpus], vocab_sizes, workers, repeats),
            encode_rows(args.corpus, args.gpt2_vocab, args.gpt2_merges, workers, repeats),
            scale_rows([small, args.corpus, *scale], vocab_sizes[0], workers),
        ]
    return "\n\n".join("\n".join(lines) for lines in sections)


# ---- the command line --------------------------------------------------------------------------------------------


def build_parser():
    dry_run = "train and encode the small files in tests/data"
    parser = cli.parser("smollm_stack.bench.tokenizer", __doc__, dry_run=dry_run)
    add = parser.add_argument
    add("--corpus", type=Path, metavar="PATH", help="UTF-8 text to train on and encode (needed without --dry-run)")
    add("--small-corpus", type=Path, metavar="PATH",
        help=f"the smallest corpus in the memory-vs-size table (default: --corpus's first {SMALL_CORPUS_MB} MB)")
    add("--gpt2-vocab", type=Path, default=GPT2_VOCAB, metavar="PATH",
        help="GPT-2's vocab.json, or .json.gz, for the encoding race (default: the copy in tests/data)")
    add("--gpt2-merges", type=Path, default=GPT2_MERGES, metavar="PATH",
        help="GPT-2's merges.txt, or .txt.gz (default: the copy in tests/data)")
    add("--repeats", type=int, default=3, metavar="N",
        help="fresh processes per timed row, the median shown (default 3; 1 with --dry-run)")
    add("--scale-mb", type=float, default=55.0, metavar="MB",
        help="size of the largest row of the memory-vs-size table (default 55; no such row with --dry-run)")
    add("--sizes", type=Path, nargs="+", metavar="PATH",
        help="larger corpora (e.g. prefixes of bench.scale_corpus's): train on --corpus and each at vocab 32000, "
        "ours beside HF, and encode the last against tiktoken, instead of the default report")
    add("--first-call", action="store_true",
        help="only time a fresh process's first train_bpe on --corpus (vocab 500), Numba's cache empty vs warm")
    add("--out", type=Path, metavar="DIR", help=f"new directory for report.md (default {DEFAULT_OUT}/<date-time>)")
    return parser


def parse_args(argv):
    """The flags, checked: returns the namespace, or None after printing one `error:` line."""
    args = build_parser().parse_args(argv)
    if args.dry_run:
        args.corpus = args.corpus or EXCERPT
        args.small_corpus = args.small_corpus or args.corpus  # the excerpt is smaller than any prefix
    args.out = args.out or DEFAULT_OUT / datetime.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    texts = {"--corpus": args.corpus, "--small-corpus": args.small_corpus}
    texts |= {f"--sizes[{i}]": path for i, path in enumerate(args.sizes or ())}
    files = {**texts, "--gpt2-vocab": args.gpt2_vocab, "--gpt2-merges": args.gpt2_merges}
    missing = [f"{flag} {path}" for flag, path in files.items() if path is not None and not path.is_file()]
    if args.corpus is None:
        error = "--corpus PATH is needed (any UTF-8 text), or --dry-run"
    elif missing:
        error = f"{missing[0]}: no such file"
    elif not_text := [f"{flag} {path}" for flag, path in texts.items() if path and not _is_utf8(path)]:
        error = f"{not_text[0]} is not UTF-8 text"
    elif args.repeats < 1:
        error = f"--repeats must be at least 1, got {args.repeats}"
    elif not args.scale_mb > 0:
        error = f"--scale-mb must be a positive number of MB, got {args.scale_mb}"
    elif args.out.exists() and not args.out.is_dir():
        error = f"--out {args.out} is a file, not a directory"
    elif (args.out / "report.md").exists():
        error = f"--out {args.out} already holds a report.md; name a new directory"
    else:
        return args
    print(f"error: {error}", file=sys.stderr)
    return None


def _is_utf8(path: Path) -> bool:
    """Checked a block at a time, so this process stays small (its peak is inherited by what it starts)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            while block := f.read(16 << 20):
                decoder.decode(block)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    if args is None:
        return 2
    command = " ".join(["python -m smollm_stack.bench.tokenizer", *(sys.argv[1:] if argv is None else argv)])
    try:
        report = run(args, command)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "report.md", report + "\n")
    print(report)
    print(f"wrote {args.out / 'report.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
