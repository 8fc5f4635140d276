"""The server's security rules, as pure ASGI layers that answer before any body is read.

Invariants:
- With an API key (`_AuthMiddleware`), every HTTP request without `Authorization: Bearer KEY` (or
  `X-Api-Key: KEY`) is refused with 401 before its body is read; two `Authorization` headers are
  refused (proxies disagree on which counts); the key is compared in constant time. Only GET/HEAD of
  the chat page's static files (`llmcore.webui`, which hold nothing) are answered outside it.
- An API key that is set must be usable (`check_api_key`): an empty one, one with surrounding spaces or
  one that is not printable ASCII is refused at start, so authentication is never silently off.
- Without a key (`_LocalOnlyMiddleware`) the server binds only loopback (`llmcore.serve.cli.serve`)
  and answers only requests whose `Host` names it (an IP literal, `localhost`, `*.localhost`; else 403:
  DNS rebinding) and POST bodies typed `application/json` (else 415: a `text/plain` POST is a CORS
  "simple request" any page may send), so no web page can drive it (CSRF).
- Importing this module needs neither FastAPI nor starlette.
"""

import hmac
from typing import Any

from llmcore.errors import LLMCoreError
from llmcore.serve.requests import ApiError


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
                err = ApiError(
                    401, "missing or incorrect API key: send 'Authorization: Bearer KEY'", code="invalid_api_key"
                )
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
        host = host[1 : host.find("]")] if "]" in host else host
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
                await _refuse(
                    ApiError(
                        403,
                        f"Host {host[:100]!r} does not name this server; a server without "
                        "--api-key answers only localhost and IP addresses",
                        code="host_not_allowed",
                    ),
                    scope,
                    receive,
                    send,
                )
                return
            if scope.get("method") == "POST":
                ctype = headers.get(b"content-type", b"").decode("latin-1").split(";", 1)[0].strip().lower()
                if ctype != "application/json":
                    await _refuse(
                        ApiError(
                            415,
                            f"Content-Type must be application/json, got {ctype or 'none'!r}",
                            code="unsupported_media_type",
                        ),
                        scope,
                        receive,
                        send,
                    )
                    return
        await self.app(scope, receive, send)


def check_api_key(api_key: str | None) -> None:
    """An API key that is set must be usable: an empty one (`--api-key ""`, `LLMCORE_API_KEY=` from an
    unset shell variable) would silently turn authentication off."""
    if api_key is None:
        return
    if not api_key.strip():
        raise LLMCoreError(
            "--api-key (or LLMCORE_API_KEY) is empty, which would turn authentication off; "
            "set a key, or unset LLMCORE_API_KEY and drop --api-key for a local key-less server"
        )
    if api_key != api_key.strip() or not api_key.isprintable() or not api_key.isascii():
        raise LLMCoreError(
            "--api-key (or LLMCORE_API_KEY) must be printable ASCII without surrounding spaces "
            "(it travels in an HTTP header)"
        )
