"""OpenAI request parsing: a request body (a JSON object) to validated settings, or an `ApiError`.

Invariants:
- Every refusal is an `ApiError` with a 4xx status, an OpenAI error `type`, the offending `param` and a
  message naming the field; the app turns it into `{"error": {...}}` (no traceback reaches a client).
- Roles are OpenAI's (`developer` becomes `system`); content is a string or text parts (joined).
- Text is valid Unicode: a lone surrogate (valid JSON, `"\\ud800"`) is refused naming the field
  (`check_text`), so the tokenizer and the embedder never see one.
- Sampling fields are range-checked (`temperature` in [0, 2], below `GREEDY_BELOW` greedy; `top_p` in
  (0, 1]; `repetition_penalty` in (0, 10]; `seed` folded to unsigned 64 bits); what llmcore does not do
  (`n` > 1, penalties, chat `logprobs`, `suffix`, `best_of` > 1, the deprecated function API, a
  non-text `response_format`, logprobs/echo with streaming) is refused, not ignored.
- Size caps: at most `MAX_STOP_STRINGS` stop strings, `MAX_LOGPROBS` top tokens per position,
  `MAX_PROMPTS` completion prompts; the body size (`DEFAULT_MAX_BODY_BYTES`) and the context are
  checked by the app.
- Tools are function tools only; `tool_choice` is `auto` or `none` (`none`: the model is not told about
  them); tools need a chat template that renders them, thinking one that has `open_thinking`.
- Importing this module needs neither torch nor FastAPI.

Why hand-written checks and not pydantic models: every refusal names its field in OpenAI's words
(`'top_p' must be in (0.0, 1.0], got 0`) with `param` set, the first bad field in a fixed order wins,
and `bool` is never a number; pydantic would need strict types plus a translation table from its
error types back to these messages, as long as the checks themselves.
"""

import json
import math
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 512  # as `llmcore chat`; capped by the room left in the context
MAX_STOP_STRINGS = 4
MAX_LOGPROBS = 20  # top tokens listed per position (OpenAI allows 5, vLLM 20)
MAX_PROMPTS = 64  # completion prompts in one request (each is its own job; they may share batches)
GREEDY_BELOW = 1e-5  # temperatures below this are greedy
CHAT_ROLES = {"system", "user", "assistant", "developer", "tool"}


class ApiError(Exception):
    """A request the server refuses: turned into `{"error": {...}}` with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# -- request parsing ------------------------------------------------------------------------------


@dataclass
class SamplingParams:
    """What one request asks of the generator (validated)."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # completions: return the log-probabilities of the tokens (and the top N)
    echo: bool = False  # completions: the prompt comes back in front of the text (and in logprobs)

    def batch_key(self) -> tuple[Any, ...] | None:
        """Requests with equal keys may share a batch; None = must run alone (seeded sampling)."""
        if self.temperature <= 0:
            return ("greedy", self.repetition_penalty)
        if self.seed is not None:
            return None
        return ("sample", self.temperature, self.top_k, self.top_p, self.repetition_penalty)


