"""A corpus of about a gigabyte of real text, for the tokenizer and data benchmarks at scale, from Debian packages.

    python -m smollm_stack.bench.scale_corpus --base ~/.cache/english-corpus/out/corpus.txt --out DIR

--base is the 36 MB English corpus that ../shared/corpus/make_corpus.sh builds (novels, the Bible, manuals, man
pages). To it this adds, from pinned Debian bookworm packages (about 190 MB of .debs, fetched with `apt-get
download`, unpacked with `dpkg-deb -x` under DIR, nothing installed):
- prose: the Linux kernel's Documentation/ (reStructuredText), GCIDE (a full English dictionary, one entry a
  document), the JDK 17 API documentation and cppreference (HTML, reduced to their text);
- code: the Go 1.19 standard library's sources, then Linux kernel C sources drawn at random until the corpus reaches
  --mb megabytes.
Every file (or dictionary entry) is one document, each followed by a line ``<|endoftext|>``; documents from all
sources are shuffled with a fixed seed, so every prefix is a mix and prefixes of it are the smaller corpora of a
size curve. Nothing is repeated, so distinct pre-tokens grow with size as they would on a web corpus (faster, as
code brings identifiers). Writes DIR/corpus_<MB>MB.txt and DIR/sources.json (bytes and documents per source).
"""

import argparse
import hashlib
import html.parser
import json
import random
import re
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

from smollm_stack.files import atomic_file, write_atomic

EOT = "<|endoftext|>"
SEED = 1234
DEBS = {  # package=version: sha256 of the .deb the recorded corpus was built from
    "linux-source-6.1=6.1.192-3": "5259c57ca92092da39bd2ea803046da0e3c28f2b6a11ea20f6297468188ceb67",
    "golang-1.19-src=1.19.8-2": "2dfa82fe4f08f4e0193c532e561af4c91871f5235608f04f2bb8d57bb288df5a",
    "dict-gcide=0.48.5+nmu2": "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f",
    "openjdk-17-doc=17.0.21.1+2-1~deb12u1": "3e04db24dbcb31d598774973998f1d8212e3424e288befbfef235077325f841d",
    "cppreference-doc-en-html=20170409-2": "603e9b7ef33d08b957e287b2b1f429f2338bccf75144f91b7c9e51d3cb6a14e2",
}


def fetch(work: Path) -> Path:
    """Download and unpack the pinned .debs into work/x/<package>; a checksum that differs is reported, not fatal."""
    debs, x = work / "debs", work / "x"
    debs.mkdir(parents=True, exist_ok=True)
    x.mkdir(exist_ok=True)
    for spec, digest in DEBS.items():
        name = spec.split("=")[0]
        found = sorted(debs.glob(f"{name}_*.deb"))
        if not found:
            subprocess.run(["apt-get", "download", spec], cwd=debs, check=True)
            found = sorted(debs.glob(f"{name}_*.deb"))
        if hashlib.sha256(found[0].read_bytes()).hexdigest() != digest:
            print(f"warning: {found[0].name} differs from the recorded corpus's .deb", file=sys.stderr)
        if not (x / name).is_dir():
            subprocess.run(["dpkg-deb", "-x", str(found[0]), str(x / name)], check=True)
    return x


def clean(text: str) -> str:
    """No end-of-text marker inside a document, no control characters, at most one blank line in a row."""
    text = text.replace(EOT, "").replace("\r\n", "\n")
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)
    return re.sub(r"\n\s*\n\s*\n+", "\n\n", text).strip()


class TextOfHtml(html.parser.HTMLParser):
    """The visible text of an HTML page: scripts, styles and navigation dropped, a newline per block element."""

    BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "dt", "dd", "table", "section"}
    HIDDEN = {"script", "style", "nav", "header", "footer", "head"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.hidden = [], 0

    def handle_starttag(self, tag, attrs):
        self.hidden += tag in self.HIDDEN
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        self.hidden -= tag in self.HIDDEN and self.hidden > 0

    def handle_data(self, data):
        if not self.hidden:
            self.parts.append(data)


def html_text(path: Path) -> str:
    parser = TextOfHtml()
    parser.feed(path.read_text("utf-8", errors="replace"))
    return "\n".join(" ".join(line.split()) for line in "".join(parser.parts).split("\n"))


def dictd_entries(index: Path, body: Path) -> list[str]:
    """The entries of a dictd dictionary (.index: word, offset, length in dictd's base-64 digits; .dict.dz: gzip)."""
    digits = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}

    def number(s: str) -> int:
        n = 0
        for c in s:
            n = n * 64 + digits[c]
        return n

    text = zlib.decompress(body.read_bytes(), wbits=31)
    spans = {}  # several headwords (spellings, inflections) share one entry: each entry once
    for line in index.read_text("utf-8", errors="replace").splitlines():
        word, offset, length = line.split("\t")[:3]
        if not word.startswith("00-database"):
            spans.setdefault((number(offset), number(length)), None)
    return [text[start:start + n].decode("utf-8", "replace") for start, n in spans]


