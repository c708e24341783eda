"""Models shared by the engine tests, loaded once per test process."""
from __future__ import annotations

from functools import lru_cache

from services.engine import load_model


@lru_cache(maxsize=None)
def smollm2():
    return load_model("smollm2", "cpu")


@lru_cache(maxsize=None)
def tiny(seed: int = 0):
    return load_model(f"tiny-random:{seed}", "cpu")
