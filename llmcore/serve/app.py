"""The FastAPI app: OpenAI's routes over one response path, the security layers, the chat page, `--rag`.

Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models` (and
`GET /v1/models/{id}`), with OpenAI's request fields, response objects, server-sent-event chunks
(ending with `data: [DONE]`) and `{"error": {...}}` bodies.

Invariants:
- Both completion routes take one path (`_Api.respond`): read the body (at most `max_body_bytes`),
  check the model, let the route turn the body into jobs (`_Api.prepare_chat`/`prepare_completion`:
  prompt ids exactly as `llmcore generate` renders them, `[bos] + encode(prompt)` for completions, the
  tokenizer's chat template with the generation prompt for chat), fit each reply's budget to the
  context, queue the jobs on the scheduler, then stream or collect. Only the output's shape differs
  per route (`_ChatShape`, `_CompletionShape`).
- Stop-safe streaming: the scheduler emits text only once it is whole characters and cannot be the
  start of a stop string, and both paths build their text from the same events, so the streamed
  pieces join to exactly the non-streamed text. Chat output is split by one
  `llmcore.chat_format.OutputParser` per request, streamed or not: reasoning into
  `reasoning_content`, `<tool_call>` blocks (when the request has tools) into `tool_calls` with
  `finish_reason: "tool_calls"`; a block that is not a valid call stays content.
- A client that goes away (closed stream, dropped connection, polled every `DISCONNECT_POLL_S` while
  a non-streamed reply is collected) marks its jobs cancelled, which frees their rows.
- Bad requests get an OpenAI-style JSON error with a 4xx status (`ApiError`, also for FastAPI's own
  404/405/validation errors); anything else is a 500 with no detail: no traceback ever reaches a
  client. Text longer than the context could hold is refused before it is tokenized or embedded.
- The security rules of `llmcore.serve.security` wrap the whole app (key, or Host + JSON-only without
  one); the chat page's static files answer outside them, `/ui/info` inside; CORS, when asked for,
  is outermost so a browser's preflight (which never carries the key) is answered.
- Importing this module needs neither torch nor FastAPI; both are imported when an app is built.
"""

# No `from __future__ import annotations`: FastAPI reads the route functions' annotations (Request)
# as objects, and those classes are imported inside create_app.
import asyncio
import dataclasses
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

from llmcore.chat_format import OutputParser, ToolCall
from llmcore.errors import LLMCoreError, install_hint
from llmcore.serve.requests import (
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_COMPLETION_MAX_TOKENS,
    DEFAULT_MAX_BODY_BYTES,
    ApiError,
    ChatOptions,
    SamplingParams,
    parse_chat_options,
    parse_messages,
    parse_prompts,
    parse_sampling,
)
from llmcore.serve.scheduler import BatchScheduler, Event, Job
from llmcore.serve.security import _AuthMiddleware, _LocalOnlyMiddleware, check_api_key

log = logging.getLogger("llmcore.serve")  # one logger for the package (`--log-level` sets it)

DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is still there
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class ServerOptions:
    """What the app needs besides the scheduler."""

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


# -- the two routes' output shapes ----------------------------------------------------------------

Result = tuple[str, str, int, "dict[str, Any] | None"]  # text, finish reason, completion tokens, scored


