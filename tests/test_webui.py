"""The chat page of `llmcore serve` (llmcore/webui), driven in a real headless browser.

Debian's `chromium` through Python Playwright (`executable_path`, never `playwright install`), against
real servers on 127.0.0.1: a tiny random model (streamed answers equal the API's own greedy answer)
and a scripted model whose replies are fixed text, slowed down per token (stop, history, thinking and
tool calls shown, model HTML rendered as text, the API key). The browser tests skip with a reason when
chromium or playwright is missing; `.ci/run` installs chromium and the `test` extra has playwright.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import pytest
import torch

httpx = pytest.importorskip("httpx", reason="the chat page tests need httpx")
pytest.importorskip("fastapi", reason="llmcore serve needs fastapi (pip install -e '.[serve]')")
pytest.importorskip("uvicorn", reason="llmcore serve needs uvicorn (pip install -e '.[serve]')")

from llmcore.model import LLM, ModelConfig  # noqa: E402
from llmcore.serve import Engine, RunningServer, ServerOptions, bind_socket, create_app  # noqa: E402
from llmcore.webui import CSP  # noqa: E402

CHROMIUM = os.environ.get("LLMCORE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
KEY = "right-key-123"
STEP_DELAY_S = 0.02  # per generated token of the scripted model: streaming is visible, Stop has time

XSS = 'Here: <script>alert(1)</script> and <img src=x onerror="alert(2)"> end.'
REPLIES = [
    ("XSS-PLEASE", XSS),
    ("LONG-PLEASE", " ".join(f"word{i}" for i in range(400))),
    (
        "What is llmcore",
        "<think>The user asks what llmcore is; answer in three points.</think>"
        "llmcore trains **small LLMs** end to end:\n\n- a tokenizer and Arrow shards\n"
        "- pretrain, SFT, DPO and RL\n- `llmcore serve`, with this page\n\n"
        "```bash\nllmcore serve --ckpt runs/dpo --port 8000\n```",
    ),
    ("weather", '<tool_call>{"name": "get_weather", "arguments": {"city": "Beijing"}}</tool_call>'),
    ("BADTOOL-PLEASE", '<tool_call>not json</tool_call> <tool_call>{"arguments": {}}</tool_call>'),
]
DEFAULT_REPLY = "Hello! I am a scripted model."


# -- servers --------------------------------------------------------------------------------------


def _tokenizer(name: str = "minimind_tokenizer") -> Any:
    from conftest import shared_data_dir

    from llmcore.data_prep.tokenizer import load_tokenizer

    path = shared_data_dir() / name
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"the MiniMind tokenizer is not at {path}")
    return load_tokenizer(path)


class _Cache:
    def __init__(self) -> None:
        self.replies: list[list[int]] = []
        self.step = 0


class ScriptedLM(torch.nn.Module):
    """Stands in for `LLM` under the real `generate_steps`: each row writes the tokens of the first reply
    whose needle is in the newest user message of its prompt, then eos; every step sleeps `delay` seconds."""

    def __init__(self, tokenizer: Any, delay: float, replies: list[tuple[str, str]] = REPLIES) -> None:
        super().__init__()
        self.tok, self.delay, self.replies = tokenizer, delay, replies
        self.config = ModelConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, max_position_embeddings=2048)
        self.embed_tokens = torch.nn.Embedding(1, 1)  # for `.weight.device`
        self.prompts: list[str] = []

    def new_kv_cache(self, batch_size: int, max_len: int) -> _Cache:
        return _Cache()

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, kv_cache: _Cache | None = None
    ) -> SimpleNamespace:
        assert kv_cache is not None
        b = input_ids.shape[0]
        if not kv_cache.replies:  # the prompt call: left-padded rows, each prompt starts at its last position 0
            for row in range(b):
                pos = position_ids[row].tolist() if position_ids is not None else list(range(input_ids.shape[1]))
                start = max(i for i, p in enumerate(pos) if p == 0)
                prompt = self.tok.decode(input_ids[row, start:].tolist())
                self.prompts.append(prompt)
                last = prompt.rsplit("user\n", 1)[-1]  # the newest user message picks the reply
                text = next((t for needle, t in self.replies if needle in last), DEFAULT_REPLY)
                kv_cache.replies.append(self.tok.encode(text))
        else:
            time.sleep(self.delay)
        logits = torch.zeros(b, input_ids.shape[1], self.config.vocab_size)
        for row, script in enumerate(kv_cache.replies):
            token = script[kv_cache.step] if kv_cache.step < len(script) else self.tok.eos_id
            logits[row, -1, token] = 100.0
        kv_cache.step += 1
        return SimpleNamespace(logits=logits)


class Served:
    def __init__(self, model: Any, tok: Any, name: str, **options: Any) -> None:
        self.model, self.name = model, name
        self.engine = Engine(model, tok, max_batch=4).start()
        app = create_app(self.engine, ServerOptions(model_name=name, **options))
        self.server = RunningServer(app, bind_socket("127.0.0.1", 0), self.engine).start()
        self.url = self.server.url

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def tok() -> Any:
    return _tokenizer()


@pytest.fixture(scope="module")
def scripted(tok: Any) -> Iterator[Served]:
    s = Served(ScriptedLM(tok, STEP_DELAY_S), tok, "scripted")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyed(tok: Any) -> Iterator[Served]:
    s = Served(ScriptedLM(tok, 0.0), tok, "scripted", api_key=KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tiny(tok: Any) -> Iterator[Served]:
    torch.manual_seed(0)
    model = LLM(ModelConfig.from_preset("tiny", initializer_range=0.2, vocab_size=tok.vocab_size)).eval()
    s = Served(model, tok, "tiny-run")
    yield s
    s.stop()


# -- the page over plain HTTP (no browser) --------------------------------------------------------


def test_page_files_headers_and_info(scripted: Served, keyed: Served) -> None:
    for path, ctype in [("/", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/style.css", "text/css")]:
        r = httpx.get(scripted.url + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(ctype), (path, r.headers)
        assert r.headers["content-security-policy"] == CSP and "default-src 'self'" in CSP
        assert r.headers["x-content-type-options"] == "nosniff"
    html = httpx.get(scripted.url + "/").text
    assert "<script>" not in html and "style=" not in html and "http" not in html.replace("http-equiv", "")
    info = httpx.get(scripted.url + "/ui/info").json()
    assert info["model"] == "scripted" and info["device"] == "cpu" and info["api_key_required"] is False
    # With a key: the page itself loads (it holds no data), its info and the API need the key.
    assert httpx.get(keyed.url + "/").status_code == 200
    assert httpx.get(keyed.url + "/ui/info").status_code == 401
    r = httpx.get(keyed.url + "/ui/info", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json()["api_key_required"] is True
    assert httpx.post(keyed.url + "/", json={}).status_code == 401  # only GET/HEAD of page files skip the key


def test_no_ui_turns_the_page_off_and_keeps_the_api(tok: Any) -> None:
    s = Served(ScriptedLM(tok, 0.0), tok, "scripted", ui=False)
    try:
        for path in ("/", "/ui/app.js", "/ui/info"):
            assert httpx.get(s.url + path).status_code == 404, path
        assert httpx.get(s.url + "/v1/models").json()["data"][0]["id"] == "scripted"
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == DEFAULT_REPLY
    finally:
        s.stop()


def test_cli_serve_no_ui(tok: Any, tmp_path: Path) -> None:
    """`llmcore serve --no-ui` as a user runs it: the page is off, the API answers."""
    import shutil
    import signal
    import subprocess
    import sys

    from conftest import shared_data_dir

    from llmcore.checkpoint import save_model

    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "tiny-run"
    torch.manual_seed(0)
    save_model(LLM(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size)).eval(), run / "checkpoints" / "step-1")
    (run / "checkpoints" / "latest").write_text("step-1\n")
    shutil.copytree(shared_data_dir() / "minimind_tokenizer", run / "tokenizer")
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("LLMCORE_API_KEY", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmcore",
            "serve",
            "--ckpt",
            str(run),
            "--port",
            "0",
            "--device",
            "cpu",
            "--log-level",
            "warning",
            "--no-ui",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=root,
    )
    try:
        line = proc.stderr.readline()  # "serving 'tiny-run' on cpu at http://127.0.0.1:PORT/v1 (...)"
        assert "serving" in line and "chat page" not in line, line + (proc.stderr.read() if proc.poll() else "")
        base = line.split(" at ", 1)[1].split()[0].removesuffix("/v1")
        assert httpx.get(base + "/", timeout=30).status_code == 404
        assert httpx.get(base + "/v1/models", timeout=30).json()["data"][0]["id"] == "tiny-run"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the page in a browser ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the browser tests need playwright (pip install -e '.[test]')"
    )
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)")
    pw = sync_api.sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    except Exception as err:  # a chromium that cannot start here is an environment problem, said as such
        pw.stop()
        pytest.skip(f"chromium at {CHROMIUM} did not start: {str(err)[:300]}")
    yield b
    b.close()
    pw.stop()


class Page:
    """A fresh browser tab on a server, recording dialogs, console errors and chat requests."""

    def __init__(self, browser: Any, url: str) -> None:
        self.context = browser.new_context(viewport={"width": 1100, "height": 760})
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.dialogs: list[str] = []
        self.console_errors: list[str] = []
        self.requests: list[dict[str, Any]] = []
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        self.page.on("request", self._request)
        self.page.goto(url + "/")

    def _request(self, request: Any) -> None:
        if request.url.endswith("/v1/chat/completions") and request.method == "POST":
            self.requests.append(json.loads(request.post_data))

    def button(self, name: str) -> Any:
        return self.page.get_by_role("button", name=name, exact=True)

    def settings(self, **values: Any) -> None:
        for label, value in values.items():
            self.page.get_by_label(label, exact=True).fill(str(value))

    def send(self, text: str) -> Any:
        """Type `text` and press Enter; the locator of the new assistant message."""
        n = self.page.locator(".msg.assistant").count()
        box = self.page.get_by_label("Message", exact=True)
        box.fill(text)
        box.press("Enter")
        return self.page.locator(".msg.assistant").nth(n)

    def wait_done(self, msg: Any) -> None:
        msg.and_(self.page.locator("[data-done='1']")).wait_for()

    def history(self) -> list[dict[str, Any]]:
        return self.page.evaluate("() => window.llmcoreChat.history()")

    def close(self) -> None:
        csp = [e for e in self.console_errors if "Content Security Policy" in e]
        self.context.close()
        assert not csp, csp  # the page itself never needs anything its policy forbids


@pytest.fixture()
def open_page(browser: Any) -> Iterator[Callable[[str], Page]]:
    pages: list[Page] = []

    def make(url: str) -> Page:
        pages.append(Page(browser, url))
        return pages[-1]

    yield make
    for p in pages:
        p.close()


def test_streamed_answer_from_a_tiny_model(tiny: Served, open_page: Callable[[str], Page]) -> None:
    p = open_page(tiny.url)
    p.page.locator("#model-info").filter(has_text="tiny-run").wait_for()
    assert "cpu" in p.page.locator("#model-info").inner_text()
    p.settings(Temperature=0, **{"Max tokens": 24})
    msg = p.send("你好")
    p.wait_done(msg)
    deltas = int(msg.get_attribute("data-deltas"))
    history = p.history()
    answer = history[1]["content"]
    assert deltas >= 2 and answer, (deltas, history)
    assert p.requests[0]["stream"] is True and p.requests[0]["max_tokens"] == 24
    # The page's streamed answer is the server's own greedy answer to the same request.
    body = {**p.requests[0], "stream": False}
    body.pop("stream_options")
    ref = httpx.post(tiny.url + "/v1/chat/completions", json=body, timeout=60).json()
    assert ref["choices"][0]["message"]["content"] == answer
    assert msg.get_attribute("data-prompt-tokens") == str(ref["usage"]["prompt_tokens"])


def test_stop_ends_the_request_and_keeps_the_partial_answer(scripted: Served, open_page: Callable[[str], Page]) -> None:
    p = open_page(scripted.url)
    p.page.locator("#model-info").filter(has_text="scripted").wait_for()
    p.settings(**{"Max tokens": 1500})
    cancelled = scripted.engine.rows_cancelled
    msg = p.send("LONG-PLEASE")
    answer = msg.locator(".answer")
    p.page.wait_for_function("() => document.querySelector('.msg.assistant .answer').textContent.length > 20")
    first = len(answer.text_content())
    p.page.wait_for_function(
        "n => document.querySelector('.msg.assistant .answer').textContent.length > n", arg=first
    )  # the answer grows while it streams
    assert p.button("Send").is_disabled() and p.button("Stop").is_enabled()
    p.button("Stop").click()
    p.wait_done(msg)
    assert msg.get_attribute("data-finish") == "stopped"
    kept = p.history()[1]["content"]
    assert kept.startswith("word0 word1") and len(kept) < len(REPLIES[1][1]), kept
    assert "stopped" in msg.locator(".status").inner_text()
    assert p.button("Send").is_enabled() and p.button("Stop").is_disabled()
    deadline = time.monotonic() + 10  # the server dropped the row: the worker is free long before 400 tokens
    while (scripted.engine.busy or scripted.engine.rows_cancelled == cancelled) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not scripted.engine.busy and scripted.engine.rows_cancelled > cancelled
    p.page.wait_for_timeout(300)
    assert p.history()[1]["content"] == kept  # nothing arrives after Stop


def test_history_is_sent_and_new_chat_clears_it(scripted: Served, open_page: Callable[[str], Page]) -> None:
    p = open_page(scripted.url)
    p.page.locator("#model-info").filter(has_text="scripted").wait_for()
    box = p.page.get_by_label("Message", exact=True)
    box.fill("first question ALPHA")
    box.press("Shift+Enter")  # a new line, not a send
    box.type("second line")
    assert box.input_value() == "first question ALPHA\nsecond line" and not p.requests
    box.press("Enter")
    first = p.page.locator(".msg.assistant").nth(0)
    p.wait_done(first)
    second = p.send("and BETA?")
    p.wait_done(second)
    assert [m["role"] for m in p.requests[1]["messages"]] == ["user", "assistant", "user"]
    assert p.requests[1]["messages"][0]["content"] == "first question ALPHA\nsecond line"
    assert p.requests[1]["messages"][1]["content"] == DEFAULT_REPLY
    prompt = scripted.model.prompts[-1]  # what the model was given: both turns
    assert "ALPHA" in prompt and DEFAULT_REPLY in prompt and "BETA" in prompt
    assert int(second.get_attribute("data-prompt-tokens")) > int(first.get_attribute("data-prompt-tokens"))
    p.button("New chat").click()
    assert p.page.locator(".msg").count() == 0 and p.history() == []
    p.wait_done(p.send("GAMMA"))
    assert [m["content"] for m in p.requests[2]["messages"]] == ["GAMMA"]


def test_wrong_api_key_is_shown_and_the_right_one_works(keyed: Served, open_page: Callable[[str], Page]) -> None:
    p = open_page(keyed.url)
    key = p.page.get_by_label("API key", exact=True)
    key.wait_for()
    key.fill("wrong-key")
    p.button("Use key").click()
    alert = p.page.get_by_role("alert")
    alert.filter(has_text="401").wait_for()
    assert "API key" in alert.inner_text()
    key.fill(KEY)
    p.button("Use key").click()
    p.page.locator("#model-info").filter(has_text="scripted").wait_for()
    assert p.page.get_by_role("alert").is_hidden()
    assert p.page.evaluate("() => [sessionStorage.getItem('llmcore.apiKey'), localStorage.length]") == [KEY, 0]
    p.wait_done(p.send("hello"))
    assert p.history()[1]["content"] == DEFAULT_REPLY
    # A chat request with a wrong key: the error is shown, the key asked for again, the message given back.
    p.page.evaluate("() => sessionStorage.setItem('llmcore.apiKey', 'wrong-key')")
    p.page.get_by_label("Message", exact=True).fill("hello again")
    p.button("Send").click()
    p.page.get_by_role("alert").filter(has_text="401").wait_for()
    assert key.is_visible()
    assert p.page.get_by_label("Message", exact=True).input_value() == "hello again"
    assert p.page.locator(".msg.assistant").count() == 1 and len(p.history()) == 2


def test_model_html_is_rendered_as_text(scripted: Served, open_page: Callable[[str], Page]) -> None:
    p = open_page(scripted.url)
    p.page.locator("#model-info").filter(has_text="scripted").wait_for()
    msg = p.send("XSS-PLEASE")
    p.wait_done(msg)
    p.page.wait_for_timeout(300)
    assert msg.locator(".answer").text_content() == XSS
    assert p.page.locator(".msg script, .msg img, #messages [onerror]").count() == 0
    assert p.page.locator("script").count() == 1  # the page's own app.js, nothing added
    assert p.dialogs == []
    bad = p.send("BADTOOL-PLEASE")  # tool-call markup that is not a call stays text, as the server leaves it
    p.wait_done(bad)
    assert bad.locator(".answer").text_content() == REPLIES[-1][1] and bad.locator(".tool-call").count() == 0


def test_thinking_tool_calls_and_markdown(scripted: Served, open_page: Callable[[str], Page], tmp_path: Path) -> None:
    p = open_page(scripted.url)
    p.page.locator("#model-info").filter(has_text="scripted").wait_for()
    msg = p.send("What is llmcore?")
    p.wait_done(msg)
    reasoning = msg.locator("details.reasoning")
    assert reasoning.is_visible() and reasoning.get_attribute("open") is None  # folded, apart from the answer
    assert "three points" in reasoning.locator(".reasoning-text").text_content()
    answer = msg.locator(".answer")
    assert "three points" not in answer.text_content() and "<think>" not in answer.text_content()
    assert answer.locator("strong").inner_text() == "small LLMs"
    assert answer.locator("li").count() == 3 and answer.locator("li code").inner_text() == "llmcore serve"
    assert answer.locator("pre code").text_content() == "llmcore serve --ckpt runs/dpo --port 8000"
    assert p.history()[1]["content"].startswith("llmcore trains **small LLMs**")
    tool = p.send("What is the weather in Beijing?")
    p.wait_done(tool)
    call = tool.locator(".tool-call")
    assert call.locator(".tool-name").inner_text() == "get_weather"
    assert json.loads(call.locator("pre").text_content()) == {"city": "Beijing"}
    reasoning.locator("summary").click()
    assert reasoning.get_attribute("open") is not None
    shot = Path(os.environ.get("LLMCORE_WEBUI_SCREENSHOT") or tmp_path / "chat_page.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    p.page.evaluate("() => { const m = document.getElementById('messages'); m.scrollTop = m.scrollHeight; }")
    p.page.screenshot(path=str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


THOUGHT = "Let me think about it: six times seven."
REASONED = THOUGHT + "\n</think>\n\nThe answer is **42**."


def test_reasoning_content_and_the_thinking_switch(open_page: Callable[[str], Page]) -> None:
    tok3 = _tokenizer("minimind3_tokenizer")  # MiniMind-3's template has a thinking mode
    s = Served(ScriptedLM(tok3, 0.0, [("ponder", REASONED)]), tok3, "thinker", thinking=True)
    try:
        # The server itself splits the reasoning out (reasoning_content), streamed or not.
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "ponder"}]})
        assert r.json()["choices"][0]["message"]["reasoning_content"].strip() == THOUGHT, r.json()
        p = open_page(s.url)
        p.page.locator("#model-info").filter(has_text="thinker").wait_for()
        thinking = p.page.get_by_label("Thinking", exact=True)
        assert thinking.is_checked() and thinking.is_enabled()  # the server's --thinking
        msg = p.send("ponder this")
        p.wait_done(msg)
        assert "chat_template_kwargs" not in p.requests[0]
        details = msg.locator("details.reasoning")
        assert details.is_visible() and details.get_attribute("open") is None
        assert details.locator(".reasoning-text").text_content().strip() == THOUGHT
        assert msg.locator(".answer").inner_text().strip() == "The answer is 42."
        assert msg.locator(".answer strong").inner_text() == "42"
        assert p.history()[1]["content"].strip() == "The answer is **42**."
        thinking.uncheck()
        p.wait_done(p.send("ponder again"))
        assert p.requests[1]["chat_template_kwargs"] == {"enable_thinking": False}
        assert s.model.prompts[-1].endswith("<think>\n\n</think>\n\n")  # the template's thinking-off prompt
    finally:
        s.stop()


def _sse(*chunks: Any) -> str:
    return "".join(f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n" for c in chunks)


def _delta(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_tool_call_deltas_errors_and_dropped_connections(scripted: Served, open_page: Callable[[str], Page]) -> None:
    """What other servers' streams (and failures) look like, played to the page by the browser itself."""
    p = open_page(scripted.url)
    p.page.locator("#model-info").filter(has_text="scripted").wait_for()
    replies: list[dict[str, Any]] = []
    p.page.route("**/v1/chat/completions", lambda route: route.fulfill(**replies.pop(0)) if replies else route.abort())
    sse = {"status": 200, "headers": {"content-type": "text/event-stream"}}
    # Streamed reasoning_content and a tool call whose arguments come in two pieces.
    replies.append(
        {
            **sse,
            "body": _sse(
                _delta({"role": "assistant", "content": ""}),
                _delta({"reasoning_content": "Plan: "}),
                _delta({"reasoning_content": "ask the weather tool."}),
                _delta(
                    {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_7",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"city": '},
                            }
                        ]
                    }
                ),
                _delta({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
                _delta({}, "tool_calls"),
                "[DONE]",
            ),
        }
    )
    msg = p.send("weather in Paris?")
    p.wait_done(msg)
    assert msg.locator(".reasoning-text").text_content() == "Plan: ask the weather tool."
    assert msg.locator(".tool-name").inner_text() == "get_weather"
    assert json.loads(msg.locator(".tool-call pre").text_content()) == {"city": "Paris"}
    assert "tool calls" in msg.locator(".status").inner_text()
    assert p.history()[1]["tool_calls"] == [
        {"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    ]
    # A 4xx: the server's own message is shown, the text given back, nothing added to the history.
    replies.append(
        {
            "status": 400,
            "content_type": "application/json",
            "body": json.dumps({"error": {"message": "'temperature' must be in [0.0, 2.0], got 5.0"}}),
        }
    )
    p.page.get_by_label("Message", exact=True).fill("too hot")
    p.button("Send").click()
    p.page.get_by_role("alert").filter(has_text="must be in [0.0, 2.0]").wait_for()
    assert "400" in p.page.get_by_role("alert").inner_text() and len(p.history()) == 2
    assert p.page.get_by_label("Message", exact=True).input_value() == "too hot"
    # The connection drops mid-answer (no [DONE]): the error is shown, the partial answer kept.
    replies.append({**sse, "body": _sse(_delta({"content": "Half an ans"}))})
    half = p.send("tell me")
    p.wait_done(half)
    assert half.locator(".answer").inner_text() == "Half an ans"
    assert "closed before the answer was complete" in p.page.get_by_role("alert").inner_text()
    assert p.history()[-1] == {"role": "assistant", "content": "Half an ans"}
    # No connection at all (the route aborts): shown, not a stall; Send works again.
    p.page.get_by_label("Message", exact=True).fill("anyone there?")
    p.button("Send").click()
    p.page.get_by_role("alert").filter(has_text="Cannot reach the server").wait_for()
    assert p.button("Send").is_enabled() and p.button("Stop").is_disabled()
