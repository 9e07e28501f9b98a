"""Measured figures come from records, and every link to a record leads to one.

A record is a folder `smollm_stack/bench/records/<date>-<name>/` holding one measurement's command, machine, figures
and raw output. The rule for the pages that quote them: in README.md every paragraph, and in bench/RESULTS.md every
`##` section, that states a measured figure links the record(s) it comes from, and each figure appears, digit for
digit, in a file of those records' folders: as written, or as a bare number in a table row whose header names the
unit (2.998 does not match a record's 2.9981: quote the record). A measured figure is a number with a unit of
measure: a ratio (1.49x), a share (73%), a time (53.1 s, 949 ms, 3:39.5), a size (1,087 MB), a rate (27.0 MB/s,
1,319 tokens/s, 461K tokens/s), or a loss with three or four decimals (2.9981).
"""

import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "smollm_stack" / "bench" / "records"
RESULTS = ROOT / "smollm_stack" / "bench" / "RESULTS.md"
README = ROOT / "README.md"

FIGURE = re.compile(
    r"(?<![\w.])("
    r"\d[\d,]*(?:\.\d+)?x(?!\w)"  # a ratio
    r"|\d[\d,]*(?:\.\d+)?%"  # a share
    r"|\d[\d,]*(?:\.\d+)?[KM]? ?(?:ms|s|MB/s|MB|GB|tok/s|tokens/s)(?![\w/])"  # a time, size or rate
    r"|\d+:\d\d(?:\.\d)?(?![\d:])"  # a wall time, m:ss
    r"|\d\.\d{3,4}"  # a loss or bits per byte
    r")(?![\d])"
)
# Figures that are not measurements: the sizes of the text files the package ships.
NOT_MEASURED = {"2.1 MB", "0.8 MB"}
LINK = re.compile(r"\]\(([^)\s]+)\)")


def figures(text):
    return [f for f in FIGURE.findall(" ".join(text.split())) if f not in NOT_MEASURED]


def links(text, page, anchors=False):
    """The local paths `page`'s markdown links point at (web links skipped), with their anchors if asked."""
    targets = []
    for link in LINK.findall(text):
        path, _, anchor = link.partition("#")
        if not re.match(r"[a-z]+:", path):
            target = (page.parent / path).resolve() if path else page
            targets.append((target, anchor) if anchors else target)
    return [t for t in targets if anchors or t != page]


def slugs(page):
    """The anchors of a markdown page's headings, as GitHub makes them."""
    headings = re.findall(r"^#+ (.+)$", prose(page.read_text()), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def linked_records(text, page):
    """The record folders `text` (a part of `page`) links."""
    folders = set()
    for target in links(text, page):
        if target.is_relative_to(RECORDS) and target != RECORDS:
            folders.add(RECORDS / target.relative_to(RECORDS).parts[0])
    return folders


@cache
def record_text(folder):
    """The folder's files as one line of text (a figure may wrap across lines), and its table rows apart."""
    lines = [ln for p in sorted(folder.rglob("*")) if p.is_file() for ln in p.read_text(errors="replace").splitlines()]
    return " ".join(" ".join(lines).split()), "\n".join(ln for ln in lines if ln.lstrip().startswith("|"))


def found(figure, folders):
    """The figure in a record as written, or its number alone in a table row (the unit in the column's header)."""
    number = re.match(r"[\d,.:]+", figure).group()
    edges = r"(?<![\d.,:])%s(?![\d]|[.,:]\d)"
    quoted, bare = re.compile(edges % re.escape(figure)), re.compile(edges % re.escape(number))
    for folder in filter(Path.is_dir, folders):
        text, table = record_text(folder)
        if quoted.search(text) or bare.search(table):
            return True
    return False


def prose(text):
    """`text` without its fenced code blocks (commands, not claims)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def paragraphs(text):
    return [p for p in re.split(r"\n\s*\n", prose(text)) if p.strip()]


def sections(text):
    return [s for s in re.split(r"^(?=## )", prose(text), flags=re.M) if s.strip()]


def unsourced(parts, page):
    """(figure, the part's first line) for each figure no record linked from its part holds."""
    missing = []
    for part in parts:
        folders = linked_records(part, page)
        missing += [(f, part.strip().splitlines()[0][:80]) for f in figures(part) if not found(f, folders)]
    return missing


def test_every_figure_in_the_readme_is_in_a_record_its_paragraph_links():
    assert unsourced(paragraphs(README.read_text()), README) == []


def test_every_figure_in_results_is_in_a_record_its_section_links():
    assert unsourced(sections(RESULTS.read_text()), RESULTS) == []


def test_every_record_holds_a_readme_with_a_dated_title():
    folders = [d for d in RECORDS.iterdir() if d.is_dir() and re.match(r"\d{4}-\d\d-\d\d-[a-z0-9.-]+$", d.name)]
    assert len(folders) > 20
    for folder in folders:
        assert (folder / "README.md").read_text().startswith("# "), folder.name


PAGES = [README, RESULTS, *sorted((ROOT / "docs").glob("*.md")), *sorted(RECORDS.rglob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_local_link_leads_to_a_file_or_folder(page):
    broken = []
    for target, anchor in links(page.read_text(), page, anchors=True):
        if not target.exists() or anchor and target.suffix == ".md" and anchor not in slugs(target):
            broken.append(f"{target.relative_to(ROOT)}#{anchor}")
    assert broken == []


def test_the_rule_catches_a_figure_no_linked_record_holds():
    """The checker itself: a changed figure, a figure without its link, and a rounded one each fail."""
    link = "[record](smollm_stack/bench/records/2026-12-08-cpu-step/README.md)"

    def missing(text):
        return [figure for figure, _ in unsourced([text], README)]

    assert missing(f"AdamW runs 1.49x the naive loop, 1,319 tokens/s {link}.") == []
    assert missing(f"AdamW runs 1.59x the naive loop {link}.") == ["1.59x"]
    assert missing("AdamW runs 1.49x the naive loop.") == ["1.49x"]
    assert missing(f"final validation loss 2.998 {link}") == ["2.998"]
    assert figures("3:39.5, 53.1 s, 949 ms, 1,087\nMB, 27.0 MB/s, 461K tokens/s, 73%, 2.9981, 16 x 128, 2.1 MB") == [
        "3:39.5", "53.1 s", "949 ms", "1,087 MB", "27.0 MB/s", "461K tokens/s", "73%", "2.9981"]  # fmt: skip


def test_results_lists_every_record():
    listed = linked_records(RESULTS.read_text(), RESULTS)
    assert sorted(d.name for d in RECORDS.iterdir() if d.is_dir() and d not in listed) == []


def test_every_record_a_source_file_names_exists():
    """Code comments point at records by folder name (bench/records/<date>-<name>): each must be there."""
    named = re.compile(r"records/(\d{4}-\d\d-\d\d-[\w.-]*\w)")
    sources = [p for d in ("smollm_stack", "tests", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    missing = sorted(
        f"{p.relative_to(ROOT)}: {m}"
        for p in sources
        for m in named.findall(p.read_text(encoding="utf-8"))
        if not (RECORDS / m.split("/")[0]).is_dir()
    )
    assert sources and not missing, f"records named in code that do not exist: {missing}"
