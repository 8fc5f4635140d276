"""Grounded answers: the one prompt format that puts retrieved passages into the chat template.

The format (`answer_messages`), used by `llmcore rag query --answer`, `rag eval --ckpt` and
`llmcore serve --rag`:

    system:  DEFAULT_SYSTEM (or the caller's system prompt)
    user:    参考资料：
             [1] 《title》(doc_id)        <- the title part only when the passage has a title
             passage text
             [2] ...
             (blank line)
             问题：question
             请根据参考资料回答。

The chat template then renders these messages exactly as in chat/SFT, with the generation prompt
for the assistant. Invariants: passages appear in the given order (best first), numbered from 1,
with their text unchanged; `fit_passages` only drops passages from the end or cuts the last one's
tail, so the prompt fits the model's positions.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterator

from llmcore.errors import LLMCoreError
from llmcore.rag.retriever import Passage

DEFAULT_SYSTEM = "你是一个严谨的问答助手。请只依据参考资料回答用户的问题，回答简洁；资料里没有答案时，就说不知道。"


def _context(passages: list[Passage]) -> str:
    parts = []
    for i, p in enumerate(passages, 1):
        head = f"[{i}] 《{p.title}》({p.doc_id})" if p.title else f"[{i}] ({p.doc_id})"
        parts.append(f"{head}\n{p.text.strip()}")
    return "\n".join(parts)


def answer_messages(question: str, passages: list[Passage], system: str | None = None) -> list[dict[str, str]]:
    """Chat messages asking the model to answer `question` from `passages` (best first)."""
    if not question or not question.strip():
        raise LLMCoreError("empty question")
    user = (
        f"参考资料：\n{_context(passages)}\n\n问题：{question.strip()}\n请根据参考资料回答。"
        if passages
        else f"问题：{question.strip()}"
    )
    return [{"role": "system", "content": system or DEFAULT_SYSTEM}, {"role": "user", "content": user}]


def prompt_ids(tokenizer: Any, question: str, passages: list[Passage], system: str | None = None) -> list[int]:
    # Special-token strings inside the passages or the question stay plain text (no forged turns).
    return tokenizer.encode_prompt(answer_messages(question, passages, system))


def fit_passages(
    tokenizer: Any, question: str, passages: list[Passage], max_prompt_tokens: int, system: str | None = None
) -> list[Passage]:
    """The longest prefix of `passages` (the last one possibly cut short) whose prompt fits the budget."""
    kept = list(passages)
    while kept and len(prompt_ids(tokenizer, question, kept, system)) > max_prompt_tokens:
        last = kept[-1]
        without = len(prompt_ids(tokenizer, question, kept[:-1], system))
        if without > max_prompt_tokens or len(last.text) < 32:
            kept.pop()
            continue
        lo, hi = 0, len(last.text)  # longest prefix of the last passage that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            trial = kept[:-1] + [replace(last, text=last.text[:mid], end=last.start + mid)]
            if len(prompt_ids(tokenizer, question, trial, system)) <= max_prompt_tokens:
                lo = mid
            else:
                hi = mid - 1
        if lo < 32:
            kept.pop()
        else:
            kept[-1] = replace(last, text=last.text[:lo], end=last.start + lo)
            break
    if len(prompt_ids(tokenizer, question, kept, system)) > max_prompt_tokens:
        raise LLMCoreError(f"the question alone needs more than {max_prompt_tokens} prompt tokens")
    return kept


def answer_stream(
    model: Any,
    tokenizer: Any,
    question: str,
    passages: list[Passage],
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.1,
    seed: int | None = 0,
) -> Iterator[str]:
    """Stream the model's answer text piece by piece (passages already fitted to the model)."""
    from llmcore.chat import stream_reply

    yield from stream_reply(
        model,
        tokenizer,
        prompt_ids(tokenizer, question, passages, system),
        seed=seed,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
    )


__all__ = ["DEFAULT_SYSTEM", "answer_messages", "prompt_ids", "fit_passages", "answer_stream"]
