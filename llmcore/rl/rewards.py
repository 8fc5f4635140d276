"""Rewards for RL: named, weighted and summed (`--reward NAME[:WEIGHT]`, repeatable).

A reward is a function `(prompt, response, sample) -> float`: `prompt` the conversation before the
response (a list of messages), `response` the generated text (think block and tool calls included),
`sample` the RL row (`gt`, `tools`, `source` "file:line", ...). Built in:

- `exact`: the answer (the response after its last `</think>`, stripped) equals `gt` (1.0, else 0.0);
  with `gt` a list, the share of its items the answer contains, each as a case-insensitive substring
  or as a number within 1e-6 (MiniMind's `validate_gt_in_text`). A row without `gt` is an error.
- `format`: MiniMind's rules (train_grpo.py `calculate_rewards`, without the reward model): +0.5 for a
  response of 20..800 characters, else -0.5; if it closes a think block, +1.0 for 20..300 characters
  of thinking, else -0.5, and +0.25 for exactly one `</think>`, else -0.25; minus the 3-gram
  repetition penalty of the answer (at most 0.5).
- `module:function` (or `path/to/file.py:function`): the user's own function. It is imported from the
  name given on the command line, like any plugin: only name code you trust.
- a reward model (`--reward-model DIR`, name `model`): a transformers sequence-classification
  model scoring the conversation with the response appended, rendered by its own tokenizer's chat
  template; the score is its first logit.

A reward that raises, or returns something that is not a finite number, stops the run with one line
naming the reward and the row.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from llmcore.errors import LLMCoreError

RewardFn = Callable[[list[dict], str, dict], float]


def answer_of(response: str) -> str:
    """The answer part of a response: what follows its last `</think>`, stripped."""
    return response.rsplit("</think>", 1)[-1].strip()


_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?![\w.])")


def gt_hits(text: str, gt: Sequence[Any]) -> int:
    """How many items of `gt` appear in `text`: as a case-insensitive substring, or (numbers) within
    1e-6 of a number in the text, commas ignored (MiniMind's `validate_gt_in_text`)."""
    lower = text.lower()
    numbers = [float(x) for x in _NUMBER.findall(text.replace(",", ""))]
    hits = 0
    for g in gt:
        s = str(g).strip()
        if s and s.lower() in lower:
            hits += 1
            continue
        plain = s.replace(",", "")
        if re.fullmatch(r"[-+]?\d+(?:\.\d+)?", plain) and any(abs(float(plain) - n) < 1e-6 for n in numbers):
            hits += 1
    return hits


def exact_reward(prompt: list[dict], response: str, sample: dict) -> float:
    gt = sample.get("gt")
    if gt is None:
        raise ValueError("the row has no gt field (the exact reward compares the answer with it)")
    answer = answer_of(response)
    if isinstance(gt, list):
        return gt_hits(answer, gt) / len(gt) if gt else 0.0
    return 1.0 if answer == str(gt).strip() else 0.0


def repetition_penalty(text: str, n: int = 3, cap: float = 0.5) -> float:
    """MiniMind's `rep_penalty`: the share of repeated word n-grams, scaled so it reaches `cap`."""
    toks = re.findall(r"\w+|[^\w\s]", text.lower())
    grams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
    return min(cap, (len(grams) - len(set(grams))) * cap * 2 / len(grams)) if grams else 0.0


def format_reward(prompt: list[dict], response: str, sample: dict) -> float:
    reward = 0.5 if 20 <= len(response.strip()) <= 800 else -0.5
    answer = response
    if "</think>" in response:
        thinking, answer = response.split("</think>", 1)
        reward += 1.0 if 20 <= len(thinking.strip()) <= 300 else -0.5
        reward += 0.25 if response.count("</think>") == 1 else -0.25
        answer = answer.strip()
    return reward - repetition_penalty(answer)


BUILTIN: dict[str, RewardFn] = {"exact": exact_reward, "format": format_reward}


def _load_function(spec: str) -> RewardFn:
    module_name, _, func_name = spec.rpartition(":")
    if not module_name or not func_name:
        raise LLMCoreError(f"--reward {spec!r}: expected a built-in ({', '.join(BUILTIN)}) or module:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise LLMCoreError(f"--reward {spec!r}: no file {path}")
            mod_spec = importlib.util.spec_from_file_location(f"llmcore_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
            sys.modules[mod_spec.name] = module  # type: ignore[union-attr]
            mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(module_name)
    except LLMCoreError:
        raise
    except Exception as err:  # the user's module failed to import: say which and why, in one line
        raise LLMCoreError(f"--reward {spec!r}: cannot import {module_name}: {type(err).__name__}: {err}") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise LLMCoreError(f"--reward {spec!r}: {module_name} has no function {func_name}")
    return fn


class RewardModel:
    """A transformers sequence-classification model as a reward: the first logit of the rendered
    conversation (prompt + the response as the assistant's turn)."""

    def __init__(self, path: str | Path, device: Any = "cpu") -> None:
        try:
            import torch
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ImportError as err:  # pragma: no cover - transformers is a core dependency
            raise LLMCoreError(f"--reward-model needs transformers: {err}") from None
        path = Path(path)
        if not (path / "config.json").is_file():
            raise LLMCoreError(f"--reward-model {path}: not a transformers model folder (no config.json)")
        try:
            self.tok = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).to(device).eval()
        except (OSError, ValueError) as err:
            raise LLMCoreError(f"--reward-model {path}: {str(err).splitlines()[0]}") from None
        self.device = device
        self.torch = torch

    def __call__(self, prompt: list[dict], response: str, sample: dict) -> float:
        messages = [*prompt, {"role": "assistant", "content": answer_of(response)}]
        text = self.tok.apply_chat_template(messages, tokenize=False)
        ids = self.tok(
            text,
            return_tensors="pt",
            add_special_tokens=False,
            truncation=True,
            max_length=getattr(self.tok, "model_max_length", 4096) or 4096,
        )["input_ids"].to(self.device)
        with self.torch.no_grad():
            return float(self.model(input_ids=ids).logits[0, 0])


@dataclass
class Reward:
    name: str
    weight: float
    fn: RewardFn


def parse_rewards(specs: Sequence[str], reward_model: str | None = None, device: Any = "cpu") -> list[Reward]:
    """`NAME[:WEIGHT]` specs (a module:function may carry a weight as a third part) -> rewards."""
    out: list[Reward] = []
    model_weight = 1.0
    for spec in specs:
        spec = spec.strip()
        weight = 1.0
        head, _, tail = spec.rpartition(":")
        if head and re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?", tail):
            spec, weight = head, float(tail)
        if spec in BUILTIN:
            out.append(Reward(spec, weight, BUILTIN[spec]))
        elif spec == "model":
            if reward_model is None:
                raise LLMCoreError("--reward model needs --reward-model DIR (a sequence-classification model folder)")
            model_weight = weight
        else:
            out.append(Reward(spec, weight, _load_function(spec)))
        if not math.isfinite(weight):
            raise LLMCoreError(f"--reward {spec}: the weight must be a finite number")
    if reward_model is not None:
        out.append(Reward("model", model_weight, RewardModel(reward_model, device)))
    if not out:
        raise LLMCoreError("no reward: give --reward exact|format|module:function (repeatable) or --reward-model DIR")
    names = [r.name for r in out]
    if len(set(names)) != len(names):
        raise LLMCoreError(f"--reward: {', '.join(sorted({n for n in names if names.count(n) > 1}))} given twice")
    return out


def score(rewards: Sequence[Reward], prompt: list[dict], response: str, sample: dict) -> dict[str, float]:
    """Each reward's value for one response (unweighted), checked: one line naming the culprit."""
    values: dict[str, float] = {}
    for r in rewards:
        try:
            v = r.fn(prompt, response, sample)
        except LLMCoreError:
            raise
        except Exception as err:
            where = sample.get("source", "a row")
            raise LLMCoreError(
                f"reward {r.name} raised {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                f" (scoring {where})"
            ) from None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise LLMCoreError(
                f"reward {r.name} returned {v!r} for {sample.get('source', 'a row')}; a reward must be a finite number"
            )
        values[r.name] = float(v)
    return values


def total(rewards: Sequence[Reward], values: dict[str, float]) -> float:
    return sum(r.weight * values[r.name] for r in rewards)


__all__ = [
    "RewardFn",
    "Reward",
    "BUILTIN",
    "answer_of",
    "gt_hits",
    "exact_reward",
    "format_reward",
    "repetition_penalty",
    "RewardModel",
    "parse_rewards",
    "score",
    "total",
]
