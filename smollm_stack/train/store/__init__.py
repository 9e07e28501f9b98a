"""The run on disk, one owner: the run directory (names, lock, state, setting damaged checkpoints aside), single-file
and sharded checkpoints, and what a resumed or extended run continues from (``resume.py``)."""
