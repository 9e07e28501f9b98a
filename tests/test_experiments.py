"""Experiments: suites, spec files, the runner (parallel, divergence, failure, resume), reports, web-text, budget."""

import contextlib
import io
import json
import math
import tomllib

import pytest

from conftest import TINY
from smollm_stack.model import ModelConfig, flops_per_token, param_counts
from smollm_stack.train import run
from smollm_stack.train.config import make_config
from smollm_stack.train.experiments import SUITES, build_report, load_spec, propose, resolve_suite, run_suite
from smollm_stack.train.experiments import webtext_config
from smollm_stack.train.experiments.__main__ import main
from smollm_stack.train.experiments.runner import prepare
from smollm_stack.train.experiments.budget import measured_flops_per_s, optimal_run_flops, shape
from smollm_stack.train.experiments.webtext import TOKENS_PER_STEP, plan, webtext_model_config
from smollm_stack.train.log import read_metrics

RUN = {**TINY, "steps": 12, "eval_interval": 4, "log_interval": 2, "ckpt_interval": 4, "keep_ckpts": 3}


def base(tokens, **overrides):
    return make_config(RUN, train_data=tokens[0], val_data=tokens[1], **overrides)


def test_builtin_suites_make_the_studies_of_the_issue():
    cfg = make_config({}, max_lr=2e-3, min_lr=2e-4, steps=128, batch_size=8)
    ablations = {v.name: v.overrides for v in SUITES["ablations"](cfg)}
    assert ablations["baseline"] == {}
    assert ablations["no-norm"]["model_args"] == {"norm": "none"} and "max_lr" not in ablations["no-norm"]
    assert (
        ablations["no-norm-low-lr"]["model_args"] == {"norm": "none"} and ablations["no-norm-low-lr"]["max_lr"] < 2e-3
    )
    assert ablations["post-norm"]["model_args"] == {"norm": "post"}
    assert ablations["nope"]["model_args"] == {"position": "nope"}
    assert ablations["silu-mlp"]["model_args"] == {"ffn": "silu", "d_ff": 4 * 128}  # tiny's d_model is 128

    lrs = [v.overrides["max_lr"] for v in SUITES["lr"](cfg)]
    assert 2e-3 in lrs and min(lrs) < 2e-3 and max(lrs) >= 1000 * 2e-3  # around the base, up to a divergent one
    assert all(v.overrides["min_lr"] == pytest.approx(v.overrides["max_lr"] / 10) for v in SUITES["lr"](cfg))

    batch = SUITES["batch"](cfg)
    sizes = [v.overrides["batch_size"] * v.overrides["grad_accum"] for v in batch]
    assert sizes[0] == 1 and sizes == sorted(sizes) and sizes[-1] > 8 and batch[-1].overrides["grad_accum"] > 1
    for v, size in zip(batch, sizes):
        assert v.overrides["steps"] * size == 128 * 8  # the token budget is held constant
        assert v.overrides["batch_size"] <= 8  # past the base micro-batch: accumulation
        assert v.overrides["max_lr"] == pytest.approx(2e-3 * (size / 8) ** 0.5, rel=1e-3)  # the sqrt rule


