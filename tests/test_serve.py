"""`llmcore serve`: a tiny model behind the real server on 127.0.0.1, called with the official `openai` client.

Greedy answers are compared with `llmcore.generate` on the same prompt ids (what `llmcore generate`
prints); streamed chunks must join to the non-streamed text; bad requests must be 4xx JSON errors.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

openai = pytest.importorskip("openai", reason="the serve tests need the `openai` client (pip install -e '.[test]')")
httpx = pytest.importorskip("httpx", reason="the serve tests need httpx")
pytest.importorskip("fastapi", reason="llmcore serve needs fastapi (pip install -e '.[serve]')")
pytest.importorskip("uvicorn", reason="llmcore serve needs uvicorn (pip install -e '.[serve]')")

from llmcore.chat import chat_prompt_ids  # noqa: E402
from llmcore.checkpoint import load_model, save_model  # noqa: E402
from llmcore.errors import LLMCoreError  # noqa: E402
from llmcore.generate import generate  # noqa: E402
from llmcore.model import LLM, ModelConfig  # noqa: E402
from llmcore.serve import ApiError, Engine, Job, RunningServer, SamplingParams, ServerOptions, bind_socket, create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-run"
CHAT_PROMPTS = [
    "你好",
    "今天天气怎么样？",
    "写一首诗",
    "1+1=?",
    "Tell me a story.",
    "为什么天是蓝的",
    "hello there",
    "介绍一下北京",
]


def _tokenizer_dir(tmp: Path) -> Path:
    """MiniMind's tokenizer from ../shared/data when present, else a small one trained here."""
    from conftest import shared_data_dir

    shared = shared_data_dir() / "minimind_tokenizer"
    if (shared / "tokenizer.json").is_file():
        return shared
    from llmcore.data_prep.tokenizer import train_tokenizer

    lines = [
        f"第{i}天，我们学习了{i * 7 % 13}个新的词语。Day {i}: the quick brown fox jumps over {i} lazy dogs."
        for i in range(400)
    ]
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in lines))
    return train_tokenizer([corpus], tmp / "tok", vocab_size=600)


def _make_run(root: Path) -> Path:
    """A run dir as training writes it: checkpoints/step-1 + latest + tokenizer/."""
    from llmcore.data_prep.tokenizer import load_tokenizer

    tok_dir = _tokenizer_dir(root)
    torch.manual_seed(0)
    model = LLM(
        ModelConfig.from_preset("tiny", initializer_range=0.2, vocab_size=load_tokenizer(tok_dir).vocab_size)
    ).eval()
    run = root / MODEL
    save_model(model, run / "checkpoints" / "step-1")
    (run / "checkpoints" / "latest").write_text("step-1\n")
    shutil.copytree(tok_dir, run / "tokenizer")
    return run


class Served:
    """A started server plus the model and tokenizer it serves (for reference generations)."""

    def __init__(
        self,
        run: Path,
        api_key: str | None = None,
        max_batch: int = 8,
        max_body_bytes: int = 1 << 16,
        retriever: Any = None,
        cors_origins: list[str] | None = None,
    ) -> None:
        self.run = run
        self.model, self.tok = load_model(run)
        self.engine = Engine(self.model, self.tok, max_batch=max_batch).start()
        app = create_app(
            self.engine,
            ServerOptions(
                model_name=MODEL,
                api_key=api_key,
                max_body_bytes=max_body_bytes,
                retriever=retriever,
                cors_origins=cors_origins or [],
            ),
        )
        self.server = RunningServer(app, bind_socket("127.0.0.1", 0), self.engine).start()
        self.url = self.server.url
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=api_key or "unused", max_retries=0, timeout=60)

    def greedy(self, ids: list[int], max_new_tokens: int) -> tuple[str, int]:
        """What `llmcore generate --temperature 0` prints for these prompt ids, and tokens produced (eos counted)."""
        out = generate(self.model, [ids], max_new_tokens=max_new_tokens, temperature=0, eos_id=self.tok.eos_id)[0]
        produced = len(out) + (1 if len(out) < max_new_tokens else 0)
        return self.tok.decode(out, skip_special_tokens=True), produced

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_run(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def served(run_dir: Path) -> Iterator[Served]:
    s = Served(run_dir)
    yield s
    s.stop()


def _text_ids(s: Served, prompt: str) -> list[int]:
    return [s.tok.bos_id] + s.tok.encode(prompt)  # as `llmcore generate` without --chat


# -- answers --------------------------------------------------------------------------------------


def test_models_list(served: Served) -> None:
    models = served.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert served.client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        served.client.models.retrieve("nope")


def test_chat_completion_is_greedy_generate(served: Served) -> None:
    r = served.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "你好"}], max_tokens=24, temperature=0
    )
    ids = chat_prompt_ids(served.tok, "你好")  # `llmcore generate --chat`
    text, produced = served.greedy(ids, 24)
    assert text.strip(), "the tiny model should say something; an empty answer makes this test vacuous"
    assert r.choices[0].message.content == text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("length" if produced == 24 else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        len(ids),
        produced,
        len(ids) + produced,
    )
    assert r.model == MODEL and r.id.startswith("chatcmpl-")


