"""`llmcore serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) for one checkpoint.

Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models` (and
`GET /v1/models/{id}`), with OpenAI's request fields, response objects, server-sent-event chunks
(ending with `data: [DONE]`) and `{"error": {...}}` bodies.

Invariants:
- Tokens come only from `llmcore.generate.generate_steps`, the function under `llmcore generate`:
  a request is rendered to prompt ids exactly as `llmcore generate` does (`[bos] + encode(prompt)`
  for completions, the tokenizer's chat template with the generation prompt for chat), so a greedy
  request (temperature 0) served on its own gives the same tokens and text as `llmcore generate`.
- One worker thread owns the model. Requests wait in a bounded FIFO queue; the worker takes the
  oldest one and, up to `max_batch`, later ones with the same sampling settings, and runs them as
  one left-padded batch with the KV cache (generate.py's padding keeps every row's positions and
  attention exactly those it has alone). A request with a `seed` and temperature > 0 always runs
  alone with its own `torch.Generator`, so its output does not depend on other traffic. Each row
  has its own text, stop strings, token budget and event queue: outputs never mix.
- A client that goes away (closed stream, dropped connection) marks its request cancelled: a queued
  one is dropped, a running row stops, and a batch whose rows are all finished or cancelled stops
  at once, freeing the worker for the next request.
- Text is emitted only once it decodes to whole characters and cannot be the start of a stop
  string; the streamed pieces join to exactly the non-streamed text. `usage.completion_tokens`
  counts every token the model produced for the request, the end-of-text token included.
- Chat output is split by `llmcore.chat_format.OutputParser` (one parser, streamed or not): reasoning
  into `reasoning_content`, `<tool_call>` blocks (when the request has tools) into `tool_calls` with
  `finish_reason: "tool_calls"`; a block that is not a valid call stays content. Tools, tool messages
  and assistant tool calls are rendered by the tokenizer's own chat template.
- Bad requests (malformed or oversized body, unknown model, empty messages, a prompt plus
  `max_tokens` past the model's context, text that is not valid Unicode, out-of-range or unsupported
  fields, a wrong or missing API key) get an OpenAI-style JSON error with a 4xx status; no traceback
  ever reaches a client. Text longer than the context could hold is refused before it is tokenized
  or embedded.
- The server binds 127.0.0.1 unless told otherwise; with an API key, every request without
  `Authorization: Bearer KEY` is refused with 401 before its body is read (but GET of the chat page's
  static files, `llmcore.webui`, which hold nothing). An empty key is refused at start. Without a key
  it binds only loopback and answers only requests whose `Host` names it and POST bodies typed
  `application/json`, so no web page can drive it (CSRF, DNS rebinding).
- Importing this module needs neither torch nor FastAPI; both are imported when a server is built.
"""

# No `from __future__ import annotations`: FastAPI reads the route functions' annotations (Request)
# as objects, and those classes are imported inside create_app.
import asyncio
import dataclasses
import hmac
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Optional

from llmcore.chat_format import OutputParser, ToolCall
from llmcore.errors import LLMCoreError, install_hint

if TYPE_CHECKING:  # pragma: no cover
    from llmcore.model import LLM

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 512  # as `llmcore chat`; capped by the room left in the context
MAX_STOP_STRINGS = 4
MAX_LOGPROBS = 20  # top tokens listed per position (OpenAI allows 5, vLLM 20)
MAX_PROMPTS = 64  # completion prompts in one request (each is its own job; they may share batches)
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is still there
GREEDY_BELOW = 1e-5  # temperatures below this are greedy
CHAT_ROLES = {"system", "user", "assistant", "developer", "tool"}


# -- errors ---------------------------------------------------------------------------------------

