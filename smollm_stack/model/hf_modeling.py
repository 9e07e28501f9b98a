"""Our model for transformers: Llama plus value embeddings, loaded with ``trust_remote_code=True``.

``export_hf`` copies this file, as it is, into an exported directory as ``modeling_smollm_stack.py`` when the model
has value embeddings (a plain Llama exports as LlamaForCausalLM, without it). It imports only torch and
transformers, never smollm_stack, so the directory works wherever transformers does:

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).generate(...)

Everything but the values is Llama's own code. Block i adds ``value_embeddings[i](input_ids)`` to its attention
values, as our TransformerLM does: the model looks the embeddings up from the ids of each forward (the new tokens
only, when generate decodes with a cache) and hands them to each block's v_proj for the length of that forward.
"""

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel


class SmolLMStackConfig(LlamaConfig):
    model_type = "smollm_stack"

    def __init__(self, value_embeddings: bool = False, **kwargs):
        self.value_embeddings = value_embeddings
        super().__init__(**kwargs)


class ValueProjection(nn.Linear):
    """v_proj(x), plus the value embedding of x's tokens while the model's forward has one set."""

    value_embedding: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = super().forward(x)
        return v if self.value_embedding is None else v + self.value_embedding.to(v.dtype)


class SmolLMStackModel(LlamaModel):
    config_class = SmolLMStackConfig

    def __init__(self, config: SmolLMStackConfig):
        super().__init__(config)
        width = config.num_key_value_heads * config.head_dim
        tables = config.num_hidden_layers if config.value_embeddings else 0
        self.value_embeddings = nn.ModuleList(nn.Embedding(config.vocab_size, width) for _ in range(tables))
        for layer in self.layers:
            layer.self_attn.v_proj = ValueProjection(config.hidden_size, width, bias=config.attention_bias)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None, **kwargs):
        if len(self.value_embeddings) and input_ids is None:
            raise ValueError("this model's value embeddings are looked up from input_ids: pass ids, not embeddings")
        projections = [layer.self_attn.v_proj for layer in self.layers]
        try:
            for projection, table in zip(projections, self.value_embeddings):
                projection.value_embedding = table(input_ids)
            return super().forward(input_ids=input_ids, **kwargs)
        finally:  # never left set: the next forward may have other ids
            for projection in projections:
                projection.value_embedding = None


class SmolLMStackForCausalLM(LlamaForCausalLM):
    config_class = SmolLMStackConfig

    def __init__(self, config: SmolLMStackConfig):
        LlamaPreTrainedModel.__init__(self, config)  # not Llama's __init__: it would build a LlamaModel to discard
        self.model = SmolLMStackModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