def test_greedy_answers_equal_the_llmcore_generate_command(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    from llmcore.cli import main

    for chat, prompt in [(True, "你好"), (False, "The capital of China is")]:
        argv = [
            "generate",
            "--ckpt",
            str(served.run),
            "--prompt",
            prompt,
            "--max-new-tokens",
            "20",
            "--temperature",
            "0",
            "--device",
            "cpu",
        ] + (["--chat"] if chat else [])
        capsys.readouterr()
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code in (0, None)
        printed = capsys.readouterr().out
        assert printed.endswith("\n")
        if chat:
            answer = (
                served.client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=20, temperature=0
                )
                .choices[0]
                .message.content
            )
        else:
            answer = (
                served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
                .choices[0]
                .text
            )
        assert answer == printed[:-1] and answer.strip()


def test_completion_and_stream_join_to_the_greedy_text(served: Served) -> None:
    prompt = "The capital of China is"
    text, produced = served.greedy(_text_ids(served, prompt), 30)
    r = served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0)
    assert r.choices[0].text == text and len(text) > 5
    assert r.usage.prompt_tokens == len(_text_ids(served, prompt)) and r.usage.completion_tokens == produced
    chunks = list(
        served.client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=30,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 3, "the answer should arrive in several chunks"
    assert "".join(pieces) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == produced
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason


def test_chat_stream_joins_to_the_non_streamed_answer(served: Served) -> None:
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "写一首诗"}]
    full = served.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=40, temperature=0)
    chunks = list(
        served.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=40, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens  # usage rides on the last chunk
    assert len({c.id for c in chunks}) == 1
    ids = served.tok.encode(served.tok.apply_chat_template(msgs, add_generation_prompt=True))
    assert full.choices[0].message.content == served.greedy(ids, 40)[0]


def test_raw_sse_ends_with_done(served: Served) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_strings_cut_the_text_streamed_or_not(served: Served) -> None:
    prompt = "Once upon a time"
    text, _ = served.greedy(_text_ids(served, prompt), 40)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert len(stop) == 2 and stop.strip(), f"need a stop string from the middle of {text!r}"
    expected = text[: text.find(stop)]
    r = served.client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=[stop, "never-there"]
    )
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    chunks = list(
        served.client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=stop, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 40


def test_max_tokens_gives_length_and_exact_count(served: Served) -> None:
    r = served.client.completions.create(model=MODEL, prompt="A", max_tokens=3, temperature=0)
    text, produced = served.greedy(_text_ids(served, "A"), 3)
    assert r.choices[0].text == text
    assert r.usage.completion_tokens == produced
    if produced == 3:
        assert r.choices[0].finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_equals_generate(served: Served) -> None:
    def ask(seed: int) -> str:
        return (
            served.client.completions.create(
                model=MODEL, prompt="Hello", max_tokens=20, temperature=1.0, top_p=0.9, seed=seed
            )
            .choices[0]
            .text
        )

    a, b, c = ask(7), ask(7), ask(8)
    assert a == b and a != c
    gen = torch.Generator().manual_seed(7)  # `llmcore generate --temperature 1 --top-p 0.9 --seed 7`
    out = generate(
        served.model,
        [_text_ids(served, "Hello")],
        max_new_tokens=20,
        temperature=1.0,
        top_p=0.9,
        eos_id=served.tok.eos_id,
        generator=gen,
    )[0]
    assert a == served.tok.decode(out, skip_special_tokens=True)


def test_eight_concurrent_streams_each_get_their_own_answer(served: Served) -> None:
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(CHAT_PROMPTS))
    max_tokens = [12 + 3 * i for i in range(len(CHAT_PROMPTS))]

    def worker(i: int) -> None:
        try:
            client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            barrier.wait(timeout=30)
            stream = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": CHAT_PROMPTS[i]}],
                max_tokens=max_tokens[i],
                temperature=0,
                stream=True,
            )
            results[i] = "".join(c.choices[0].delta.content or "" for c in stream)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(CHAT_PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    expected = {i: served.greedy(chat_prompt_ids(served.tok, p), max_tokens[i])[0] for i, p in enumerate(CHAT_PROMPTS)}
    assert results == expected
    assert len(set(expected.values())) > 4, "prompts should give different answers, or mixing would go unseen"


# -- the engine on its own: batching and cancellation ---------------------------------------------


def _job(ids: list[int], max_tokens: int, **kw: Any) -> tuple[Job, list[Any]]:
    events: list[Any] = []
    return Job(
        ids, SamplingParams(max_tokens=max_tokens, temperature=kw.pop("temperature", 0.0), **kw), events.append
    ), events


def test_engine_batches_waiting_requests_and_keeps_rows_apart(served: Served) -> None:
    engine = Engine(served.model, served.tok, max_batch=8)  # not started: the jobs queue up first
    ids = [chat_prompt_ids(served.tok, p) for p in CHAT_PROMPTS[:6]]
    jobs = [_job(p, 10 + 4 * i) for i, p in enumerate(ids)]
    seeded = _job(ids[0], 10, temperature=1.0, seed=3)  # seeded sampling runs alone
    for job, _ in jobs + [seeded]:
        engine.submit(job)
    engine.start()
    deadline = time.monotonic() + 60
    while any(not ev or ev[-1][0] != "done" for _, ev in jobs + [seeded]) and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.close()
    assert engine.batches_run == 2 and engine.max_batch_seen == 6
    for (job, events), p in zip(jobs, ids):
        text, produced = served.greedy(p, job.max_tokens)
        assert "".join(e[1] for e in events if e[0] == "text") == text
        assert events[-1][0] == "done" and events[-1][2] == produced


def test_engine_rejects_a_full_queue(served: Served) -> None:
    engine = Engine(served.model, served.tok, max_batch=1, max_queue=2)
    for _ in range(2):
        engine.submit(_job([1, 5], 2)[0])
    with pytest.raises(ApiError) as err:
        engine.submit(_job([1, 5], 2)[0])
    assert err.value.status == 429
    engine.close()
    with pytest.raises(LLMCoreError):
        Engine(served.model, served.tok, max_batch=0)


LONG = 400  # greedy tokens without an end token that the disconnect tests' prompt must give


@pytest.fixture(scope="module")
def long_prompt(served: Served) -> str:
    """A prompt whose greedy continuation runs LONG tokens without the end token, so only a
    disconnect can stop its row early."""
    for prompt in ["Once upon a time there was", "从前有座山，山里有座庙。", "The history of", "1, 2, 3,"]:
        out = generate(served.model, [_text_ids(served, prompt)], max_new_tokens=LONG, eos_id=served.tok.eos_id)[0]
        if len(out) == LONG:
            return prompt
    pytest.skip(f"no candidate prompt runs {LONG} greedy tokens without the end token on this tiny model")


def test_client_that_disconnects_mid_stream_frees_its_slot(served: Served, long_prompt: str) -> None:
    engine = served.engine
    body = {"model": MODEL, "prompt": long_prompt, "max_tokens": 900, "temperature": 0, "stream": True}
    produced_before, cancelled_before = engine.tokens_produced, engine.rows_cancelled
    t0 = time.perf_counter()
    with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
    # The connection is closed: the worker must drop the row long before 1000 tokens.
    deadline = time.monotonic() + 20
    while engine.busy and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.busy, "the worker is still generating for a client that left"
    assert engine.rows_cancelled == cancelled_before + 1
    produced = engine.tokens_produced - produced_before
    assert produced < LONG, produced
    # And the next client is served at once.
    r2 = served.client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, temperature=0.5, seed=1)
    assert r2.usage.completion_tokens >= 1
    assert time.perf_counter() - t0 < 30


