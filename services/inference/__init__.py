"""The gRPC inference service: sessions over the RazorAttention engine, spilled to Redis.

Modules: ``codec`` (tensors <-> bytes), ``spill`` (session blobs in Redis), ``sessions``
(the session store and its device budget), ``runtime`` (the engine thread), ``servicer``
(proto <-> runtime), ``server`` (the grpc.Server), ``client`` and ``cli``.
"""
