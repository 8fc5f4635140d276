"""Tokenizer: training, round trips, HF compatibility, MiniMind's files, chat rendering and loss masks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llmcore.data_prep.tokenizer import DEFAULT_SYSTEM_PROMPT, load_tokenizer, train_tokenizer
from llmcore.errors import LLMCoreError

SAMPLES = {
    "chinese": "今天天气很好，我们去公园散步吧。人工智能正在改变世界。",
    "english": "The quick brown fox jumps over the lazy dog. It's 2024!",
    "emoji": "😀🎉👍🏽 🇨🇳 ❤️‍🔥",
    "mixed": "混合 text with 数字 123 and emoji 🚀, tabs\tand\nnewlines  double  spaces",
}


def make_corpus(path: Path, n: int = 400) -> Path:
    rows = []
    for i in range(n):
        rows.append({"text": f"第{i}段：{SAMPLES['chinese']} {SAMPLES['english']} number {i * 7}"})
        rows.append({"text": f"{SAMPLES['mixed']} {SAMPLES['emoji']} 行{i}"})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """A tokenizer trained with MiniMind2's ChatML template (`--template chatml`)."""
    d = tmp_path_factory.mktemp("tok")
    return train_tokenizer([make_corpus(d / "corpus.jsonl")], d / "tok", vocab_size=600, template="chatml")


@pytest.fixture
def minimind_dir(shared_data) -> Path:
    path = shared_data / "minimind_tokenizer"
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"MiniMind tokenizer not found at {path} (../shared/data is absent in this checkout)")
    return path


@pytest.mark.parametrize("name", list(SAMPLES))
def test_round_trip(tok_dir, name):
    tok = load_tokenizer(tok_dir)
    text = SAMPLES[name]
    ids = tok.encode(text)
    assert ids and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, text]) == [ids, ids]


def test_special_ids_and_files(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 600
    assert tok.decode([1, 2, 0]) == "<|im_start|><|im_end|><|endoftext|>"
    assert tok.decode([1] + tok.encode("hi") + [2], skip_special_tokens=True) == "hi"
    assert tok.encode("<|im_end|>") == [2]  # special strings map to their ids, as in transformers
    assert {p.name for p in tok_dir.iterdir()} >= {"tokenizer.json", "tokenizer_config.json"}


def test_autotokenizer_matches(tok_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    tok = load_tokenizer(tok_dir)
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    for text in SAMPLES.values():
        assert hf(text)["input_ids"] == tok.encode(text)
    msgs = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "再见"},
    ]
    for gen in (False, True):
        assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == tok.apply_chat_template(
            msgs, gen
        )


def test_fingerprint_stable_across_copies(tok_dir, tmp_path):
    copy = load_tokenizer(tok_dir).save(tmp_path / "copy")
    assert load_tokenizer(copy).fingerprint == load_tokenizer(tok_dir).fingerprint
    other = train_tokenizer([make_corpus(tmp_path / "c.jsonl", n=50)], tmp_path / "other", vocab_size=400)
    assert load_tokenizer(other).fingerprint != load_tokenizer(tok_dir).fingerprint


def test_minimind_tokenizer_loads_and_matches_hf(minimind_dir):
    from transformers import AutoTokenizer

    tok = load_tokenizer(minimind_dir)
    hf = AutoTokenizer.from_pretrained(str(minimind_dir))
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 6400)
    for text in SAMPLES.values():
        assert tok.encode(text) == hf(text)["input_ids"]
        assert tok.decode(tok.encode(text)) == text
    msgs = [
        {"role": "system", "content": "你是助手"},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
    ]
    assert tok.apply_chat_template(msgs) == hf.apply_chat_template(msgs, tokenize=False)


def test_our_template_renders_like_minimind(tok_dir, minimind_dir):
    ours, theirs = load_tokenizer(tok_dir), load_tokenizer(minimind_dir)
    convs = [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ],
        [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": "y"},
            {"role": "system", "content": "late"},
        ],
    ]
    for msgs in convs:
        for gen in (False, True):
            assert ours.apply_chat_template(msgs, gen) == theirs.apply_chat_template(msgs, gen)
    assert DEFAULT_SYSTEM_PROMPT in ours.apply_chat_template(convs[0])


