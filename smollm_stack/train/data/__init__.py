"""What a run reads: sources of text (``sources.py``), token shards (``shards.py``), token files, samplers and the
cache of prepared data (``tokens.py``), ``smollm prepare`` and ``smollm download``; the embedded TinyStories excerpt
lies in ``embedded/``."""
