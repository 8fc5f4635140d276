"""What each stage minimises. The Trainer is the same for all; an objective turns a micro batch and
the model's output into a loss whose gradients, summed over the micro batches of a global batch and
averaged over processes, equal the gradient of the global-batch loss computed in one piece.

How that works: before the first micro batch of a step the Trainer asks every micro batch for its
`count` (loss tokens for LM, pairs for DPO), sums them over micro batches and processes, and passes
that total as `denom`. Each micro batch then contributes `sum_of_per_item_losses / denom`, so no
micro batch is weighted by its own token count (which would make accumulation differ from one big
batch whenever micro batches hold different numbers of loss tokens).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from llmcore.data_prep.loaders import IGNORE_INDEX
from llmcore.train.protocols import StepTerms, model_positions

log = logging.getLogger("llmcore.train")


def perplexity(loss: float) -> float:
    """exp(loss), clamped so a diverged loss reads as a huge number instead of overflowing."""
    return math.exp(min(loss, 50.0))


def masked_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy over positions whose label is not -100, and their count.

    `labels` are already shifted by the loader (label t is the token after input t)."""
    v = logits.shape[-1]
    total = F.cross_entropy(
        logits.float().reshape(-1, v), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total, (labels != IGNORE_INDEX).sum()


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) per position, 0 where the label is -100; shape (rows, T)."""
    v = logits.shape[-1]
    nll = F.cross_entropy(
        logits.float().reshape(-1, v), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return -nll.view(labels.shape)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool) -> torch.Tensor:
    """Per-row log-probability of the labelled tokens: their sum, or their mean when `average`."""
    lp = token_logps(logits, labels).sum(-1)
    if average:
        lp = lp / (labels != IGNORE_INDEX).sum(-1).clamp(min=1)
    return lp


class LMObjective:
    """Pretrain and SFT: masked next-token cross-entropy, mean over every loss token of the global
    batch, plus the MoE load-balancing loss (averaged over micro batches and processes)."""

    def count(self, batch: dict[str, Any]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def __call__(
        self, forward: Callable[[dict[str, Any]], Any], batch: dict[str, Any], denom: float, n_micro: int, world: int
    ) -> StepTerms:
        out = forward(batch)
        ce_sum, _ = masked_ce_sum(out.logits, batch["labels"])
        aux = out.aux_loss.float()
        ce_part = ce_sum / denom
        aux_part = aux / (n_micro * world)
        # x world: the data-parallel engine averages gradients over processes; the global loss is a sum.
        loss = (ce_part + aux_part) * world
        terms = {"loss": (ce_part + aux_part).detach(), "ce_loss": ce_part.detach()}
        # Decided without reading the value (a device sync per micro batch): only an MoE model's aux
        # loss carries a gradient; a dense model's is a constant zero.
        if aux.requires_grad:
            terms["aux_loss"] = aux_part.detach()
        return StepTerms(loss, terms)


def row_key(input_ids: torch.Tensor, labels: torch.Tensor) -> bytes:
    """A key for one padded row that ignores its padding: a causal model's log-probs of the labelled
    tokens depend only on the inputs up to the last labelled position."""
    idx = (labels != IGNORE_INDEX).nonzero()
    end = int(idx[-1]) + 1 if len(idx) else 0
    h = hashlib.blake2b(digest_size=16)
    h.update(input_ids[:end].cpu().numpy().astype("int64").tobytes())
    h.update(labels[:end].cpu().numpy().astype("int64").tobytes())
    return h.digest()


class DPOObjective:
    """Direct preference optimisation against a frozen reference (a model, or log-probs computed once).

    loss = -logsigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))), mean over the pairs of the global
    batch. Rewards as TRL logs them: rewards/chosen = beta*(pi_c - ref_c), rewards/rejected =
    beta*(pi_r - ref_r), accuracy = mean(chosen > rejected), margin = mean(chosen - rejected).
    """

    def __init__(
        self,
        beta: float,
        average_logp: bool,
        ref_model: torch.nn.Module | None = None,
        ref_cache: dict[bytes, float] | None = None,
        autocast: Callable[[], Any] | None = None,
    ) -> None:
        if (ref_model is None) == (ref_cache is None):
            raise ValueError("DPOObjective needs exactly one of ref_model or ref_cache")
        self.beta = beta
        self.average = average_logp
        self.ref_model = ref_model
        self.ref_cache = ref_cache
        self.autocast = autocast
        self._warned_empty = False

    def count(self, batch: dict[str, Any]) -> int:
        return int(batch["num_pairs"])

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.ref_cache is not None:
            keys = [row_key(ids, labels) for ids, labels in zip(batch["input_ids"], batch["labels"])]
            missing = [k for k in keys if k not in self.ref_cache]
            if missing:
                raise RuntimeError(f"{len(missing)} rows have no precomputed reference log-prob")
            return torch.tensor(
                [self.ref_cache[k] for k in keys], dtype=torch.float32, device=batch["input_ids"].device
            )
        assert self.ref_model is not None
        ctx = self.autocast() if self.autocast is not None else contextlib.nullcontext()
        with ctx:
            out = self.ref_model(batch["input_ids"], position_ids=model_positions(batch))
        return sequence_logps(out.logits, batch["labels"], self.average)

    def __call__(
        self, forward: Callable[[dict[str, Any]], Any], batch: dict[str, Any], denom: float, n_micro: int, world: int
    ) -> StepTerms:
        b = int(batch["num_pairs"])
        has_response = (batch["labels"] != IGNORE_INDEX).any(dim=1)
        empty = ~(has_response[:b] & has_response[b:])
        if bool(empty.any()) and not self._warned_empty:
            # A response cut off entirely by --seq-len gives pi == ref, loss ln 2 and no gradient:
            # the pair silently teaches nothing, so say so once.
            self._warned_empty = True
            log.warning(
                f"warning: {int(empty.sum())} of {b} DPO pairs in a batch have no response tokens within "
                "the sequence length (prompt too long); they contribute no gradient. Raise --seq-len."
            )
        ref = self.reference_logps(batch)
        out = forward(batch)
        pi = sequence_logps(out.logits, batch["labels"], self.average)
        losses, chosen_r, rejected_r = dpo_terms(pi[:b], pi[b:], ref[:b], ref[b:], self.beta)
        aux_part = out.aux_loss.float() / (n_micro * world)
        part = losses.sum() / denom
        loss = (part + aux_part) * world
        terms = {
            "loss": (part + aux_part).detach(),
            "dpo_loss": part.detach(),
            "rewards/chosen": chosen_r.sum() / denom,
            "rewards/rejected": rejected_r.sum() / denom,
            "rewards/accuracy": (chosen_r > rejected_r).float().sum() / denom,
            "rewards/margin": (chosen_r - rejected_r).sum() / denom,
            "pairs_without_response": empty.float().sum() / denom,
        }
        return StepTerms(loss, terms)


def dpo_terms(
    pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss and the implicit rewards of the chosen and rejected responses (detached)."""
    logits = (pi_c - pi_r) - (ref_c - ref_r)
    losses = -F.logsigmoid(beta * logits)
    chosen_r = (beta * (pi_c - ref_c)).detach()
    rejected_r = (beta * (pi_r - ref_r)).detach()
    return losses, chosen_r, rejected_r


