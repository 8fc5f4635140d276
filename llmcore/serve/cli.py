"""`llmcore serve`: load a checkpoint, start the scheduler, bind and run the server; the CLI command.

Invariants:
- Flags are checked and the socket is bound before the slow loads, so a bad value, a taken port or
  a bad host fails at once; a key-less server binds only a loopback address, and an empty key is
  refused (`llmcore.serve.security`).
- The model and tokenizer come from `checkpoint.load_model_and_tokenizer` (a `--tokenizer` must fit
  the model); `--thinking` needs a template with `open_thinking`.
- On exit (Ctrl-C, SIGTERM) the scheduler is closed (queued requests get an error) and the socket closed.
- Importing this module needs neither torch nor FastAPI.
"""

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from llmcore.errors import LLMCoreError, install_hint
from llmcore.serve.app import ServerOptions, create_app
from llmcore.serve.requests import DEFAULT_CHAT_MAX_TOKENS, DEFAULT_MAX_BODY_BYTES
from llmcore.serve.scheduler import BatchScheduler
from llmcore.serve.security import check_api_key

log = logging.getLogger("llmcore.serve")  # one logger for the package (`--log-level` sets it)


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

    def __init__(
        self, app: Any, sock: socket.socket, engine: BatchScheduler | None = None, log_level: str = "warning"
    ) -> None:
        import uvicorn

        self.sock, self.engine = sock, engine
        host, port = sock.getsockname()[:2]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2, access_log=False)
        )
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True, name="llmcore-serve-http"
        )

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


def serve(
    ckpt: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    api_key: str | None = None,
    model_name: str | None = None,
    tokenizer_dir: str | Path | None = None,
    rag: str | Path | None = None,
    rag_k: int = 3,
    max_batch: int = 8,
    max_queue: int = 256,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    log_level: str = "info",
    ui: bool = True,
    cors_origins: list[str] | None = None,
    default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS,
    on_ready: Callable[[str], None] | None = None,
    thinking: bool = False,
) -> None:
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
            raise LLMCoreError(
                f"--host {host} is reachable from other machines: set --api-key (or "
                "LLMCORE_API_KEY), or bind 127.0.0.1 (a key-less server answers only this machine)"
            )
        retriever = open_retriever(rag) if rag is not None else None
        # A tokenizer is required, and --tokenizer must fit the model (vocab size, special ids, stored vocabulary).
        model, tok = load_model_and_tokenizer(
            ckpt, dev, attn_backend=default_attn_backend(dev), tokenizer=tokenizer_dir
        )
        if thinking:
            from llmcore.chat_format import check_thinking

            check_thinking(tok)
    except BaseException:
        sock.close()
        raise
    name = model_name or Path(ckpt).expanduser().resolve().name
    engine = BatchScheduler(model, tok, max_batch=max_batch, max_queue=max_queue).start()
    app = create_app(
        engine,
        ServerOptions(
            model_name=name,
            api_key=api_key,
            max_body_bytes=max_body_bytes,
            retriever=retriever,
            rag_k=rag_k,
            cors_origins=list(cors_origins or []),
            ui=ui,
            default_max_tokens=default_max_tokens,
            thinking=thinking,
        ),
    )
    bound_port = sock.getsockname()[1]
    url = f"http://{host}:{bound_port}/v1"
    if on_ready is not None:
        on_ready(
            f"serving {name!r} on {dev} at {url} (batch up to {max_batch}, queue {max_queue}"
            f"{', API key required' if api_key else ''}{', RAG ' + str(rag) if rag else ''})"
            f"{'; chat page at ' + url[: -len('/v1')] + '/' if ui else ''}"
        )
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
        sock.close()


def register(app: Any) -> None:
    """Add `serve` to the root Typer app."""
    import typer

    from llmcore.common import DEVICE_HELP

    @app.command("serve")
    def serve_cmd(
        ckpt: Path = typer.Option(..., "--ckpt", help="run dir, checkpoint dir or exported HF folder"),
        host: str = typer.Option(
            "127.0.0.1", "--host", help="address to bind; anything but 127.0.0.1 is reachable from other machines"
        ),
        port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port (0 = any free one)"),
        device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
        api_key: Optional[str] = typer.Option(
            None, "--api-key", envvar="LLMCORE_API_KEY", help="require 'Authorization: Bearer KEY' on every request"
        ),
        model_name: Optional[str] = typer.Option(
            None, "--model-name", help="model id clients use (default: the --ckpt folder's name)"
        ),
        tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer dir (default: the checkpoint's)"),
        rag: Optional[Path] = typer.Option(
            None,
            "--rag",
            help="index dir from `llmcore rag index`: chat answers "
            "get the top passages as context, as `rag query --answer`",
        ),
        rag_k: int = typer.Option(3, "--rag-k", help="passages retrieved per question with --rag"),
        max_batch: int = typer.Option(
            8,
            "--max-batch",
            help="requests with the same sampling settings that run together as one batch (1 = strictly one at a time)",
        ),
        default_max_tokens: int = typer.Option(
            DEFAULT_CHAT_MAX_TOKENS,
            "--default-max-tokens",
            help="reply length of a chat request that sets no max_tokens (capped by the context left)",
        ),
        max_queue: int = typer.Option(256, "--max-queue", help="requests that may wait; more get 429"),
        max_body_bytes: int = typer.Option(
            DEFAULT_MAX_BODY_BYTES, "--max-body-bytes", help="larger request bodies get 413"
        ),
        log_level: str = typer.Option("info", "--log-level", help="uvicorn log level: debug, info, warning, error"),
        cors_origin: Optional[list[str]] = typer.Option(
            None,
            "--cors-origin",
            help="a web page origin allowed to call the API from a browser (repeatable; '*' = any)",
        ),
        no_ui: bool = typer.Option(False, "--no-ui", help="do not serve the chat page at / (the API is unchanged)"),
        thinking: bool = typer.Option(
            False,
            "--thinking",
            help="chat requests open the think block (MiniMind-3's "
            'open_thinking) unless they send chat_template_kwargs {"open_thinking": false}; '
            "the reasoning is returned as reasoning_content",
        ),
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
        serve(
            ckpt,
            host=host,
            port=port,
            device=device,
            api_key=api_key,
            model_name=model_name,
            tokenizer_dir=tokenizer,
            rag=rag,
            rag_k=rag_k,
            max_batch=max_batch,
            max_queue=max_queue,
            max_body_bytes=max_body_bytes,
            log_level=log_level,
            cors_origins=cors_origin,
            ui=not no_ui,
            default_max_tokens=default_max_tokens,
            thinking=thinking,
            on_ready=lambda line: typer.echo(line, err=True),
        )
