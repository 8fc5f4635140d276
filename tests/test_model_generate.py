"""Generation: greedy vs a plain argmax loop, batching, sampling filters, repetition penalty, eos, streaming."""

from __future__ import annotations

import pytest
import torch

from llmcore.chat import stream_text
from llmcore.errors import LLMCoreError
from llmcore.generate import (
    apply_repetition_penalty,
    filter_logits,
    generate,
    sample_next,
    seeded_generator,
    stream_generate,
)
from llmcore.model import LLM, ModelConfig


def tiny(seed: int = 0, **overrides) -> LLM:
    torch.manual_seed(seed)
    return LLM(ModelConfig.from_preset("tiny", **{"initializer_range": 0.2, **overrides})).eval()


def argmax_loop(model: LLM, prompt: list[int], n: int) -> list[int]:
    """The obvious reference: full forward over the whole sequence each step, no cache."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [400, 500, 600, 700]]


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_greedy_equals_argmax_loop(backend: str) -> None:
    model = tiny(attn_backend=backend)
    out = generate(model, [PROMPTS[0]], max_new_tokens=12, temperature=0, eos_id=None)
    expected = argmax_loop(model, PROMPTS[0], 12)
    assert out == [expected]
    assert len(set(expected)) > 3  # a model that repeats one token would make this test vacuous


def test_batched_prompts_of_different_lengths_equal_one_by_one() -> None:
    model = tiny()
    batched = generate(model, PROMPTS, max_new_tokens=10, eos_id=None)
    alone = [generate(model, [p], max_new_tokens=10, eos_id=None)[0] for p in PROMPTS]
    assert batched == alone
    assert batched == [argmax_loop(model, p, 10) for p in PROMPTS]
    # The uncached path with the same left padding agrees too.
    assert generate(model, PROMPTS, max_new_tokens=10, eos_id=None, use_cache=False) == batched


def test_moe_generation_cache_equals_no_cache() -> None:
    model = tiny(use_moe=True)
    assert generate(model, PROMPTS, 8, eos_id=None) == generate(model, PROMPTS, 8, eos_id=None, use_cache=False)


def test_stops_on_eos_per_row_and_streams() -> None:
    model = tiny()
    free = generate(model, PROMPTS, max_new_tokens=10, eos_id=None)
    eos = free[0][3]  # pretend the 4th token of row 0 is the end token
    streamed: list[tuple[int, int]] = []
    out = generate(model, PROMPTS, max_new_tokens=10, eos_id=eos, stream=lambda r, t: streamed.append((r, t)))
    assert out[0] == free[0][:3]
    for row in (1, 2):  # other rows run on until their own eos (if any) or the limit
        cut = free[row].index(eos) if eos in free[row] else 10
        assert out[row] == free[row][:cut]
    for row in range(3):
        assert [t for r, t in streamed if r == row] == out[row]
    assert list(stream_generate(model, PROMPTS[0], max_new_tokens=10, eos_id=eos)) == out[0]


def test_top_k_restricts_samples() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9, -1.0, 2.8]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, temperature=5.0, top_k=3, generator=g)) for _ in range(300)}
    assert draws == {1, 3, 5}


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = torch.isfinite(filter_logits(logits, top_p=0.75))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.75, 0.5+0.3 reaches it
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.1)).sum() == 1  # the top token always stays
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, temperature=1.0, top_p=0.75, generator=g)) for _ in range(300)}
    assert draws == {0, 1}


def test_top_p_below_float32_resolution_keeps_the_top_token() -> None:
    # 1e-300 is a valid top_p in (0, 1] but 0 in float32: the top token must still be sampled (was a crash).
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5], [3.0, 0.0, 0.0, 0.0]])
    assert torch.isfinite(filter_logits(logits, top_p=1e-300)).tolist() == [
        [False, True, False, False],
        [True, False, False, False],
    ]
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, temperature=1.0, top_p=1e-300, generator=g).tolist() == [1, 0]


def test_temperature_sharpens_and_flattens() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    cold = [int(sample_next(logits, temperature=0.05, generator=g)) for _ in range(200)]
    hot = [int(sample_next(logits, temperature=100.0, generator=g)) for _ in range(600)]
    assert set(cold) == {0}
    assert set(hot) == {0, 1, 2} and min(hot.count(i) for i in range(3)) > 120
    assert int(sample_next(logits, temperature=0)) == 0


def test_sampling_is_reproducible_with_a_seed() -> None:
    model = tiny()

    def run(seed: int) -> list:
        return generate(
            model, PROMPTS, 8, temperature=1.0, top_k=50, eos_id=None, generator=torch.Generator().manual_seed(seed)
        )

    assert run(1) == run(1) and run(1) != run(2)


def test_seeded_generator_repeats_a_seed_and_draws_fresh_without_one() -> None:
    model = tiny()
    # A seed gives torch's own seeded stream; None must not fall back to torch's constant default seed
    # (every unseeded chat or generate run would then sample the same replies).
    assert torch.equal(
        torch.rand(8, generator=seeded_generator(model, 3)), torch.rand(8, generator=torch.Generator().manual_seed(3))
    )
    fresh = [torch.rand(8, generator=seeded_generator(model, None)) for _ in range(2)]
    assert not torch.equal(fresh[0], fresh[1])
    assert not torch.equal(fresh[0], torch.rand(8, generator=torch.Generator()))


def test_repetition_penalty() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]
    # In generation: a strong penalty prevents repeats that greedy decoding otherwise makes.
    model = tiny(initializer_range=0.05)
    plain = generate(model, [[5, 6]], 12, eos_id=None)[0]
    assert len(set(plain)) < len(plain)
    penalised = generate(model, [[5, 6]], 12, eos_id=None, repetition_penalty=1e4)[0]
    assert len(set(penalised)) == len(penalised) and not {5, 6} & set(penalised)


def test_bad_arguments_are_user_errors() -> None:
    model = tiny()
    with pytest.raises(LLMCoreError):
        generate(model, [[]], 4)
    with pytest.raises(LLMCoreError):
        generate(model, [[1]], 2000)  # tiny has 1024 positions
    with pytest.raises(LLMCoreError):
        generate(model, [[1]], 4, top_p=0)


class _ByteTok:
    """Decodes ids as UTF-8 bytes: a multi-byte character arrives split over tokens."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_stream_text_holds_back_partial_characters() -> None:
    data = list("a你b".encode())
    pieces = list(stream_text(_ByteTok(), iter(data)))
    assert "".join(pieces) == "a你b"
    assert all("\ufffd" not in p for p in pieces)
