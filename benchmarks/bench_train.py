"""Moved to `llmcore bench train` (llmcore/bench/train.py); this wrapper passes its arguments on."""
import sys; from llmcore.bench.__main__ import main; main(["train", *sys.argv[1:]])  # noqa: E401,E702
