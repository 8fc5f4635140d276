"""Hostile input against `llmcore serve` (issue 24, ../shared/reviews/reliability-round3.md rows SK-*, SB-*,
SC-*, SF-*, SR-*, SV-*, SA-dup-*): every case is a one-line error at start or a 4xx JSON error, never a 500,
a traceback or a server that silently needs no key."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("openai", reason="the serve tests need the `openai` client")
httpx = pytest.importorskip("httpx", reason="the serve tests need httpx")
pytest.importorskip("fastapi", reason="llmcore serve needs fastapi (pip install -e '.[serve]')")

from test_serve import MODEL, Served, _assert_error, _make_run  # noqa: E402

from llmcore.checkpoint import save_model  # noqa: E402
from llmcore.errors import LLMCoreError  # noqa: E402
from llmcore.model import LLM, ModelConfig  # noqa: E402
from llmcore.serve import Engine, ServerOptions, check_api_key, create_app, host_names_this_server, serve  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_run(tmp_path_factory.mktemp("faults-serve"))


@pytest.fixture(scope="module")
def served(run_dir: Path) -> Iterator[Served]:
    s = Served(run_dir)
    yield s
    s.stop()


def _post(
    s: Served, path: str, body: Any, headers: dict[str, str] | None = None, content: bytes | None = None
) -> httpx.Response:
    return httpx.post(
        s.url + path,
        content=content if content is not None else json.dumps(body),
        timeout=60,
        headers={"Content-Type": "application/json", **(headers or {})},
    )


def _chat(content: Any = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


# -- keys and browsers ----------------------------------------------------------------------------


def test_empty_or_unusable_api_key_is_refused_at_start(
    run_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmcore.cli import main

    for bad in ("", "   ", " k ", "k\x00"):
        with pytest.raises(LLMCoreError, match="API_KEY"):
            check_api_key(bad)
    with pytest.raises(LLMCoreError, match="empty"):
        serve(run_dir, port=0, api_key="")
    with pytest.raises(LLMCoreError, match="empty"):  # create_app too: a library user gets no key-less server
        create_app(Engine.__new__(Engine), ServerOptions(model_name=MODEL, api_key=""))
    for argv, env in ((["--api-key", ""], None), ([], "")):
        if env is not None:
            monkeypatch.setenv("LLMCORE_API_KEY", env)
        with pytest.raises(SystemExit) as exit_info:
            main(["serve", "--ckpt", str(run_dir), "--port", "0", *argv])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "empty" in err and "\n" not in err, err


def test_keyless_server_on_a_reachable_address_is_refused(
    run_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmcore.cli import main

    monkeypatch.delenv("LLMCORE_API_KEY", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--ckpt", str(run_dir), "--port", "0", "--host", "0.0.0.0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--api-key" in err and "\n" not in err, err


@pytest.mark.parametrize(
    "host,ok",
    [
        ("127.0.0.1:8000", True),
        ("localhost", True),
        ("LOCALHOST:1", True),
        ("[::1]:8000", True),
        ("ui.localhost:3000", True),
        ("10.0.0.7", True),
        ("evil.example", False),
        ("evil.example:8000", False),
        ("localhost.evil.example", False),
        ("127.0.0.1.nip.io", False),
    ],
)
def test_host_names(host: str, ok: bool) -> None:
    assert host_names_this_server(host) is ok


def test_keyless_server_refuses_foreign_hosts_and_non_json_bodies(served: Served) -> None:
    # A page on evil.example (CSRF with a text/plain "simple request", or DNS rebinding to read answers).
    r = _post(
        served,
        "/v1/chat/completions",
        _chat(),
        {"Content-Type": "text/plain", "Origin": "http://evil.example", "Host": "evil.example"},
    )
    _assert_error(r, 403, "Host")
    _assert_error(httpx.get(served.url + "/v1/models", headers={"Host": "evil.example:80"}, timeout=30), 403, "Host")
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""):
        _assert_error(_post(served, "/v1/chat/completions", _chat(), {"Content-Type": ctype}), 415, "Content-Type")
    port = served.url.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
        r = _post(
            served, "/v1/chat/completions", _chat(), {"Host": host, "Content-Type": "application/json; charset=utf-8"}
        )
        assert r.status_code == 200, r.text


def test_two_authorization_headers_are_refused(run_dir: Path) -> None:
    s = Served(run_dir, api_key="sekret", max_batch=1)
    try:
        for pair in (["Bearer wrong", "Bearer sekret"], ["Bearer sekret", "Bearer sekret"]):
            r = httpx.get(s.url + "/v1/models", headers=[("Authorization", v) for v in pair], timeout=30)
            _assert_error(r, 401, "API key")
        r = httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer sekret"}, timeout=30)
        assert r.status_code == 200
    finally:
        s.stop()


# -- bodies that used to be 500 -------------------------------------------------------------------

SURROGATE = b'"a\\ud800b"'  # valid JSON; not valid Unicode text


@pytest.mark.parametrize(
    "path,template,param",
    [
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": %s}], "max_tokens": 2}', "content"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": [{"type": "text", "text": %s}]}]}',
            "content",
        ),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "stop": [%s]}', "stop"),
        ("/v1/completions", b'{"prompt": %s, "max_tokens": 2}', "prompt"),
    ],
)
def test_lone_surrogates_are_400(served: Served, path: str, template: bytes, param: str) -> None:
    err = _assert_error(_post(served, path, None, content=template % SURROGATE), 400, "surrogate")
    assert param in err["param"]


@pytest.mark.parametrize("role", [["user"], {"a": 1}, None, 3])
def test_unhashable_or_odd_roles_are_400(served: Served, role: Any) -> None:
    body = {"model": MODEL, "messages": [{"role": role, "content": "x"}]}
    _assert_error(_post(served, "/v1/chat/completions", body), 400, "role")


def test_top_p_below_float32_resolution_is_answered(served: Served) -> None:
    r = _post(served, "/v1/chat/completions", _chat(temperature=1, top_p=1e-300, max_tokens=4))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_huge_prompts_are_refused_before_any_encoding(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for name in ("encode_prompt", "encode", "encode_chats"):
        real = getattr(served.tok, name)
        monkeypatch.setattr(served.tok, name, lambda *a, _n=name, _r=real, **k: calls.append(_n) or _r(*a, **k))
    too_many_chars = 16 * 1024 + 1  # no token of this tokenizer decodes to more than 16 characters; context 1024
    assert max(len(served.tok.decode([i])) for i in range(served.tok.vocab_size)) <= 16
    err = _assert_error(_post(served, "/v1/chat/completions", _chat("x" * too_many_chars)), 400, "characters")
    assert err["code"] == "context_length_exceeded"
    _assert_error(
        _post(served, "/v1/completions", {"prompt": "x" * too_many_chars, "max_tokens": 1}), 400, "characters"
    )
    msgs = [{"role": "user", "content": "<|im_end|>"}] * 1025  # the quadratic-encoding attack (SX-locate-dos)
    _assert_error(_post(served, "/v1/chat/completions", {"messages": msgs, "max_tokens": 1}), 400, "1025 messages")
    assert calls == []


# -- the command ----------------------------------------------------------------------------------


def test_tokenizer_larger_than_the_model_is_refused_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_serve import _tokenizer_dir

    from llmcore.cli import main

    tok_dir = _tokenizer_dir(tmp_path)
    small = tmp_path / "small-vocab"
    save_model(LLM(ModelConfig.from_preset("tiny", vocab_size=300)), small)
    monkeypatch.setenv("LLMCORE_API_KEY", "k")
    for argv in (
        ["serve", "--ckpt", str(small), "--port", "0", "--tokenizer", str(tok_dir)],
        ["generate", "--ckpt", str(small), "--tokenizer", str(tok_dir), "--prompt", "hi"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "--tokenizer" in err and "300" in err and "\n" not in err


def test_thinking_with_a_template_without_it_is_refused_at_start(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from llmcore.cli import main

    with pytest.raises(SystemExit) as exit_info:  # the run's MiniMind2 template has no open_thinking
        main(["serve", "--ckpt", str(run_dir), "--port", "0", "--api-key", "k", "--thinking"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --thinking") and "open_thinking" in err and "\n" not in err, err


def test_missing_rag_index_names_the_flag(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("llmcore.rag", reason="the RAG part is not installed")
    from llmcore.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--ckpt", str(run_dir), "--port", "0", "--api-key", "k", "--rag", str(tmp_path / "nope")])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --rag ") and "no such directory" in err, err


# -- retrieval ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rag_served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, Any]]:
    pytest.importorskip("hnswlib", reason="--rag needs hnswlib (pip install -e '.[rag]')")
    from test_serve_rag import DOCS  # also registers its deterministic test embedder

    from llmcore.rag import build_index
    from llmcore.serve import open_retriever

    root = tmp_path_factory.mktemp("faults-serve-rag")
    build_index(DOCS, root / "idx", embedder="test-serve-bigram", chunk_chars=120, overlap=16, progress=False)
    retriever = open_retriever(root / "idx")
    s = Served(_make_run(root), retriever=retriever)
    yield s, retriever
    s.stop()


def test_rag_long_question_refused_before_embedding_and_search_does_not_block_others(
    rag_served: tuple[Served, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    s, retriever = rag_served
    searched: list[str] = []
    entered, release = threading.Event(), threading.Event()
    real = retriever.search

    def search(question: str, k: int) -> Any:
        searched.append(question)
        if question == "slow":
            entered.set()
            release.wait(30)
        return real(question, k)

    monkeypatch.setattr(retriever, "search", search)
    err = _assert_error(_post(s, "/v1/chat/completions", _chat("问" * 3000)), 400, "question")
    assert err["code"] == "context_length_exceeded" and searched == []
    _assert_error(
        _post(
            s, "/v1/chat/completions", None, content=b'{"messages": [{"role": "user", "content": ' + SURROGATE + b"}]}"
        ),
        400,
        "surrogate",
    )
    result: dict[str, httpx.Response] = {}
    t = threading.Thread(target=lambda: result.update(r=_post(s, "/v1/chat/completions", _chat("slow"))))
    t.start()
    try:
        assert entered.wait(30)
        # While a search holds the retriever, a request that needs no retrieval is answered.
        r = _post(s, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and t.is_alive()
    finally:
        release.set()
        t.join(60)
    assert result["r"].status_code == 200, result["r"].text
