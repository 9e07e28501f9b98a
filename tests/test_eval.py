"""Downstream tasks (train/eval.py): lm-eval's document formats, its token split, and every score checked against
one computed by hand on a unigram model of byte tokens; the KV-cache batch against a plain forward; the command."""

import dataclasses
import json
import math

import pytest
import torch

from smollm_stack.model import ModelConfig, TransformerLM, load_model
from smollm_stack.train.eval import EOT, Doc, arc, encode_pair, evaluate, hellaswag, main, score_choices

LN2 = math.log(2)
# A unigram model: each token's probability, whatever came before. Powers of two make every score k * ln 2.
PROBS = {" ": 1 / 4, "a": 1 / 4, "b": 1 / 8, ":": 1 / 16}


@pytest.fixture(scope="module")
def tokenizer():
    from smollm_stack.tokenizer import Tokenizer

    return Tokenizer({i: bytes([i]) for i in range(256)} | {256: EOT.encode()}, [], [EOT])  # one token a byte


def unigram_model() -> TransformerLM:
    """Blocks that add nothing (zero output matrices) and one embedding for every token, so the logits are one
    fixed vector: lm_head's first column times the normed embedding e0, set to log PROBS (the rest share what is
    left)."""
    config = ModelConfig(vocab_size=257, context_length=32, d_model=8, num_layers=1, num_heads=2, norm_eps=1e-12,
                         backend="eager")  # fmt: skip
    model = TransformerLM(config).eval()
    rest = (1 - sum(PROBS.values())) / (257 - len(PROBS))
    logp = torch.full((257,), math.log(rest), dtype=torch.float64)
    for char, p in PROBS.items():
        logp[ord(char)] = math.log(p)
    with torch.no_grad():
        model.layers[0].attn.output_proj.weight.zero_()
        model.layers[0].ffn.w2.weight.zero_()
        model.token_embeddings.weight.zero_()[:, 0] = 1.0  # RMSNorm makes it sqrt(8) e0
        model.lm_head.weight.zero_()[:, 0] = (logp / math.sqrt(8)).float()
    return model


def ll(text: str) -> float:
    """The hand-computed summed log-likelihood of text under PROBS."""
    return sum(math.log(PROBS[c]) for c in text)


ARC_DOCS = [  # (choices " ab", " b", " aab": summed -7, -5, -9 ln 2; per character -7/3, -5/2, -9/4 ln 2)
    {"question": "Q", "choices": {"text": ["ab", "b", "aab"], "label": ["A", "B", "C"]}, "answerKey": gold}
    for gold in "BCB"
]  # acc: " b" wins, right for B (2 of 3); acc_norm: " aab" wins, right for C (1 of 3)


def test_formats_are_lm_evals():
    assert arc(ARC_DOCS[1]) == Doc("Question: Q\nAnswer:", [" ab", " b", " aab"], 2)
    doc = {"activity_label": "Cooking", "ctx_a": "A man sits.", "ctx_b": "he [title] cuts", "label": "1",
           "endings": ["a b [step] ", "[header] x  y"]}  # fmt: skip
    assert hellaswag(doc) == Doc("Cooking: A man sits. He. cuts", [" a b ", "  x y"], 1)  # lm-eval strips first


def test_token_split_moves_trailing_spaces_and_fills_an_empty_context(tokenizer):
    assert encode_pair(tokenizer, "ab ", "c") == ([97, 98], [32, 99])
    assert encode_pair(tokenizer, "", " a") == ([256], [32, 97])


def test_every_score_is_the_hand_computed_one(tokenizer):
    model = unigram_model()
    doc = arc(ARC_DOCS[0])
    context, _ = encode_pair(tokenizer, doc.context, doc.choices[0])
    scores = score_choices(model, context, [encode_pair(tokenizer, doc.context, c)[1] for c in doc.choices])
    want = [ll(c) for c in doc.choices]
    assert want == pytest.approx([-7 * LN2, -5 * LN2, -9 * LN2], rel=1e-15)
    # fp32 logits of size ~5 and a log-sum-exp over 257 terms: ~1e-6 each, a few tokens summed
    torch.testing.assert_close(torch.tensor(scores), torch.tensor(want), atol=1e-5, rtol=0)
    docs = [arc(d) for d in ARC_DOCS]
    assert evaluate(model, tokenizer, {"arc_easy": docs}) == {
        "arc_easy": {"acc": 2 / 3, "acc_norm": 1 / 3, "docs": 3}
    }


@pytest.mark.parametrize("context_len", [5, 40])  # 40: longer than the context length 32, so it is cut
def test_shared_cache_batch_equals_a_plain_forward(context_len):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50, context_length=32, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         value_embeddings=True, backend="eager")  # fmt: skip
    model = TransformerLM(config).eval()
    context = torch.randint(0, 50, (context_len,)).tolist()
    choices = [[3], [7, 1, 4, 4], [9, 9]]
    scores = score_choices(model, context, choices)
    kept = context[-(32 + 1 - 4) :]
    for choice, score in zip(choices, scores):
        ids = torch.tensor([kept + choice])
        with torch.no_grad():
            logp = model(ids[:, :-1]).log_softmax(-1)[0, len(kept) - 1 :]
        want = logp.gather(-1, torch.tensor(choice)[:, None]).sum()
        torch.testing.assert_close(torch.tensor(score), want, atol=1e-5, rtol=1e-5)


