"""smollm-stack: pretrain small language models from scratch. One import name, the card's parts inside it:

    smollm_stack.tokenizer  byte-level BPE (Numba trainer, GPT-2-exact encoder); imports none of the others
    smollm_stack.kernels    Triton kernels, their eager twins and the reference ops
    smollm_stack.model      the Llama-style TransformerLM
    smollm_stack.train      the trainer, data preparation, sampling and export, experiments
    smollm_stack.bench      benchmarks (nothing imports them)

The command line is ``smollm`` (``python -m smollm_stack``); see ``smollm --help``. Importing this package imports
nothing else: ``bench.env`` must set its environment before torch loads.
"""

__version__ = "0.1.0"
