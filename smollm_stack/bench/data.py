"""Data at scale: the whole prepare of a sharded corpus timed with its peak memory, and a shard set past 2**31 tokens
read back through the loader and the sampler.

    python -m smollm_stack.bench.data --corpus PATH --shards 8 --vocab-size 32000 --out DIR
    python -m smollm_stack.bench.data --past-2-31 --out DIR   # 8 GiB of sparse shards in DIR, removed at the end

The corpus (UTF-8 text, documents separated by ``<|endoftext|>``, e.g. the Debian corpus of ../shared/corpus) is cut
into --shards shards of whole documents, alternately .jsonl.gz and .parquet (pyarrow: the ``data`` extra); the last
one is the validation split. ``smollm prepare`` then runs on them in a fresh process: its wall time and the peak
RSS of its largest process (main or worker) are reported with the token counts. The report goes to DIR/report.md.
"""

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from smollm_stack.bench.tokenizer import EOT, document_blocks


def documents(corpus: Path):
    """The corpus's documents, read a block of whole documents at a time."""
    for block in document_blocks(corpus, 16 << 20):
        yield from (d.strip("\n") for d in block.split(EOT) if d.strip())


def cut_into_shards(corpus: Path, n: int, out: Path) -> list[Path]:
    """``n`` shards of whole documents, of about equal bytes, alternately .jsonl.gz and .parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    target, paths, docs, size = corpus.stat().st_size / n, [], [], 0

    def flush():
        path = out / f"part-{len(paths):03d}.{'parquet' if len(paths) % 2 else 'jsonl.gz'}"
        if path.suffix == ".parquet":
            pq.write_table(pa.table({"text": docs}), path, row_group_size=2048)
        else:
            with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as f:
                f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
        paths.append(path)

    out.mkdir(parents=True, exist_ok=True)
    for doc in documents(corpus):
        docs.append(doc)
        size += len(doc.encode())
        if size >= target * (len(paths) + 1) and len(paths) < n - 1:
            flush()
            docs = []
    flush()
    return paths


PREPARE = """import json, sys
from smollm_stack.bench.tokenizer import peak_rss_mb
from smollm_stack.train.data.prepare import main
code = main(sys.argv[1:])
print(json.dumps(peak_rss_mb()))
sys.exit(code)"""


def prepare_rows(corpus: Path, n_shards: int, vocab_size: int, out: Path) -> list[str]:
    shards = cut_into_shards(corpus, n_shards, out / "shards" / "train")
    (out / "shards" / "val").mkdir()
    shards[-1].rename(out / "shards" / "val" / shards[-1].name)
    splits = ["--train", str(out / "shards" / "train"), "--val", str(out / "shards" / "val")]
    command = [sys.executable, "-c", PREPARE, *splits, "--out", str(out / "prepared"), "--vocab-size", str(vocab_size)]
    t0 = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-2000:])
    peak = max(json.loads(run.stdout.strip().splitlines()[-1]))
    manifests = [json.loads((out / "prepared" / s / "manifest.json").read_text()) for s in ("train", "val")]
    tokens = sum(shard["tokens"] for m in manifests for shard in m["shards"])
    return [
        f"`smollm prepare` of {corpus.name} ({corpus.stat().st_size / 1e6:.0f} MB) cut into {n_shards} shards "
        f"(.jsonl.gz and .parquet), vocab {vocab_size}, {os.cpu_count()} workers:",
        "",
        "| wall time | peak RSS (largest process) | tokens | shards |",
        "|---|---|---|---|",
        f"| {wall:.1f} s | {peak:.0f} MB | {tokens:,} | {sum(len(m['shards']) for m in manifests)} |",
    ]


def past_2_31_rows(out: Path) -> list[str]:
    """Two sparse shards of 2**31 + 5 and 2**31 tokens, marked near the seam, read through open_tokens and sampled."""
    from smollm_stack.train.data.tokens import BatchSampler, open_tokens
    from smollm_stack.train.data.shards import FORMAT, MANIFEST

    big = 1 << 31
    sizes = [big + 5, big]
    out.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(sizes):
        ids = np.lib.format.open_memmap(out / f"shard-{i:05d}.npy", mode="w+", dtype=np.uint16, shape=(n,))
        ids[[big - 2, big + 4] if i == 0 else [0, n - 1]] = [1, 2] if i == 0 else [3, 4]
        ids.flush()
        del ids
    shards = [{"file": f"shard-{i:05d}.npy", "tokens": n} for i, n in enumerate(sizes)]
    (out / MANIFEST).write_text(json.dumps({"format": FORMAT, "complete": True, "shards": shards}))
    data = open_tokens(out)
    seam = sizes[0]
    assert data[big - 2 : big].tolist() == [1, 0] and data[seam - 1 : seam + 1].tolist() == [2, 3]
    assert data[len(data) - 1] == 4 and len(data) == sum(sizes)
    sampler, past, checked = BatchSampler(data, 64, 256, 0, 1), 0, 0
    for step in range(200):
        x, _ = sampler.batch(step, 0, "cpu")
        for s, row in zip(sampler.starts(step).tolist(), x.tolist()):
            assert row == np.asarray(data[s : s + 256]).tolist()
            past, checked = past + (s > big), checked + 1
    shutil.rmtree(out)
    return [
        f"A shard set of {len(data):,} tokens (two sparse uint16 shards, 8 GiB): ids at the 2**31 boundary and across "
        f"the shard seam read back exactly; {checked:,} sampled windows equal their slices, {past:,} of them starting "
        "past 2**31."
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smollm_stack.bench.data", description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, help="UTF-8 text, documents separated by <|endoftext|>")
    parser.add_argument("--shards", type=int, default=8, help="shards to cut the corpus into (default 8)")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--past-2-31", action="store_true", help="check a sparse shard set past 2**31 tokens")
    parser.add_argument("--out", type=Path, required=True, help="new directory for the shards and report.md")
    args = parser.parse_args(argv)
    if args.out.exists():
        print(f"error: --out {args.out} exists: name a new directory", file=sys.stderr)
        return 2
    if (args.corpus is None) == (not args.past_2_31) or (args.corpus and not args.corpus.is_file()):
        print("error: give --corpus PATH (an existing text file) or --past-2-31", file=sys.stderr)
        return 2
    header = f"bench.data, {time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.1f} at the start"
    if args.past_2_31:
        rows = past_2_31_rows(args.out / "past_2_31")
    else:
        rows = prepare_rows(args.corpus, args.shards, args.vocab_size, args.out)
    report = "\n".join([header, "", *rows])
    args.out.mkdir(parents=True, exist_ok=True)
    from smollm_stack.files import write_atomic

    write_atomic(args.out / "report.md", report + "\n", exclusive=True)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