def test_client_that_gives_up_on_a_non_streamed_request_frees_its_slot(served: Served, long_prompt: str) -> None:
    engine = served.engine
    produced_before, cancelled_before = engine.tokens_produced, engine.rows_cancelled
    body = {"model": MODEL, "prompt": long_prompt, "max_tokens": 900, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
    deadline = time.monotonic() + 20
    time.sleep(0.2)
    while engine.busy and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.busy, "the worker is still generating for a client that left"
    assert engine.rows_cancelled == cancelled_before + 1
    assert engine.tokens_produced - produced_before < LONG


def _reference_logprobs(s: Served, ids: list[int]) -> list[float]:
    """log p(token t | tokens < t) for t >= 1, by cross-entropy on one plain forward pass."""
    with torch.no_grad():
        logits = s.model(torch.tensor([ids])).logits[0].float()
    return (-torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")).tolist()


def test_completion_logprobs_and_echo_as_lm_eval_reads_them(served: Served) -> None:
    """lm-eval's `local-completions` loglikelihood request: token-id prompt, echo, logprobs=1, max_tokens=1;
    it sums token_logprobs[ctxlen:-1] and calls the continuation greedy when each equals the top logprob."""
    context, continuation = served.tok.encode("今天天气"), served.tok.encode("很好")
    ids = context + continuation
    r = served.client.completions.create(
        model=MODEL, prompt=[ids], max_tokens=1, temperature=0, logprobs=1, echo=True, seed=1234
    )
    lp = r.choices[0].logprobs
    ref = _reference_logprobs(served, ids)
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) + 1 == len(lp.tokens)
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(ref, abs=1e-4)
    assert lp.tokens[: len(ids)] == [served.tok.decode([i]) for i in ids]
    assert sum(lp.token_logprobs[len(context) : -1]) == pytest.approx(sum(ref[len(context) - 1 :]), abs=1e-3)
    # the generated (greedy) token is the top one, and the top entry holds the most likely logprob
    assert lp.token_logprobs[-1] == pytest.approx(max(lp.top_logprobs[-1].values()), abs=1e-5)
    greedy = served.greedy(ids, 1)[0]
    assert r.choices[0].text == served.tok.decode(ids) + greedy
    assert lp.text_offset[:3] == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]
    # Without echo: only the completion's tokens, which score as a forward pass over prompt + answer does.
    r = served.client.completions.create(model=MODEL, prompt="你好", max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    prompt_ids = _text_ids(served, "你好")
    out = generate(served.model, [prompt_ids], max_new_tokens=6, temperature=0, eos_id=served.tok.eos_id)[0]
    assert lp.tokens == [served.tok.decode([i]) for i in out]
    full_ref = _reference_logprobs(served, prompt_ids + out)
    assert lp.token_logprobs == pytest.approx(full_ref[len(prompt_ids) - 1 :], abs=1e-4)
    assert all(3 <= len(t) <= 4 for t in lp.top_logprobs)
    assert r.choices[0].text == served.greedy(prompt_ids, 6)[0]
    for bad in (
        {"logprobs": 21},
        {"logprobs": -1},
        {"logprobs": True},
        {"echo": "yes"},
        {"logprobs": 1, "stream": True},
    ):
        _assert_error(_raw(served, "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 1, **bad})), 400)


def test_several_prompts_in_one_request_answer_as_each_alone(served: Served) -> None:
    """lm-eval batches requests: a list of token-id lists (or strings) gets one choice per prompt, in order."""
    batch = [served.tok.encode(t) for t in ("今天天气很好", "我们学习", "hello there, how")]
    r = served.client.completions.create(model=MODEL, prompt=batch, max_tokens=1, temperature=0, logprobs=1, echo=True)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for ids, choice in zip(batch, r.choices):
        assert choice.logprobs.token_logprobs[1 : len(ids)] == pytest.approx(_reference_logprobs(served, ids), abs=1e-4)
    assert r.usage.prompt_tokens == sum(len(ids) for ids in batch)
    texts = ["你好", "为什么天是蓝的"]
    r = served.client.completions.create(model=MODEL, prompt=texts, max_tokens=5, temperature=0)
    assert [c.text for c in r.choices] == [served.greedy(_text_ids(served, t), 5)[0] for t in texts]


def test_chat_without_max_tokens_gets_the_default_budget(served: Served) -> None:
    engine = Engine(served.model, served.tok)
    app_options = ServerOptions(model_name=MODEL, default_max_tokens=7)
    server = RunningServer(create_app(engine.start(), app_options), bind_socket("127.0.0.1", 0), engine).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello there"}], temperature=0
        )
        text, produced = served.greedy(chat_prompt_ids(served.tok, "hello there"), 7)
        assert r.choices[0].message.content == text and r.usage.completion_tokens == produced
    finally:
        server.stop()


def test_engine_close_ends_a_running_batch(served: Served) -> None:
    engine = Engine(served.model, served.tok).start()
    job, events = _job([1, 5, 6, 7], 1000)
    engine.submit(job)
    deadline = time.monotonic() + 20
    while not events and time.monotonic() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    engine.close()
    assert time.monotonic() - t0 < 5
    assert events[-1] == ("error", "the server is shutting down")
    assert engine.tokens_produced < 1000


def test_disconnected_request_still_queued_is_dropped(served: Served) -> None:
    engine = Engine(served.model, served.tok, max_batch=1)
    a, ev_a = _job([1, 5, 6], 3)
    b, ev_b = _job([1, 7, 8], 3)
    engine.submit(a)
    engine.submit(b)
    b.cancelled.set()
    engine.start()
    deadline = time.monotonic() + 30
    while (not ev_a or ev_a[-1][0] != "done") and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.close()
    assert ev_a[-1][0] == "done" and ev_b == [] and engine.batches_run == 1


# -- refusals -------------------------------------------------------------------------------------


def _raw(
    s: Served,
    path: str,
    content: bytes | str | None = None,
    method: str = "POST",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    return httpx.request(
        method,
        s.url + path,
        content=content,
        timeout=30,
        headers={"Content-Type": "application/json", **(headers or {})},
    )


def _assert_error(r: httpx.Response, status: int, needle: str = "") -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    assert "Traceback" not in r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    assert needle.lower() in err["message"].lower(), err
    return err


BAD_BODIES = {
    "unknown model": ({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "does not exist"),
    "empty messages": ({"model": MODEL, "messages": []}, 400, "at least one message"),
    "no messages": ({"model": MODEL}, 400, "messages"),
    "bad role": ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    "bad content": ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "content"),
    "max_tokens past the context": (
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1024},
        400,
        "context",
    ),
    "max_tokens zero": (
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        400,
        "max_tokens",
    ),
    "temperature string": (
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
        400,
        "temperature",
    ),
    "temperature too high": (
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 3},
        400,
        "temperature",
    ),
    "top_p zero": ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
    "n=2": ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n=1"),
    "stop not strings": ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": [1]}, 400, "stop"),
    "five stops": (
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": list("abcde")},
        400,
        "stop",
    ),
    "stream not bool": (
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
        400,
        "stream",
    ),
    "body not an object": ([1, 2], 400, "object"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_chat_requests_are_4xx_json(served: Served, case: str) -> None:
    body, status, needle = BAD_BODIES[case]
    _assert_error(_raw(served, "/v1/chat/completions", json.dumps(body)), status, needle)


WEIRD_VALUES = ["x", -1, 2**70, 1e308, True, [1, "a"], {"a": 1}]
CHAT_FIELDS = [
    "model",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "stop",
    "seed",
    "n",
    "stream_options",
    "response_format",
]
COMPLETION_FIELDS = ["prompt", "echo", "best_of", "logprobs"]


def test_no_field_value_gives_a_server_error(served: Served) -> None:
    """Every odd value of every field is answered with 200 or a 4xx JSON error, never a 5xx."""
    cases = [
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}, f)
        for f in CHAT_FIELDS
    ]
    cases += [("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2}, f) for f in COMPLETION_FIELDS]
    seen = set()
    with httpx.Client(timeout=30) as client:
        for path, base, name in cases:
            for value in WEIRD_VALUES:
                body = {**base, name: value}

                r = client.post(
                    served.url + path, content=json.dumps(body), headers={"Content-Type": "application/json"}
                )
                seen.add(r.status_code)
                assert r.status_code < 500, (path, name, value, r.text)
                if r.status_code != 200:
                    assert "error" in r.json() and "Traceback" not in r.text, (path, name, value, r.text)
    assert 200 in seen and 400 in seen


def test_bad_requests_through_the_openai_client(served: Served) -> None:
    c = served.client
    with pytest.raises(openai.NotFoundError) as nf:
        c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError) as ctx:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=5000)
    assert ctx.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL, prompt="x" * 3000, max_tokens=1)  # the prompt alone fills the context
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL, prompt="x", max_tokens=1, echo=True, stream=True)


