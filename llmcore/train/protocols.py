"""The typed contracts between the Trainer and its parts: loader, objective, engine.

A batch is a dict of CPU tensors from the loader (`input_ids`, `labels` with IGNORE_INDEX where no
loss, `position_ids`; DPO batches add `num_pairs`), moved to the engine's device by the engine.
The Trainer only talks to these interfaces; which class sits behind them is the stage's and the
config's choice.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import torch

Batch = dict[str, Any]


def model_positions(batch: Batch) -> torch.Tensor | None:
    """The `position_ids` to hand the model for a batch: None when the loader says every row is one
    document starting at position 0 (`single_documents`, padded and pair rows), so the model takes
    its plain causal path (SDPA's flash kernel, no document bounds) without reading the positions
    back from the device to find that out; the positions otherwise (packed and best-fit rows)."""
    return None if batch.get("single_documents") else batch["position_ids"]


@runtime_checkable
class Loader(Protocol):
    """An endless iterator of batches with an exact, JSON-able position (see data_prep/loaders.py).
    The attributes are what the trainer's plan lines, the feed and the checkpoints read."""

    mode: str  # "packed" | "bestfit" | "padded" | "pairs"
    micro_batch_size: int  # rows per micro batch per process (a checkpoint's loader state is kept for it)
    docs: Any  # the shard documents this loader reads (np.ndarray of indices); len() is the count
    long_docs: int  # documents longer than seq_len + 1 (cut, or refused by `--on-long fail`)
    docs_without_loss: int  # documents with no loss token left after cutting (all of them: an error)
    tokens_per_epoch: int
    epoch: int
    steps_per_epoch: int  # micro batches per process per epoch
    rows_per_epoch: int

    def __next__(self) -> Batch: ...

    def unwrapped_rows(self, step: int) -> int: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class StepTerms:
    """One micro batch's contribution: `loss` for backward (already scaled for the global batch and
    for the data-parallel gradient average) and detached `terms` whose sum over all micro batches and
    processes is the global-batch value of each metric (e.g. terms["loss"] sums to the step loss)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]


@runtime_checkable
class Objective(Protocol):
    """What a stage minimises. `count(batch)` is the number of loss items (tokens, pairs) in a micro
    batch; the Trainer sums it over the global batch and passes the total as `denom`."""

    def count(self, batch: Batch) -> int: ...

    def __call__(
        self, forward: Callable[[Batch], Any], batch: Batch, denom: float, n_micro: int, world: int
    ) -> StepTerms: ...


@runtime_checkable
class ModelHook(Protocol):
    """How a stage's model is made, saved and loaded back (torchtitan's model-converter idea).

    `convert(model)` runs once on the freshly built or `--init` model, before the engine wraps it: it
    may add modules (LoRA adapters), freeze parameters (only those with `requires_grad` reach the
    optimizer), and returns the model to train (still an `LLM`, so the engine, metrics and export
    see its config). `save(model, step_dir)` writes the checkpoint's weights (rank 0, full weights);
    `load(step_dir)` rebuilds exactly the model `save` saw (converted, weights restored) for
    `--resume`; the optimizer state is the engine's, keyed by the trainable parameters."""

    def convert(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def save(self, model: torch.nn.Module, step_dir: Path) -> None: ...

    def load(self, step_dir: Path) -> torch.nn.Module: ...


@runtime_checkable
class Engine(Protocol):
    """Owns the device, the process group and the precision; wraps the model and its optimizer.

    Per micro batch the Trainer calls `forward(batch)`, `backward(loss)`, then
    `micro_step_end(boundary, lr)`; at a boundary the engine clips, steps with `lr` and returns
    the gradient norm (a tensor on the device: reading it is the caller's sync)."""

    kind: str
    cfg: Any  # the run's TrainConfig; `Trainer.from_config` sets it to the resolved settings
    device: torch.device
    rank: int
    world: int
    module: torch.nn.Module

    def prepare(self, model: torch.nn.Module, accum: int) -> None: ...

    def autocast(self) -> contextlib.AbstractContextManager: ...

    def to_device(self, batch: Batch) -> Batch: ...

    def forward(self, batch: Batch) -> Any: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def micro_step_end(self, boundary: bool, lr: float) -> torch.Tensor | None: ...

    def zero_grad(self) -> None: ...

    def full_weights(self) -> contextlib.AbstractContextManager[torch.nn.Module]: ...

    def save_state(self, step_dir: Path) -> None: ...

    def load_state(self, step_dir: Path) -> None: ...

    def train(self, mode: bool = True) -> None: ...

    def all_sum(self, t: torch.Tensor) -> torch.Tensor: ...

    def barrier(self) -> None: ...


__all__ = ["Batch", "model_positions", "Loader", "Objective", "ModelHook", "Engine", "StepTerms"]
