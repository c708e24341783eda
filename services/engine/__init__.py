"""RazorAttention engine: profiling, head maps, compressed KV cache, attention, generation.

A plain library (torch + transformers); it imports no gRPC, Redis or Celery. See docs/engine-api.md.
"""
from .cache import CompressedKVCache, CompressionParams
from .calibration import CalibrationParams, calibrate, variant_at
from .errors import ContextLengthError, InvalidRequest, SessionDamagedError, SessionMismatchError
from .generation import Engine, GenerationResult, SessionState, TokenEvent, forward, forward_all
from .headmap import HeadMap, HeadMapError
from .models import LoadedModel, ModelFingerprint, ModelLoadError, load_model
from .profiling import ProfileParams, profile_model
from .sampling import SamplingParams
from .scheduler import Scheduler, SchedulerConfig, TurnRequest

__all__ = ["CalibrationParams", "CompressedKVCache", "CompressionParams", "calibrate", "variant_at", "ContextLengthError", "Engine", "GenerationResult",
           "HeadMap", "HeadMapError", "InvalidRequest", "SessionDamagedError", "LoadedModel", "ModelFingerprint", "ModelLoadError", "ProfileParams",
           "SamplingParams", "SessionMismatchError", "SessionState", "TokenEvent", "forward", "forward_all", "Scheduler", "SchedulerConfig", "TurnRequest", "load_model",
           "profile_model"]
