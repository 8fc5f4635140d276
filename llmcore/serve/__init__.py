"""`llmcore serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) for one checkpoint.

One module per job, each stating its invariants:
- `requests`: OpenAI request bodies to validated settings (`parse_sampling`, `parse_messages`,
  `parse_chat_options`, `parse_prompts`) or an `ApiError` (roles, Unicode, ranges, size caps, tools);
- `scheduler`: `BatchScheduler`, the worker thread that owns the model and batches queued `Job`s, the
  stop-safe streaming of each row's text, and `score` (completion logprobs);
- `security`: the API key, or for a key-less server the Host and JSON-only rules, as ASGI layers;
- `app`: `create_app`, the routes over one response path shared by `/v1/chat/completions` and
  `/v1/completions` (streamed or not), `/v1/models`, the chat page mount and `--rag`;
- `cli`: `serve` (load, bind, run, close) and the `llmcore serve` command.

The names below are the public API (`from llmcore.serve import create_app, ...`). `Engine` is the
scheduler's old name, kept as an alias for code that imports it. Importing this package needs neither
torch nor FastAPI; both are imported when a server is built.
"""

from llmcore.serve.app import DISCONNECT_POLL_S, ServerOptions, create_app
from llmcore.serve.cli import RunningServer, bind_socket, is_loopback, open_retriever, register, serve
from llmcore.serve.requests import (
    CHAT_ROLES,
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_COMPLETION_MAX_TOKENS,
    DEFAULT_MAX_BODY_BYTES,
    GREEDY_BELOW,
    MAX_LOGPROBS,
    MAX_PROMPTS,
    MAX_STOP_STRINGS,
    ApiError,
    ChatOptions,
    SamplingParams,
    check_text,
    parse_chat_options,
    parse_messages,
    parse_prompts,
    parse_sampling,
)
from llmcore.serve.scheduler import BatchScheduler, Event, Job
from llmcore.serve.security import check_api_key, host_names_this_server

Engine = BatchScheduler  # the old name (it clashed with the training `Engine` protocol)

__all__ = [
    "CHAT_ROLES",
    "DEFAULT_CHAT_MAX_TOKENS",
    "DEFAULT_COMPLETION_MAX_TOKENS",
    "DEFAULT_MAX_BODY_BYTES",
    "DISCONNECT_POLL_S",
    "GREEDY_BELOW",
    "MAX_LOGPROBS",
    "MAX_PROMPTS",
    "MAX_STOP_STRINGS",
    "ApiError",
    "BatchScheduler",
    "ChatOptions",
    "Engine",
    "Event",
    "Job",
    "RunningServer",
    "SamplingParams",
    "ServerOptions",
    "bind_socket",
    "check_api_key",
    "check_text",
    "create_app",
    "host_names_this_server",
    "is_loopback",
    "open_retriever",
    "parse_chat_options",
    "parse_messages",
    "parse_prompts",
    "parse_sampling",
    "register",
    "serve",
]
