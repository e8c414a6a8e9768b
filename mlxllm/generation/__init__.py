"""Generation in three layers: sample.py (pure samplers) -> step.py (token ids) -> stream.py (text)."""
