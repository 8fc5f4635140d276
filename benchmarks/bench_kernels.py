"""Moved to `llmcore bench kernels` (llmcore/bench/kernels.py); this wrapper passes its arguments on."""
import sys; from llmcore.bench.__main__ import main; main(["kernels", *sys.argv[1:]])  # noqa: E401,E702
