"""RL math and rewards against hand-computed examples (no model involved)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llmcore.errors import DataError, LLMCoreError
from llmcore.rl.data import read_rl_rows
from llmcore.rl.losses import approx_kl, gae, group_advantages, kl_k3, policy_loss, value_loss, whiten
from llmcore.rl.rewards import exact_reward, format_reward, gt_hits, parse_rewards, repetition_penalty, score, total

# ---------------------------------------------------------------- advantages and losses


def test_group_advantages_by_hand() -> None:
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0]), group_size=2)
    a = 0.5 / (0.5 + 1e-4)
    assert adv.tolist() == pytest.approx([a, -a, -a, a, 0.0, 0.0])
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(5), group_size=2)


def test_kl_k3_by_hand() -> None:
    kl = kl_k3(torch.log(torch.tensor([0.5, 0.3])), torch.log(torch.tensor([0.25, 0.3])))
    assert kl.tolist() == pytest.approx([0.5 - math.log(0.5) - 1, 0.0], abs=1e-7)


@pytest.mark.parametrize("loss", ["grpo", "cispo"])
def test_first_update_is_the_plain_policy_gradient(loss: str) -> None:
    """ratio 1 (logp == old) and KL 0 (policy == reference): the gradient is -A / tokens on every
    counted token, and the GRPO value is -sum(A) / tokens."""
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.1, 0.6, 0.7]])).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([2.0, -1.0])
    out = policy_loss(logp, logp.detach(), adv, mask, denom=5, loss=loss, beta=0.1, ref_logp=logp.detach())
    out.loss.backward()
    want = -(adv.unsqueeze(1) * mask) / 5
    assert torch.allclose(logp.grad, want)
    if loss == "grpo":
        assert float(out.loss.detach()) == pytest.approx(-(2 * 2 - 1 * 3) / 5)
    else:
        assert float(out.loss.detach()) == pytest.approx(float(-(adv.unsqueeze(1) * logp.detach() * mask).sum() / 5))
    assert float(out.clipped) == 0 and float(out.kl) == 0


def test_grpo_clip_and_cispo_cap_by_hand() -> None:
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 1.5]])).requires_grad_()  # ratio 1.5 on both tokens
    adv = torch.tensor([[1.0, -1.0]])
    out = policy_loss(logp, old, adv, torch.ones(1, 2), denom=2, loss="grpo", epsilon=0.2)
    # A=+1: min(1.5, 1.2) = 1.2 (clipped, no gradient); A=-1: min(-1.5, -1.2) = -1.5 (gradient -A*r).
    assert float(out.loss.detach()) == pytest.approx((-1.2 + 1.5) / 2)
    out.loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([0.0, 1.5 / 2])
    assert float(out.clipped) == 1

    logp = torch.log(torch.tensor([[6.0, 2.0]])).requires_grad_()  # ratios 6 and 2
    out = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2), denom=2, loss="cispo", epsilon_high=5.0)
    out.loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([-5.0 / 2, -2.0 / 2])  # the weight is capped at 5, detached
    assert float(out.clipped) == 1


def test_gae_by_hand() -> None:
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]), torch.ones(1, 3), 1.0, 0.95)
    assert adv.tolist()[0] == pytest.approx([0.1 + 0.95 * 0.385, 0.1 + 0.95 * 0.3, 0.3])
    assert ret.tolist()[0] == pytest.approx([0.96575, 0.985, 1.0])
    # The last counted token carries the reward; masked positions give 0 and no value beyond them.
    adv, ret = gae(torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.5, 0.6, 9.0]]), torch.tensor([[1, 1, 0]]))
    assert adv.tolist()[0] == pytest.approx([0.1 + 0.95 * 0.4, 0.4, 0.0])


def test_value_clipping_by_hand() -> None:
    v = torch.tensor([[1.0, 0.2, 0.75]])
    old = torch.tensor([[0.5, 0.5, 0.5]])
    ret = torch.tensor([[0.8, 0.9, 1.0]])
    # 0.5*max(.04, .01); 0.5*max(.49, .36); 0.5*max(.0625, .09): the clipped term wins only in the last.
    assert float(value_loss(v, old, ret, torch.ones(1, 3), denom=3, clip=0.2)) == pytest.approx(
        (0.02 + 0.245 + 0.045) / 3
    )


def test_whiten_and_approx_kl() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    w = whiten(x, m)
    assert w[0, :3].tolist() == pytest.approx([-1.2247, 0.0, 1.2247], abs=1e-4) and float(w[0, 3]) == 0
    assert float(approx_kl(torch.tensor([[0.1, 0.5]]), torch.zeros(1, 2), torch.tensor([[1, 0]]))) == pytest.approx(
        0.005
    )


# ---------------------------------------------------------------- rewards


def test_exact_reward_string_and_list() -> None:
    assert exact_reward([], "<think>\nhmm\n</think>\n\n 42 ", {"gt": "42"}) == 1.0
    assert exact_reward([], "答案是 41", {"gt": "42"}) == 0.0
    assert gt_hits("The total is 1,000 and Paris", ["1000", "paris", "london"]) == 2
    assert exact_reward([], "<think>x</think>It is 3.0 km, Paris.", {"gt": ["3", "Paris", "Rome"]}) == pytest.approx(
        2 / 3
    )
    with pytest.raises(ValueError, match="no gt"):
        exact_reward([], "x", {})


def test_format_reward_by_hand() -> None:
    thinking = "想" * 25
    answer = "这是一个足够长的回答，超过二十个字符，好的好的好的。"
    resp = f"{thinking}</think>{answer}"
    assert format_reward([], resp, {}) == pytest.approx(0.5 + 1.0 + 0.25 - repetition_penalty(answer))
    assert format_reward([], "短", {}) == pytest.approx(-0.5)
    assert format_reward([], "x</think>y</think>" + "z" * 30, {}) == pytest.approx(0.5 - 0.5 - 0.25)
    assert repetition_penalty("a b c a b c a b c") == pytest.approx(0.5)  # 7 trigrams, 3 distinct: capped


def test_reward_specs_weights_and_failures(tmp_path: Path) -> None:
    plugin = tmp_path / "my_rewards.py"
    plugin.write_text(
        "def length(prompt, response, sample):\n    return len(response)\n"
        "def boom(prompt, response, sample):\n    raise RuntimeError('bad day')\n"
        "def nan(prompt, response, sample):\n    return float('nan')\n"
    )
    rewards = parse_rewards(["exact:2", f"{plugin}:length:0.5"])
    assert [(r.name, r.weight) for r in rewards] == [("exact", 2.0), (f"{plugin}:length", 0.5)]
    values = score(rewards, [], "42", {"gt": "42"})
    assert values == {"exact": 1.0, f"{plugin}:length": 2.0} and total(rewards, values) == 3.0
    with pytest.raises(LLMCoreError, match=r"reward .*:boom raised RuntimeError: bad day \(scoring f\.jsonl:3\)"):
        score(parse_rewards([f"{plugin}:boom"]), [], "x", {"source": "f.jsonl:3"})
    with pytest.raises(LLMCoreError, match=r"reward .*:nan returned nan for f\.jsonl:3; a reward must be a finite"):
        score(parse_rewards([f"{plugin}:nan"]), [], "x", {"source": "f.jsonl:3"})
    with pytest.raises(LLMCoreError, match="has no function missing"):
        parse_rewards([f"{plugin}:missing"])
    with pytest.raises(LLMCoreError, match="cannot import no_such_module_xyz"):
        parse_rewards(["no_such_module_xyz:f"])
    with pytest.raises(LLMCoreError, match="no reward"):
        parse_rewards([])
    with pytest.raises(LLMCoreError, match="--reward model needs --reward-model"):
        parse_rewards(["model"])


# ---------------------------------------------------------------- RL rows


def test_rl_rows_and_their_errors(tmp_path: Path) -> None:
    good = tmp_path / "rl.jsonl"
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    good.write_text(
        "\n".join(
            json.dumps(r, ensure_ascii=False)
            for r in [
                {
                    "conversations": [{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": ""}],
                    "gt": "2",
                },
                {
                    "conversations": [
                        {"role": "system", "content": "", "tools": json.dumps(tools)},
                        {"role": "user", "content": "add"},
                        {"role": "assistant", "content": ""},
                    ],
                    "gt": ["3", 4],
                    "extra": 7,
                },
            ]
        )
        + "\n"
    )
    rows = read_rl_rows(good)
    assert rows[0].prompt == [{"role": "user", "content": "1+1=?"}] and rows[0].sample["gt"] == "2"
    assert rows[1].tools == tools and rows[1].sample["extra"] == 7 and rows[1].sample["source"].endswith("rl.jsonl:2")

    def bad(line: str, match: str) -> None:
        p = tmp_path / "bad.jsonl"
        p.write_text(
            json.dumps({"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]})
            + "\n"
            + line
            + "\n"
        )
        with pytest.raises(DataError, match=match):
            read_rl_rows(p)

    bad("{not json", r"bad\.jsonl:2: malformed JSON")
    bad(json.dumps({"conversations": []}), r"bad\.jsonl:2: \"conversations\" must be a non-empty list")
    bad(json.dumps({"conversations": [{"role": "user", "content": "hi"}]}), r"bad\.jsonl:2: the last message must be")
    bad(
        json.dumps({"conversations": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": ""}]}),
        r"bad\.jsonl:2: conversations\[0\]\.role is 'robot'",
    )
    bad(
        json.dumps(
            {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}], "gt": {"a": 1}}
        ),
        r"bad\.jsonl:2: gt must be a string or a list",
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: no rows"):
        read_rl_rows(empty)
