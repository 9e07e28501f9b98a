"""bench.tokenizer's command line (its measurements are what `python -m smollm_stack.bench.tokenizer --dry-run`
smoke-tests)."""

import argparse

import pytest

from smollm_stack.bench import tokenizer as bench_tokenizer


def test_every_flag_is_described(capsys):
    parser = bench_tokenizer.build_parser()
    assert parser.format_usage().startswith("usage: python -m smollm_stack.bench.tokenizer")
    undescribed = [a.option_strings for a in parser._actions if not a.help or a.help == argparse.SUPPRESS]
    assert not undescribed


@pytest.mark.parametrize(
    "argv, error",
    [
        ([], "--corpus PATH is needed"),
        (["--corpus", "nowhere.txt"], "--corpus nowhere.txt: no such file"),
        (["--dry-run", "--repeats", "0"], "--repeats must be at least 1"),
        (["--dry-run", "--scale-mb", "-1"], "--scale-mb must be a positive number"),
    ],
)
def test_bad_flags_are_one_error_line(argv, error, capsys):
    assert bench_tokenizer.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {error}") and err.count("\n") == 1


def test_a_corpus_that_is_not_utf8_is_one_error_line(tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    assert bench_tokenizer.main(["--corpus", str(tmp_path / "latin1.txt")]) == 2
    assert capsys.readouterr().err == f"error: --corpus {tmp_path / 'latin1.txt'} is not UTF-8 text\n"


def test_out_must_be_a_new_directory(tmp_path, capsys):
    (tmp_path / "report.md").write_text("an earlier report\n")
    assert bench_tokenizer.main(["--dry-run", "--out", str(tmp_path)]) == 2
    assert "already holds a report.md" in capsys.readouterr().err
    assert (tmp_path / "report.md").read_text() == "an earlier report\n"
