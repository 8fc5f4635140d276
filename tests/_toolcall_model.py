"""A tiny model trained on CPU until it reproduces a MiniMind-3 tool-call conversation: the tool call,
then the answer after the tool's response (about 70 full-batch steps; seconds on an idle 2-core machine).
For the serve test of tools with a real model; needs MiniMind-3's tokenizer from ../shared/data
(callers skip without it).

The training text of each conversation is what transformers' own `apply_chat_template` renders for
it (the reply is the rendered conversation minus the rendered generation prompt), so the model
learns the template's format, not ours.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "查询城市天气",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "城市名"}},
            "required": ["city"],
        },
    },
}
TOOLS = [WEATHER_TOOL]
ASK = [{"role": "user", "content": "北京天气怎么样？"}]
CALL = {
    "role": "assistant",
    "content": "",
    "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}
    ],
}
TOOL_RESULT = {"role": "tool", "tool_call_id": "call_1", "content": '{"weather": "晴", "temp": 25}'}
ANSWER = {"role": "assistant", "content": "北京今天晴，25度。"}

# (messages before the reply, the reply, tools, thinking)
CONVERSATIONS = [(ASK, CALL, TOOLS, False), (ASK + [CALL, TOOL_RESULT], ANSWER, TOOLS, False)]


def minimind3_tokenizer_dir() -> Path:
    from conftest import shared_data_dir

    path = shared_data_dir() / "minimind3_tokenizer"
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"MiniMind-3's tokenizer is not at {path}")
    return path


def _reply_text(hf_tok: Any, before: list[dict], reply: dict, tools: list | None, thinking: bool) -> str:
    full = hf_tok.apply_chat_template(before + [reply], tools=tools, tokenize=False)
    prompt = hf_tok.apply_chat_template(
        before, tools=tools, tokenize=False, add_generation_prompt=True, open_thinking=thinking
    )
    assert full.startswith(prompt), "the template does not extend the generation prompt"
    return full[len(prompt) :].rstrip("\n")  # ends with <|im_end|>, the eos


def train_toolcall_run(root: Path, max_steps: int = 300) -> Path:
    """A run dir (checkpoints/step-1, latest, tokenizer/) whose greedy replies are the conversations'."""
    from transformers import AutoTokenizer

    from llmcore.chat_format import prompt_ids
    from llmcore.checkpoint import save_model
    from llmcore.data_prep.tokenizer import load_tokenizer
    from llmcore.generate import generate
    from llmcore.model import LLM, ModelConfig

    tok_dir = minimind3_tokenizer_dir()
    tok, hf_tok = load_tokenizer(tok_dir), AutoTokenizer.from_pretrained(str(tok_dir))
    rows = []
    for before, reply, tools, thinking in CONVERSATIONS:
        p = prompt_ids(tok, before, tools=tools, thinking=thinking)
        rows.append((p, tok.encode(_reply_text(hf_tok, before, reply, tools, thinking))))
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        seq = torch.tensor(p + r)
        ids[i, : len(seq)] = seq
        labels[i, len(p) - 1 : len(seq) - 1] = torch.tensor(r)  # position t predicts token t+1
    torch.manual_seed(0)
    model = LLM(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=512))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(1, max_steps + 1):
        model.train()
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 and loss.item() < 0.3:
            model.eval()
            out = generate(
                model,
                [p for p, _ in rows],
                max_new_tokens=max(len(r) for _, r in rows),
                temperature=0,
                eos_id=tok.eos_id,
            )
            if all(o + [tok.eos_id] == r for o, (_, r) in zip(out, rows)):
                break
    else:
        raise AssertionError(f"the tiny model did not learn the conversations in {max_steps} steps")
    model.eval()
    run = root / "toolcall-run"
    save_model(model, run / "checkpoints" / "step-1")
    (run / "checkpoints" / "latest").write_text("step-1\n")
    shutil.copytree(tok_dir, run / "tokenizer")
    return run
