"""Chat prompts with thinking and tools, and the model's output split back into reasoning, answer
and tool calls (for `generate --chat`, `chat` and `serve`).

MiniMind-3's chat template (and Qwen3's) writes an assistant turn as
`<think>\\n{reasoning}\\n</think>\\n\\n{content}` followed by one `<tool_call>\\n{"name": ..., "arguments":
{...}}\\n</tool_call>` block per call (blocks after content or each other are separated by a newline).
A generation prompt ends in `<think>\\n` when thinking is on (the template's `open_thinking`) and in an
empty `<think>\\n\\n</think>\\n\\n` when it is off, so the model's output starts inside the reasoning or
directly with the answer.

Invariants:
- `OutputParser` is the only parser: the non-streamed split (`parse_output`) is the streamed one fed
  the whole text at once, so streamed pieces always join to the non-streamed fields.
- With neither thinking nor tools, the parser passes the text through unchanged (content == text).
- A `<tool_call>` block that is not a JSON object with a string `name` and object `arguments` (or a
  JSON string holding an object) stays in the content as the model wrote it; a parse never raises.
- Text is held back only while it may still become a marker (`</think>`, `<tool_call>`) or a newline
  the template puts around one; everything else is emitted at once.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

from llmcore.errors import LLMCoreError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


# -- prompts --------------------------------------------------------------------------------------


def template_has_thinking(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template has a thinking switch (`open_thinking`)."""
    return "open_thinking" in (getattr(tokenizer, "chat_template", None) or "")


def template_has_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders a `tools` list."""
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def check_thinking(tokenizer: Any, flag: str = "--thinking") -> None:
    """One-line error when thinking is asked of a template that has no thinking switch (it would be
    silently ignored: MiniMind2's ChatML template, for one)."""
    if not template_has_thinking(tokenizer):
        where = getattr(tokenizer, "path", "this tokenizer")
        raise LLMCoreError(
            f"{flag}: the chat template of {where} has no thinking mode (no 'open_thinking'); "
            "use a tokenizer with MiniMind-3's template"
        )


def prompt_ids(
    tokenizer: Any, messages: Sequence[dict], tools: list | None = None, thinking: bool = False
) -> list[int]:
    """Token ids of a generation prompt through the tokenizer's own chat template (special-token
    strings in message text stay plain text; see `Tokenizer.encode_prompt`). `thinking` opens the
    think block (`open_thinking`, refused for a template without one); `tools` are rendered by the
    template."""
    if thinking:
        check_thinking(tokenizer)
    return tokenizer.encode_prompt(list(messages), tools=list(tools) if tools else None, open_thinking=thinking)


# -- output ---------------------------------------------------------------------------------------


@dataclass
class ToolCall:
    """One parsed call: `arguments` is a JSON string (OpenAI's format)."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        if index is not None:
            d = {"index": index, **d}
        return d


def parse_tool_call(block: str) -> ToolCall | None:
    """The call in the text between `<tool_call>` and `</tool_call>`, or None when it is not one."""
    try:
        data = json.loads(block)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return None
    args = data.get("arguments", {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            if not isinstance(json.loads(args), dict):
                return None
        except (ValueError, RecursionError):
            return None
        return ToolCall(data["name"], args)
    if not isinstance(args, dict):
        return None
    return ToolCall(data["name"], json.dumps(args, ensure_ascii=False))


Delta = tuple[str, Any]  # ("reasoning", str) | ("content", str) | ("tool_call", ToolCall)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper prefix of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class OutputParser:
    """Incremental split of generated text: `feed(piece)` and `finish()` return deltas.

    `thinking`: the prompt opened a think block, so output starts as reasoning until `</think>`.
    `tools`: `<tool_call>` blocks in the answer become tool calls.
    """

    def __init__(self, thinking: bool = False, tools: bool = False) -> None:
        self.tools = tools
        self.state = "reasoning" if thinking else "content"
        self.buf = ""
        self.lead = thinking  # strip the newlines the template puts at the start of a section
        self.reasoning: str | None = "" if thinking else None
        self.content = ""
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> list[Delta]:
        self.buf += text
        return self._drain(final=False)

    def finish(self) -> list[Delta]:
        return self._drain(final=True)

    def _emit(self, out: list[Delta], kind: str, text: str) -> None:
        if not text:
            return
        if kind == "reasoning":
            self.reasoning = (self.reasoning or "") + text
        else:
            self.content += text
        out.append((kind, text))

    def _drain(self, final: bool) -> list[Delta]:
        out: list[Delta] = []
        while True:
            if self.lead:
                stripped = self.buf.lstrip("\n")
                if not stripped and not final:
                    return out  # only newlines so far: wait
                self.buf, self.lead = stripped, False
            if self.state == "tool":
                end = self.buf.find(TOOL_CLOSE)
                if end < 0:
                    if final:  # an unclosed block is text the model wrote
                        self._emit(out, "content", self.buf)
                        self.buf = ""
                    return out
                call = parse_tool_call(self.buf[len(TOOL_OPEN) : end].strip())
                if call is None:
                    self._emit(out, "content", self.buf[: end + len(TOOL_CLOSE)])
                else:
                    self.calls.append(call)
                    out.append(("tool_call", call))
                self.buf, self.state, self.lead = self.buf[end + len(TOOL_CLOSE) :], "content", True
                continue
            marker = THINK_CLOSE if self.state == "reasoning" else TOOL_OPEN if self.tools else None
            hit = self.buf.find(marker) if marker else -1
            if hit >= 0:
                # The template writes "\n</think>" and "content\n<tool_call>": those newlines are not text.
                self._emit(out, self.state, self.buf[:hit].rstrip("\n"))
                if self.state == "reasoning":
                    self.buf, self.state, self.lead = self.buf[hit + len(marker) :], "content", True
                else:
                    self.buf, self.state = self.buf[hit:], "tool"
                continue
            if final or marker is None:
                self._emit(out, self.state, self.buf)
                self.buf = ""
                return out
            keep = _partial_suffix(self.buf, marker)
            head = self.buf[: len(self.buf) - keep]
            keep += len(head) - len(head.rstrip("\n"))  # newlines that may turn out to precede the marker
            self._emit(out, self.state, self.buf[: len(self.buf) - keep])
            self.buf = self.buf[len(self.buf) - keep :]
            return out


@dataclass
class ParsedOutput:
    """A whole answer split: `reasoning` is None when thinking was off."""

    content: str
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


def parse_output(text: str, thinking: bool = False, tools: bool = False) -> ParsedOutput:
    """Split a finished answer (see `OutputParser`)."""
    parser = OutputParser(thinking=thinking, tools=tools)
    parser.feed(text)
    parser.finish()
    return ParsedOutput(parser.content, parser.reasoning, parser.calls)
