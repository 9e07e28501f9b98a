"""Downstream tasks: multiple-choice scoring of a run's model, as lm-eval-harness scores them.

    smollm eval RUN --tasks hellaswag,arc_easy          # (python -m smollm_stack.train.eval RUN --tasks ...)
    smollm eval RUN --tasks arc_easy --limit 200 --offline --out arc.json

Each document of a task is a context, a few choices and the gold one, built from the Hub dataset's fields exactly as
lm-eval-harness's task files build them (the `Question: ...\\nAnswer:` prompts, HellaSwag's cleaned endings, a space
before each choice). A choice's score is the summed log-likelihood of its tokens after the context; `acc` is how
often the best summed score is the gold choice, `acc_norm` the same with each score divided by the choice's length
in characters (lm-eval's normalisation, which stops short choices winning for being short).

Tokens: as lm-eval, trailing spaces of the context move to the choice, the choice's tokens are those of context +
choice past as many tokens as the context alone has, and an empty context is the end-of-text token. The context
runs once per document and its KV cache is shared by every choice, which run as one right-padded batch. When the
context and the longest choice exceed the model's context length, the context loses its first tokens (lm-eval cuts
each choice's sequence separately: scores differ only on such documents).

Data: the Hub's parquet export of each dataset (huggingface.co/datasets/<repo>, revision refs/convert/parquet),
downloaded once into the cache (``--cache``, default the trainer's: ``$SMOLLM_CACHE`` or ``~/.cache/smollm-stack``;
then ``tasks/<task>/``) and read with pyarrow (``pip install 'smollm-stack[eval]'``). Offline (``--offline``, or
``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1``) only the cache is read. A ``<split>.jsonl`` of the same fields in
a task's folder is read instead of the parquet file: your own copy, or a test's.
"""

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from smollm_stack.files import make_dir, write_atomic
from smollm_stack.model.model import TransformerLM
from smollm_stack.train.data.tokens import cache_dir

HUB = "https://huggingface.co/datasets"
EOT = "<|endoftext|>"


@dataclass(frozen=True)
class Doc:
    context: str
    choices: list[str]  # each with its leading space, as scored
    gold: int


def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag preprocessing: WikiHow's " [title]" becomes ". ", other bracketed tags go."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag(doc: dict) -> Doc:
    context = doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return Doc(_hellaswag_clean(context), [" " + _hellaswag_clean(e) for e in doc["endings"]], int(doc["label"]))


def arc(doc: dict) -> Doc:
    choices = doc["choices"]
    gold = choices["label"].index(doc["answerKey"])
    return Doc(f"Question: {doc['question']}\nAnswer:", [" " + t for t in choices["text"]], gold)


def piqa(doc: dict) -> Doc:
    return Doc(f"Question: {doc['goal']}\nAnswer:", [" " + doc["sol1"], " " + doc["sol2"]], int(doc["label"]))


def openbookqa(doc: dict) -> Doc:
    choices = doc["choices"]
    return Doc(doc["question_stem"], [" " + t for t in choices["text"]], choices["label"].index(doc["answerKey"]))


@dataclass(frozen=True)
class Task:
    repo: str  # Hub dataset
    config: str  # its configuration ("default" when it has one)
    split: str  # the split lm-eval scores
    to_doc: Callable[[dict], Doc]


TASKS = {
    "hellaswag": Task("Rowan/hellaswag", "default", "validation", hellaswag),
    "arc_easy": Task("allenai/ai2_arc", "ARC-Easy", "test", arc),
    "arc_challenge": Task("allenai/ai2_arc", "ARC-Challenge", "test", arc),
    "piqa": Task("baber/piqa", "default", "validation", piqa),
    "openbookqa": Task("allenai/openbookqa", "main", "test", openbookqa),
}


def parse_tasks(names: str) -> list[str]:
    """A comma-separated list of TASKS names (an empty string: none)."""
    tasks = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in tasks if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}: choose among {', '.join(TASKS)}")
    return tasks


