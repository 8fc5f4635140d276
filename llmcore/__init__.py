"""llmcore: a small-LLM training system from raw jsonl to a chatting, retrieval-augmented model."""

__version__ = "0.1.0"
