"""Triton kernels (installed as `llmcore.kernels`)."""
