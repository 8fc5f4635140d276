"""The math of reinforcement learning on language models, as plain tensor functions.

Shapes: `logp`, `old_logp`, `ref_logp`, `mask`, `values`: (N, R), one row per sampled response and
one column per response token (R = the longest response); `mask` is 1 on the tokens that count
(the response through its end-of-turn token), 0 on padding. Rewards are per response, (N,).

Normalisation (TRL's token-level rule, `loss_type="dapo"`/`"bnpo"`): a policy loss is the sum of its
per-token terms over every counted token of the batch, divided by the number of those tokens, so a
long response weighs as much per token as a short one (MiniMind's per-sequence mean gives each
response equal weight instead, which tilts the update toward short answers). Callers that split a
batch into micro batches pass the global token count as `denom`.

GRPO (MiniMind `--loss_type grpo`): ratio r = exp(logp - old_logp), per-token loss
`-(min(r A, clip(r, 1-eps, 1+eps) A) - beta KL)`. CISPO (MiniMind's default): the importance weight
is clipped from above and detached, the gradient flows through logp only:
`-(sg(min(r, eps_high)) A logp - beta KL)`. KL to the reference is the k3 estimator
`exp(ref - logp) - (ref - logp) - 1` (non-negative, unbiased, 0 where the policies agree), as
MiniMind and TRL use. At the first update of a step (logp == old_logp, policy == reference) both
reduce to the plain policy gradient `-A grad logp`.

PPO (MiniMind's train_ppo.py): GAE over response tokens with the reward added at the last counted
token, advantages whitened over the counted tokens, clipped policy loss, value loss
`0.5 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)`, KL to the reference in the loss (not in
the reward), early stop when the approximate KL `0.5 (logp - old_logp)^2` passes a bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSSES = ("grpo", "cispo")


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-normalised advantages: each reward minus its group's mean, over the group's
    (population) standard deviation plus `eps`. Rows `[g*group_size, (g+1)*group_size)` are one
    prompt's samples (MiniMind: `std(unbiased=False)`, eps 1e-4)."""
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (n_prompts * {group_size},), got {tuple(rewards.shape)}")
    g = rewards.view(-1, group_size).float()
    mean = g.mean(dim=1, keepdim=True)
    std = g.std(dim=1, unbiased=False, keepdim=True)
    return ((g - mean) / (std + eps)).view(-1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): exp(d) - d - 1 with d = ref_logp - logp."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


@dataclass
class PolicyLoss:
    loss: torch.Tensor  # summed per-token loss / denom (what backward takes)
    clipped: torch.Tensor  # counted tokens whose ratio was clipped (a sum, for the clip fraction)
    kl: torch.Tensor  # summed per-token KL to the reference over counted tokens (a sum)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    denom: float,
    loss: str = "cispo",
    epsilon: float = 0.2,
    epsilon_high: float = 5.0,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
) -> PolicyLoss:
    """GRPO or CISPO per-token loss, token-level normalised (see the module docstring).

    `advantages` is (N,) (one per response, GRPO) or (N, R) (per token, PPO)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    if loss == "grpo":
        unclipped = ratio * adv
        clipped_term = torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * adv
        per_token = -torch.min(unclipped, clipped_term)
        was_clipped = (clipped_term < unclipped).to(logp.dtype)
    else:
        weight = torch.clamp(ratio, max=epsilon_high).detach()
        per_token = -(weight * adv * logp)
        was_clipped = (ratio > epsilon_high).to(logp.dtype)
    kl = torch.zeros_like(logp)
    if beta and ref_logp is not None:
        kl = kl_k3(logp, ref_logp)
        per_token = per_token + beta * kl
    return PolicyLoss((per_token * mask).sum() / denom, (was_clipped * mask).sum().detach(), (kl * mask).sum().detach())


def gae(
    token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens: `(advantages, returns)`, both (N, R).

    delta_t = r_t + gamma V_{t+1} - V_t (V past the last counted token is 0);
    A_t = delta_t + gamma lam A_{t+1}; returns = A + V. Positions outside `mask` give 0."""
    mask = mask.to(values.dtype)
    values = values * mask
    n, length = values.shape
    adv = torch.zeros_like(values)
    last = torch.zeros(n, dtype=values.dtype, device=values.device)
    for t in reversed(range(length)):
        next_v = values[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = token_rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance over the masked entries (MiniMind's PPO advantage normalisation)."""
    m = mask.to(x.dtype)
    n = m.sum().clamp(min=1)
    mean = (x * m).sum() / n
    var = ((x - mean) ** 2 * m).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * m


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    denom: float,
    clip: float = 0.2,
) -> torch.Tensor:
    """PPO's clipped value loss, 0.5 max((V - R)^2, (clip(V, V_old +- clip) - R)^2), summed over
    counted tokens / denom."""
    m = mask.to(values.dtype)
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    per_token = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    return (per_token * m).sum() / denom


def approx_kl(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed 0.5 (logp - old_logp)^2 over counted tokens (divide by their count for the mean)."""
    return (0.5 * (logp - old_logp) ** 2 * mask.to(logp.dtype)).sum()


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    denom: float,
    clip: float = 0.2,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
) -> PolicyLoss:
    """PPO's clipped surrogate with per-token advantages (the GRPO formula with eps = clip)."""
    return policy_loss(logp, old_logp, advantages, mask, denom, loss="grpo", epsilon=clip, beta=beta, ref_logp=ref_logp)


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position, in fp32: logits (N, T, V), targets (N, T) -> (N, T)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


__all__ = [
    "LOSSES",
    "group_advantages",
    "kl_k3",
    "PolicyLoss",
    "policy_loss",
    "gae",
    "whiten",
    "value_loss",
    "approx_kl",
    "ppo_policy_loss",
    "token_logps",
]