class ApiError(Exception):
    """A request the server refuses: turned into `{"error": {...}}` with `status`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
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


def _number(body: dict[str, Any], name: str, default: Any, lo: float, hi: float, integer: bool = False,
            lo_open: bool = False) -> Any:
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
        raise ApiError(400, f"{where} holds the lone surrogate {value[err.start]!r}, which is not valid Unicode "
                            "text", param=where) from None
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
            raise ApiError(400, f"'{penalty}' is not supported (use 0, or the 'repetition_penalty' extension)",
                           param=penalty)
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
                raise ApiError(400, f"'{legacy}' (the deprecated function-calling API) is not supported; use "
                                    "'tools'", param=legacy)
        fmt = body.get("response_format")
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise ApiError(400, "only response_format {'type': 'text'} is supported", param="response_format")
    else:
        logprobs = body.get("logprobs")
        if logprobs is not None:
            if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= MAX_LOGPROBS:
                raise ApiError(400, f"'logprobs' must be an integer from 0 to {MAX_LOGPROBS} (the top tokens to list "
                                    f"per position), got {logprobs!r}", param="logprobs")
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
            if not (isinstance(t, dict) and t.get("type") == "function" and isinstance(fn, dict)
                    and isinstance(fn.get("name"), str) and fn["name"]):
                raise ApiError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}} "
                                    "(only function tools are supported)", param=f"tools[{i}]")
            check_text(json.dumps(t, ensure_ascii=False), f"tools[{i}]")
    choice = body.get("tool_choice")
    if choice is not None and choice not in ("none", "auto"):
        raise ApiError(400, f"tool_choice {choice!r} is not supported; use 'auto' or 'none'", param="tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ApiError(400, f"'parallel_tool_calls' must be true or false, got {parallel!r}",
                       param="parallel_tool_calls")
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
                raise ApiError(400, f"chat_template_kwargs: only 'open_thinking' (or its alias 'enable_thinking') "
                                    f"is supported, got {str(key)[:50]!r}", param="chat_template_kwargs")
            if not isinstance(value, bool):
                raise ApiError(400, f"chat_template_kwargs.{key} must be true or false", param="chat_template_kwargs")
            o.thinking = value
    if o.thinking and not template_has_thinking(tokenizer):
        raise ApiError(400, "this model's chat template has no thinking mode (no 'open_thinking')",
                       param="chat_template_kwargs")
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
            raise ApiError(400, f"{at} must be {{'type': 'function', 'function': {{'name': ..., 'arguments': ...}}}}",
                           param=at)
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(check_text(args, f"{at}.function.arguments"))
            except (ValueError, RecursionError):
                raise ApiError(400, f"{at}.function.arguments is not JSON", param=f"{at}.function.arguments") from None
        if not isinstance(args, dict):
            raise ApiError(400, f"{at}.function.arguments must be a JSON object", param=f"{at}.function.arguments")
        entry: dict[str, Any] = {"type": "function",
                                 "function": {"name": check_text(fn["name"], f"{at}.function.name"), "arguments": args}}
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
            raise ApiError(400, f"{where}.role must be one of {sorted(CHAT_ROLES)}, got {role!r}",
                           param=f"{where}.role")
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
        msg: dict[str, Any] = {"role": "system" if role == "developer" else role,
                               "content": check_text(content, f"{where}.content")}
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
    return (isinstance(value, list) and bool(value)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value))


def parse_prompts(body: dict[str, Any]) -> list[str | list[int]]:
    """The completion prompts (OpenAI's forms): a string, a list of token ids, or a list of up to
    MAX_PROMPTS strings or token-id lists (one choice each, as lm-eval batches them)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _token_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _token_ids(p) for p in prompt):
        prompts = list(prompt)
    else:
        raise ApiError(400, "'prompt' is required: a string, a non-empty list of token ids, or a list of those",
                       param="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", param="prompt")
    return [check_text(p, f"prompt[{i}]" if len(prompts) > 1 else "prompt") if isinstance(p, str) else list(p)
            for i, p in enumerate(prompts)]


# -- generation -----------------------------------------------------------------------------------

Event = tuple[Any, ...]  # ("text", str) | ("done", finish_reason, completion_tokens) | ("error", message)


@dataclass
class Job:
    """One request's work: prompt ids, resolved sampling settings and where its events go."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def max_tokens(self) -> int:
        assert self.params.max_tokens is not None
        return self.params.max_tokens


def _holdback(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class _Row:
    """Per-request decoding state: tokens so far, text sent, stop strings, budget."""

    def __init__(self, job: Job, tokenizer: Any, scorer: Callable[[list[int], int], dict[str, Any]] | None = None
                 ) -> None:
        self.job, self.tokenizer, self.scorer = job, tokenizer, scorer
        self.ids: list[int] = []
        self.sent = ""
        self.produced = 0
        self.done = False

    def _send_upto(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.job.emit(("text", text[len(self.sent):]))
            self.sent = text

    def _first_stop(self, text: str) -> int:
        hits = [i for i in (text.find(s) for s in self.job.params.stop) if i >= 0]
        return min(hits) if hits else -1

    def push(self, token: int, eos_id: int | None) -> None:
        """Take the next token; finishes the row on eos, a stop string or the token budget."""
        self.produced += 1
        if eos_id is not None and token == eos_id:
            self.finish("stop")
            return
        self.ids.append(token)
        # A character whose bytes are not all there yet decodes to U+FFFD at the end; everything before
        # it is final (UTF-8 resynchronises), so stops are searched and text sent up to it.
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).rstrip("\ufffd")
        cut = self._first_stop(text)
        if cut >= 0:
            self._send_upto(text[:cut])
            self._end("stop")
            return
        self._send_upto(text[:len(text) - _holdback(text, self.job.params.stop)])
        if self.produced >= self.job.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        """Send the rest of the text (cut at a stop string) and end the row."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._first_stop(text)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        self._send_upto(text)
        self._end(reason)

    def _end(self, reason: str) -> None:
        self.done = True
        if self.job.params.logprobs is not None and self.scorer is not None:
            self.job.emit(("logprobs", self.scorer(self.job.prompt_ids + self.ids, self.job.params.logprobs)))
        self.job.emit(("done", reason, self.produced))


