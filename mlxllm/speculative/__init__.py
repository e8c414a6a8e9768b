"""Speculative decoding: drafts verified by the model in one call (``decode.py``), drafted by a
smaller model or an MTP layer (``drafters.py``, ``mtp.py``)."""

from mlxllm.speculative.decode import SpecStats, accept, speculative_generate_step
from mlxllm.speculative.drafters import (
    DraftModel,
    DraftPair,
    MTPDrafter,
    MTPPair,
    make_drafter,
)
from mlxllm.speculative.mtp import MTPLayer, from_checkpoint, load_head, mtp_layer, save_head

__all__ = [
    "DraftModel",
    "DraftPair",
    "MTPDrafter",
    "MTPLayer",
    "MTPPair",
    "SpecStats",
    "accept",
    "from_checkpoint",
    "load_head",
    "make_drafter",
    "mtp_layer",
    "save_head",
    "speculative_generate_step",
]
