"""A stand-in for `llmcore.model.LLM` whose replies are scripted: for the chat and serve tests of
thinking and tool calls, where what matters is what happens to the tokens a model writes, not the
model. It runs through the real `generate_steps` (KV-cache calls, left padding, eos) like the real model.

`reply(prompt_ids) -> list[int]` gives the tokens a row writes after its prompt; after them the
model writes `eos` forever. Every prompt it saw is kept in `.prompts` (to compare with a reference
rendering).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch

from llmcore.model import ModelConfig


class _Cache:
    def __init__(self) -> None:
        self.replies: list[list[int]] = []
        self.step = 0


class ScriptedLM(torch.nn.Module):
    def __init__(
        self, reply: Callable[[list[int]], list[int]], vocab_size: int, eos_id: int, context: int = 1024
    ) -> None:
        super().__init__()
        self.config = ModelConfig.from_preset("tiny", vocab_size=vocab_size, max_position_embeddings=context)
        self.embed_tokens = torch.nn.Embedding(1, 1)  # only for `.weight.device`
        self.reply, self.eos_id = reply, eos_id
        self.prompts: list[list[int]] = []

    def new_kv_cache(self, batch_size: int, max_len: int) -> _Cache:
        return _Cache()

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, kv_cache: _Cache | None = None
    ) -> SimpleNamespace:
        if kv_cache is None:
            raise AssertionError("generation runs with the KV cache")
        b = input_ids.shape[0]
        if (
            not kv_cache.replies
        ):  # the prompt call: rows are left-padded, each real prompt starts at its last position 0
            for row in range(b):
                pos = position_ids[row].tolist() if position_ids is not None else list(range(input_ids.shape[1]))
                start = max(i for i, p in enumerate(pos) if p == 0)
                prompt = input_ids[row, start:].tolist()
                self.prompts.append(prompt)
                kv_cache.replies.append(list(self.reply(prompt)))
        logits = torch.zeros(b, input_ids.shape[1], self.config.vocab_size)
        for row, script in enumerate(kv_cache.replies):
            token = script[kv_cache.step] if kv_cache.step < len(script) else self.eos_id
            logits[row, -1, token] = 100.0
        kv_cache.step += 1
        return SimpleNamespace(logits=logits)


def text_replies(tokenizer, script: list[tuple[str, str]], default: str = "") -> Callable[[list[int]], list[int]]:
    """`reply` for ScriptedLM: the first `(needle, text)` whose needle is in the decoded prompt gives the
    reply text; encoded with its special tokens (e.g. none) and ended with eos."""

    def reply(prompt: list[int]) -> list[int]:
        decoded = tokenizer.decode(prompt)
        text = next((t for needle, t in script if needle in decoded), default)
        return tokenizer.encode(text) + [tokenizer.eos_id]

    return reply
