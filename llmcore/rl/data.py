"""RL rows, read directly from MiniMind's jsonl formats (no prep step: rollouts need text prompts).

- rlaif.jsonl: `{"conversations": [..., {"role": "assistant", "content": ""}]}`: the conversation up to
  its last message is the prompt; the last message is the assistant turn the policy writes (its
  content, often empty, is not used).
- agent_rl.jsonl: the same with `tools` on the system message (MiniMind-3's format) and a `gt` field,
  a string or a list of strings/numbers, that `--reward exact` checks the answer against.
Any other keys of a row stay available to user reward functions as `sample[key]`.

Every row is checked when the file is opened: an empty or malformed row is a one-line DataError
naming the file and line (nothing is skipped silently).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmcore.errors import DataError, LLMCoreError


@dataclass
class RLRow:
    prompt: list[dict]  # the messages before the turn to write (normalised, tools parsed)
    tools: list[dict] | None
    sample: dict[str, Any] = field(default_factory=dict)  # the row's other fields + "source"


def read_rl_rows(path: str | Path) -> list[RLRow]:
    """All rows of an RL jsonl file, checked (see the module docstring)."""
    from llmcore.data_prep.jsonl import BadLine, iter_records, normalize_conversation

    path = Path(path)
    if not path.is_file():
        raise LLMCoreError(f"--data {path}: no such file (RL reads a jsonl of conversations, e.g. rlaif.jsonl)")
    rows: list[RLRow] = []
    for line, rec in iter_records(path):
        where = str(path)
        if isinstance(rec, BadLine):
            raise DataError(rec.message, where, line)
        if not isinstance(rec, dict) or "conversations" not in rec:
            raise DataError('expected an object with a "conversations" list', where, line)
        conv = rec["conversations"]
        if not isinstance(conv, list) or not conv:
            raise DataError('"conversations" must be a non-empty list of messages', where, line)
        try:
            messages, tools = normalize_conversation(conv)
        except DataError as err:
            raise DataError(str(err), where, line) from None
        if messages[-1].get("role") != "assistant":
            raise DataError("the last message must be the assistant turn to write (rlaif format)", where, line)
        prompt = messages[:-1]
        if not any(m.get("role") == "user" and str(m.get("content", "")).strip() for m in prompt):
            raise DataError("no user message before the assistant turn", where, line)
        gt = rec.get("gt")
        if gt is not None:
            ok = isinstance(gt, str) or (
                isinstance(gt, list) and all(isinstance(g, (str, int, float)) and not isinstance(g, bool) for g in gt)
            )
            if not ok:
                raise DataError("gt must be a string or a list of strings/numbers", where, line)
        sample = {k: v for k, v in rec.items() if k != "conversations"}
        sample["source"] = f"{path}:{line}"
        rows.append(RLRow(prompt, tools, sample))
    if not rows:
        raise DataError("no rows", str(path))
    return rows


__all__ = ["RLRow", "read_rl_rows"]
