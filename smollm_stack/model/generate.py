"""Sampling with a KV cache: prefill the prompts in one forward, then one token per row per forward.

A batch of prompts of unequal lengths is left-padded, so every row's last prompt token sits in the same column and
each step appends one column. The cache's `pad` hides the padding from attention; positions need no per-row shift,
since RoPE scores depend only on the distance between query and key. Each step reads its new tokens back to the
host once (`tolist`), after queueing the next forward, so the device runs ahead while the host looks for eos.
A model's vocabulary may be padded beyond its tokenizer's (to a multiple of 64, say): `vocab_limit` masks the ids no
token has, so they are never drawn, whatever the weights say.
"""

from collections.abc import Iterator, Sequence

import torch

from smollm_stack.kernels.reference import softmax
from smollm_stack.model.model import TransformerLM


def top_k_filter(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep exactly the top_k most likely tokens (ties broken by torch.topk), renormalized. probs (..., V).

    E.g. probs [0.5, 0.3, 0.2] with top_k 2 -> [0.625, 0.375, 0].
    """
    values, order = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    kept = torch.zeros_like(probs).scatter(-1, order, values)
    return kept / kept.sum(dim=-1, keepdim=True)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (nucleus sampling), renormalized.

    probs (..., V). E.g. probs [0.5, 0.3, 0.2] with top_p 0.7 keeps [0.5, 0.3] -> [0.625, 0.375, 0].
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # of the tokens strictly more likely than this one
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the most likely token always stays
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator, top_k: int = 0
) -> torch.Tensor:
    """Token ids (...,) from logits (..., V): greedy at temperature 0, else softmax(logits / temperature) cut to
    the top_k most likely (0 = off), then to the top_p nucleus (as transformers orders them)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = softmax(logits.float() / temperature, dim=-1)
    if top_k > 0:
        probs = top_k_filter(probs, top_k)
    if top_p < 1.0:
        probs = top_p_filter(probs, top_p)
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(probs.shape[:-1])


def _check(model, prompts, max_new_tokens, temperature, top_p, top_k, vocab_limit) -> list[torch.Tensor]:
    prompts = [torch.as_tensor(p, dtype=torch.long).flatten() for p in prompts]
    context = model.config.context_length
    if not prompts or min(p.numel() for p in prompts) == 0:
        raise ValueError("prompt_ids is empty: give at least one token (e.g. the end-of-text id)")
    longest = max(p.numel() for p in prompts)
    if max_new_tokens < 0 or longest + max_new_tokens > context:
        raise ValueError(f"{longest} prompt + {max_new_tokens} new tokens must fit the context length {context}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1 and top_k >= 0, got {temperature}, {top_p}, {top_k}")
    if vocab_limit is not None and not 0 < vocab_limit <= model.config.vocab_size:
        raise ValueError(f"vocab_limit must be in [1, vocab_size {model.config.vocab_size}], got {vocab_limit}")
    return prompts


@torch.inference_mode()
def stream(
    model: TransformerLM,
    prompts: Sequence[list[int] | torch.Tensor],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    seed: int | None = None,
    top_k: int = 0,
    vocab_limit: int | None = None,
) -> Iterator[list[int | None]]:
    """Yield, step by step, each row's new token id, or None for a row that has ended at eos_id (not yielded).

    Stops after max_new_tokens steps or once every row has ended. The longest prompt plus max_new_tokens must fit
    the context length; seed makes the draws repeatable (one generator for the whole batch); only ids below
    vocab_limit (the tokenizer's size; default: the model's vocab_size) are drawn.
    """
    prompts = _check(model, prompts, max_new_tokens, temperature, top_p, top_k, vocab_limit)
    weight = model.lm_head.weight
    generator = torch.Generator(device=weight.device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    longest = max(p.numel() for p in prompts)
    pads = [longest - p.numel() for p in prompts]
    ids = torch.stack([torch.cat([p.new_zeros(n), p]) for p, n in zip(prompts, pads)]).to(weight.device)  # (B, T)
    # The last new token is never fed back, so the cache needs one slot less than the full sequence.
    caches = model.make_kv_caches(len(prompts), longest + max(max_new_tokens - 1, 0), weight.device, weight.dtype)
    if any(pads):
        pad = torch.tensor(pads, device=weight.device)
        for cache in caches:
            cache.pad = pad
    logits = model(ids, kv_caches=caches)[:, -1]  # prefill: (B, V) for the next tokens
    running = [True] * len(prompts)
    for step in range(max_new_tokens):
        tokens = sample_next(logits[:, :vocab_limit], temperature, top_p, generator, top_k)  # (B,)
        if step + 1 < max_new_tokens:
            logits = model(tokens[:, None], kv_caches=caches)[:, -1]
        new = tokens.tolist()  # the step's one host sync
        running = [alive and t != eos_id for alive, t in zip(running, new)]
        if not any(running):
            return
        yield [t if alive else None for t, alive in zip(new, running)]


def generate_batch(model: TransformerLM, prompts: Sequence[list[int] | torch.Tensor], max_new_tokens: int, **sampling):
    """The new ids of each prompt (a list per prompt); sampling: stream's keywords."""
    out = [[] for _ in prompts]
    for step in stream(model, prompts, max_new_tokens, **sampling):
        for row, token in zip(out, step):
            if token is not None:
                row.append(token)
    return out


def generate(model: TransformerLM, prompt_ids: list[int] | torch.Tensor, max_new_tokens: int, **sampling) -> list[int]:
    """The ids of up to max_new_tokens tokens sampled after prompt_ids; stops early after eos_id (not returned).

    sampling: stream's keywords (temperature=1.0, top_k=0, top_p=1.0, eos_id=None, seed=None, vocab_limit=None).
    The prompt plus the new tokens must fit in the model's context length. seed makes the draw repeatable.
    """
    return generate_batch(model, [prompt_ids], max_new_tokens, **sampling)[0]