class Engine:
    """The model behind a worker thread: `submit(job)` queues a request; events flow back through `job.emit`."""

    def __init__(self, model: "LLM", tokenizer: Any, max_batch: int = 8, max_queue: int = 256) -> None:
        if max_batch < 1:
            raise LLMCoreError(f"--max-batch must be at least 1, got {max_batch}")
        if max_queue < 1:
            raise LLMCoreError(f"--max-queue must be at least 1, got {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = int(model.config.max_position_embeddings)
        self.eos_id = tokenizer.eos_id
        self._pending: deque[Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="llmcore-serve-worker", daemon=True)
        self.batches_run = 0  # counters for tests, benchmarks and logs
        self.max_batch_seen = 0
        self.tokens_produced = 0  # tokens handed to rows that were still listening
        self.rows_cancelled = 0  # running rows dropped because their client left
        self.busy = False  # a batch is running

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking work; queued requests get an error event; waits for the running batch."""
        with self._cv:
            self._closed = True
            pending, self._pending = list(self._pending), deque()
            self._cv.notify_all()
        for job in pending:
            job.emit(("error", "the server is shutting down"))
        if self._thread.is_alive():
            self._thread.join(timeout)

    def queued(self) -> int:
        with self._cv:
            return len(self._pending)

    def submit(self, job: Job) -> None:
        if job.params.max_tokens is None or len(job.prompt_ids) + job.max_tokens > self.context:
            raise ValueError("job.params.max_tokens must be resolved against the context before submit")
        with self._cv:
            if self._closed:
                raise ApiError(503, "the server is shutting down", type_="server_error")
            if len(self._pending) >= self.max_queue:
                raise ApiError(429, f"too many requests waiting ({self.max_queue}); retry later",
                               type_="rate_limit_error", code="queue_full")
            self._pending.append(job)
            self._cv.notify()

    def _take_batch(self) -> list[Job] | None:
        with self._cv:
            while True:
                while self._pending and self._pending[0].cancelled.is_set():
                    self._pending.popleft()
                if self._pending:
                    break
                if self._closed:
                    return None
                self._cv.wait()
            first = self._pending.popleft()
            batch = [first]
            key = first.params.batch_key()
            if key is None or self.max_batch == 1:
                return batch
            longest, budget = len(first.prompt_ids), first.max_tokens
            keep: deque[Job] = deque()
            while self._pending:
                job = self._pending.popleft()
                fits = max(longest, len(job.prompt_ids)) + max(budget, job.max_tokens) <= self.context
                if (len(batch) < self.max_batch and not job.cancelled.is_set() and fits
                        and job.params.batch_key() == key):
                    batch.append(job)
                    longest, budget = max(longest, len(job.prompt_ids)), max(budget, job.max_tokens)
                elif not job.cancelled.is_set():
                    keep.append(job)
            self._pending = keep
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            self.busy = True
            try:
                self._generate(batch)
            except Exception as err:  # the worker must survive anything one batch does
                log.exception("generation failed for a batch of %d", len(batch))
                for job in batch:
                    job.emit(("error", f"generation failed: {type(err).__name__}"))
            finally:
                self.busy = False

    def score(self, ids: list[int], top_n: int) -> dict[str, Any]:
        """Log-probabilities of `ids` under the model, one teacher-forced forward pass (the first token
        has none): `tokens` (each id decoded alone), `token_logprobs`, `top_logprobs` (per position the
        `top_n` likeliest tokens and the actual one, `{text: logprob}`; None when `top_n` is 0)."""
        import torch

        with torch.no_grad():
            x = torch.tensor([ids], device=self.model.embed_tokens.weight.device)
            logp = torch.log_softmax(self.model(x).logits[0, :-1].float(), dim=-1)
        actual = logp.gather(1, x[0, 1:, None]).squeeze(1).tolist()
        decode = self.tokenizer.decode
        top: list[dict[str, float] | None] | None = None
        if top_n > 0:
            top = [None]
            values, index = logp.topk(min(top_n, logp.shape[-1]), dim=-1)
            for lp, vs, js, tok in zip(actual, values.tolist(), index.tolist(), ids[1:]):
                entry: dict[str, float] = {}
                for v, j in zip(vs, js):
                    entry.setdefault(decode([j]), v)  # two ids may decode alike: keep the likelier
                entry.setdefault(decode([tok]), lp)
                top.append(entry)
        return {"tokens": [decode([i]) for i in ids], "token_logprobs": [None] + actual, "top_logprobs": top}

    def _generate(self, batch: list[Job]) -> None:
        import torch

        from llmcore.generate import generate_steps

        p = batch[0].params
        self.batches_run += 1
        self.max_batch_seen = max(self.max_batch_seen, len(batch))
        generator = torch.Generator(device=self.model.embed_tokens.weight.device)
        if p.seed is not None:
            generator.manual_seed(p.seed)
        else:
            generator.seed()
        rows = [_Row(job, self.tokenizer, self.score) for job in batch]
        steps = generate_steps(self.model, [job.prompt_ids for job in batch],
                               max_new_tokens=max(job.max_tokens for job in batch), temperature=p.temperature,
                               top_k=p.top_k, top_p=p.top_p, repetition_penalty=p.repetition_penalty,
                               eos_id=self.eos_id, generator=generator)
        try:
            for tokens, _active in steps:
                if self._closed:  # shutting down: end the running rows now rather than at their budget
                    for row in rows:
                        if not row.done:
                            row.done = True
                            row.job.emit(("error", "the server is shutting down"))
                    break
                for row, token in zip(rows, tokens.tolist()):
                    if row.done:
                        continue
                    if row.job.cancelled.is_set():
                        row.done = True  # nobody is listening; nothing to send
                        self.rows_cancelled += 1
                        continue
                    row.push(int(token), self.eos_id)
                    self.tokens_produced += 1
                if all(row.done for row in rows):
                    break
        finally:
            steps.close()
        for row in rows:
            if not row.done:  # generate_steps ended without this row's end (cannot happen; be safe)
                row.finish("length")


# -- the HTTP app ---------------------------------------------------------------------------------

@dataclass
class ServerOptions:
    """What the app needs besides the engine."""

    model_name: str
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    retriever: Any = None  # llmcore.rag.Retriever when --rag is given
    rag_k: int = 3
    default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS  # chat requests without max_tokens
    cors_origins: list[str] = field(default_factory=list)  # browser origins allowed to call the API
    ui: bool = True  # the chat page at / (llmcore.webui); --no-ui turns it off
    thinking: bool = False  # chat requests open the think block unless they say otherwise (--thinking)


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _AuthMiddleware:
    """Pure ASGI: refuse every HTTP request without `Authorization: Bearer KEY` (401), before any body is read."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            raw = scope.get("headers") or []
            headers = dict(raw)
            auth = headers.get(b"authorization", b"")
            given = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
            # Two Authorization headers are ambiguous (proxies disagree on which one counts): refused.
            repeated = sum(1 for k, _ in raw if k == b"authorization") > 1
            if repeated or not hmac.compare_digest(given, self.key):
                err = ApiError(401, "missing or incorrect API key: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key")
                await _refuse(err, scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _refuse(err: ApiError, scope: dict[str, Any], receive: Any, send: Any) -> None:
    from starlette.responses import JSONResponse

    await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)


def host_names_this_server(host_header: str) -> bool:
    """Whether a `Host` header value names a loopback server: an IP literal (a DNS-rebinding page is
    always reached through a name, never an address), `localhost` or `*.localhost`, any port."""
    import ipaddress

    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return host == "localhost" or host.endswith(".localhost")


class _LocalOnlyMiddleware:
    """Pure ASGI, for a server without an API key (which only binds loopback): a browser page from
    another site must not be able to use it. Refuses a `Host` that does not name this server (403:
    DNS rebinding) and a POST whose body is not `application/json` (415: a `text/plain` POST is a CORS
    "simple request" any page can send without a preflight), as Jupyter and Ollama do."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            host = headers.get(b"host", b"").decode("latin-1")
            if host and not host_names_this_server(host):
                await _refuse(ApiError(403, f"Host {host[:100]!r} does not name this server; a server without "
                                            "--api-key answers only localhost and IP addresses",
                                       code="host_not_allowed"), scope, receive, send)
                return
            if scope.get("method") == "POST":
                ctype = headers.get(b"content-type", b"").decode("latin-1").split(";", 1)[0].strip().lower()
                if ctype != "application/json":
                    await _refuse(ApiError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}",
                                           code="unsupported_media_type"), scope, receive, send)
                    return
        await self.app(scope, receive, send)


def check_api_key(api_key: str | None) -> None:
    """An API key that is set must be usable: an empty one (`--api-key ""`, `LLMCORE_API_KEY=` from an
    unset shell variable) would silently turn authentication off."""
    if api_key is None:
        return
    if not api_key.strip():
        raise LLMCoreError("--api-key (or LLMCORE_API_KEY) is empty, which would turn authentication off; "
                           "set a key, or unset LLMCORE_API_KEY and drop --api-key for a local key-less server")
    if api_key != api_key.strip() or not api_key.isprintable() or not api_key.isascii():
        raise LLMCoreError("--api-key (or LLMCORE_API_KEY) must be printable ASCII without surrounding spaces "
                           "(it travels in an HTTP header)")


def create_app(engine: Engine, options: ServerOptions) -> Any:
    """The FastAPI app for one engine (the engine's worker must be started by the caller)."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from starlette.concurrency import run_in_threadpool
        from starlette.exceptions import HTTPException as StarletteHTTPException
        from starlette.requests import ClientDisconnect
        from starlette.responses import JSONResponse, StreamingResponse
    except ImportError as err:
        raise LLMCoreError(f"llmcore serve needs FastAPI and uvicorn: {install_hint('serve')} ({err})") from err

    check_api_key(options.api_key)
    app = FastAPI(title="llmcore", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    tokenizer = engine.tokenizer
    # No token decodes to more characters than this, so text of more than `max_token_chars * context`
    # characters cannot fit the context: refused before any encoding or embedding work.
    max_token_chars = max(1, max((len(tokenizer.decode([i])) for i in range(tokenizer.vocab_size)), default=1))

    def check_size(chars: int, what: str, param: str) -> None:
        if chars > max_token_chars * engine.context:
            raise ApiError(400, f"{what} holds {chars} characters, more than fit this model's context of "
                                f"{engine.context} tokens", param=param, code="context_length_exceeded")

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(ApiError(400, f"invalid request: {err.errors()[:1]}").body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if err.status_code == 404 else None
        body = ApiError(err.status_code, str(err.detail), code=code).body()
        return JSONResponse(body, status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_request: Request, err: Exception) -> JSONResponse:
        log.error("internal error: %s: %s", type(err).__name__, err)
        return JSONResponse(ApiError(500, "internal server error", type_="server_error").body(), status_code=500)

    async def read_json(request: Request) -> dict[str, Any]:
        limit = options.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, f"request body is {int(length)} bytes; the limit is {limit}", code="body_too_large")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"request body is over the {limit}-byte limit", code="body_too_large")
                chunks.append(chunk)
        except ClientDisconnect:
            raise ApiError(400, "the client closed the connection before the body was complete") from None
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as err:
            raise ApiError(400, f"request body is not valid JSON ({str(err)[:200]})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body

    def check_model(body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is None:
            return  # lenient: the one model served
        if model != options.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server has {options.model_name!r}",
                           param="model", code="model_not_found")

    def resolve_max_tokens(prompt_ids: list[int], params: SamplingParams, default: int) -> None:
        room = engine.context - len(prompt_ids)
        if room < 1:
            raise ApiError(400, f"the prompt is {len(prompt_ids)} tokens; this model's context is {engine.context} "
                                "tokens, which leaves no room for a reply", param="messages",
                           code="context_length_exceeded")
        if params.max_tokens is None:
            params.max_tokens = min(default, room)
        elif params.max_tokens > room:
            raise ApiError(400, f"max_tokens ({params.max_tokens}) + the prompt ({len(prompt_ids)} tokens) is more "
                                f"than this model's context of {engine.context} tokens; use max_tokens <= {room}",
                           param="max_tokens", code="context_length_exceeded")

    async def rag_messages(messages: list[dict[str, str]], params: SamplingParams) -> list[dict[str, str]]:
        """The conversation with its last user message asked as `rag query --answer` asks it: the top passages
        (fitted to the context left after the reply and the earlier turns) in `answer_messages`' prompt."""
        from llmcore.rag import answer_messages, fit_passages

        last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last is None:
            raise ApiError(400, "with retrieval on, the messages need a user message (the question)", param="messages")
        question = messages[last]["content"]
        if not question.strip():
            raise ApiError(400, "the last user message (the question) is empty", param="messages")
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        history = [m for m in messages[:last] if m["role"] != "system"]
        reserve = params.max_tokens if params.max_tokens is not None else min(options.default_max_tokens,
                                                                              engine.context // 2)
        # A question that cannot fit is refused before it is embedded (embedding cost grows with its length).
        n_question = len(await run_in_threadpool(tokenizer.encode_text, question))
        if n_question + reserve >= engine.context:
            raise ApiError(400, f"the question is {n_question} tokens; with {reserve} for the reply it does not fit "
                                f"this model's context of {engine.context} tokens", param="messages",
                           code="context_length_exceeded")
        # The Retriever is safe to share across threads (it locks only its index call; docs/INTERNALS.md).
        passages = await run_in_threadpool(options.retriever.search, question, options.rag_k)
        history_tokens = len(await run_in_threadpool(chat_ids, history)) if history else 0
        try:
            context = await run_in_threadpool(fit_passages, tokenizer, question, passages,
                                              engine.context - reserve - history_tokens, system)
        except LLMCoreError as err:
            raise ApiError(400, str(err), param="messages", code="context_length_exceeded") from None
        grounded = answer_messages(question, context, system)
        return grounded[:-1] + history + grounded[-1:] + messages[last + 1:]

    def chat_ids(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                 thinking: bool = False) -> list[int]:
        import jinja2

        from llmcore.chat_format import prompt_ids

        try:
            # Special-token strings inside message content stay plain text: a client cannot forge turns.
            return prompt_ids(tokenizer, messages, tools=tools, thinking=thinking)
        except (jinja2.TemplateError, LLMCoreError) as err:
            raise ApiError(400, f"the chat template refused these messages: {err}", param="messages") from None

    def start(prompt_ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop
              ) -> tuple[Job, "asyncio.Queue[Event]"]:
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is gone (server stopped)
                pass

        job = Job(prompt_ids, params, emit)
        engine.submit(job)
        return job, events

    async def collect(request: Request, job: Job, events: "asyncio.Queue[Event]"
                      ) -> tuple[str, str, int, dict[str, Any] | None]:
        """Wait for the whole answer, polling for a client that went away: text, finish reason,
        completion tokens and the scored tokens (`Engine.score`) when logprobs were asked for."""
        parts: list[str] = []
        scored: dict[str, Any] | None = None
        next_check = time.monotonic() + DISCONNECT_POLL_S
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    event = None
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + DISCONNECT_POLL_S
                    if await request.is_disconnected():
                        job.cancelled.set()
                        raise ApiError(499, "client closed the request")
                if event is None:
                    continue
                if event[0] == "text":
                    parts.append(event[1])
                elif event[0] == "logprobs":
                    scored = event[1]
                elif event[0] == "done":
                    return "".join(parts), event[1], event[2], scored
                else:
                    raise ApiError(503, event[1], type_="server_error")
        finally:
            job.cancelled.set()  # a no-op once done; frees the row if this handler is cancelled

    async def stream(job: Job, events: "asyncio.Queue[Event]", make_chunk: Callable[[Any, str | None], dict],
                     n_prompt: int, include_usage: bool, first: dict | None, t0: float,
                     shape: Callable[[str | None], list[Any]] = lambda text: [text] if text else [],
                     finish_reason: Callable[[str], str] = lambda reason: reason) -> AsyncIterator[bytes]:
        """SSE chunks of one request: `shape(text)` turns each text event (None at the end) into chunk
        payloads for `make_chunk`; `finish_reason` may rename the final reason."""
        try:
            if first is not None:
                yield _sse(first)
            while True:
                event = await events.get()
                if event[0] == "text":
                    for payload in shape(event[1]):
                        yield _sse(make_chunk(payload, None))
                elif event[0] == "done":
                    for payload in shape(None):
                        yield _sse(make_chunk(payload, None))
                    final = make_chunk(None, finish_reason(event[1]))
                    usage = _usage(n_prompt, event[2])
                    if not include_usage:
                        final["usage"] = usage
                    yield _sse(final)
                    if include_usage:
                        yield _sse({**make_chunk(None, None), "choices": [], "usage": usage})
                    log.info("%s: %d prompt + %d completion tokens in %.2fs (%s)", final["id"], n_prompt, event[2],
                             time.perf_counter() - t0, event[1])
                    break
                else:
                    yield _sse(ApiError(503, event[1], type_="server_error").body())
                    break
            yield b"data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # client gone (generator closed) or done: free the row

    sse_headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    def model_card() -> dict[str, Any]:
        return {"id": options.model_name, "object": "model", "created": created, "owned_by": "llmcore",
                "context_length": engine.context}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != options.model_name:
            raise ApiError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        t0 = time.perf_counter()
        body = await read_json(request)
        check_model(body)
        messages = parse_messages(body)
        params = parse_sampling(body, chat=True)
        chat = parse_chat_options(body, tokenizer, options.thinking)
        if len(messages) > engine.context:  # every message takes at least one token of the template
            raise ApiError(400, f"{len(messages)} messages cannot fit this model's context of {engine.context} "
                                "tokens", param="messages", code="context_length_exceeded")
        check_size(sum(len(m["content"]) + len(json.dumps(m.get("tool_calls", ""), ensure_ascii=False))
                       for m in messages) + len(json.dumps(chat.tools or "", ensure_ascii=False)),
                   "the messages", "messages")
        if options.retriever is not None:
            messages = await rag_messages(messages, params)
        # a long prompt must not stall other clients
        prompt_ids = await run_in_threadpool(chat_ids, messages, chat.tools, chat.thinking)
        resolve_max_tokens(prompt_ids, params, options.default_max_tokens)
        job, events = start(prompt_ids, params, asyncio.get_running_loop())
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        # Reasoning and tool calls are split out of the text by one parser, streamed or not (chat_format).
        parser = OutputParser(thinking=chat.thinking, tools=chat.parse_tools)
        calls: list[ToolCall] = []

        def deltas(text: str | None) -> list[dict[str, Any]]:
            out = []
            for kind, value in (parser.feed(text) if text is not None else parser.finish()):
                if kind == "tool_call":
                    if chat.parallel_tool_calls or not calls:
                        out.append({"tool_calls": [value.to_openai(index=len(calls))]})
                        calls.append(value)
                else:
                    out.append({"reasoning_content" if kind == "reasoning" else "content": value})
            return out

        def finish_reason(reason: str) -> str:
            return "tool_calls" if calls and reason == "stop" else reason

        if params.stream:
            def chunk(delta: dict[str, Any] | None, finish: str | None) -> dict[str, Any]:
                return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": options.model_name,
                        "system_fingerprint": None,
                        "choices": [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}]}

            return StreamingResponse(stream(job, events, chunk, len(prompt_ids), params.include_usage,
                                            chunk({"role": "assistant", "content": ""}, None), t0,
                                            shape=deltas, finish_reason=finish_reason),
                                     media_type="text/event-stream", headers=sse_headers)
        text, finish, n, _ = await collect(request, job, events)
        deltas(text)
        deltas(None)
        log.info("%s: %d prompt + %d completion tokens in %.2fs (%s)", rid, len(prompt_ids), n,
                 time.perf_counter() - t0, finish)
        message: dict[str, Any] = {"role": "assistant", "content": parser.content if parser.content or not calls
                                   else None}
        if parser.reasoning is not None:
            message["reasoning_content"] = parser.reasoning
        if calls:
            message["tool_calls"] = [c.to_openai() for c in calls]
        return {"id": rid, "object": "chat.completion", "created": now, "model": options.model_name,
                "system_fingerprint": None,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(finish)}],
                "usage": _usage(len(prompt_ids), n)}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        t0 = time.perf_counter()
        body = await read_json(request)
        check_model(body)
        prompts = parse_prompts(body)
        params = parse_sampling(body, chat=False)
        if params.stream and len(prompts) > 1:
            raise ApiError(400, "stream: true takes one prompt per request", param="prompt")
        check_size(sum(len(p) for p in prompts), "the prompt", "prompt")
        all_ids: list[list[int]] = []
        all_params: list[SamplingParams] = []
        for prompt in prompts:
            if isinstance(prompt, str):  # as `llmcore generate`: bos in front
                ids = [tokenizer.bos_id] + await run_in_threadpool(tokenizer.encode, prompt)
            else:
                bad = next((t for t in prompt if not 0 <= t < engine.model.config.vocab_size), None)
                if bad is not None:
                    raise ApiError(400, f"token id {bad} is outside the vocabulary", param="prompt")
                ids = prompt
            p = dataclasses.replace(params)  # each prompt's own budget (the room left differs)
            resolve_max_tokens(ids, p, DEFAULT_COMPLETION_MAX_TOKENS)
            all_ids.append(ids)
            all_params.append(p)
        loop = asyncio.get_running_loop()
        started: list[tuple[Job, "asyncio.Queue[Event]"]] = []
        try:
            for ids, p in zip(all_ids, all_params):
                started.append(start(ids, p, loop))
        except ApiError:  # the queue filled up part way: the ones already queued are dropped
            for job, _ in started:
                job.cancelled.set()
            raise
        rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if params.stream:
            (job, events), prompt_ids = started[0], all_ids[0]

            def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
                return {"id": rid, "object": "text_completion", "created": now, "model": options.model_name,
                        "system_fingerprint": None,
                        "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}

            return StreamingResponse(stream(job, events, chunk, len(prompt_ids), params.include_usage, None, t0),
                                     media_type="text/event-stream", headers=sse_headers)
        tasks = [asyncio.ensure_future(collect(request, job, events)) for job, events in started]
        try:
            results = await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # one failed or the client left: the others stop too (a no-op once done)
                task.cancel()
        choices, n_total = [], 0
        for index, (prompt, prompt_ids, (text, finish, n, scored)) in enumerate(zip(prompts, all_ids, results)):
            n_total += n
            logprobs = None
            if scored is not None:  # OpenAI's legacy logprobs object; with echo it covers the prompt's tokens too
                first = 0 if params.echo else len(prompt_ids)
                tokens = scored["tokens"][first:]
                offsets, at = [], 0
                for t in tokens:
                    offsets.append(at)
                    at += len(t)
                top = scored["top_logprobs"]
                logprobs = {"tokens": tokens, "token_logprobs": scored["token_logprobs"][first:],
                            "top_logprobs": top[first:] if top is not None else None, "text_offset": offsets}
            if params.echo:
                text = (prompt if isinstance(prompt, str) else tokenizer.decode(prompt_ids)) + text
            choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
        n_prompt = sum(len(ids) for ids in all_ids)
        log.info("%s: %d prompt(s), %d prompt + %d completion tokens in %.2fs", rid, len(prompts), n_prompt, n_total,
                 time.perf_counter() - t0)
        return {"id": rid, "object": "text_completion", "created": now, "model": options.model_name,
                "system_fingerprint": None, "choices": choices, "usage": _usage(n_prompt, n_total)}

    asgi: Any = _AuthMiddleware(app, options.api_key) if options.api_key is not None else _LocalOnlyMiddleware(app)
    if options.ui:  # the page's static files answer outside the key and Host checks; /ui/info stays inside
        from llmcore.webui import mount_ui, page_info

        asgi = mount_ui(app, asgi, lambda: page_info(engine, options))
    if options.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        # Outermost, so a browser's preflight (which never carries the key) is answered here.
        asgi = CORSMiddleware(asgi, allow_origins=options.cors_origins, allow_methods=["GET", "POST", "OPTIONS"],
                              allow_headers=["Authorization", "Content-Type"])
    return asgi


# -- running --------------------------------------------------------------------------------------

def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0 = a free one); LLMCoreError when it cannot bind."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise LLMCoreError(f"--host {host}: cannot resolve ({err})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise LLMCoreError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.set_inheritable(True)
    return sock


