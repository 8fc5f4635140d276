"""Streaming jsonl input: read line by line as bytes, decode and validate each line, classify bad ones.

Every bad line gets one of the `REASONS` keys, so skip mode can count them and fail mode can
say exactly what is wrong and where (file and 1-based line number). Which checks a record of a
given kind must pass is the kind's business (`kinds.py`); this module has the building blocks.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from llmcore.errors import DataError, LLMCoreError

DEFAULT_MAX_LINE_BYTES = 16 << 20  # 16 MiB: the tokenizer needs ~115 bytes of memory per byte of a line

REASONS = {
    "invalid_utf8": "line is not valid UTF-8",
    "line_too_long": "line is longer than --max-line-bytes",
    "malformed_json": "line is not a JSON object",
    "nested_too_deep": "JSON is nested too deeply",
    "lone_surrogate": "a string holds a lone UTF-16 surrogate escape (not valid Unicode)",
    "missing_field": "required field is missing",
    "bad_field_type": "field has the wrong type",
    "empty_text": "text is empty",
    "no_assistant_turn": "conversation has no assistant turn",
    "token_id_overflow": "token id does not fit uint16",
    "template_error": "the tokenizer's chat template cannot render the conversation",
    "dpo_identical": "dpo pair: chosen and rejected replies are the same",
    "dpo_prompt_mismatch": "dpo pair: chosen and rejected have different prompts",
}


@dataclass
class BadLine:
    """A line that cannot become a document; `reason` is a key of REASONS."""

    reason: str
    message: str


# Magic numbers of what a .jsonl path may really hold: read transparently, or refused by name.
_GZIP, _BZ2, _XZ, _ZSTD = b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd"
_REFUSED = [
    (b"PK\x03\x04", "a zip archive; unzip it first"),
    (b"\x04\x22\x4d\x18", "lz4-compressed; decompress it first (lz4 -d)"),
    (b"7z\xbc\xaf\x27\x1c", "a 7z archive; extract it first"),
    (b"\xff\xfe", "UTF-16 text (it starts with a UTF-16 byte-order mark); convert it to UTF-8"),
    (b"\xfe\xff", "UTF-16 text (it starts with a UTF-16 byte-order mark); convert it to UTF-8"),
]
# What decompressors raise on a damaged stream (gzip.BadGzipFile is an OSError, a truncated one EOFError).
DECOMPRESS_ERRORS: tuple[type[BaseException], ...] = (EOFError,)
try:
    import zlib

    DECOMPRESS_ERRORS += (zlib.error,)
    import lzma

    DECOMPRESS_ERRORS += (lzma.LZMAError,)
except ImportError:  # pragma: no cover
    pass


class InputFile:
    """A jsonl input opened for binary reading, decompressed on the fly when it is gzip, bzip2, xz or
    zstd (by its first bytes, whatever its name; zstd needs the `zstandard` package).

    `read(n)`, `readline(n)`, `close()`, context manager; `compression` (None, "gzip", ...);
    `consumed()` is how many bytes of the file on disk were read so far (for progress bars)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._raw = open(self.path, "rb")
        except OSError as err:
            raise DataError(
                f"cannot read input file: {err.strerror or err}", str(self.path), reason="unreadable_file"
            ) from err
        try:
            head = self._raw.read(8)
            self._raw.seek(0)
        except OSError as err:
            self._raw.close()
            raise DataError(
                f"cannot read input file: {err.strerror or err}", str(self.path), reason="unreadable_file"
            ) from err
        self.compression: str | None = None
        self._f = self._raw
        try:
            if head.startswith(_GZIP):
                import gzip

                self.compression, self._f = "gzip", gzip.GzipFile(fileobj=self._raw, mode="rb")
            elif head.startswith(_BZ2):
                import bz2

                self.compression, self._f = "bzip2", bz2.BZ2File(self._raw, mode="rb")
            elif head.startswith(_XZ):
                import lzma

                self.compression, self._f = "xz", lzma.LZMAFile(self._raw, mode="rb")
            elif head.startswith(_ZSTD):
                try:
                    import zstandard
                except ImportError:
                    raise DataError(
                        "is zstd-compressed and the `zstandard` package is not installed: "
                        "pip install zstandard, or decompress it (zstd -d)",
                        str(self.path),
                        reason="unreadable_file",
                    ) from None
                self.compression = "zstd"
                self._f = io.BufferedReader(
                    zstandard.ZstdDecompressor().stream_reader(self._raw, closefd=False), 1 << 20
                )
            else:
                for magic, what in _REFUSED:
                    if head.startswith(magic):
                        raise DataError(f"is {what}", str(self.path), reason="unreadable_file")
        except BaseException:
            self._raw.close()
            raise

    def _wrap(self, fn, *args):
        try:
            return fn(*args)
        except DataError:
            raise
        except (OSError, *DECOMPRESS_ERRORS) as err:
            what = f"cannot decompress ({self.compression})" if self.compression else "read error"
            msg = getattr(err, "strerror", None) or str(err) or type(err).__name__
            raise DataError(f"{what}: {msg}", str(self.path), reason="unreadable_file") from err

    def read(self, n: int = -1) -> bytes:
        return self._wrap(self._f.read, n)

    def readline(self, limit: int = -1) -> bytes:
        return self._wrap(self._f.readline, limit)

    def consumed(self) -> int:
        try:
            return self._raw.tell()
        except (OSError, ValueError):
            return 0

    def close(self) -> None:
        try:
            if self._f is not self._raw:
                self._f.close()
        finally:
            self._raw.close()

    def __enter__(self) -> "InputFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_input(path: str | Path) -> InputFile:
    """Open a jsonl file (plain or compressed) for binary reading; a missing, unreadable or
    unsupported file is a DataError naming it."""
    return InputFile(path)


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


