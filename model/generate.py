"""Sampling with a KV cache: prefill the prompt in one forward, then one token per forward."""

import torch

from kernels.reference import softmax
from model.model import TransformerLM


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (nucleus sampling), renormalized.

    probs (..., V). E.g. probs [0.5, 0.3, 0.2] with top_p 0.7 keeps [0.5, 0.3] -> [0.625, 0.375, 0].
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # of the tokens strictly more likely than this one
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the most likely token always stays
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token id from logits (V,): greedy at temperature 0, else softmax(logits / temperature) cut to top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        probs = top_p_filter(probs, top_p)
    return torch.multinomial(probs, 1, generator=generator)[0]


@torch.inference_mode()
def generate(
    model: TransformerLM,
    prompt_ids: list[int] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    seed: int | None = None,
) -> list[int]:
    """The ids of up to max_new_tokens tokens sampled after prompt_ids; stops early after eos_id (not returned).

    The prompt plus the new tokens must fit in the model's context length. seed makes the draw repeatable.
    """
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).flatten()
    context = model.config.context_length
    if prompt.numel() == 0:
        raise ValueError("prompt_ids is empty: give at least one token (e.g. the end-of-text id)")
    if max_new_tokens < 0 or prompt.numel() + max_new_tokens > context:
        raise ValueError(f"{prompt.numel()} prompt + {max_new_tokens} new tokens must fit the context length {context}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    weight = model.lm_head.weight
    generator = torch.Generator(device=weight.device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    # The last new token is never fed back, so the cache needs one slot less than the full sequence.
    cache_len = prompt.numel() + max(max_new_tokens - 1, 0)
    caches = model.make_kv_caches(1, cache_len, weight.device, weight.dtype)
    logits = model(prompt[None].to(weight.device), kv_caches=caches)[0, -1]  # prefill: (V,) for the next token
    new_ids = []
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, top_p, generator)
        if token.item() == eos_id:
            break
        new_ids.append(token.item())
        if step + 1 < max_new_tokens:
            logits = model(token.view(1, 1), kv_caches=caches)[0, -1]
    return new_ids
