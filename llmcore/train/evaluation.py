"""The held-out evaluation: one loop for the trainer's periodic eval and for `llmcore eval`.

Both hand it the stage's objective, a forward and a loader over the documents to score, built with
the stage's row layout (`Stage.loader_mode`: packed/bestfit/padded for the language-model stages,
pairs for DPO), so `llmcore eval` on a run's held-out documents reproduces the `eval_loss` that run
logged for the same checkpoint.

Invariants:
- one pass over the loader's epoch, each batch cut to its `unwrapped_rows` (a loader fills the
  epoch's last global batch by wrapping to its first rows; those rows are not counted twice);
- the objective scores a batch with denominator 1, so its terms are sums; they are accumulated in
  float64 on the device (no host read per batch), and the item count (loss tokens, or pairs) is
  counted on the host batch;
- `eval_metrics`: `eval_loss` is the sum of the stage's `eval_key` term over the item count; every
  other term except the training-only `loss`/`aux_loss` becomes `eval_<term>` (its mean per item);
  `eval_ppl` = exp(eval_loss) for stages that report perplexity.
Several processes each score their own rows and sum the totals before `eval_metrics` (the caller's
all-reduce), so the result does not depend on the world size.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from llmcore.common import to_device
from llmcore.data_prep.loaders import first_rows
from llmcore.train.objectives import perplexity
from llmcore.train.protocols import Loader, Objective
from llmcore.train.stages import Stage

COUNT = "_count"  # the key of the item count among the sums
TRAINING_ONLY_TERMS = ("loss", "aux_loss")  # the optimised total and the MoE balance loss: not eval metrics


@torch.no_grad()
def eval_sums(
    objective: Objective,
    forward: Callable[[dict[str, Any]], Any],
    loader: Loader,
    device: torch.device,
    *,
    max_batches: int | None = None,
    on_batch: Callable[[], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Summed objective terms over one pass of `loader` (at most `max_batches` batches), plus the
    item count under `COUNT`; float64 tensors on `device`, where each batch is moved before `forward`.
    `on_batch` is called after each batch (a progress bar)."""
    steps = loader.steps_per_epoch if max_batches is None else min(loader.steps_per_epoch, max_batches)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for step in range(steps):
        batch = first_rows(next(loader), loader.unwrapped_rows(step))
        if batch is not None:
            count += objective.count(batch)
            out = objective(forward, to_device(batch, device), 1.0, 1, 1)
            for key, value in out.terms.items():
                if key not in TRAINING_ONLY_TERMS:
                    sums[key] = sums[key] + value.double() if key in sums else value.double()
        if on_batch is not None:
            on_batch()
    sums[COUNT] = torch.tensor(float(count), dtype=torch.float64, device=device)
    return sums


def eval_metrics(stage: Stage, sums: dict[str, float]) -> dict[str, float]:
    """The logged eval record from (all processes') summed terms: `eval_loss` (the mean of the
    stage's `eval_key` term per item), `eval_<term>` for the other terms, `eval_ppl` where the stage
    reports perplexity. An empty pass (count 0) gives 0 rather than dividing by zero."""
    totals = dict(sums)
    n = max(totals.pop(COUNT), 1.0)
    res = {"eval_loss": totals.pop(stage.eval_key, 0.0) / n}
    for key, value in totals.items():
        res[f"eval_{key}"] = value / n
    if stage.reports_perplexity:
        res["eval_ppl"] = perplexity(res["eval_loss"])
    return res


__all__ = ["COUNT", "eval_sums", "eval_metrics"]
