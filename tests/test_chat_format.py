"""Splitting model output into reasoning, answer and tool calls (llmcore/chat_format.py).

The reference is the chat template itself: an assistant turn rendered by transformers' own
`apply_chat_template` with MiniMind-3's tokenizer, minus the generation prompt, is exactly what a model
trained on that template writes; parsing it must give back the message's fields.
"""

from __future__ import annotations

import json
import random

import pytest

from llmcore.chat_format import OutputParser, ToolCall, parse_output, parse_tool_call


def _stream(text: str, thinking: bool, tools: bool, seed: int = 0) -> tuple[str, str | None, list[ToolCall]]:
    """Feed `text` in random pieces; join the deltas."""
    rng = random.Random(seed)
    p = OutputParser(thinking=thinking, tools=tools)
    deltas, i = [], 0
    while i < len(text):
        n = rng.randint(1, 4)
        deltas += p.feed(text[i : i + n])
        i += n
    deltas += p.finish()
    reasoning = "".join(d[1] for d in deltas if d[0] == "reasoning") if thinking else None
    return "".join(d[1] for d in deltas if d[0] == "content"), reasoning, [d[1] for d in deltas if d[0] == "tool_call"]


CASES = [
    # (output text, thinking, tools, content, reasoning, [(name, arguments dict)])
    ("你好！", False, False, "你好！", None, []),
    ("a\n</think>\n\nb<tool_call>x", False, False, "a\n</think>\n\nb<tool_call>x", None, []),  # passthrough
    ("想一想\n\n再想\n</think>\n\n答案是 2。", True, False, "答案是 2。", "想一想\n\n再想", []),
    ("没有结束的思考", True, False, "", "没有结束的思考", []),
    ('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>', False, True, "", None, [("f", {"x": 1})]),
    (
        '先查一下\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "g", '
        '"arguments": {"s": "北京"}}\n</tool_call>',
        False,
        True,
        "先查一下",
        None,
        [("f", {}), ("g", {"s": "北京"})],
    ),
    (
        'r\n</think>\n\n<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 2}"}\n</tool_call>',
        True,
        True,
        "",
        "r",
        [("f", {"a": 2})],
    ),
    # not a call: bad JSON, missing name, non-object arguments, unclosed block -> content, as written
    (
        '<tool_call>\n{"name": "f", "arguments": {x}}\n</tool_call>',
        False,
        True,
        '<tool_call>\n{"name": "f", "arguments": {x}}\n</tool_call>',
        None,
        [],
    ),
    (
        '<tool_call>\n{"arguments": {}}\n</tool_call>',
        False,
        True,
        '<tool_call>\n{"arguments": {}}\n</tool_call>',
        None,
        [],
    ),
    (
        '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',
        False,
        True,
        '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',
        None,
        [],
    ),
    ('ok <tool_call>\n{"name": "f"', False, True, 'ok <tool_call>\n{"name": "f"', None, []),
    ("a </tool_call> b", False, True, "a </tool_call> b", None, []),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_split_streamed_and_whole(case: int) -> None:
    text, thinking, tools, content, reasoning, calls = CASES[case]
    whole = parse_output(text, thinking=thinking, tools=tools)
    assert whole.content == content
    assert whole.reasoning == reasoning
    assert [(c.name, json.loads(c.arguments)) for c in whole.tool_calls] == calls
    for seed in range(5):
        s_content, s_reasoning, s_calls = _stream(text, thinking, tools, seed)
        assert (s_content, s_reasoning) == (content, reasoning)
        assert [(c.name, c.arguments) for c in s_calls] == [(c.name, c.arguments) for c in whole.tool_calls]


def test_streaming_emits_text_as_soon_as_it_cannot_be_a_marker() -> None:
    p = OutputParser(thinking=True, tools=True)
    assert p.feed("abc</th") == [("reasoning", "abc")]
    assert p.feed("ink>\n\nhi\n") == [("content", "hi")]  # the newline may precede <tool_call>
    assert p.feed("there") == [("content", "\nthere")]
    assert p.feed("<tool") == []
    out = p.feed('_call>\n{"name": "f", "arguments": {}}\n</tool_call>')
    assert [d[0] for d in out] == ["tool_call"] and out[0][1].name == "f"


def test_tool_call_ids_are_unique_and_arguments_are_json_strings() -> None:
    a, b = parse_tool_call('{"name": "f", "arguments": {"城市": "北京"}}'), parse_tool_call('{"name": "f"}')
    assert a is not None and b is not None and a.id != b.id and a.id.startswith("call_")
    assert a.arguments == '{"城市": "北京"}' and b.arguments == "{}"
    assert a.to_openai(0) == {
        "index": 0,
        "id": a.id,
        "type": "function",
        "function": {"name": "f", "arguments": '{"城市": "北京"}'},
    }
    assert parse_tool_call("[" * 100000) is None  # deep nesting is not a crash


# -- the template as the reference ----------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "查询天气",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
TURNS = [
    {"role": "assistant", "content": "北京今天晴。"},
    {"role": "assistant", "content": "答案是 4。", "reasoning_content": "2+2\n\n等于 4"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}],
    },
    {
        "role": "assistant",
        "content": "我查一下。",
        "reasoning_content": "需要工具",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "上海"}}},
        ],
    },
]


@pytest.fixture(scope="module")
def hf_tok():
    from conftest import shared_data_dir

    path = shared_data_dir() / "minimind3_tokenizer"
    if not (path / "tokenizer_config.json").is_file():
        pytest.skip(f"MiniMind-3's tokenizer is not at {path}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize("turn", range(len(TURNS)))
def test_what_the_template_writes_parses_back_to_the_message(hf_tok, turn: int) -> None:
    msg = TURNS[turn]
    thinking = bool(msg.get("reasoning_content"))
    convo = [{"role": "user", "content": "北京天气怎么样？"}, msg]
    full = hf_tok.apply_chat_template(convo, tools=TOOLS, tokenize=False)
    prompt = hf_tok.apply_chat_template(
        convo[:1], tools=TOOLS, tokenize=False, add_generation_prompt=True, open_thinking=thinking
    )
    assert full.startswith(prompt) and full.endswith("<|im_end|>\n")
    output = full[len(prompt) : -len("<|im_end|>\n")]  # what the model generates before its eos
    parsed = parse_output(output, thinking=thinking, tools=True)
    assert parsed.content == msg["content"]
    assert parsed.reasoning == (msg["reasoning_content"] if thinking else None)
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in msg.get("tool_calls", [])
    ]
