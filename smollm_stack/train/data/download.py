"""Download a public pretraining corpus as text files, through huggingface_hub (needs a network, or its cache).

    smollm download tinystories --out data/tinystories     # 2.2 GB train + 22 MB valid (TinyStoriesV2-GPT4)
    smollm download owt --out data/owt                      # 11.9 GB train + 0.3 GB valid (OpenWebText sample)
    smollm prepare --train data/tinystories/train.txt --val data/tinystories/valid.txt \\
        --vocab-size 10000 --out data/tinystories

Sources: TinyStories (Eldan & Li, 2023; CDLA-Sharing-1.0) from roneneldan/TinyStories, and the OpenWebText sample
(Gokaslan & Cohen, 2019) that Stanford CS336 distributes as stanford-cs336/owt-sample, both Hugging Face Hub
datasets. huggingface_hub fetches each file into its cache (an interrupted download resumes; the file is checked
against the Hub's checksum; ``HF_HUB_OFFLINE=1`` reads only the cache); it is then copied, gunzipped when
compressed, to a temporary name beside the output and renamed when complete. Corpora in parquet or jsonl shards
need no download step: give ``prepare`` the ``hf:REPO_ID:PATTERN`` source itself (sources.py).
"""

import argparse
import gzip
import shutil
import sys
from pathlib import Path

from smollm_stack.files import atomic_file, make_dir
from smollm_stack.train.data.sources import hub_fetch

CORPORA = {  # name -> {output file: (Hub dataset, file in it)}
    "tinystories": {
        "train.txt": ("roneneldan/TinyStories", "TinyStoriesV2-GPT4-train.txt"),
        "valid.txt": ("roneneldan/TinyStories", "TinyStoriesV2-GPT4-valid.txt"),
    },
    "owt": {
        "train.txt": ("stanford-cs336/owt-sample", "owt_train.txt.gz"),
        "valid.txt": ("stanford-cs336/owt-sample", "owt_valid.txt.gz"),
    },
}


def download(repo_id: str, filename: str, out: Path) -> Path:
    """Fetch ``filename`` of the Hub dataset ``repo_id`` and write it to ``out`` (gunzipped if ``.gz``), atomically;
    an existing ``out`` is kept."""
    if out.is_file():
        print(f"{out} exists, skipping")
        return out
    cached = hub_fetch("hf_hub_download", f"{repo_id}/{filename}", repo_id=repo_id, filename=filename,
                       repo_type="dataset")  # fmt: skip
    make_dir(out.parent, exist_ok=True)
    with open(cached, "rb") as source, atomic_file(out, exclusive=True) as f:  # never through a link
        shutil.copyfileobj(gzip.GzipFile(fileobj=source) if filename.endswith(".gz") else source, f, 1 << 20)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="smollm download", description=__doc__.splitlines()[0])
    parser.add_argument("corpus", choices=sorted(CORPORA))
    parser.add_argument("--out", type=Path, required=True, help="directory for train.txt and valid.txt")
    args = parser.parse_args(argv)
    try:
        for name, (repo_id, filename) in CORPORA[args.corpus].items():
            download(repo_id, filename, args.out / name)
    except (ValueError, OSError, EOFError) as e:  # EOFError: a truncated .gz
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"next: smollm prepare --train {args.out / 'train.txt'} --val {args.out / 'valid.txt'} "
          f"--vocab-size 10000 --out {args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