@pytest.mark.parametrize("raw", [b"{", b"not json", b"", b"\xff\xfe", b"[" * 100_00, b'{"max_tokens": NaN}'])
def test_malformed_json_is_400(served: Served, raw: bytes) -> None:
    r = _raw(served, "/v1/chat/completions", raw)
    assert r.status_code == 400, r.text
    _assert_error(r, 400)


def test_oversized_body_is_413(served: Served) -> None:
    big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * (1 << 17)}]})
    _assert_error(_raw(served, "/v1/chat/completions", big), 413, "limit")

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        yield b'{"model": "tiny-run", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"x" * 4096
        yield b'"}]}'

    r = httpx.post(
        served.url + "/v1/completions", content=chunked(), timeout=30, headers={"Content-Type": "application/json"}
    )
    _assert_error(r, 413, "limit")


def test_bad_completion_prompts(served: Served) -> None:
    for body, needle in [
        ({"model": MODEL}, "prompt"),
        ({"model": MODEL, "prompt": ["a", "b"], "stream": True}, "one prompt"),
        ({"model": MODEL, "prompt": ["a"] * 65}, "at most 64"),
        ({"model": MODEL, "prompt": ["a", 3]}, "prompt"),
        ({"model": MODEL, "prompt": [[1], [2, 999999]]}, "vocabulary"),
        ({"model": MODEL, "prompt": []}, "prompt"),
        ({"model": MODEL, "prompt": [1, 999999]}, "vocabulary"),
        ({"model": MODEL, "prompt": 3}, "prompt"),
    ]:
        _assert_error(_raw(served, "/v1/completions", json.dumps(body)), 400, needle)


