"""ModelRefPolicy: which `model_ref`s a profiling job may name in this deployment.

Shared by the service (checks at submit, before anything is queued) and the worker (checks again and
resolves the name to what it loads, so a message put on the queue by hand gets no further).

A model_ref is allowed when it is
  - a model built into the engine: empty / "smollm2" / "default" (the embedded SmolLM2) or
    "tiny-random[:seed]" (random weights, no files);
  - the model this deployment serves (RAZOR_MODEL);
  - listed verbatim in RAZOR_PROFILE_ALLOWED_MODELS (comma-separated; the operator's own paths); or
  - a relative name under RAZOR_PROFILE_MODELS_DIR ("llama-3b", "org/model", "file.gguf").

The check is lexical: it never touches the file system, so a refusal says nothing about whether a path
exists or what it is, and the message names only the settings that would allow it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from services.engine.models import EMBEDDED_NAMES

BUILTIN = re.compile(r"tiny-random(:\d{1,9})?")
# One to three path segments, each starting with a letter or digit: no "..", no hidden files, no "~".
NAME_UNDER_DIR = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._-]{0,127}){0,2}")
MAX_REF_CHARS = 512


class ModelRefRefused(ValueError):
    """The model_ref is not one this deployment may load; the message says how to allow it."""


@dataclass(frozen=True)
class ModelRefPolicy:
    models_dir: str = ""                  # RAZOR_PROFILE_MODELS_DIR ("" = none)
    allowed: tuple[str, ...] = ()         # RAZOR_PROFILE_ALLOWED_MODELS, verbatim refs
    served: str = ""                      # RAZOR_MODEL: the deployment's own model is always allowed

    @classmethod
    def from_settings(cls, settings) -> "ModelRefPolicy":
        allowed = tuple(ref.strip() for ref in settings.profile_allowed_models.split(",") if ref.strip())
        return cls(settings.profile_models_dir, allowed, settings.model.strip())

    def resolve(self, model_ref: str) -> str:
        """What to load for `model_ref` (a path under the models directory for a name there).

        ModelRefRefused when this deployment may not load it."""
        if not isinstance(model_ref, str):
            raise ModelRefRefused("model_ref must be a string (empty = the embedded SmolLM2)")
        ref = model_ref.strip()
        if ref.lower() in EMBEDDED_NAMES or BUILTIN.fullmatch(ref):
            return ref
        if ref and (ref == self.served or ref in self.allowed):
            return ref
        if self.models_dir and len(ref) <= MAX_REF_CHARS and NAME_UNDER_DIR.fullmatch(ref):
            return str(PurePosixPath(self.models_dir) / ref)
        raise ModelRefRefused(self._refusal())

    def check(self, model_ref: str) -> None:
        self.resolve(model_ref)

    def _refusal(self) -> str:
        ways = ["leave it empty for the embedded SmolLM2", "name the model this deployment serves (RAZOR_MODEL)",
                "add it to RAZOR_PROFILE_ALLOWED_MODELS"]
        if self.models_dir:
            ways.append("give the relative name of a model under RAZOR_PROFILE_MODELS_DIR (letters, digits, "
                        "'.', '_', '-', up to 3 segments separated by '/')")
        else:
            ways.append("set RAZOR_PROFILE_MODELS_DIR and give a model's name under it")
        return "model_ref is not a model this deployment may profile: " + "; ".join(ways)
