"""Tokenizer training and the jsonl-to-shard pipeline (installed as `llmcore.data_prep`)."""
