"""The shard dir format, shared by the writer (prep.py) and the reader (shards.py).

Kept free of heavy imports (no tokenizer, no multiprocessing) so that reading shards stays light.
The columns of each kind live with the kind in `kinds.py`.
"""

from __future__ import annotations

FORMAT = "llmcore-shards"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
UINT16_LIMIT = 1 << 16  # token columns are uint16: a larger id cannot be stored


def shard_file_name(index: int) -> str:
    """`shard-00000.arrow`, `shard-00001.arrow`, ..."""
    return f"shard-{index:05d}.arrow"
