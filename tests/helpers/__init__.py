"""Shared test helpers: tiny random HF model dirs, paged-KV batches."""