def test_spec_files_and_bad_suites(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text(
        'name = "mine"\n[[variants]]\nname = "a"\n[[variants]]\nname = "b"\nmax_lr = 1e-3\nmodel = {norm = "post"}\n'
    )
    name, variants = load_spec(str(spec))
    assert name == "mine" and [v.name for v in variants] == ["a", "b"]
    assert variants[1].overrides == {"max_lr": 1e-3, "model_args": {"norm": "post"}}
    cfg = variants[1].config(make_config({}), tmp_path / "b")
    assert (
        cfg.schedule.max_lr == 1e-3
        and cfg.model.args == {"norm": "post"}
        and cfg.checkpoint.out_dir == str(tmp_path / "b")
    )

    (tmp_path / "j.json").write_text(json.dumps({"variants": [{"name": "x", "model": {"d_model": 7}}]}))
    with pytest.raises(ValueError, match="variant x"):  # 7 is not divisible by the heads: named before any run
        resolve_suite(str(tmp_path / "j.json"), make_config({}))
    (tmp_path / "d.json").write_text(json.dumps({"variants": [{"name": "x"}, {"name": "x"}]}))
    with pytest.raises(ValueError, match="unique"):
        resolve_suite(str(tmp_path / "d.json"), make_config({}))
    (tmp_path / "e.json").write_text(json.dumps({"variants": []}))
    with pytest.raises(ValueError, match="non-empty"):
        load_spec(str(tmp_path / "e.json"))
    with pytest.raises(ValueError, match="unknown suite"):
        resolve_suite("nosuch", make_config({}))
    with pytest.raises(FileNotFoundError):
        load_spec(str(tmp_path / "missing.toml"))
    assert main(["run", "nosuch"]) == 2


# The CI smoke test of the runner, in two module-scoped steps whose results the tests below read: a suite run in
# parallel, then a simulated kill and the same command again. Each test checks one behaviour of what they left.
SMOKE_VARIANTS = [
    {"name": "a", "note": "the base"},
    {"name": "huge-lr", "max_lr": 1000.0, "min_lr": 100.0},  # diverges: marked, the suite goes on
]


@pytest.fixture(scope="module")
def first_run(tokens, tmp_path_factory):
    """The suite of SMOKE_VARIANTS in two subprocesses (jobs=2): (spec, suite_dir, rows, huge-lr's log)."""
    spec = tmp_path_factory.mktemp("spec") / "spec.json"
    spec.write_text(json.dumps({"name": "smoke", "variants": SMOKE_VARIANTS}))
    suite_dir = tmp_path_factory.mktemp("suites") / "suite"
    _, rows = run_suite(str(spec), base(tokens), str(suite_dir), jobs=2, progress=False)
    return spec, suite_dir, rows, (suite_dir / "logs" / "huge-lr.log").read_text()


@pytest.fixture(scope="module")
def second_run(first_run, tokens):
    """The same command again, in this process (jobs=1), after a variant was added that fails at run time (its
        context is longer than the data) and "a" was killed between its step-8 checkpoint and its end (no summary, no
        last checkpoint). Returns the spec, the suite dir, the rows, what it printed, a's metrics before and after, and
    whether the diverged variant was skipped."""
    spec, suite_dir, _, _ = first_run
    broken = {"name": "broken", "context_length": 10_000}
    spec.write_text(json.dumps({"name": "smoke", "variants": [*SMOKE_VARIANTS, broken]}))
    a = suite_dir / "a"
    before = read_metrics(a)
    (a / "summary.json").unlink()
    (a / "ckpt_000012.pt").unlink()
    diverged_mtime = (suite_dir / "huge-lr" / "summary.json").stat().st_mtime_ns
    with contextlib.redirect_stdout(io.StringIO()) as out:
        _, rows = run_suite(str(spec), base(tokens), str(suite_dir), jobs=1, progress=False)
    skipped = (suite_dir / "huge-lr" / "summary.json").stat().st_mtime_ns == diverged_mtime
    return dict(spec=spec, suite_dir=suite_dir, rows=rows, out=out.getvalue(), skipped=skipped, before=before,
                after=read_metrics(a))  # fmt: skip


def test_suite_runs_in_parallel_and_a_diverged_variant_is_marked(first_run):
    _, _, rows, log = first_run
    assert {r["name"]: r["status"] for r in rows} == {"a": "finished", "huge-lr": "diverged"}
    assert "diverged at step" in log


def test_a_variant_failing_at_run_time_is_recorded_not_fatal(second_run):
    rows = second_run["rows"]
    assert [r["status"] for r in rows] == ["finished", "diverged", "failed"]
    assert "too few for one sequence" in rows[2]["message"]


def test_the_same_command_again_resumes_a_killed_variant_and_skips_finished_ones(second_run):
    before, after = second_run["before"], second_run["after"]
    assert second_run["skipped"]  # the diverged variant's summary untouched: not rerun
    assert "3 variants, 1 done, 2 to run" in second_run["out"]  # nor started (its run would refuse, unseen)
    assert "resuming a" in second_run["out"].splitlines()  # the runner's line, not the trainer's "resuming at step"
    assert after[:-3] == before[:-3]  # steps 0..8 kept as logged (times included), 10 and 12 redone
    assert [r["step"] for r in after] == [r["step"] for r in before]
    assert after[-1]["val_loss"] == pytest.approx(before[-1]["val_loss"], abs=1e-4)  # the same run, continued


def test_a_finished_variant_is_never_reused_under_another_config(second_run, tokens):
    with pytest.raises(ValueError, match="another config"):
        run_suite(str(second_run["spec"]), base(tokens, max_lr=1e-3), str(second_run["suite_dir"]), progress=False)


def test_report_has_figures_the_results_table_and_the_divergence(second_run, tmp_path):
    text = build_report(second_run["suite_dir"], tmp_path / "report", notes="Short runs.").read_text()
    for name in ("loss_vs_steps.png", "loss_vs_tokens.png", "loss_vs_time.png"):
        assert (tmp_path / "report" / name).stat().st_size > 5000 and f"]({name})" in text
    table = json.loads((tmp_path / "report" / "results.json").read_text())
    assert [(t["variant"], t["status"]) for t in table] == [
        ("a", "finished"),
        ("huge-lr", "diverged"),
        ("broken", "failed"),
    ]
    assert "| 1 | a | the base |" in text and "**diverged**" in text and "Short runs." in text
    assert "Measured ranking by best validation loss" in text and "**huge-lr diverged**: diverged at step" in text
    assert table[1]["best_val_loss"] is None  # a diverged run's pre-divergence loss is not reported as its result


@pytest.mark.parametrize("name", ["loss_vs_steps.png", "report.md"])
def test_a_report_never_writes_through_a_link(second_run, tmp_path, name):
    victim, out = tmp_path / "victim", tmp_path / "report"
    victim.write_text("mine")
    out.mkdir()
    (out / name).symlink_to(victim)
    with pytest.raises(ValueError, match=f"{name} is a symbolic link"):
        build_report(second_run["suite_dir"], out)
    assert victim.read_text() == "mine" and (out / name).is_symlink()


def test_budget_reads_a_measured_throughput_from_a_run(second_run):
    assert measured_flops_per_s(str(second_run["suite_dir"] / "a")) > 0


def test_webtext_preset_is_the_recipe_and_runs_at_toy_scale(tokens, tmp_path, capsys):
    cfg = webtext_config(world_size=1)
    total = param_counts(webtext_model_config())[0]
    assert 90e6 < total < 130e6
    assert cfg.training.batch_size * cfg.training.grad_accum * cfg.model.context_length == TOKENS_PER_STEP == 2**20
    assert cfg.training.steps * TOKENS_PER_STEP == pytest.approx(
        20 * total, rel=0.01
    )  # Chinchilla's 20 tokens / parameter
    assert cfg.optimizer.name == "torch"  # AdamW, whatever the trainer's default optimizer
    assert (
        cfg.schedule.max_lr,
        cfg.schedule.min_lr,
        cfg.optimizer.beta1,
        cfg.optimizer.beta2,
        cfg.optimizer.weight_decay,
        cfg.optimizer.grad_clip,
        cfg.system.dtype,
    ) == (
        3e-3,
        3e-4,
        0.9,
        0.95,
        0.1,
        1.0,
        "bfloat16",
    )
    assert 0 < cfg.schedule.warmup_steps < cfg.training.steps // 10
    eight = webtext_config(world_size=8)
    assert eight.training.grad_accum * 8 == cfg.training.grad_accum  # data parallel keeps the 1M-token step
    with pytest.raises(ValueError, match="processes"):
        webtext_config(world_size=3)
    assert "ESTIMATE" in plan() and "H100-hours" in plan()

    smoke = webtext_config(smoke=True, train_data=tokens[0], val_data=tokens[1], out_dir=str(tmp_path / "w"))
    s, o = smoke, smoke.optimizer
    assert (s.schedule.max_lr, o.beta2, o.weight_decay, s.system.dtype, s.training.grad_accum) == (
        3e-3,
        0.95,
        0.1,
        "bfloat16",
        2,
    )
    summary = run(smoke)
    shrunk = "125m preset (d_model=64, num_layers=2, num_heads=2, d_ff=192, tie_embeddings=True), 0.14M parameters"
    assert shrunk in capsys.readouterr().out  # the model the smoke run trains, not the 110M one
    assert summary["status"] == "finished" and math.isfinite(summary["final_val_loss"])
    assert summary["final_val_loss"] < read_metrics(tmp_path / "w")[0]["val_loss"]  # it learns, in bf16 on the CPU


def test_budget_picks_the_largest_compute_optimal_model_that_fits():
    config, tokens = propose(1e18)
    assert tokens == 20 * param_counts(config)[0]
    assert flops_per_token(config) * tokens <= 1e18
    bigger = shape(config.num_layers + 1, config.vocab_size, config.context_length)
    assert optimal_run_flops(bigger) > 1e18  # the next shape up would not fit
    assert param_counts(propose(1e20)[0])[0] > 5 * param_counts(config)[0]
    assert isinstance(config, ModelConfig) and config.d_model == 64 * config.num_layers
    with pytest.raises(ValueError, match="below the smallest"):
        propose(1e6)


def test_help_lists_the_public_commands_and_the_webtext_run_directory_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "{run,report,list,webtext,budget}" in out and "_variant" not in out and "SUPPRESS" not in out
    with pytest.raises(SystemExit):
        main(["webtext", "--help"])
    assert "--out-dir DIR" in capsys.readouterr().out  # the flag its "already holds a finished run" line asks for
    assert main(["_variant"]) == 2 and "takes one argument" in capsys.readouterr().err


def test_budget_cli(capsys):
    assert main(["budget", "--hours", "2", "--gpu", "H100", "--mfu", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "20 per parameter" in out and "num_layers =" in out
    # The printed preset is a TOML config that the trainer's --config accepts as it is.
    toml_text = out.split("# TOML preset", 1)[1].split("\n", 1)[1]
    cfg = make_config(tomllib.loads(toml_text))
    assert cfg.model.preset == "125m" and cfg.model.args["num_layers"] > 0 and cfg.training.tokens > 0
    assert main(["budget", "--hours", "2"]) == 2  # no throughput given
    assert "needs exactly one throughput" in capsys.readouterr().err
    assert main(["budget", "--flops", "1e18", "--gpu", "nosuch"]) == 2


def test_prepare_resumes_restarts_or_skips_a_run_directory(tmp_path):
    cfg = make_config(RUN, out_dir=str(tmp_path / "r"))
    assert (
        prepare(cfg) == "start" and cfg.checkpoint.resume == "auto"
    )  # the trainer then starts, resumes or restarts it
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "r" / "metrics.jsonl").write_text("")
    assert prepare(cfg) == "start" and (tmp_path / "r" / "metrics.jsonl").exists()  # dead: restarted, not deleted
    (tmp_path / "r" / "ckpt_000004.pt").write_bytes(b"")
    assert prepare(cfg) == "resume" and cfg.checkpoint.resume == "auto"
    (tmp_path / "r" / "summary.json").write_text("{}")
    assert prepare(cfg) == "done"
    with pytest.raises(ValueError, match="differs in max_lr"):
        prepare(make_config(RUN, out_dir=str(tmp_path / "r"), max_lr=2e-2))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a run")
    with pytest.raises(ValueError, match="not a run's"):
        prepare(make_config(RUN, out_dir=str(tmp_path / "mine")))


def test_a_run_saved_before_a_field_existed_is_reused_only_when_that_field_is_at_its_default(tmp_path):
    cfg = make_config(RUN, out_dir=str(tmp_path / "r"))
    old = {k: v for k, v in cfg.flat().items() if k != "doc_mask"}  # flat, by a trainer without --doc-mask
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text(json.dumps(old))
    (tmp_path / "r" / "summary.json").write_text("{}")
    assert prepare(cfg) == "done"
    with pytest.raises(ValueError, match="differs in doc_mask"):
        prepare(make_config(RUN, out_dir=str(tmp_path / "r"), doc_mask=True))