class _ChatShape:
    """`chat.completion` output: reasoning, content and tool calls split out of the text by one parser."""

    id_prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, chat: ChatOptions) -> None:
        self.parallel = chat.parallel_tool_calls
        self.parser = OutputParser(thinking=chat.thinking, tools=chat.parse_tools)
        self.calls: list[ToolCall] = []

    def first(self) -> dict[str, Any] | None:
        return {"role": "assistant", "content": ""}

    def pieces(self, text: str | None) -> list[dict[str, Any]]:
        """The deltas of one text event (None: the end of the text)."""
        out = []
        for kind, value in self.parser.feed(text) if text is not None else self.parser.finish():
            if kind == "tool_call":
                if self.parallel or not self.calls:
                    out.append({"tool_calls": [value.to_openai(index=len(self.calls))]})
                    self.calls.append(value)
            else:
                out.append({"reasoning_content" if kind == "reasoning" else "content": value})
        return out

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.calls and reason == "stop" else reason

    def chunk_choice(self, delta: dict[str, Any] | None, finish: str | None) -> dict[str, Any]:
        return {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}

    def choices(self, results: list[Result], _ids: list[list[int]]) -> list[dict[str, Any]]:
        ((text, finish, _n, _scored),) = results
        self.pieces(text)
        self.pieces(None)
        parser, calls = self.parser, self.calls
        message: dict[str, Any] = {
            "role": "assistant",
            "content": parser.content if parser.content or not calls else None,
        }
        if parser.reasoning is not None:
            message["reasoning_content"] = parser.reasoning
        if calls:
            message["tool_calls"] = [c.to_openai() for c in calls]
        return [{"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish_reason(finish)}]


class _CompletionShape:
    """`text_completion` output: the text, with the prompt in front (`echo`) and OpenAI's legacy logprobs."""

    id_prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def __init__(self, prompts: list[str | list[int]], echo: bool, tokenizer: Any) -> None:
        self.prompts, self.echo, self.tokenizer = prompts, echo, tokenizer

    def first(self) -> dict[str, Any] | None:
        return None

    def pieces(self, text: str | None) -> list[str | None]:
        return [text] if text else []

    def finish_reason(self, reason: str) -> str:
        return reason

    def chunk_choice(self, text: str | None, finish: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    def choices(self, results: list[Result], all_ids: list[list[int]]) -> list[dict[str, Any]]:
        choices = []
        for index, (prompt, prompt_ids, (text, finish, _n, scored)) in enumerate(zip(self.prompts, all_ids, results)):
            logprobs = None
            if scored is not None:  # OpenAI's legacy logprobs object; with echo it covers the prompt's tokens too
                first = 0 if self.echo else len(prompt_ids)
                tokens = scored["tokens"][first:]
                offsets, at = [], 0
                for t in tokens:
                    offsets.append(at)
                    at += len(t)
                top = scored["top_logprobs"]
                logprobs = {
                    "tokens": tokens,
                    "token_logprobs": scored["token_logprobs"][first:],
                    "top_logprobs": top[first:] if top is not None else None,
                    "text_offset": offsets,
                }
            if self.echo:
                text = (prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt_ids)) + text
            choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
        return choices


@dataclass
class _Prepared:
    """A request ready to queue: one prompt (ids) and sampling settings per choice, and its output shape."""

    ids: list[list[int]]
    params: list[SamplingParams]
    shape: Any  # _ChatShape | _CompletionShape
    stream: bool
    include_usage: bool


# -- the request path shared by both routes -------------------------------------------------------


class _Api:
    """What the routes share: the scheduler, the options, body reading, budgets, queueing, streaming."""

    def __init__(self, engine: BatchScheduler, options: ServerOptions) -> None:
        self.engine, self.options, self.tokenizer = engine, options, engine.tokenizer
        self.created = int(time.time())
        tokenizer = engine.tokenizer
        # No token decodes to more characters than this, so text of more than `max_token_chars * context`
        # characters cannot fit the context: refused before any encoding or embedding work.
        self.max_token_chars = max(1, max((len(tokenizer.decode([i])) for i in range(tokenizer.vocab_size)), default=1))

    # -- checks --

    def check_size(self, chars: int, what: str, param: str) -> None:
        context = self.engine.context
        if chars > self.max_token_chars * context:
            raise ApiError(
                400,
                f"{what} holds {chars} characters, more than fit this model's context of {context} tokens",
                param=param,
                code="context_length_exceeded",
            )

    async def read_json(self, request: Any) -> dict[str, Any]:
        from starlette.requests import ClientDisconnect

        limit = self.options.max_body_bytes
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

    def check_model(self, body: dict[str, Any]) -> None:
        model, name = body.get("model"), self.options.model_name
        if model is None:
            return  # lenient: the one model served
        if model != name:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this server has {name!r}",
                param="model",
                code="model_not_found",
            )

    def resolve_max_tokens(self, prompt_ids: list[int], params: SamplingParams, default: int) -> None:
        context = self.engine.context
        room = context - len(prompt_ids)
        if room < 1:
            raise ApiError(
                400,
                f"the prompt is {len(prompt_ids)} tokens; this model's context is {context} "
                "tokens, which leaves no room for a reply",
                param="messages",
                code="context_length_exceeded",
            )
        if params.max_tokens is None:
            params.max_tokens = min(default, room)
        elif params.max_tokens > room:
            raise ApiError(
                400,
                f"max_tokens ({params.max_tokens}) + the prompt ({len(prompt_ids)} tokens) is more "
                f"than this model's context of {context} tokens; use max_tokens <= {room}",
                param="max_tokens",
                code="context_length_exceeded",
            )

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.options.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "llmcore",
            "context_length": self.engine.context,
        }

    # -- the routes' own parts: a body to prompt ids --

    def chat_ids(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, thinking: bool = False
    ) -> list[int]:
        import jinja2

        from llmcore.chat_format import prompt_ids

        try:
            # Special-token strings inside message content stay plain text: a client cannot forge turns.
            return prompt_ids(self.tokenizer, messages, tools=tools, thinking=thinking)
        except (jinja2.TemplateError, LLMCoreError) as err:
            raise ApiError(400, f"the chat template refused these messages: {err}", param="messages") from None

    async def rag_messages(self, messages: list[dict[str, str]], params: SamplingParams) -> list[dict[str, str]]:
        """The conversation with its last user message asked as `rag query --answer` asks it: the top passages
        (fitted to the context left after the reply and the earlier turns) in `answer_messages`' prompt."""
        from starlette.concurrency import run_in_threadpool

        from llmcore.rag import answer_messages, fit_passages

        options, context = self.options, self.engine.context
        last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last is None:
            raise ApiError(400, "with retrieval on, the messages need a user message (the question)", param="messages")
        question = messages[last]["content"]
        if not question.strip():
            raise ApiError(400, "the last user message (the question) is empty", param="messages")
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        history = [m for m in messages[:last] if m["role"] != "system"]
        reserve = params.max_tokens if params.max_tokens is not None else min(options.default_max_tokens, context // 2)
        # A question that cannot fit is refused before it is embedded (embedding cost grows with its length).
        n_question = len(await run_in_threadpool(self.tokenizer.encode_text, question))
        if n_question + reserve >= context:
            raise ApiError(
                400,
                f"the question is {n_question} tokens; with {reserve} for the reply it does not fit "
                f"this model's context of {context} tokens",
                param="messages",
                code="context_length_exceeded",
            )
        # The Retriever is safe to share across threads (it locks only its index call; docs/INTERNALS.md).
        passages = await run_in_threadpool(options.retriever.search, question, options.rag_k)
        history_tokens = len(await run_in_threadpool(self.chat_ids, history)) if history else 0
        try:
            fitted = await run_in_threadpool(
                fit_passages, self.tokenizer, question, passages, context - reserve - history_tokens, system
            )
        except LLMCoreError as err:
            raise ApiError(400, str(err), param="messages", code="context_length_exceeded") from None
        grounded = answer_messages(question, fitted, system)
        return grounded[:-1] + history + grounded[-1:] + messages[last + 1 :]

    async def prepare_chat(self, body: dict[str, Any]) -> _Prepared:
        from starlette.concurrency import run_in_threadpool

        context = self.engine.context
        messages = parse_messages(body)
        params = parse_sampling(body, chat=True)
        chat = parse_chat_options(body, self.tokenizer, self.options.thinking)
        if len(messages) > context:  # every message takes at least one token of the template
            raise ApiError(
                400,
                f"{len(messages)} messages cannot fit this model's context of {context} tokens",
                param="messages",
                code="context_length_exceeded",
            )
        self.check_size(
            sum(len(m["content"]) + len(json.dumps(m.get("tool_calls", ""), ensure_ascii=False)) for m in messages)
            + len(json.dumps(chat.tools or "", ensure_ascii=False)),
            "the messages",
            "messages",
        )
        if self.options.retriever is not None:
            messages = await self.rag_messages(messages, params)
        # a long prompt must not stall other clients
        prompt_ids = await run_in_threadpool(self.chat_ids, messages, chat.tools, chat.thinking)
        self.resolve_max_tokens(prompt_ids, params, self.options.default_max_tokens)
        return _Prepared([prompt_ids], [params], _ChatShape(chat), params.stream, params.include_usage)

    async def prepare_completion(self, body: dict[str, Any]) -> _Prepared:
        from starlette.concurrency import run_in_threadpool

        tokenizer = self.tokenizer
        prompts = parse_prompts(body)
        params = parse_sampling(body, chat=False)
        if params.stream and len(prompts) > 1:
            raise ApiError(400, "stream: true takes one prompt per request", param="prompt")
        self.check_size(sum(len(p) for p in prompts), "the prompt", "prompt")
        all_ids: list[list[int]] = []
        all_params: list[SamplingParams] = []
        for prompt in prompts:
            if isinstance(prompt, str):  # as `llmcore generate`: bos in front
                ids = [tokenizer.bos_id] + await run_in_threadpool(tokenizer.encode, prompt)
            else:
                bad = next((t for t in prompt if not 0 <= t < self.engine.model.config.vocab_size), None)
                if bad is not None:
                    raise ApiError(400, f"token id {bad} is outside the vocabulary", param="prompt")
                ids = prompt
            p = dataclasses.replace(params)  # each prompt's own budget (the room left differs)
            self.resolve_max_tokens(ids, p, DEFAULT_COMPLETION_MAX_TOKENS)
            all_ids.append(ids)
            all_params.append(p)
        return _Prepared(
            all_ids, all_params, _CompletionShape(prompts, params.echo, tokenizer), params.stream, params.include_usage
        )

    # -- the shared path: queue, then stream or collect --

    async def respond(self, request: Any, prepare: Callable[[dict[str, Any]], Awaitable[_Prepared]]) -> Any:
        """One completion request from body to response, for both routes."""
        from starlette.responses import StreamingResponse

        t0 = time.perf_counter()
        body = await self.read_json(request)
        self.check_model(body)
        prep = await prepare(body)
        started = self.start_all(prep)
        rid, now = f"{prep.shape.id_prefix}-{uuid.uuid4().hex[:24]}", int(time.time())
        if prep.stream:
            ((job, events),) = started
            return StreamingResponse(
                self.stream(job, events, rid, now, prep.shape, len(prep.ids[0]), prep.include_usage, t0),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )
        tasks = [asyncio.ensure_future(self.collect(request, job, events)) for job, events in started]
        try:
            results = await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # one failed or the client left: the others stop too (a no-op once done)
                task.cancel()
        choices = prep.shape.choices(results, prep.ids)
        n_prompt, n_total = sum(len(ids) for ids in prep.ids), sum(r[2] for r in results)
        log.info(
            "%s: %d prompt(s), %d prompt + %d completion tokens in %.2fs (%s)",
            rid,
            len(results),
            n_prompt,
            n_total,
            time.perf_counter() - t0,
            ", ".join(r[1] for r in results),
        )
        return {
            "id": rid,
            "object": prep.shape.object,
            "created": now,
            "model": self.options.model_name,
            "system_fingerprint": None,
            "choices": choices,
            "usage": _usage(n_prompt, n_total),
        }

    def start_all(self, prep: _Prepared) -> list[tuple[Job, "asyncio.Queue[Event]"]]:
        """Queue one job per prompt; when the queue fills part way, the ones already queued are dropped."""
        loop = asyncio.get_running_loop()
        started: list[tuple[Job, "asyncio.Queue[Event]"]] = []
        try:
            for ids, p in zip(prep.ids, prep.params):
                started.append(self.start(ids, p, loop))
        except ApiError:
            for job, _ in started:
                job.cancelled.set()
            raise
        return started

    def start(
        self, prompt_ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop
    ) -> tuple[Job, "asyncio.Queue[Event]"]:
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is gone (server stopped)
                pass

        job = Job(prompt_ids, params, emit)
        self.engine.submit(job)
        return job, events

    async def collect(self, request: Any, job: Job, events: "asyncio.Queue[Event]") -> Result:
        """Wait for the whole answer, polling for a client that went away: text, finish reason,
        completion tokens and the scored tokens (`BatchScheduler.score`) when logprobs were asked for."""
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

    async def stream(
        self,
        job: Job,
        events: "asyncio.Queue[Event]",
        rid: str,
        now: int,
        shape: Any,
        n_prompt: int,
        include_usage: bool,
        t0: float,
    ) -> AsyncIterator[bytes]:
        """SSE chunks of one request: `shape.pieces(text)` turns each text event (None at the end) into
        chunk payloads; `shape.finish_reason` may rename the final reason."""

        def chunk(payload: Any, finish: str | None) -> dict[str, Any]:
            return {
                "id": rid,
                "object": shape.chunk_object,
                "created": now,
                "model": self.options.model_name,
                "system_fingerprint": None,
                "choices": [shape.chunk_choice(payload, finish)],
            }

        try:
            first = shape.first()
            if first is not None:
                yield _sse(chunk(first, None))
            while True:
                event = await events.get()
                if event[0] == "text":
                    for payload in shape.pieces(event[1]):
                        yield _sse(chunk(payload, None))
                elif event[0] == "done":
                    for payload in shape.pieces(None):
                        yield _sse(chunk(payload, None))
                    final = chunk(None, shape.finish_reason(event[1]))
                    usage = _usage(n_prompt, event[2])
                    if not include_usage:
                        final["usage"] = usage
                    yield _sse(final)
                    if include_usage:
                        yield _sse({**chunk(None, None), "choices": [], "usage": usage})
                    log.info(
                        "%s: %d prompt + %d completion tokens in %.2fs (%s)",
                        rid,
                        n_prompt,
                        event[2],
                        time.perf_counter() - t0,
                        event[1],
                    )
                    break
                else:
                    yield _sse(ApiError(503, event[1], type_="server_error").body())
                    break
            yield b"data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # client gone (generator closed) or done: free the row


# -- the app ----------------------------------------------------------------------------------------


def _add_error_handlers(app: Any) -> None:
    """Every error is `{"error": {...}}`: ApiError as given, FastAPI's own as 4xx, anything else a bare 500."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import JSONResponse

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


def _add_routes(app: Any, api: _Api) -> None:
    from fastapi import Request

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [api.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != api.options.model_name:
            raise ApiError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
        return api.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await api.respond(request, api.prepare_chat)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await api.respond(request, api.prepare_completion)


def _wrap(app: Any, engine: BatchScheduler, options: ServerOptions) -> Any:
    """The ASGI app clients reach: the security layer, then the chat page's static files, then CORS."""
    asgi: Any = _AuthMiddleware(app, options.api_key) if options.api_key is not None else _LocalOnlyMiddleware(app)
    if options.ui:  # the page's static files answer outside the key and Host checks; /ui/info stays inside
        from llmcore.webui import mount_ui, page_info

        asgi = mount_ui(app, asgi, lambda: page_info(engine, options))
    if options.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        # Outermost, so a browser's preflight (which never carries the key) is answered here.
        asgi = CORSMiddleware(
            asgi,
            allow_origins=options.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return asgi


def create_app(engine: BatchScheduler, options: ServerOptions) -> Any:
    """The ASGI app for one scheduler (its worker must be started by the caller)."""
    try:
        from fastapi import FastAPI
    except ImportError as err:
        raise LLMCoreError(f"llmcore serve needs FastAPI and uvicorn: {install_hint('serve')} ({err})") from err

    check_api_key(options.api_key)
    app = FastAPI(title="llmcore", docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app)
    _add_routes(app, _Api(engine, options))
    return _wrap(app, engine, options)