def test_command_scores_a_run_from_the_cache(tokenizer, tmp_path, capsys):
    model = unigram_model()
    run = tmp_path / "run"
    tokenizer.save(run / "tokenizer")
    checkpoint = {"model": model.state_dict(), "model_config": dataclasses.asdict(model.config), "iteration": 1}
    torch.save(checkpoint, run / "ckpt_000001.pt")
    cache = tmp_path / "cache"
    (cache / "tasks/arc_easy").mkdir(parents=True)
    (cache / "tasks/arc_easy/test.jsonl").write_text("".join(json.dumps(d) + "\n" for d in ARC_DOCS))
    argv = [str(run), "--tasks", "arc_easy", "--cache", str(cache), "--offline", "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "scores.json")]) == 0
    assert json.loads((tmp_path / "scores.json").read_text()) == {"arc_easy": {"acc": 2 / 3, "acc_norm": 1 / 3,
                                                                               "docs": 3}}  # fmt: skip
    assert "arc_easy       acc 0.6667  acc_norm 0.3333  (3 docs)" in capsys.readouterr().out
    for tasks, message in [("arc_challenge", "offline, and"), ("mmlu", "unknown task 'mmlu'")]:
        assert main([*argv[:2], tasks, *argv[3:]]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_training_scores_tasks_at_each_eval_into_metrics_summary_and_plot(tokenizer, tokens, tmp_path, monkeypatch):
    from conftest import TINY

    from smollm_stack.train import TrainConfig, run
    from smollm_stack.train.log import read_metrics

    monkeypatch.setenv("SMOLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "cache/tasks/arc_easy").mkdir(parents=True)
    (tmp_path / "cache/tasks/arc_easy/test.jsonl").write_text("".join(json.dumps(d) + "\n" for d in ARC_DOCS))
    tokenizer.save(tmp_path / "tok")
    config = dict(TINY, vocab_size=len(tokenizer), steps=4, eval_interval=2, train_data=tokens[0], val_data=tokens[1])
    summary = run(TrainConfig(**config, tokenizer=str(tmp_path / "tok"), out_dir=str(tmp_path / "r"),
                              eval_tasks="arc_easy", eval_task_docs=2))  # fmt: skip
    rows = [r for r in read_metrics(tmp_path / "r") if "val_loss" in r]
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert all({"arc_easy_acc", "arc_easy_acc_norm"} <= r.keys() for r in rows)
    final = load_model(tmp_path / "r/ckpt_000004.pt")  # the model of the last eval: its scores, recomputed
    want = evaluate(final, tokenizer, {"arc_easy": [arc(d) for d in ARC_DOCS[:2]]})["arc_easy"]
    for scores in (rows[-1], summary):
        assert (scores["arc_easy_acc"], scores["arc_easy_acc_norm"]) == (want["acc"], want["acc_norm"])
    assert (tmp_path / "r/tasks.png").stat().st_size > 1000


def test_scores_agree_with_lm_eval_harness_on_the_export(tmp_path, monkeypatch):
    """lm-eval-harness's `hf` model, on our export of a model with value embeddings and a tokenizer with merges,
    gives each (context, choice) the log-likelihood we give it: the same token split, the same sums."""
    pytest.importorskip("lm_eval")
    transformers = pytest.importorskip("transformers")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from smollm_stack.tokenizer import Tokenizer
    from smollm_stack.train.lm import main as lm_main

    merges = [(b"t", b"h"), (b"th", b"e"), (b" ", b"the"), (b" ", b"a")]
    vocab = {i: bytes([i]) for i in range(256)} | {256 + i: a + b for i, (a, b) in enumerate(merges)}
    tokenizer = Tokenizer(vocab | {260: EOT.encode()}, merges, [EOT])
    tokenizer.save(tmp_path / "tok")
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=261, context_length=32, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         value_embeddings=True, backend="eager")  # fmt: skip
    model = TransformerLM(config).eval()
    with torch.no_grad():
        for table in model.value_embeddings:
            table.weight.mul_(0.3)
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(config)}, tmp_path / "m.pt")
    argv = ["export-hf", "--checkpoint", str(tmp_path / "m.pt"), "--tokenizer", str(tmp_path / "tok")]
    assert lm_main([*argv, "--out", str(tmp_path / "hf")]) == 0
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.syspath_prepend(tmp_path / "modules")
    hf = HFLM(pretrained=str(tmp_path / "hf"), trust_remote_code=True, device="cpu", dtype="float32", batch_size=1)
    pairs = [("the cat ", "sat on the mat"), ("Question: a\nAnswer:", " the"), ("", " a theme"), ("x" * 40, " the")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    theirs = [ll for ll, _ in hf.loglikelihood(requests)]
    ours = []
    for pair in pairs:
        context, choice = encode_pair(tokenizer, *pair)
        ours.append(score_choices(model, context, [choice])[0])
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), atol=1e-4, rtol=1e-5)


def test_the_hub_parquet_file_is_read_from_the_cache_offline(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    from smollm_stack.train.eval import load_docs

    folder = tmp_path / "tasks/arc_easy"
    folder.mkdir(parents=True)
    pq.write_table(pyarrow.Table.from_pylist(ARC_DOCS), folder / "test.parquet")  # as the Hub's parquet export
    assert load_docs("arc_easy", tmp_path, offline=True) == [arc(d) for d in ARC_DOCS]
    with pytest.raises(FileNotFoundError, match="offline, and .*hellaswag/validation.parquet is not cached"):
        load_docs("hellaswag", tmp_path, offline=True)
