"""The chat page of `llmcore serve`: static HTML, CSS and JavaScript shipped in this package (no build
step, no CDN), served at `/` and `/ui/*`, talking to the server's own `/v1/chat/completions`.

Invariants:
- The static files are public (they hold no data), so they are served by a small ASGI layer outside
  the API's key and Host checks: a browser must be able to load the page before it knows the key.
  Everything that says something about the model (`/ui/info`, the API) stays behind those checks.
- Every page response carries a strict Content-Security-Policy (`default-src 'self'`, no inline
  script or style, no framing), `X-Content-Type-Options: nosniff` and its exact content type. The
  page builds all model text into DOM nodes with `textContent`: model output never becomes HTML.
- Importing this module needs neither torch nor FastAPI.
"""

from importlib import resources
from typing import Any, Callable

# path -> (file in this package, content type)
PAGES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/ui/": ("index.html", "text/html; charset=utf-8"),
    "/ui/index.html": ("index.html", "text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/style.css": ("style.css", "text/css; charset=utf-8"),
}
INFO_PATH = "/ui/info"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),
]


def load_pages() -> dict[str, tuple[bytes, str]]:
    """The page's files, read once from the package: path -> (bytes, content type)."""
    root = resources.files(__name__)
    return {path: (root.joinpath(name).read_bytes(), ctype) for path, (name, ctype) in PAGES.items()}


class _PageMiddleware:
    """Pure ASGI: GET/HEAD of a page path answers the file; everything else goes to `app` unchanged."""

    def __init__(self, app: Any, pages: dict[str, tuple[bytes, str]]) -> None:
        self.app, self.pages = app, pages

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        page = self.pages.get(scope.get("path", "")) if scope["type"] == "http" else None
        if page is None or scope.get("method") not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        body, ctype = page
        headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode()), *SECURITY_HEADERS]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


def model_device(engine: Any) -> str:
    """The device the served model's weights are on, as a string (`cpu`, `cuda:0`)."""
    try:
        return str(engine.model.embed_tokens.weight.device)
    except AttributeError:
        try:
            return str(next(engine.model.parameters()).device)
        except (AttributeError, StopIteration, TypeError):
            return "unknown"


def page_info(engine: Any, options: Any) -> dict[str, Any]:
    """What the page shows and needs: model id, device, context, whether a key is needed, thinking."""
    from llmcore.chat_format import template_has_thinking

    return {
        "model": options.model_name,
        "device": model_device(engine),
        "context_length": int(engine.context),
        "api_key_required": options.api_key is not None,
        "thinking_available": template_has_thinking(engine.tokenizer),
        "thinking": bool(getattr(options, "thinking", False)),
        "rag": getattr(options, "retriever", None) is not None,
    }


def mount_ui(app: Any, asgi: Any, info: Callable[[], dict[str, Any]]) -> Any:
    """Add `GET /ui/info` to the FastAPI `app` (behind whatever checks wrap it in `asgi`) and return
    `asgi` wrapped so that `/` and `/ui/*` serve the page."""

    async def ui_info():  # no annotations: FastAPI would read them
        return info()

    app.add_api_route(INFO_PATH, ui_info, methods=["GET"], include_in_schema=False)
    return _PageMiddleware(asgi, load_pages())