@torch.no_grad()
def precompute_reference(
    ref_model: torch.nn.Module, batches: Any, average: bool, autocast: Callable[[], Any] | None = None
) -> dict[bytes, float]:
    """Reference log-prob of every row the loader can produce, keyed by `row_key`, so DPO can drop
    the reference model after one pass over the data."""
    cache: dict[bytes, float] = {}
    for batch in batches:
        ctx = autocast() if autocast is not None else contextlib.nullcontext()
        with ctx:
            out = ref_model(batch["input_ids"], position_ids=model_positions(batch))
        lp = sequence_logps(out.logits, batch["labels"], average)
        for ids, labels, v in zip(batch["input_ids"], batch["labels"], lp.tolist()):
            cache[row_key(ids, labels)] = v
    return cache


def kd_kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over rows of KL(teacher || student) between the temperature-softened distributions,
    sum_v p_t(v) (log p_t(v) - log p_s(v)), in fp32; both (N, V). The teacher side carries no gradient."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum()


class DistillObjective:
    """White-box knowledge distillation (MiniMind's train_distillation.py, Hinton et al. 2015):

        loss = alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T)

    both terms averaged over the loss tokens of the global batch (pretrain: every token; SFT: the
    assistant's), plus the student's MoE aux loss. The teacher runs in eval mode under no_grad with
    the engine's autocast, on the student's device. Logged: `ce_loss` and `kd_loss` (the unweighted
    terms, kd_loss already times T^2) and `top1_agreement` (share of loss tokens where the student's
    argmax is the teacher's)."""

    def __init__(
        self, teacher: torch.nn.Module, alpha: float, temperature: float, autocast: Callable[[], Any] | None = None
    ) -> None:
        self.teacher = teacher
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.autocast = autocast

    def count(self, batch: dict[str, Any]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    @torch.no_grad()
    def teacher_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        ctx = self.autocast() if self.autocast is not None else contextlib.nullcontext()
        with ctx:
            return self.teacher(batch["input_ids"], position_ids=model_positions(batch)).logits

    def __call__(
        self, forward: Callable[[dict[str, Any]], Any], batch: dict[str, Any], denom: float, n_micro: int, world: int
    ) -> StepTerms:
        t_logits = self.teacher_logits(batch)
        out = forward(batch)
        labels = batch["labels"]
        ce_sum, _ = masked_ce_sum(out.logits, labels)
        keep = (labels != IGNORE_INDEX).reshape(-1)
        v = out.logits.shape[-1]
        s_sel, t_sel = out.logits.reshape(-1, v)[keep], t_logits.reshape(-1, v)[keep]
        kd_sum = self.temperature**2 * kd_kl_sum(s_sel, t_sel, self.temperature)
        agree = (s_sel.detach().argmax(-1) == t_sel.argmax(-1)).float().sum()
        ce_part, kd_part = ce_sum / denom, kd_sum / denom
        aux_part = out.aux_loss.float() / (n_micro * world)
        part = self.alpha * ce_part + (1.0 - self.alpha) * kd_part + aux_part
        terms = {
            "loss": part.detach(),
            "ce_loss": ce_part.detach(),
            "kd_loss": kd_part.detach(),
            "top1_agreement": agree / denom,
        }
        if out.aux_loss.requires_grad or float(out.aux_loss) != 0.0:
            terms["aux_loss"] = aux_part.detach()
        # x world: the data-parallel engine averages gradients over processes; the global loss is a sum.
        return StepTerms(part * world, terms)
