"""Streaming jsonl input: read line by line as bytes, decode and validate each line, classify bad ones.

Every bad line gets one of the `REASONS` keys, so skip mode can count them and fail mode can
say exactly what is wrong and where (file and 1-based line number). Which checks a record of a
given kind must pass is the kind's business (`kinds.py`); this module has the building blocks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmcore.errors import DataError, LLMCoreError

REASONS = {
    "invalid_utf8": "line is not valid UTF-8",
    "malformed_json": "line is not a JSON object",
    "missing_field": "required field is missing",
    "bad_field_type": "field has the wrong type",
    "empty_text": "text is empty",
    "no_assistant_turn": "conversation has no assistant turn",
    "token_id_overflow": "token id does not fit uint16",
}

@dataclass
class BadLine:
    """A line that cannot become a document; `reason` is a key of REASONS."""

    reason: str
    message: str


def open_input(path: str | Path):
    """Open a jsonl file for binary reading; a missing or unreadable file is a DataError naming it."""
    p = Path(path)
    try:
        return open(p, "rb")
    except OSError as err:
        raise DataError(f"cannot read input file: {err.strerror or err}", str(p), reason="unreadable_file") from err


def input_files(inputs, try_open: bool = False) -> list[Path]:
    """The jsonl `inputs` as Paths; no inputs, or one that is missing or not a file, is an error.

    ``try_open`` also opens each file, so permission problems fail before any work.
    """
    paths = [Path(p) for p in inputs]
    if not paths:
        raise LLMCoreError("no input files given")
    for p in paths:
        if not p.is_file():
            raise DataError("cannot read input file (missing or not a file)", str(p), reason="unreadable_file")
        if try_open:
            open_input(p).close()
    return paths


def parse_line(raw: bytes) -> dict | BadLine | None:
    """Decode one line; None for a blank line (ignored, e.g. a trailing newline)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return BadLine("invalid_utf8", f"invalid UTF-8 at byte {err.start}")
    if not text.strip():
        return None
    if text.startswith("\ufeff"):  # a byte-order mark (files saved by some Windows editors)
        text = text[1:]
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return BadLine("malformed_json", f"malformed JSON: {err.msg} (column {err.colno})")
    if not isinstance(obj, dict):
        return BadLine("malformed_json", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def iter_records(path: str | Path) -> Iterator[tuple[int, dict | BadLine]]:
    """Yield (line_no, record or BadLine) for each non-blank line, streaming the file."""
    with open_input(path) as f:
        line_no = 0
        try:
            for raw in f:
                line_no += 1
                rec = parse_line(raw)
                if rec is not None:
                    yield line_no, rec
        except OSError as err:
            raise DataError(f"read error: {err.strerror or err}", str(path), line_no + 1, "unreadable_file") from err


def check_text(obj: dict, field: str = "text") -> str | BadLine:
    if field not in obj:
        return BadLine("missing_field", f'missing field "{field}"')
    value = obj[field]
    if not isinstance(value, str):
        return BadLine("bad_field_type", f'field "{field}" is {type(value).__name__}, expected a string')
    if not value.strip():
        return BadLine("empty_text", f'field "{field}" is empty')
    return value


def check_messages(obj: dict, field: str, final_assistant: bool = False) -> list[dict] | BadLine:
    """A conversation field: non-empty list of {role, content} with string content and an assistant turn.

    Returns copies holding only role and content (other keys such as tool calls are not rendered).
    """
    if field not in obj:
        return BadLine("missing_field", f'missing field "{field}"')
    value = obj[field]
    if not isinstance(value, list):
        return BadLine("bad_field_type", f'field "{field}" is {type(value).__name__}, expected a list of messages')
    if not value:
        return BadLine("empty_text", f'field "{field}" is an empty conversation')
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            return BadLine("bad_field_type", f'{field}[{i}] is {type(m).__name__}, expected an object')
        for key in ("role", "content"):
            if key not in m:
                return BadLine("missing_field", f'{field}[{i}] is missing "{key}"')
            if not isinstance(m[key], str):
                return BadLine("bad_field_type", f'{field}[{i}].{key} is {type(m[key]).__name__}, expected a string')
        if m["role"] not in ("system", "user", "assistant"):
            return BadLine("bad_field_type", f'{field}[{i}].role is {m["role"]!r}, expected system, user or assistant')
        messages.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in messages):
        return BadLine("no_assistant_turn", f'field "{field}": conversation has no assistant turn')
    if final_assistant and messages[-1]["role"] != "assistant":
        return BadLine("no_assistant_turn", f'field "{field}": the final message is not an assistant turn')
    if not any(m["content"].strip() for m in messages):
        return BadLine("empty_text", f'field "{field}": every message is empty')
    return messages