def test_unknown_route_and_method(served: Served) -> None:
    _assert_error(_raw(served, "/v1/embeddings", "{}"), 404)
    _assert_error(_raw(served, "/v1/chat/completions", method="GET"), 405)


def test_api_key_is_required(run_dir: Path) -> None:
    s = Served(run_dir, api_key="sekret", max_batch=1, cors_origins=["http://ui.localhost:3000"])
    try:
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            _assert_error(_raw(s, "/v1/models", method="GET", headers=headers), 401, "API key")
            _assert_error(_raw(s, "/v1/completions", "{", headers=headers), 401)  # refused before the body is read
            _assert_error(_raw(s, "/nothing", method="GET", headers=headers), 401)
        assert [m.id for m in s.client.models.list().data] == [MODEL]
        # A browser UI on an allowed origin: the preflight (never carrying the key) passes, the call needs the key.
        origin = {"Origin": "http://ui.localhost:3000"}
        pre = _raw(
            s,
            "/v1/chat/completions",
            method="OPTIONS",
            headers={
                **origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == origin["Origin"]
        _assert_error(_raw(s, "/v1/models", method="GET", headers=origin), 401)
        ok = _raw(s, "/v1/models", method="GET", headers={**origin, "Authorization": "Bearer sekret"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == origin["Origin"]
        r = s.client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, temperature=0)
        assert r.choices[0].text == s.greedy(_text_ids(s, "Hi"), 3)[0]
    finally:
        s.stop()


# -- the command ----------------------------------------------------------------------------------


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llmcore.cli import main

    for argv, needle in [
        (["serve", "--ckpt", str(tmp_path / "missing")], "no such checkpoint"),
        (["serve", "--ckpt", str(tmp_path), "--device", "cuda:7"], "--device"),
        (["serve", "--ckpt", str(tmp_path), "--host", "256.1.1.1"], "--host"),
        (["serve", "--ckpt", str(tmp_path), "--rag-k", "0"], "--rag-k"),
    ]:
        if "cuda:7" in argv and torch.cuda.device_count() > 7:
            continue
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle in err and "\n" not in err, err


def test_cli_serves_on_a_free_port_and_stops_on_sigint(run_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LLMCORE_API_KEY": "k1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmcore",
            "serve",
            "--ckpt",
            str(run_dir),
            "--port",
            "0",
            "--device",
            "cpu",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        line = proc.stderr.readline()  # "serving 'tiny-run' on cpu at http://127.0.0.1:PORT/v1 (...)"
        assert "serving" in line and "http://127.0.0.1:" in line, line + (proc.stderr.read() if proc.poll() else "")
        base = line.split(" at ", 1)[1].split()[0]
        client = openai.OpenAI(base_url=base, api_key="k1", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == [MODEL]
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "你好"}], max_tokens=5, temperature=0
        )
        assert r.usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="k2", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    assert proc.returncode in (0, 130) and "Traceback" not in err, err  # 130: the CLI's "interrupted"
