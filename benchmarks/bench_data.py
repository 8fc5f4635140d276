"""Moved to `llmcore bench data` (llmcore/bench/data.py); this wrapper passes its arguments on."""
import sys; from llmcore.bench.__main__ import main; main(["data", *sys.argv[1:]])  # noqa: E401,E702
