"""Tools and thinking over `llmcore serve`'s OpenAI API, driven by the official `openai` client.

The model is scripted (tests/_scripted_model.py): it writes what a MiniMind-3 model trained on the
template writes (`<tool_call>` blocks, reasoning ending in `</think>`), so these tests check what the
server makes of it: `tool_calls` with JSON-string arguments and `finish_reason: "tool_calls"`,
`reasoning_content`, streamed as deltas too. Every prompt the model receives is compared with
transformers' own `apply_chat_template` for the same messages and tools (the reference rendering).
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import pytest

openai = pytest.importorskip("openai", reason="the serve tests need the `openai` client")
httpx = pytest.importorskip("httpx", reason="the serve tests need httpx")
pytest.importorskip("fastapi", reason="llmcore serve needs fastapi (pip install -e '.[serve]')")

from test_serve import _assert_error  # noqa: E402

from llmcore.serve import Engine, RunningServer, ServerOptions, bind_socket, create_app  # noqa: E402

from _scripted_model import ScriptedLM, text_replies  # noqa: E402
from _toolcall_model import TOOLS, minimind3_tokenizer_dir  # noqa: E402

MODEL = "tools-model"
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
SCRIPT = [
    ("<tool_response>", "北京今天晴，25度。"),
    ("坏参数", '<tool_call>\n{"name": "get_weather", "arguments": {city: 北京}}\n</tool_call>'),
    (
        "两个城市",
        "我分别查一下。\n" + CALL + '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "上海"}}'
        "\n</tool_call>",
    ),
    ("get_weather", CALL),  # the tools are in the prompt
    ("1+1", "一加一，\n\n是二。\n</think>\n\n等于2。"),
]
ASK = [{"role": "user", "content": "北京天气怎么样？"}]


class ToolServer:
    def __init__(self, thinking: bool = False) -> None:
        from transformers import AutoTokenizer

        from llmcore.data_prep.tokenizer import load_tokenizer

        path = minimind3_tokenizer_dir()
        self.tok, self.hf = load_tokenizer(path), AutoTokenizer.from_pretrained(str(path))
        self.model = ScriptedLM(text_replies(self.tok, SCRIPT, default="你好！"), self.tok.vocab_size, self.tok.eos_id)
        self.engine = Engine(self.model, self.tok, max_batch=4).start()
        app = create_app(self.engine, ServerOptions(model_name=MODEL, thinking=thinking))
        self.server = RunningServer(app, bind_socket("127.0.0.1", 0), self.engine).start()
        self.url = self.server.url
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def reference_prompt(
        self, messages: list[dict[str, Any]], tools: list | None = None, thinking: bool = False
    ) -> list[int]:
        text = self.hf.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True, open_thinking=thinking
        )
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def ts() -> Iterator[ToolServer]:
    s = ToolServer()
    yield s
    s.stop()


def _stream(ts: ToolServer, **kw: Any) -> tuple[str, str, list[dict[str, Any]], str]:
    """Join a streamed answer as a client does: content, reasoning, tool calls by index, finish reason."""
    content, reasoning, calls, finish = "", "", {}, None
    for chunk in ts.client.chat.completions.create(model=MODEL, stream=True, **kw):
        choice = chunk.choices[0]
        delta = choice.delta
        content += delta.content or ""
        reasoning += getattr(delta, "reasoning_content", None) or ""
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += tc.id or ""
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, reasoning, [calls[i] for i in sorted(calls)], finish


def test_tool_call_becomes_tool_calls_and_the_conversation_continues(ts: ToolServer) -> None:
    r = ts.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=64)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "北京"}
    assert ts.model.prompts[-1] == ts.reference_prompt(ASK, TOOLS)
    # The client runs the tool and sends the assistant turn and the tool's result back.
    messages = ASK + [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"weather": "晴", "temp": 25}'},
    ]
    r2 = ts.client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=64)
    assert r2.choices[0].finish_reason == "stop" and r2.choices[0].message.content == "北京今天晴，25度。"
    assert not r2.choices[0].message.tool_calls
    reference = ASK + [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}],
        },
        messages[-1],
    ]
    assert ts.model.prompts[-1] == ts.reference_prompt(reference, TOOLS)


def test_streamed_tool_calls_equal_the_whole_answer(ts: ToolServer) -> None:
    content, reasoning, calls, finish = _stream(ts, messages=ASK, tools=TOOLS, temperature=0, max_tokens=64)
    assert (content, reasoning, finish) == ("", "", "tool_calls")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "北京"})]
    assert calls[0]["id"].startswith("call_")
    two = [{"role": "user", "content": "两个城市的天气"}]
    content, _, calls, finish = _stream(ts, messages=two, tools=TOOLS, temperature=0, max_tokens=96)
    whole = ts.client.chat.completions.create(model=MODEL, messages=two, tools=TOOLS, temperature=0, max_tokens=96)
    assert content == whole.choices[0].message.content == "我分别查一下。" and finish == "tool_calls"
    assert (
        [json.loads(c["arguments"]) for c in calls]
        == [json.loads(c.function.arguments) for c in whole.choices[0].message.tool_calls]
        == [{"city": "北京"}, {"city": "上海"}]
    )
    one = ts.client.chat.completions.create(
        model=MODEL, messages=two, tools=TOOLS, temperature=0, max_tokens=96, parallel_tool_calls=False
    )
    assert [json.loads(c.function.arguments) for c in one.choices[0].message.tool_calls] == [{"city": "北京"}]


def test_tool_call_with_arguments_that_are_not_json_is_content(ts: ToolServer) -> None:
    msgs = [{"role": "user", "content": "坏参数"}]
    r = ts.client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, temperature=0, max_tokens=64)
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content == SCRIPT[1][1]
    content, _, calls, finish = _stream(ts, messages=msgs, tools=TOOLS, temperature=0, max_tokens=64)
    assert (content, calls, finish) == (SCRIPT[1][1], [], "stop")


def test_tool_choice_none_renders_no_tools_and_parses_none(ts: ToolServer) -> None:
    r = ts.client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=16
    )
    assert r.choices[0].message.content == "你好！" and r.choices[0].finish_reason == "stop"
    assert ts.model.prompts[-1] == ts.reference_prompt(ASK)


def test_without_tools_a_tool_call_block_is_plain_content(ts: ToolServer) -> None:
    r = ts.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "坏参数"}], temperature=0, max_tokens=64
    )
    assert r.choices[0].message.content == SCRIPT[1][1] and not r.choices[0].message.tool_calls


def test_thinking_per_request_and_as_the_server_default(ts: ToolServer) -> None:
    msgs = [{"role": "user", "content": "1+1等于几？"}]
    r = ts.client.chat.completions.create(
        model=MODEL,
        messages=msgs,
        temperature=0,
        max_tokens=64,
        extra_body={"chat_template_kwargs": {"open_thinking": True}},
    )
    m = r.choices[0].message
    assert (m.content, m.reasoning_content, r.choices[0].finish_reason) == ("等于2。", "一加一，\n\n是二。", "stop")
    assert ts.model.prompts[-1] == ts.reference_prompt(msgs, thinking=True)
    content, reasoning, _, _ = _stream(
        ts, messages=msgs, temperature=0, max_tokens=64, extra_body={"chat_template_kwargs": {"enable_thinking": True}}
    )
    assert (content, reasoning) == ("等于2。", "一加一，\n\n是二。")
    default_on = ToolServer(thinking=True)
    try:
        r = default_on.client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=64)
        assert r.choices[0].message.reasoning_content == "一加一，\n\n是二。"
        assert default_on.model.prompts[-1] == default_on.reference_prompt(msgs, thinking=True)
        r = default_on.client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            temperature=0,
            max_tokens=64,
            extra_body={"chat_template_kwargs": {"open_thinking": False}},
        )
        assert default_on.model.prompts[-1] == default_on.reference_prompt(ASK)
    finally:
        default_on.stop()


def _post(ts: ToolServer, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        ts.url + "/v1/chat/completions",
        content=json.dumps(body),
        timeout=30,
        headers={"Content-Type": "application/json"},
    )


BAD = {
    "tool_choice required": ({"tools": TOOLS, "tool_choice": "required"}, "tool_choice"),
    "tool_choice named": (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
        "tool_choice",
    ),
    "tools not a list": ({"tools": {"a": 1}}, "tools"),
    "tool without a name": ({"tools": [{"type": "function", "function": {}}]}, "tools[0]"),
    "non-function tool": ({"tools": [{"type": "code_interpreter"}]}, "tools[0]"),
    "legacy functions": ({"functions": [{"name": "f"}]}, "functions"),
    "parallel not bool": ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    "unknown template kwarg": ({"chat_template_kwargs": {"evil": 1}}, "chat_template_kwargs"),
    "thinking not bool": ({"chat_template_kwargs": {"open_thinking": "yes"}}, "chat_template_kwargs"),
    "arguments not JSON": (
        {
            "messages": ASK
            + [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{city"}}],
                }
            ]
        },
        "not JSON",
    ),
    "arguments not an object": (
        {
            "messages": ASK
            + [
                {
                    "role": "assistant",
                    "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "[1]"}}],
                }
            ]
        },
        "JSON object",
    ),
    "tool_calls not a list": ({"messages": ASK + [{"role": "assistant", "tool_calls": {"a": 1}}]}, "tool_calls"),
    "tool content missing": ({"messages": ASK + [{"role": "tool"}]}, "content"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_what_is_not_supported_is_a_400(ts: ToolServer, case: str) -> None:
    extra, needle = BAD[case]
    _assert_error(_post(ts, {"model": MODEL, "messages": ASK, "max_tokens": 4, **extra}), 400, needle)


def test_thinking_on_a_template_without_it_is_a_400(tmp_path) -> None:
    from test_serve import _tokenizer_dir

    from llmcore.data_prep.tokenizer import load_tokenizer

    tok = load_tokenizer(_tokenizer_dir(tmp_path))  # MiniMind2's ChatML template: tools, no thinking
    engine = Engine(ScriptedLM(lambda p: [tok.eos_id], tok.vocab_size, tok.eos_id), tok).start()
    server = RunningServer(
        create_app(engine, ServerOptions(model_name=MODEL)), bind_socket("127.0.0.1", 0), engine
    ).start()
    try:
        r = httpx.post(
            server.url + "/v1/chat/completions",
            timeout=30,
            headers={"Content-Type": "application/json"},
            content=json.dumps({"messages": ASK, "chat_template_kwargs": {"open_thinking": True}}),
        )
        _assert_error(r, 400, "thinking")
    finally:
        server.stop()
