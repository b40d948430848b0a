"""Torch models served by the torch engine: `tiny_gpt` (generative) and `classifier`."""
