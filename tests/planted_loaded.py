"""The planted Llama of tests/planted.py wrapped as the engine's `LoadedModel` (no tokenizer).

For engine-level tests (head maps, compressed caches, calibration) that need a model whose
retrieval heads are known: pass `copy_output=True` so the induction head also drives the logits.
"""
from __future__ import annotations

import torch

from planted import build_planted_llama
from services.engine.models import LoadedModel, fingerprint

MAX_CONTEXT = 4096  # the engine's context check; the planted heads stay sharp to planted.MAX_LEN only


def planted_loaded(**kwargs) -> LoadedModel:
    """`build_planted_llama(**kwargs)` on the CPU as a LoadedModel with ref "planted"."""
    model = build_planted_llama(**kwargs)
    return LoadedModel(model, None, fingerprint(model), "planted", torch.device("cpu"), MAX_CONTEXT)