def is_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def load_docs(name: str, cache: Path, offline: bool = False) -> list[Doc]:
    """A task's documents: its folder's <split>.jsonl if there is one, else the parquet file (downloaded once)."""
    task = TASKS[name]
    folder = cache / "tasks" / name
    jsonl = folder / f"{task.split}.jsonl"
    if jsonl.is_file():
        try:
            rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"{jsonl} is not JSON lines: {e}") from None
    else:
        rows = _read_parquet(_fetch(task, folder / f"{task.split}.parquet", offline or is_offline()))
    try:
        return [task.to_doc(row) for row in rows]
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{name}: a document lacks or has a wrong field ({e!r}): not {task.repo}'s format") from None


def _fetch(task: Task, path: Path, offline: bool) -> Path:
    if path.is_file():
        return path
    if offline:
        raise FileNotFoundError(f"offline, and {path} is not cached: run once with a network, or put it there")
    from smollm_stack.train.data.download import download  # urllib and tqdm: only when downloading

    url = f"{HUB}/{task.repo}/resolve/refs%2Fconvert%2Fparquet/{task.config}/{task.split}/0000.parquet"
    make_dir(path.parent, exist_ok=True)
    try:
        return download(url, path)
    except OSError as e:  # URLError is one
        raise OSError(f"downloading {url} failed ({e}): this needs a network (or the file in {path})") from None


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet
    except ImportError:
        raise ValueError(f"reading {path} needs pyarrow: pip install 'smollm-stack[eval]'") from None
    return pyarrow.parquet.read_table(path).to_pylist()


def encode_pair(tokenizer, context: str, choice: str) -> tuple[list[int], list[int]]:
    """(context ids, choice ids) as lm-eval splits them (see the module's docstring)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, choice = context[:-spaces], context[-spaces:] + choice
    if not context:
        return [tokenizer.special_token_id(EOT)], tokenizer.encode(choice)
    ids = tokenizer.encode(context)
    return ids, tokenizer.encode(context + choice)[len(ids) :]


@torch.inference_mode()
def score_choices(model: TransformerLM, context: list[int], choices: list[list[int]]) -> list[float]:
    """Summed log-likelihood of each choice's ids after context's: the context runs once into a KV cache, which
    every choice then shares in one right-padded batch (padding comes after a row's tokens, so the causal mask
    keeps it out of them)."""
    longest = max(map(len, choices))
    keep = model.config.context_length + 1 - longest  # the last token of each choice is never fed
    if keep < 1 or min(map(len, choices)) == 0:
        raise ValueError(f"a choice of {longest} tokens (or of none) does not fit the context {keep + longest - 1}")
    context = context[-keep:]
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    caches = model.make_kv_caches(1, len(context) + longest - 1, device, dtype)
    first = model(torch.tensor([context], device=device), kv_caches=caches)[:, -1].float().log_softmax(-1)  # (1, V)
    rows = torch.zeros(len(choices), longest, dtype=torch.long, device=device)
    for row, ids in zip(rows, choices):
        row[: len(ids)] = torch.tensor(ids)
    logprobs = first.expand(len(choices), 1, -1)
    if longest > 1:
        for cache in caches:  # the one context row, shared by every choice
            cache.k, cache.v = (t.expand(len(choices), -1, -1, -1).contiguous() for t in (cache.k, cache.v))
        rest = model(rows[:, :-1], kv_caches=caches).float().log_softmax(-1)  # (choices, longest - 1, V)
        logprobs = torch.cat([logprobs, rest], dim=1)
    picked = logprobs.gather(-1, rows[..., None])[..., 0]  # (choices, longest)
    mask = torch.arange(longest, device=device) < torch.tensor([len(c) for c in choices], device=device)[:, None]
    return (picked * mask).sum(-1).tolist()


def evaluate_task(model: TransformerLM, tokenizer, docs: list[Doc]) -> dict:
    """{"acc", "acc_norm", "docs"} of a task's documents."""
    hits = hits_norm = 0
    for doc in docs:
        pairs = [encode_pair(tokenizer, doc.context, choice) for choice in doc.choices]  # one context for all
        scores = score_choices(model, pairs[0][0], [choice for _, choice in pairs])
        normed = [s / len(c) for s, c in zip(scores, doc.choices)]
        hits += max(range(len(scores)), key=scores.__getitem__) == doc.gold
        hits_norm += max(range(len(normed)), key=normed.__getitem__) == doc.gold
    n = len(docs)
    return {"acc": hits / n if n else math.nan, "acc_norm": hits_norm / n if n else math.nan, "docs": n}