def too_long(nbytes: int, limit: int) -> BadLine:
    return BadLine("line_too_long", f"line is {nbytes} bytes, over the limit of {limit} (--max-line-bytes)")


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _lone_surrogate(obj) -> str | None:
    """The first string in a parsed JSON value that holds a lone surrogate (repr'd), else None.
    Iterative, so a deep (but parseable) value cannot overflow the stack."""
    stack = [obj]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as err:
                return repr(v[err.start])
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return None


def parse_line(raw: bytes, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> dict | BadLine | None:
    """Decode one line; None for a blank line (ignored, e.g. a trailing newline).

    Every failure is a BadLine with a reason of REASONS, never an exception: a line over
    `max_line_bytes`, invalid UTF-8, malformed or too deeply nested JSON, numbers Python refuses,
    strings with lone surrogate escapes (``"\\ud800"``, which no UTF-8 text can hold)."""
    if len(raw) > max_line_bytes:
        return too_long(len(raw), max_line_bytes)
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
    except RecursionError:
        return BadLine("nested_too_deep", "JSON is nested too deeply")
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        return BadLine("malformed_json", f"malformed JSON: {err}")
    if not isinstance(obj, dict):
        return BadLine("malformed_json", f"expected a JSON object, got {type(obj).__name__}")
    if _SURROGATE_ESCAPE.search(raw):  # only then can a decoded string hold a lone surrogate
        bad = _lone_surrogate(obj)
        if bad is not None:
            return BadLine("lone_surrogate", f"a string holds the lone surrogate {bad}, which is not valid Unicode")
    return obj


def iter_lines(f: InputFile, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[bytes | int]:
    """Each line of `f` as bytes, or, for a line over `max_line_bytes`, its length as an int: such a
    line is skipped in pieces, never held in memory whole."""
    while True:
        raw = f.readline(max_line_bytes + 2)
        if not raw:
            return
        if len(raw) <= max_line_bytes or (raw.endswith(b"\n") and len(raw.rstrip(b"\r\n")) <= max_line_bytes):
            yield raw
            continue
        n = len(raw)
        while not raw.endswith(b"\n"):
            raw = f.readline(1 << 20)
            if not raw:
                break
            n += len(raw)
        yield n - 1 if raw.endswith(b"\n") else n


def iter_records(
    path: str | Path, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> Iterator[tuple[int, dict | BadLine]]:
    """Yield (line_no, record or BadLine) for each non-blank line, streaming the file (plain or compressed)."""
    with open_input(path) as f:
        for line_no, raw in enumerate(iter_lines(f, max_line_bytes), start=1):
            if isinstance(raw, int):
                yield line_no, too_long(raw, max_line_bytes)
                continue
            rec = parse_line(raw.rstrip(b"\r\n"), max_line_bytes)
            if rec is not None:
                yield line_no, rec


CHAT_ROLES = ("system", "user", "assistant", "tool")


def _json_field(value, where: str):
    """A field that may hold JSON text or the parsed value: the parsed value (DataError if not JSON)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as err:
        raise DataError(f"{where} is not JSON: {str(err).splitlines()[0][:200]}", reason="bad_field_type") from None


def normalize_conversation(
    messages: Sequence[dict], where: str = "conversations"
) -> tuple[list[dict], list[dict] | None]:
    """MiniMind-3's (and OpenAI's) message format made ready for a chat template: (messages, tools).

    - `tools` on a system message (a JSON string or a list of schemas) become the `tools` argument
      of `apply_chat_template` (the message keeps them, parsed; templates ignore the key);
    - assistant `tool_calls` given as a JSON string become a list, and a call's `arguments` given
      as a string must be JSON (the template writes that string verbatim);
    - `reasoning_content` is kept; the roles are system, user, assistant and tool;
    - keys whose value is None are dropped (as transformers does).
    Idempotent. Anything malformed is a one-line DataError naming the field (`where[i].tool_calls
    is not JSON: ...`); callers that read files add the file and line.
    """
    if not isinstance(messages, (list, tuple)):
        raise DataError(f"{where} is {type(messages).__name__}, expected a list of messages", reason="bad_field_type")
    out: list[dict] = []
    tools = None
    for i, m in enumerate(messages):
        here = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{here} is {type(m).__name__}, expected an object", reason="bad_field_type")
        m = {k: v for k, v in m.items() if v is not None}
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise DataError(
                f"{here}.role is {role!r}, expected {', '.join(CHAT_ROLES[:-1])} or {CHAT_ROLES[-1]}",
                reason="bad_field_type",
            )
        for key in ("content", "reasoning_content"):
            if key in m and not isinstance(m[key], str):
                raise DataError(f"{here}.{key} is {type(m[key]).__name__}, expected a string", reason="bad_field_type")
        if m.get("tools") not in (None, "", []):
            if role != "system":
                raise DataError(
                    f"{here}.tools: tools belong on the system message, not on a {role} message",
                    reason="bad_field_type",
                )
            parsed = _json_field(m["tools"], f"{here}.tools")
            if isinstance(parsed, dict):
                parsed = [parsed]
            if not isinstance(parsed, list) or not all(isinstance(t, dict) for t in parsed):
                raise DataError(f"{here}.tools must be a list of tool schemas (objects)", reason="bad_field_type")
            if tools is not None:
                raise DataError(f"{here}.tools: only one system message may carry tools", reason="bad_field_type")
            m["tools"] = tools = parsed
        elif "tools" in m:
            del m["tools"]
        if m.get("tool_calls") not in (None, "", []):
            if role != "assistant":
                raise DataError(f"{here}.tool_calls: only assistant messages make tool calls", reason="bad_field_type")
            calls = _json_field(m["tool_calls"], f"{here}.tool_calls")
            if isinstance(calls, dict):
                calls = [calls]
            if not isinstance(calls, list):
                raise DataError(f"{here}.tool_calls must be a list of calls", reason="bad_field_type")
            for j, call in enumerate(calls):
                fn = call.get("function", call) if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                    raise DataError(
                        f"{here}.tool_calls[{j}] must be an object with a function name", reason="bad_field_type"
                    )
                if isinstance(fn.get("arguments"), str):
                    _json_field(fn["arguments"], f"{here}.tool_calls[{j}].arguments")
            m["tool_calls"] = calls
        elif "tool_calls" in m:
            del m["tool_calls"]
        out.append(m)
    return out, tools


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
    """A conversation field: a non-empty list of messages with string role and content and an
    assistant turn, normalised by `normalize_conversation` (MiniMind-3's format: tools on the system
    message, assistant tool_calls, the tool role, reasoning_content).

    Returns normalised copies (tool_calls and tools parsed, None-valued keys dropped); other keys
    are kept, so a template that reads them sees them."""
    if field not in obj:
        return BadLine("missing_field", f'missing field "{field}"')
    value = obj[field]
    if not isinstance(value, list):
        return BadLine("bad_field_type", f'field "{field}" is {type(value).__name__}, expected a list of messages')
    if not value:
        return BadLine("empty_text", f'field "{field}" is an empty conversation')
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            return BadLine("bad_field_type", f"{field}[{i}] is {type(m).__name__}, expected an object")
        for key in ("role", "content"):
            if key not in m:
                return BadLine("missing_field", f'{field}[{i}] is missing "{key}"')
            if not isinstance(m[key], str):
                return BadLine("bad_field_type", f"{field}[{i}].{key} is {type(m[key]).__name__}, expected a string")
    try:
        messages, _ = normalize_conversation(value, field)
    except DataError as err:
        return BadLine(err.reason or "bad_field_type", str(err))
    if not any(m["role"] == "assistant" for m in messages):
        return BadLine("no_assistant_turn", f'field "{field}": conversation has no assistant turn')
    if final_assistant and messages[-1]["role"] != "assistant":
        return BadLine("no_assistant_turn", f'field "{field}": the final message is not an assistant turn')
    if not any(m["content"].strip() or m.get("reasoning_content", "").strip() or m.get("tool_calls") for m in messages):
        return BadLine("empty_text", f'field "{field}": every message is empty')
    return messages
