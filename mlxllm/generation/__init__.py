"""Generation in three layers: sample.py (samplers) -> step.py (token ids) -> stream.py (text)."""
