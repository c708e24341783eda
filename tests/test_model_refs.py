"""ModelRefPolicy: what a profiling job may name, checked without touching the file system."""
from __future__ import annotations

import pytest

from services.model_refs import ModelRefPolicy, ModelRefRefused
from services.settings import Settings


def test_builtin_served_and_listed_models_are_allowed_as_given():
    policy = ModelRefPolicy(allowed=("/opt/models/extra.gguf",), served="/srv/model")
    for ref in ("", "smollm2", "default", "tiny-random", "tiny-random:3", "/srv/model", "/opt/models/extra.gguf"):
        assert policy.resolve(ref) == ref


def test_names_under_the_models_dir_resolve_there():
    policy = ModelRefPolicy(models_dir="/models")
    assert policy.resolve("llama-3b") == "/models/llama-3b"
    assert policy.resolve("HuggingFaceTB/SmolLM2-135M") == "/models/HuggingFaceTB/SmolLM2-135M"
    assert policy.resolve("q4/model.Q4_K_M.gguf") == "/models/q4/model.Q4_K_M.gguf"


@pytest.mark.parametrize("ref", ["../etc/passwd", "a/../../etc", "/etc/passwd", "/no/such/model", "~/model",
                                 ".hidden", "a//b", "a/b/c/d", "x" * 600, "tiny-random:x", "tiny-random:",
                                 "C:\\models\\x", "a b", "a\nb"])
def test_anything_else_is_refused_with_one_message_that_names_no_path(ref):
    policy = ModelRefPolicy(models_dir="/models")
    with pytest.raises(ModelRefRefused) as refused:
        policy.resolve(ref)
    message = str(refused.value)
    assert "RAZOR_PROFILE_MODELS_DIR" in message and "RAZOR_PROFILE_ALLOWED_MODELS" in message
    assert "/models" not in message and ref.strip() not in message
    assert message == str(pytest.raises(ModelRefRefused, policy.resolve, "/definitely/absent").value)


def test_without_a_models_dir_only_builtin_served_and_listed_refs_pass():
    with pytest.raises(ModelRefRefused, match="set RAZOR_PROFILE_MODELS_DIR"):
        ModelRefPolicy().resolve("llama-3b")
    with pytest.raises(ModelRefRefused):
        ModelRefPolicy().resolve(None)


def test_policy_from_settings():
    settings = Settings(model="/srv/m", profile_models_dir="/models", profile_allowed_models=" a.gguf , /x/b ,")
    policy = ModelRefPolicy.from_settings(settings)
    assert policy == ModelRefPolicy("/models", ("a.gguf", "/x/b"), "/srv/m")
    assert policy.resolve("/x/b") == "/x/b" and policy.resolve("/srv/m") == "/srv/m"


def test_the_service_checks_refs_with_its_own_settings(redis_url, tiny_loaded, tiny_head_map):
    import grpc

    from conftest import flushed_db
    from services.inference.client import RazorClient
    from services.inference.runtime import FixedHeadMaps
    from services.inference.server import build_server
    from test_service import rpc_error

    url = flushed_db(redis_url, 11)   # no worker listens here: accepted jobs stay queued
    settings = Settings(host="127.0.0.1", port=0, redis_url=url, grace_s=2.0, auth_token="", tls_cert="",
                        tls_key="", metrics_port=0, profile_models_dir="/models", profile_allowed_models="/x/m.gguf")
    server = build_server(settings, loaded=tiny_loaded, head_maps=FixedHeadMaps(tiny_head_map)).start()
    try:
        with RazorClient(server.target) as client:
            for ref in ("llama-3b", "/x/m.gguf", ""):
                assert client.profile_model(ref, seq_len=16).job_id
            error = rpc_error(lambda: client.profile_model("/models/llama-3b", seq_len=16))
    finally:
        server.stop(0)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "/models" not in error.details()
