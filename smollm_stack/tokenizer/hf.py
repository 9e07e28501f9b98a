"""Hugging Face's tokenizer files for our tokenizer, and our tokenizer from theirs.

`Tokenizer.save` writes these beside vocab.json and merges.txt, so `AutoTokenizer.from_pretrained(tok_dir)` and
`tokenizers.Tokenizer.from_file(tok_dir / "tokenizer.json")` read our directories as they are:
  tokenizer.json           the whole pipeline: special tokens split first (as ours), then a Split on our exact
                           pre-tokenization pattern, then ByteLevel (bytes to GPT-2's alphabet), then BPE with our
                           vocab and merges; no normalizer and no post-processor (we add no BOS/EOS when encoding)
  tokenizer_config.json    which class loads it (PreTrainedTokenizerFast) and which special token is BOS/EOS/PAD
  special_tokens_map.json  the same roles, for older tools
Only JSON is written and read here: neither `tokenizers` nor `transformers` is needed.

The roles: GPT-2's convention, which our trainer follows: "<|endoftext|>" separates documents, so it is the
beginning, the end and the padding token at once. A tokenizer without it has no BOS/EOS/PAD.
"""

import json

from smollm_stack.tokenizer.pretokenize import GPT2_PATTERN

END_OF_TEXT = "<|endoftext|>"


def special_roles(special_tokens: list[str]) -> dict[str, str]:
    """{"bos_token": ..., "eos_token": ..., "pad_token": ...} for a tokenizer's specials (empty without END_OF_TEXT)."""
    if END_OF_TEXT not in special_tokens:
        return {}
    return {role: END_OF_TEXT for role in ("bos_token", "eos_token", "pad_token")}


def tokenizer_json(vocab_text: dict[str, int], merges_text: list[str], special_ids: dict[str, int]) -> dict:
    """HF's tokenizer.json; vocab and merges are already in GPT-2's byte alphabet ("Ġthe": 262, "Ġ the")."""
    added = [
        {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for s, i in special_ids.items()
    ]  # fmt: skip
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": GPT2_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab_text, "merges": merges_text,
        },  # fmt: skip
    }


def tokenizer_config(special_ids: dict[str, int], model_max_length: int | None = None) -> dict:
    """HF's tokenizer_config.json. clean_up_tokenization_spaces is off, else decode would eat the space in " ."."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True}
            for s, i in special_ids.items()
        },  # fmt: skip
        **special_roles(list(special_ids)),
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    return config


def special_tokens_map(special_tokens: list[str]) -> dict:
    others = [s for s in special_tokens if s != END_OF_TEXT]
    return {**special_roles(special_tokens), **({"additional_special_tokens": others} if others else {})}


def _is_our_pre_tokenizer(pre: dict | None) -> bool:
    """Our Split + ByteLevel, or a plain ByteLevel with its built-in regex (GPT-2's pattern, the same splits)."""
    if not isinstance(pre, dict):
        return False
    if pre.get("type") == "ByteLevel":
        return pre.get("use_regex", True) and not pre.get("add_prefix_space", False)
    steps = pre.get("pretokenizers", [])
    return (
        pre.get("type") == "Sequence"
        and len(steps) == 2
        and steps[0].get("type") == "Split"
        and steps[0].get("pattern") == {"Regex": GPT2_PATTERN}
        and steps[0].get("behavior") == "Isolated"
        and not steps[0].get("invert")
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex", True)
        and not steps[1].get("add_prefix_space", False)
    )


def read_tokenizer_json(path) -> tuple[list[tuple[str, int]], list[tuple[str, str]], dict[str, int]]:
    """(vocab entries, merges, {special token: id}) of an HF tokenizer.json that our encoder reproduces exactly,
    vocab and merges in GPT-2's byte alphabet; ValueError naming the file for anything else (another
    pre-tokenizer, a normalizer, a model other than BPE)."""
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ValueError(f"{path} is not a Hugging Face BPE tokenizer.json")
    if spec.get("normalizer") is not None or not _is_our_pre_tokenizer(spec.get("pre_tokenizer")):
        raise ValueError(f"{path}: only byte-level BPE with GPT-2's pre-tokenization and no normalizer is supported")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    if not all(len(m) == 2 and all(isinstance(t, str) for t in m) for m in merges):
        raise ValueError(f"{path}: every merge must be a pair of tokens")
    added = [t for t in spec.get("added_tokens", []) if isinstance(t, dict) and t.get("special")]
    if not all(isinstance(t.get("content"), str) and isinstance(t.get("id"), int) for t in added):
        raise ValueError(f"{path}: every added token needs a string content and an integer id")
    return list(model["vocab"].items()), merges, {t["content"]: t["id"] for t in added}
