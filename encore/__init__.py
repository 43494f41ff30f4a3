"""Encore: an OpenAI-compatible LLM serving daemon that remembers KV cache.

Components (one process each, see docs/architecture.md):
``encore.server`` (P0, HTTP) -> ``encore.protocol`` (messages, spawning, clients) ->
``encore.scheduler`` + ``encore.kvmanager`` (P1, engine) -> ``encore.worker`` +
``encore.kernels`` (P2, model and KV tensors). ``encore.configs`` is shared by all.
"""
