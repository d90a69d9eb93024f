"""The native engine: our own PyTorch inference (paged KV cache, continuous batching)."""
