"""Parallelism: the process group and its collectives (``distributed.py``), FSDP2 wrapping (``fsdp.py``), and the
memory estimate that says which setting fits a card (``memory.py``)."""