def linux_files(x: Path) -> tuple[list[str], list[str]]:
    """The kernel tarball's Documentation/ text files and its C sources and headers, read as a stream."""
    prose, code = [], []
    tarball = next((x / "linux-source-6.1").rglob("linux-source-6.1.tar.xz"))
    with tarfile.open(tarball, "r:xz") as tar:
        for member in tar:
            if not member.isfile():
                continue
            kind = prose if "/Documentation/" in member.name and member.name.endswith((".rst", ".txt")) else (
                code if member.name.endswith((".c", ".h")) else None)
            if kind is not None:
                kind.append(tar.extractfile(member).read().decode("utf-8", "replace"))
    return prose, code


def files(folder: Path, pattern: str) -> list[Path]:
    return sorted(p for p in folder.rglob(pattern) if p.is_file() and not p.is_symlink())


def sources(x: Path) -> dict[str, list[str]]:
    """Documents by source, every one cleaned; the kernel's C last, since it fills up to the target."""
    linux_prose, linux_code = linux_files(x)
    gcide = x / "dict-gcide/usr/share/dictd"
    return {
        "linux Documentation": linux_prose,
        "GCIDE dictionary": dictd_entries(gcide / "gcide.index", gcide / "gcide.dict.dz"),
        "JDK 17 API docs": [html_text(p) for p in files(x / "openjdk-17-doc", "*.html")],
        "cppreference": [html_text(p) for p in files(x / "cppreference-doc-en-html", "*.html")],
        "Go 1.19 sources": [p.read_text("utf-8", errors="replace") for p in files(x / "golang-1.19-src", "*.go")],
        "linux C sources": linux_code,
    }


def build(base: Path, work: Path, target_mb: int) -> Path:
    """Write work/corpus_<target_mb>MB.txt (the base's documents plus the packages', shuffled) and sources.json."""
    docs = {"base corpus": [d for d in base.read_text("utf-8").split(EOT) if d.strip()], **sources(fetch(work))}
    rng, chosen, stats, total = random.Random(SEED), [], {}, 0
    for name, texts in docs.items():
        texts = [t for t in map(clean, texts) if t]
        if name == "linux C sources":
            rng.shuffle(texts)
        kept = []
        for t in texts:
            if total >= target_mb * 10**6 and name == "linux C sources":
                break
            kept.append(t.encode() + b"\n" + EOT.encode() + b"\n")
            total += len(kept[-1])
        stats[name] = {"documents": len(kept), "MB": round(sum(map(len, kept)) / 1e6, 1)}
        chosen += kept
    rng.shuffle(chosen)
    out = work / f"corpus_{target_mb}MB.txt"
    with atomic_file(out) as f:
        f.writelines(chosen)
    write_atomic(work / "sources.json", json.dumps({"debs": DEBS, "seed": SEED, "sources": stats}, indent=1) + "\n")
    return out


def main(argv=None) -> int:
    prog, description = "python -m smollm_stack.bench.scale_corpus", __doc__.splitlines()[0]
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--base", type=Path, required=True, help="the 36 MB corpus of ../shared/corpus/make_corpus.sh")
    parser.add_argument("--out", type=Path, required=True, help="folder for the .debs, their files and the corpus")
    parser.add_argument("--mb", type=int, default=1100, help="size of the corpus in MB (default 1100)")
    args = parser.parse_args(argv)
    if not args.base.is_file():
        print(f"error: --base {args.base}: no such file (../shared/corpus/make_corpus.sh builds it)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    out = build(args.base, args.out, args.mb)
    print(f"{out}: {out.stat().st_size / 1e6:.0f} MB; sources in {args.out / 'sources.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
