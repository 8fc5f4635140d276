"""Character-based passage splitting (works the same for Chinese, which has no spaces, and for English).

Invariants of `chunk_spans(text, chunk_chars, overlap)`:
- spans are `(start, end)` character offsets into `text`, `0 <= start < end <= len(text)`, in order;
- every span is at most `chunk_chars` characters long;
- together they cover the whole text: the first starts at 0, the last ends at `len(text)`, and each
  span starts at or before the previous one's end (consecutive spans share at most `overlap` characters);
- a span ends at a sentence boundary (。！？；.!?; or a newline) when one lies in the last 40% of the
  window, so passages rarely cut a sentence in half;
- a text of at most `chunk_chars` characters is one span; the same input always gives the same spans.
"""

from __future__ import annotations

from llmcore.errors import LLMCoreError

SENTENCE_ENDS = frozenset("。！？；!?;\n")
SOFT_ENDS = frozenset("，、,.：: \t")  # used only when no sentence end is in reach


def check_chunking(chunk_chars: int, overlap: int) -> None:
    """Raise LLMCoreError for settings that could not make progress or make no sense."""
    if chunk_chars < 16:
        raise LLMCoreError(f"--chunk-chars {chunk_chars}: must be at least 16")
    if overlap < 0 or overlap * 2 >= chunk_chars:
        raise LLMCoreError(f"--overlap {overlap}: must be >= 0 and less than half of --chunk-chars ({chunk_chars})")


def _cut(text: str, start: int, limit: int, chunk_chars: int) -> int:
    """Where the span starting at `start` ends (exclusive), at most `limit`."""
    floor = start + max(1, int(chunk_chars * 0.6))
    for ends in (SENTENCE_ENDS, SOFT_ENDS):
        for i in range(limit - 1, floor - 1, -1):
            if text[i] in ends:
                return i + 1
    return limit


def chunk_spans(text: str, chunk_chars: int = 480, overlap: int = 64) -> list[tuple[int, int]]:
    """Split `text` into overlapping `(start, end)` spans of at most `chunk_chars` characters."""
    check_chunking(chunk_chars, overlap)
    n = len(text)
    if n == 0:
        return []
    spans: list[tuple[int, int]] = []
    start = 0
    while True:
        if n - start <= chunk_chars:
            spans.append((start, n))
            return spans
        end = _cut(text, start, start + chunk_chars, chunk_chars)
        spans.append((start, end))
        # end - start >= 0.6 * chunk_chars > overlap (overlap < chunk_chars / 2): the next start moves forward.
        start = end - overlap
        # Do not start a passage in the middle of whitespace.
        while start < end and text[start].isspace():
            start += 1


__all__ = ["chunk_spans", "check_chunking", "SENTENCE_ENDS"]