def load_tasks(tasks: list[str], cache: Path, limit: int | None = None, offline: bool = False) -> dict[str, list[Doc]]:
    """{task: its first `limit` documents (all: None)}."""
    return {name: load_docs(name, cache, offline)[:limit] for name in tasks}


def evaluate(model: TransformerLM, tokenizer, docs: dict[str, list[Doc]]) -> dict[str, dict]:
    """{task: {"acc", "acc_norm", "docs"}} of each task's documents, the model in eval mode meanwhile."""
    was_training = model.training
    model.eval()
    try:
        return {name: evaluate_task(model, tokenizer, task_docs) for name, task_docs in docs.items()}
    finally:
        model.train(was_training)


# ---- in training (--eval-tasks): scores as metrics-row columns, "<task>_acc" and "<task>_acc_norm" ---------------


def training_docs(names: str, docs_per_task: int, tokenizer) -> dict[str, list[Doc]]:
    """The documents --eval-tasks scores at each eval step (none without it), loaded once at the start."""
    tasks = parse_tasks(names)
    if tasks and tokenizer is None:
        raise ValueError("--eval-tasks needs the run's tokenizer (give --tokenizer with pre-encoded data)")
    return load_tasks(tasks, cache_dir(), docs_per_task or None) if tasks else {}


def task_columns(model: TransformerLM, tokenizer, docs: dict[str, list[Doc]]) -> dict[str, float]:
    """{"<task>_acc": ..., "<task>_acc_norm": ...} for a metrics row ({} without tasks)."""
    scores = evaluate(model, tokenizer, docs) if docs else {}
    return {f"{task}_{k}": v for task, s in scores.items() for k, v in s.items() if k != "docs"}


def last_task_columns(rows: list[dict]) -> dict[str, float]:
    """The task columns of the last metrics row that has any (the final eval's), for the run's summary."""
    columns = {f"{t}_{k}" for t in TASKS for k in ("acc", "acc_norm")}
    return next(({k: v for k, v in r.items() if k in columns} for r in reversed(rows) if columns & r.keys()), {})


def build_parser() -> argparse.ArgumentParser:
    from smollm_stack.train.lm import add_source

    parser = argparse.ArgumentParser(prog="smollm eval", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", nargs="?", help="a run directory (its newest checkpoint and its tokenizer)")
    add_source(parser)
    parser.add_argument("--tasks", required=True, help=f"comma-separated, among {', '.join(TASKS)}")
    parser.add_argument("--limit", type=int, default=None, help="score only each task's first N documents")
    parser.add_argument("--cache", type=Path, default=None, help="default: $SMOLLM_CACHE or ~/.cache/smollm-stack")
    parser.add_argument("--offline", action="store_true", help="read only the cache (as HF_HUB_OFFLINE=1)")
    parser.add_argument("--out", type=Path, help="also write the scores here as JSON (must not exist)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main(argv=None) -> int:
    from smollm_stack.train.lm import load_pair

    args = build_parser().parse_args(argv)
    args.run = args.run or args.run_dir
    try:
        tasks = parse_tasks(args.tasks)
        if not tasks or (args.limit is not None and args.limit < 1):
            raise ValueError("--tasks needs at least one task, and --limit a positive count")
        docs = load_tasks(tasks, args.cache or cache_dir(), args.limit, args.offline)
        model, tokenizer = load_pair(args, args.device)
        scores = evaluate(model, tokenizer, docs)
        if args.out is not None:
            make_dir(args.out.parent, exist_ok=True)
            write_atomic(args.out, json.dumps(scores, indent=2) + "\n", exclusive=True)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, s in scores.items():
        print(f"{name:<14} acc {s['acc']:.4f}  acc_norm {s['acc_norm']:.4f}  ({s['docs']} docs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
