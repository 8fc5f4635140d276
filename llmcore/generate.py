"""Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p), repetition
penalty, stop on eos, streaming, and batches of prompts of different lengths.

Batches are left-padded. Each pad token gets position 0, which makes it a document of its own
under the model's packing rule (a document starts where position_ids == 0), so real tokens never
attend to padding and every prompt sees exactly the positions it would see alone.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import torch

from llmcore.errors import LLMCoreError
from llmcore.model import LLM

StreamCallback = Callable[[int, int], None]  # (row index, new token id)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as transformers): tokens already seen get positive logits divided and
    negative ones multiplied by `penalty`. logits (B, V) float, seen (B, V) bool."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest nucleus whose mass reaches top_p."""
    if top_k and top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p; the top token always stays, even
        # when top_p is below float32's resolution (1e-300 rounds to 0, which would drop every token).
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token per row from (B, V) logits; temperature <= 0 means greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(
    max_new_tokens: int, temperature: float, top_k: int, top_p: float, repetition_penalty: float
) -> None:
    """One-line errors for settings that would sample nonsense or crash mid-generation (a NaN
    temperature, a negative one silently meaning greedy, top_p outside (0, 1], ...)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise LLMCoreError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise LLMCoreError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_k, int) or top_k < 0:
        raise LLMCoreError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise LLMCoreError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    if not (math.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise LLMCoreError(f"repetition_penalty must be a finite number > 0 (1 = off), got {repetition_penalty!r}")


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        n = len(p)
        ids[i, width - n :] = torch.tensor(list(p), dtype=torch.long)
        pos[i, width - n :] = torch.arange(n)
    return ids.to(device), pos.to(device)


def generate_steps(
    model: LLM,
    prompt_ids_batch: Sequence[Sequence[int]],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    eos_id: int | None = 2,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    pad_id: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield `(tokens, active)` per step: the (B,) new tokens and which rows were still generating.

    A row stops after producing `eos_id` (the eos is yielded with active=True, never afterwards).
    """
    if not prompt_ids_batch or any(len(p) == 0 for p in prompt_ids_batch):
        raise LLMCoreError("every prompt needs at least one token")
    check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    cfg = model.config
    longest = max(len(p) for p in prompt_ids_batch)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise LLMCoreError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"{cfg.max_position_embeddings} positions"
        )
    device = model.embed_tokens.weight.device
    ids, pos = _left_pad(prompt_ids_batch, pad_id, device)
    b, width = ids.shape
    seen = torch.zeros(b, cfg.vocab_size, dtype=torch.bool, device=device)
    for i, p in enumerate(prompt_ids_batch):
        seen[i, torch.tensor(list(p), device=device)] = True
    active = torch.ones(b, dtype=torch.bool, device=device)
    next_pos = pos[:, -1] + 1

    cache = model.new_kv_cache(b, width + max_new_tokens) if use_cache else None
    all_ids, all_pos = ids, pos
    step_ids, step_pos = ids, pos
    for _ in range(max_new_tokens):
        with torch.no_grad():
            if use_cache:
                logits = model(step_ids, position_ids=step_pos, kv_cache=cache).logits[:, -1]
            else:
                logits = model(all_ids, position_ids=all_pos).logits[:, -1]
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        tok = sample_next(logits, temperature, top_k, top_p, generator)
        tok = torch.where(active, tok, torch.full_like(tok, pad_id))
        yield tok, active.clone()
        seen[active, tok[active]] = True
        if eos_id is not None:
            active = active & (tok != eos_id)
        if not bool(active.any()):
            return
        step_ids, step_pos = tok.unsqueeze(1), next_pos.unsqueeze(1)
        next_pos = next_pos + 1
        if not use_cache:
            all_ids = torch.cat([all_ids, step_ids], dim=1)
            all_pos = torch.cat([all_pos, step_pos], dim=1)


@torch.no_grad()
def generate(
    model: LLM,
    prompt_ids_batch: Sequence[Sequence[int]],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    eos_id: int | None = 2,
    stream: StreamCallback | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    pad_id: int = 0,
) -> list[list[int]]:
    """Continue each prompt; returns the new tokens per prompt (eos not included).

    `stream(row, token)` is called for every new non-eos token as soon as it is chosen.
    `temperature=0` is greedy; `generator` makes sampling reproducible.
    """
    was_training = model.training
    model.eval()
    out: list[list[int]] = [[] for _ in prompt_ids_batch]
    try:
        for tok, active in generate_steps(
            model,
            prompt_ids_batch,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            eos_id,
            use_cache,
            generator,
            pad_id,
        ):
            for row, (t, a) in enumerate(zip(tok.tolist(), active.tolist())):
                if a and t != eos_id:
                    out[row].append(t)
                    if stream is not None:
                        stream(row, t)
    finally:
        model.train(was_training)
    return out


def seeded_generator(model: LLM, seed: int | None) -> torch.Generator:
    """A sampling generator on the model's device: seeded (reproducible) or, for `seed=None`, from fresh
    entropy (torch's default seed is a constant, so an unseeded generator would repeat every run's samples)."""
    generator = torch.Generator(device=model.embed_tokens.weight.device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def stream_generate(model: LLM, prompt_ids: Sequence[int], **kwargs: object) -> Iterator[int]:
    """Iterator over the new tokens of one prompt (eos not included), one at a time as they are produced.

    Keyword arguments as `generate_steps` (max_new_tokens, temperature, top_k, top_p, ...).
    """
    was_training = model.training
    model.eval()
    eos_id = kwargs.get("eos_id", 2)
    try:
        for tok, active in generate_steps(model, [list(prompt_ids)], **kwargs):  # type: ignore[arg-type]
            t = int(tok[0])
            if bool(active[0]) and t != eos_id:
                yield t
    finally:
        model.train(was_training)
