"""`llmcore serve --rag`: chat answers get the retrieved passages in the prompt, exactly as `rag query --answer`."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

pytest.importorskip("hnswlib", reason="--rag needs hnswlib (pip install -e '.[rag]')")
pytest.importorskip("openai", reason="the serve tests need the `openai` client (pip install -e '.[test]')")
pytest.importorskip("fastapi", reason="llmcore serve needs fastapi (pip install -e '.[serve]')")

from test_serve import MODEL, Served, _assert_error, _make_run, _raw  # noqa: E402

from llmcore.rag import Embedder, answer_messages, build_index, register_embedder  # noqa: E402
from llmcore.rag.answer import prompt_ids  # noqa: E402
from llmcore.serve import open_retriever  # noqa: E402


class BigramEmbedder(Embedder):
    """Deterministic test embedder: character bigrams hashed into 64 buckets."""

    def __init__(self) -> None:
        self.name, self.dim, self.model = "test-serve-bigram", 64, "crc32 bigram buckets"

    def _encode(self, texts: list[str], is_query: bool) -> np.ndarray:
        out = np.full((len(texts), self.dim), 1e-3, dtype=np.float32)
        for i, t in enumerate(texts):
            for a, b in zip(t, t[1:]):
                out[i, zlib.crc32((a + b).encode()) % self.dim] += 1.0
        return out


register_embedder("test-serve-bigram", BigramEmbedder)

DOCS = [
    {"id": "great-wall", "text": "长城是中国古代的军事防御工程，东起山海关，西至嘉峪关，全长两万多公里。"},
    {"id": "panda", "text": "大熊猫生活在四川、陕西和甘肃的山区，主要以竹子为食。"},
    {"id": "tea", "text": "龙井茶产于浙江杭州西湖一带，是中国十大名茶之一。"},
    {"id": "rocket", "text": "长征五号是中国推力最大的运载火箭，在海南文昌发射。"},
]


@pytest.fixture(scope="module")
def rag_served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, object]]:
    root = tmp_path_factory.mktemp("serve_rag")
    build_index(DOCS, root / "idx", embedder="test-serve-bigram", chunk_chars=120, overlap=16, progress=False)
    retriever = open_retriever(root / "idx")
    s = Served(_make_run(root), retriever=retriever)
    yield s, retriever
    s.stop()


def test_rag_answers_with_the_retrieved_passages_in_the_prompt(rag_served: tuple[Served, object]) -> None:
    s, retriever = rag_served
    question = "大熊猫吃什么？"
    passages = retriever.search(question, 3)  # type: ignore[attr-defined]
    assert passages[0].doc_id == "panda"
    ids = prompt_ids(s.tok, question, passages)  # what `rag query --answer -k 3` gives the model
    r = s.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=16, temperature=0
    )
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == s.greedy(ids, 16)[0]
    # Streaming goes through the same prompt.
    chunks = s.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=16, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content


def test_rag_keeps_the_system_prompt_and_earlier_turns(rag_served: tuple[Served, object]) -> None:
    s, retriever = rag_served
    question = "长城有多长？"
    history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    msgs = [{"role": "system", "content": "只用一句话回答。"}, *history, {"role": "user", "content": question}]
    grounded = answer_messages(question, retriever.search(question, 3), system="只用一句话回答。")  # type: ignore[attr-defined]
    expected = grounded[:1] + history + grounded[1:]
    ids = s.tok.encode(s.tok.apply_chat_template(expected, add_generation_prompt=True))
    r = s.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == s.greedy(ids, 8)[0]


def test_rag_needs_a_user_question(rag_served: tuple[Served, object]) -> None:
    s, _ = rag_served
    body = '{"messages": [{"role": "system", "content": "hi"}]}'
    _assert_error(_raw(s, "/v1/chat/completions", body), 400, "user message")
    _assert_error(_raw(s, "/v1/chat/completions", '{"messages": [{"role": "user", "content": "  "}]}'), 400, "empty")


def test_rag_flag_errors(tmp_path: Path) -> None:
    from llmcore.errors import LLMCoreError

    with pytest.raises(LLMCoreError):
        open_retriever(tmp_path / "no-index")
