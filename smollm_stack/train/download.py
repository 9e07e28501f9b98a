"""Download a public pretraining corpus as text files (needs a network; nothing here runs in CI but the plumbing).

    smollm download tinystories --out data/tinystories     # 2.2 GB train + 22 MB valid (TinyStoriesV2-GPT4)
    smollm download owt --out data/owt                      # 11.9 GB train + 0.3 GB valid (OpenWebText sample)
    smollm prepare --train data/tinystories/train.txt --val data/tinystories/valid.txt \\
        --vocab-size 10000 --out data/tinystories

Sources: TinyStories (Eldan & Li, 2023; CDLA-Sharing-1.0) from roneneldan/TinyStories, and the OpenWebText sample
(Gokaslan & Cohen, 2019) that Stanford CS336 distributes as stanford-cs336/owt-sample, both on the Hugging Face hub.
Files are streamed to a temporary name, gunzipped on the fly when compressed, and renamed when complete, so an
interrupted download is simply started again.
"""

import argparse
import gzip
import shutil
import sys
import urllib.request
from pathlib import Path

from tqdm import tqdm

from smollm_stack.files import atomic_file

HF = "https://huggingface.co/datasets"
CORPORA = {
    "tinystories": {
        "train.txt": f"{HF}/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-train.txt",
        "valid.txt": f"{HF}/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-valid.txt",
    },
    "owt": {
        "train.txt": f"{HF}/stanford-cs336/owt-sample/resolve/main/owt_train.txt.gz",
        "valid.txt": f"{HF}/stanford-cs336/owt-sample/resolve/main/owt_valid.txt.gz",
    },
}


def download(url: str, out: Path, progress: bool = True) -> Path:
    """Stream ``url`` to ``out`` (gunzipping a ``.gz`` URL), atomically; an existing ``out`` is kept."""
    if out.is_file():
        print(f"{out} exists, skipping")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url) as response, atomic_file(out, exclusive=True) as f:  # never through a link
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=out.name, disable=not progress) as bar:
            source = _Counting(response, bar)
            shutil.copyfileobj(gzip.GzipFile(fileobj=source) if url.endswith(".gz") else source, f, 1 << 20)
    return out


class _Counting:
    """A read-only stream that advances a progress bar by the (compressed) bytes read."""

    def __init__(self, stream, bar):
        self.stream, self.bar = stream, bar

    def read(self, n=-1):
        data = self.stream.read(n)
        self.bar.update(len(data))
        return data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="smollm download", description=__doc__.splitlines()[0])
    parser.add_argument("corpus", choices=sorted(CORPORA))
    parser.add_argument("--out", type=Path, required=True, help="directory for train.txt and valid.txt")
    args = parser.parse_args(argv)
    try:
        for name, url in CORPORA[args.corpus].items():
            download(url, args.out / name)
    except OSError as e:  # URLError is an OSError
        print(f"error: download failed ({e}); this needs a network connection", file=sys.stderr)
        return 2
    print(f"next: smollm prepare --train {args.out / 'train.txt'} --val {args.out / 'valid.txt'} "
          f"--vocab-size 10000 --out {args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