def _number(
    body: dict[str, Any], name: str, default: Any, lo: float, hi: float, integer: bool = False, lo_open: bool = False
) -> Any:
    value = body.get(name)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}", param=name)
    if not math.isfinite(value) or value > hi or value < lo or (lo_open and value == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise ApiError(400, f"'{name}' must be in {bound}, got {value!r}", param=name)
    return int(value) if integer else float(value)


def check_text(value: str, where: str) -> str:
    """`value` unless it holds a lone surrogate (valid JSON, `"\\ud800"`, but not Unicode text: the
    tokenizer and the embedder cannot take it), which is a 400 naming the field."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ApiError(
            400, f"{where} holds the lone surrogate {value[err.start]!r}, which is not valid Unicode text", param=where
        ) from None
    return value


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {value!r}", param=name)
    return value


def parse_sampling(body: dict[str, Any], chat: bool) -> SamplingParams:
    """Sampling fields of a chat or completion request; raises ApiError(400) for a bad or unsupported one."""
    p = SamplingParams()
    name = "max_tokens"
    if chat and body.get("max_completion_tokens") is not None:
        name = "max_completion_tokens"
    p.max_tokens = _number(body, name, None, 1, 1 << 31, integer=True)
    p.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    if p.temperature < GREEDY_BELOW:
        p.temperature = 0.0  # dividing logits by ~0 would overflow; this close to 0 is greedy anyway
    p.top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    p.top_k = _number(body, "top_k", 0, 0, 1 << 31, integer=True)  # extension (vLLM); 0 = off
    p.repetition_penalty = _number(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True)  # extension
    p.seed = _number(body, "seed", None, -(1 << 63), (1 << 64) - 1, integer=True)
    if p.seed is not None and p.seed < 0:
        p.seed &= (1 << 64) - 1  # torch seeds are unsigned 64-bit
    if _number(body, "n", 1, 1, 1 << 31, integer=True) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    for penalty in ("presence_penalty", "frequency_penalty"):
        if _number(body, penalty, 0.0, -2.0, 2.0) != 0.0:
            raise ApiError(
                400, f"'{penalty}' is not supported (use 0, or the 'repetition_penalty' extension)", param=penalty
            )
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
        if len(stop) > MAX_STOP_STRINGS:
            raise ApiError(400, f"'stop' takes at most {MAX_STOP_STRINGS} strings", param="stop")
        p.stop = [check_text(s, "stop") for s in stop if s]
    p.stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise ApiError(400, "'stream_options' must be an object", param="stream_options")
        if not p.stream:
            raise ApiError(400, "'stream_options' is only allowed with stream: true", param="stream_options")
        p.include_usage = _flag(options, "include_usage")
    if chat:
        if body.get("logprobs") or body.get("top_logprobs"):
            raise ApiError(400, "'logprobs' is not supported", param="logprobs")
        for legacy in ("functions", "function_call"):
            if body.get(legacy) is not None:
                raise ApiError(
                    400, f"'{legacy}' (the deprecated function-calling API) is not supported; use 'tools'", param=legacy
                )
        fmt = body.get("response_format")
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise ApiError(400, "only response_format {'type': 'text'} is supported", param="response_format")
    else:
        logprobs = body.get("logprobs")
        if logprobs is not None:
            if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= MAX_LOGPROBS:
                raise ApiError(
                    400,
                    f"'logprobs' must be an integer from 0 to {MAX_LOGPROBS} (the top tokens to list "
                    f"per position), got {logprobs!r}",
                    param="logprobs",
                )
            p.logprobs = logprobs
        p.echo = _flag(body, "echo")
        if p.stream and (p.logprobs is not None or p.echo):
            raise ApiError(400, "'logprobs' and 'echo' are not supported with stream: true", param="stream")
        if body.get("suffix"):
            raise ApiError(400, "'suffix' is not supported", param="suffix")
        if _number(body, "best_of", 1, 1, 1 << 31, integer=True) != 1:
            raise ApiError(400, "only best_of=1 is supported", param="best_of")
    return p


@dataclass
class ChatOptions:
    """What a chat request asks of the template and the output parser (validated)."""

    tools: list[dict[str, Any]] | None = None  # rendered by the template; None = no tools
    parse_tools: bool = False  # `<tool_call>` blocks in the output become tool_calls
    parallel_tool_calls: bool = True
    thinking: bool = False  # the template's open_thinking


def parse_chat_options(body: dict[str, Any], tokenizer: Any, default_thinking: bool) -> ChatOptions:
    """`tools`, `tool_choice`, `parallel_tool_calls` and `chat_template_kwargs` of a chat request."""
    from llmcore.chat_format import template_has_thinking, template_has_tools

    o = ChatOptions(thinking=default_thinking)
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise ApiError(400, "'tools' must be a list of {'type': 'function', 'function': {...}}", param="tools")
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not (
                isinstance(t, dict)
                and t.get("type") == "function"
                and isinstance(fn, dict)
                and isinstance(fn.get("name"), str)
                and fn["name"]
            ):
                raise ApiError(
                    400,
                    f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}} "
                    "(only function tools are supported)",
                    param=f"tools[{i}]",
                )
            check_text(json.dumps(t, ensure_ascii=False), f"tools[{i}]")
    choice = body.get("tool_choice")
    if choice is not None and choice not in ("none", "auto"):
        raise ApiError(400, f"tool_choice {choice!r} is not supported; use 'auto' or 'none'", param="tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ApiError(
            400, f"'parallel_tool_calls' must be true or false, got {parallel!r}", param="parallel_tool_calls"
        )
    o.parallel_tool_calls = parallel is not False
    if tools and choice != "none":  # "none": the model is not told about the tools (and none are parsed)
        if not template_has_tools(tokenizer):
            raise ApiError(400, "this model's chat template does not render tools", param="tools")
        o.tools, o.parse_tools = tools, True
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise ApiError(400, "'chat_template_kwargs' must be an object", param="chat_template_kwargs")
        for key, value in kwargs.items():
            if key not in ("open_thinking", "enable_thinking"):
                raise ApiError(
                    400,
                    f"chat_template_kwargs: only 'open_thinking' (or its alias 'enable_thinking') "
                    f"is supported, got {str(key)[:50]!r}",
                    param="chat_template_kwargs",
                )
            if not isinstance(value, bool):
                raise ApiError(400, f"chat_template_kwargs.{key} must be true or false", param="chat_template_kwargs")
            o.thinking = value
    if o.thinking and not template_has_thinking(tokenizer):
        raise ApiError(
            400, "this model's chat template has no thinking mode (no 'open_thinking')", param="chat_template_kwargs"
        )
    return o


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's OpenAI `tool_calls`, for the template: arguments as a JSON object."""
    if not isinstance(value, list):
        raise ApiError(400, f"{where} must be a list", param=where)
    out = []
    for j, call in enumerate(value):
        at = f"{where}[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]):
            raise ApiError(
                400, f"{at} must be {{'type': 'function', 'function': {{'name': ..., 'arguments': ...}}}}", param=at
            )
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(check_text(args, f"{at}.function.arguments"))
            except (ValueError, RecursionError):
                raise ApiError(400, f"{at}.function.arguments is not JSON", param=f"{at}.function.arguments") from None
        if not isinstance(args, dict):
            raise ApiError(400, f"{at}.function.arguments must be a JSON object", param=f"{at}.function.arguments")
        entry: dict[str, Any] = {
            "type": "function",
            "function": {"name": check_text(fn["name"], f"{at}.function.name"), "arguments": args},
        }
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def parse_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """`messages` for the chat template: `{"role", "content"}` strings (text content parts joined), plus an
    assistant's `tool_calls` (arguments parsed to objects) and `reasoning_content`, and a tool message's
    `tool_call_id`."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise ApiError(400, "'messages' is required and must be a list", param="messages")
    if not messages:
        raise ApiError(400, "'messages' must contain at least one message", param="messages")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object with 'role' and 'content'", param=where)
        role = m.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:  # a list or object role is unhashable
            raise ApiError(
                400, f"{where}.role must be one of {sorted(CHAT_ROLES)}, got {role!r}", param=f"{where}.role"
            )
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ApiError(400, f"{where}.content: only text parts are supported", param=f"{where}.content")
                parts.append(part["text"])
            content = "".join(parts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string or a list of text parts", param=f"{where}.content")
        msg: dict[str, Any] = {
            "role": "system" if role == "developer" else role,
            "content": check_text(content, f"{where}.content"),
        }
        if role == "assistant" and m.get("tool_calls") is not None:
            msg["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
        if role == "assistant" and m.get("reasoning_content") is not None:
            if not isinstance(m["reasoning_content"], str):
                raise ApiError(400, f"{where}.reasoning_content must be a string", param=f"{where}.reasoning_content")
            msg["reasoning_content"] = check_text(m["reasoning_content"], f"{where}.reasoning_content")
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            msg["tool_call_id"] = check_text(m["tool_call_id"], f"{where}.tool_call_id")
        out.append(msg)
    return out


def _token_ids(value: Any) -> bool:
    return (
        isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def parse_prompts(body: dict[str, Any]) -> list[str | list[int]]:
    """The completion prompts (OpenAI's forms): a string, a list of token ids, or a list of up to
    MAX_PROMPTS strings or token-id lists (one choice each, as lm-eval batches them)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _token_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _token_ids(p) for p in prompt):
        prompts = list(prompt)
    else:
        raise ApiError(
            400, "'prompt' is required: a string, a non-empty list of token ids, or a list of those", param="prompt"
        )
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", param="prompt")
    return [
        check_text(p, f"prompt[{i}]" if len(prompts) > 1 else "prompt") if isinstance(p, str) else list(p)
        for i, p in enumerate(prompts)
    ]