class RunningServer:
    """A uvicorn server on its own thread (for tests and benchmarks): `.url`, `.stop()`."""

    def __init__(self, app: Any, sock: socket.socket, engine: Engine | None = None, log_level: str = "warning") -> None:
        import uvicorn

        self.sock, self.engine = sock, engine
        host, port = sock.getsockname()[:2]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2,
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True,
                                       name="llmcore-serve-http")

    def start(self, timeout: float = 30.0) -> "RunningServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise LLMCoreError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        if self.engine is not None:
            self.engine.close()
        self.sock.close()


def open_retriever(index_dir: str | Path) -> Any:
    """`llmcore.rag.Retriever.open(index_dir)`, or a clear error when RAG is not installed."""
    try:
        from llmcore.rag import Retriever
    except ImportError as err:
        raise LLMCoreError(f"--rag needs llmcore's RAG part and its extra: {install_hint('rag')} ({err})") from None
    if not Path(index_dir).is_dir():
        raise LLMCoreError(f"--rag {index_dir}: no such directory (make one with `llmcore rag index`)")
    return Retriever.open(index_dir)


def is_loopback(address: str) -> bool:
    """Whether a bound address is reachable only from this machine."""
    import ipaddress

    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return address == "localhost"


def serve(ckpt: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          api_key: str | None = None, model_name: str | None = None, tokenizer_dir: str | Path | None = None,
          rag: str | Path | None = None, rag_k: int = 3, max_batch: int = 8, max_queue: int = 256,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, log_level: str = "info", ui: bool = True,
          cors_origins: list[str] | None = None, default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS,
          on_ready: Callable[[str], None] | None = None, thinking: bool = False) -> None:
    """Load the checkpoint and serve it until interrupted (Ctrl-C / SIGTERM)."""
    try:
        import uvicorn
    except ImportError as err:
        raise LLMCoreError(f"llmcore serve needs FastAPI and uvicorn: {install_hint('serve')} ({err})") from None
    from llmcore.checkpoint import load_model_and_tokenizer
    from llmcore.common import default_attn_backend, resolve_device

    if rag_k < 1:
        raise LLMCoreError(f"--rag-k must be at least 1, got {rag_k}")
    if max_body_bytes < 1024:
        raise LLMCoreError(f"--max-body-bytes must be at least 1024, got {max_body_bytes}")
    if default_max_tokens < 1:
        raise LLMCoreError(f"--default-max-tokens must be at least 1, got {default_max_tokens}")
    if max_batch < 1 or max_queue < 1:
        raise LLMCoreError(f"--max-batch and --max-queue must be at least 1, got {max_batch} and {max_queue}")
    check_api_key(api_key)
    dev = resolve_device(device)
    sock = bind_socket(host, port)  # before the slow loads: a taken port or bad host fails at once
    try:
        if api_key is None and not is_loopback(sock.getsockname()[0]):
            raise LLMCoreError(f"--host {host} is reachable from other machines: set --api-key (or "
                               "LLMCORE_API_KEY), or bind 127.0.0.1 (a key-less server answers only this machine)")
        retriever = open_retriever(rag) if rag is not None else None
        # A tokenizer is required, and --tokenizer must fit the model (vocab size, special ids, stored vocabulary).
        model, tok = load_model_and_tokenizer(ckpt, dev, attn_backend=default_attn_backend(dev), tokenizer=tokenizer_dir)
        if thinking:
            from llmcore.chat_format import check_thinking

            check_thinking(tok)
    except BaseException:
        sock.close()
        raise
    name = model_name or Path(ckpt).expanduser().resolve().name
    engine = Engine(model, tok, max_batch=max_batch, max_queue=max_queue).start()
    app = create_app(engine, ServerOptions(model_name=name, api_key=api_key, max_body_bytes=max_body_bytes,
                                           retriever=retriever, rag_k=rag_k, cors_origins=list(cors_origins or []), ui=ui,
                                           default_max_tokens=default_max_tokens, thinking=thinking))
    bound_port = sock.getsockname()[1]
    url = f"http://{host}:{bound_port}/v1"
    if on_ready is not None:
        on_ready(f"serving {name!r} on {dev} at {url} (batch up to {max_batch}, queue {max_queue}"
                 f"{', API key required' if api_key else ''}{', RAG ' + str(rag) if rag else ''})"
                 f"{'; chat page at ' + url[:-len('/v1')] + '/' if ui else ''}")
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
        sock.close()


