"""Inference: generation over the KV cache (token ids in, token ids out)."""
