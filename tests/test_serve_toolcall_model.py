"""A real (tiny, trained here) model behind `llmcore serve` holds a tool-call conversation through the
official `openai` client: it calls the tool, the client sends the result back, it answers.

The model learned the conversation as transformers' `apply_chat_template` renders it
(tests/_toolcall_model.py), so the server must render the OpenAI request the same way and read the
`<tool_call>` block the model writes back into `tool_calls` for the model to get it right.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest

openai = pytest.importorskip("openai", reason="the serve tests need the `openai` client")
pytest.importorskip("fastapi", reason="llmcore serve needs fastapi (pip install -e '.[serve]')")

from test_serve import Served  # noqa: E402

from _toolcall_model import ASK, TOOL_RESULT, TOOLS, train_toolcall_run  # noqa: E402

MODEL = "tiny-run"  # Served's model name


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    run = train_toolcall_run(tmp_path_factory.mktemp("toolcall"))
    s = Served(Path(run))
    yield s
    s.stop()


def test_trained_model_calls_the_tool_and_answers_from_its_result(served: Served) -> None:
    c = served.client
    r = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=48)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "北京"}
    messages = ASK + [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": TOOL_RESULT["content"]},
    ]
    r2 = c.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=48)
    assert r2.choices[0].finish_reason == "stop"
    assert r2.choices[0].message.content == "北京今天晴，25度。" and not r2.choices[0].message.tool_calls
    # Streamed, the call arrives as one tool_calls delta.
    calls, finish = [], None
    for chunk in c.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=48, stream=True
    ):
        calls += chunk.choices[0].delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and [(t.function.name, json.loads(t.function.arguments)) for t in calls] == [
        ("get_weather", {"city": "北京"})
    ]