# -- CLI ------------------------------------------------------------------------------------------

def register(app: Any) -> None:
    """Add `serve` to the root Typer app."""
    import typer

    from llmcore.common import DEVICE_HELP

    @app.command("serve")
    def serve_cmd(
        ckpt: Path = typer.Option(..., "--ckpt", help="run dir, checkpoint dir or exported HF folder"),
        host: str = typer.Option("127.0.0.1", "--host", help="address to bind; anything but 127.0.0.1 is reachable "
                                 "from other machines"),
        port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port (0 = any free one)"),
        device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
        api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LLMCORE_API_KEY",
                                              help="require 'Authorization: Bearer KEY' on every request"),
        model_name: Optional[str] = typer.Option(None, "--model-name", help="model id clients use "
                                                 "(default: the --ckpt folder's name)"),
        tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer dir (default: the checkpoint's)"),
        rag: Optional[Path] = typer.Option(None, "--rag", help="index dir from `llmcore rag index`: chat answers "
                                           "get the top passages as context, as `rag query --answer`"),
        rag_k: int = typer.Option(3, "--rag-k", help="passages retrieved per question with --rag"),
        max_batch: int = typer.Option(8, "--max-batch", help="requests with the same sampling settings that run "
                                      "together as one batch (1 = strictly one at a time)"),
        default_max_tokens: int = typer.Option(DEFAULT_CHAT_MAX_TOKENS, "--default-max-tokens",
                                               help="reply length of a chat request that sets no max_tokens "
                                                    "(capped by the context left)"),
        max_queue: int = typer.Option(256, "--max-queue", help="requests that may wait; more get 429"),
        max_body_bytes: int = typer.Option(DEFAULT_MAX_BODY_BYTES, "--max-body-bytes",
                                           help="larger request bodies get 413"),
        log_level: str = typer.Option("info", "--log-level", help="uvicorn log level: debug, info, warning, error"),
        cors_origin: Optional[list[str]] = typer.Option(None, "--cors-origin", help="a web page origin allowed to "
                                                        "call the API from a browser (repeatable; '*' = any)"),
        no_ui: bool = typer.Option(False, "--no-ui", help="do not serve the chat page at / (the API is unchanged)"),
        thinking: bool = typer.Option(False, "--thinking", help="chat requests open the think block (MiniMind-3's "
                                      "open_thinking) unless they send chat_template_kwargs {\"open_thinking\": false}; "
                                      "the reasoning is returned as reasoning_content"),
    ) -> None:
        """Serve a checkpoint over an OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions, /v1/models.

        Example: llmcore serve --ckpt runs/dpo --port 8000   then
        curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json'
        -d '{"model": "dpo", "messages": [{"role": "user", "content": "你好"}]}'
        """
        if log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise LLMCoreError(f"--log-level {log_level!r}: expected debug, info, warning or error")
        log.setLevel(logging.DEBUG if log_level == "trace" else getattr(logging, log_level.upper()))
        if api_key is None and os.environ.get("LLMCORE_API_KEY") is not None:
            api_key = os.environ["LLMCORE_API_KEY"]  # set but empty: click treats it as unset; refused below
        serve(ckpt, host=host, port=port, device=device, api_key=api_key, model_name=model_name,
              tokenizer_dir=tokenizer, rag=rag, rag_k=rag_k, max_batch=max_batch, max_queue=max_queue,
              max_body_bytes=max_body_bytes, log_level=log_level, cors_origins=cors_origin, ui=not no_ui,
              default_max_tokens=default_max_tokens, thinking=thinking,
              on_ready=lambda line: typer.echo(line, err=True))