# -- SFT / DPO masks, checked token by token against an independent construction ------------------


def expected_chat(tok, messages, only_last=False):
    """Build tokens and mask piece by piece: special tokens split the text, so each piece encodes alone."""
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}] + list(messages)
    last_assistant = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    tokens, mask = [], []
    for i, m in enumerate(messages):
        header = tok.encode(m["role"] + "\n")
        content = tok.encode(m["content"])
        # Precondition of this construction: the header and content do not fuse into one token.
        assert tok.encode(m["role"] + "\n" + m["content"]) == header + content
        learn = m["role"] == "assistant" and (not only_last or i == last_assistant)
        tokens += [tok.bos_id] + header + content + [tok.eos_id] + tok.encode("\n")
        mask += [0] + [0] * len(header) + [int(learn)] * (len(content) + 1) + [0]
    return tokens, mask


CONVERSATIONS = [
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ],
    [
        {"role": "user", "content": "Tell me a joke"},
        {"role": "assistant", "content": "Why did the 🐔 cross the road?"},
        {"role": "user", "content": "为什么？"},
        {"role": "assistant", "content": "To get to the other side.\n😀"},
    ],
    [
        {"role": "system", "content": "多轮"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d\n\ne"},
        {"role": "user", "content": "f"},
        {"role": "assistant", "content": ""},
    ],
]


@pytest.mark.parametrize("which", ["ours", "minimind"])
@pytest.mark.parametrize("only_last", [False, True])
def test_chat_masks_token_by_token(which, only_last, tok_dir, request):
    tok = load_tokenizer(tok_dir if which == "ours" else request.getfixturevalue("minimind_dir"))
    for msgs in CONVERSATIONS:
        tokens, mask = tok.encode_chat(msgs, only_last=only_last)
        exp_tokens, exp_mask = expected_chat(tok, msgs, only_last=only_last)
        assert tokens == exp_tokens
        assert mask == exp_mask, [(tok.decode([t]), m) for t, m in zip(tokens, mask)]
        # Boundaries by name: the im_end closing a learned reply is 1, the newline after it is 0.
        for k in range(len(tokens) - 1):
            if tokens[k] == tok.eos_id and mask[k] == 1:
                assert mask[k + 1] == 0
            if tokens[k] == tok.bos_id:
                assert mask[k] == 0


def test_mask_when_content_starts_with_whitespace(minimind_dir):
    tok = load_tokenizer(minimind_dir)
    tokens, mask = tok.encode_chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  indented"}])
    pieces = [tok.decode([t]) for t in tokens]
    start = len(tokens) - 1 - tokens[::-1].index(tok.bos_id)  # the assistant header's <|im_start|>
    assert pieces[start + 1 : start + 4] == ["ass", "ist", "ant"] and mask[start : start + 4] == [0, 0, 0, 0]
    # byte-level BPE fuses the header's newline with the leading spaces; that token carries content -> 1
    learned = "".join(p for p, m in zip(pieces, mask) if m)
    assert learned.endswith("indented<|im_end|>") and "  indented" in learned
    assert mask[-1] == 0 and tokens[-1] != tok.eos_id


def test_encode_chat_errors(tok_dir):
    tok = load_tokenizer(tok_dir)
    with pytest.raises(LLMCoreError, match="no assistant"):
        tok.encode_chat([{"role": "user", "content": "x"}])
    with pytest.raises(LLMCoreError, match="empty"):
        tok.encode_chat([])


def test_load_errors(tmp_path, tok_dir):
    with pytest.raises(LLMCoreError, match="not a tokenizer dir"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(tok_dir, bad)
    (bad / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(LLMCoreError, match="cannot load"):
        load_tokenizer(bad)


def test_train_streams_and_skips_bad_lines(tmp_path):
    corpus = make_corpus(tmp_path / "c.jsonl", n=30)
    with corpus.open("a", encoding="utf-8") as f:
        f.write("{broken\n" + json.dumps({"other": 1}) + "\n")
    out = train_tokenizer([corpus], tmp_path / "t", vocab_size=300)
    assert load_tokenizer(out).vocab_size == 300
    with pytest.raises(LLMCoreError):
        train_tokenizer([tmp_path / "missing.jsonl"], tmp_path / "t2")
