"""The optimizers: AdamW (``adamw.py``), Muon (``muon.py``), and the builder that makes a run's from its optimizer
section (``builder.py``)."""
