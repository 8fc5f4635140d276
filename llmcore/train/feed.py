"""Batches to the device without stalling it: a background thread builds the next micro batches
(numpy row assembly, host-side counts, pinned memory on CUDA) while the current step runs; the
consumer moves each to the device with a non-blocking copy.

Invariants:
- The batches come out in exactly the loader's order; the feed adds nothing and drops nothing.
- `state_dict()` is the wrapped loader's position after the last batch *taken* (not the ones built
  ahead), so a checkpoint resumes at exactly the next batch the step would have used.
- Host-side facts a step needs (loss-item count, real tokens) are computed on the CPU copy, so
  the training loop never waits on the device to learn them.
- An error raised by the loader in the thread is raised again, unchanged, by `next()`.
- On CUDA the thread first makes its rank's device current (`torch.cuda.set_device`), so pinning
  memory there never creates a context on GPU 0 (about 0.5 GB per process when several ranks share
  a machine).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

import torch

from llmcore.common import to_device

_DONE = object()


class DeviceFeed:
    """Wraps a loader (`llmcore.train.protocols.Loader`); yields `(device_batch, host_stats)`."""

    def __init__(
        self, loader: Any, device: torch.device, stats: Callable[[dict[str, Any]], dict[str, int]], depth: int = 2
    ) -> None:
        self.loader = loader
        self.device = device
        self.stats = stats
        self.depth = depth
        self._state = loader.state_dict()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- the loader's interface, as of the batches taken ---------------------------------------
    @property
    def epoch(self) -> int:
        return int(self._state["epoch"])

    @property
    def steps_per_epoch(self) -> int:
        return int(self.loader.steps_per_epoch)

    def state_dict(self) -> dict[str, Any]:
        return dict(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._thread is not None:
            raise RuntimeError("load_state_dict after batches were taken")
        self.loader.load_state_dict(state)
        self._state = self.loader.state_dict()

    # -- producing ahead -----------------------------------------------------------------------
    def _produce(self) -> None:
        assert self._queue is not None
        pin = self.device.type == "cuda"
        try:
            if pin and self.device.index is not None:
                torch.cuda.set_device(self.device)  # the current device is per thread: this one starts on 0
            while not self._stop.is_set():
                batch = next(self.loader)
                after = self.loader.state_dict()
                facts = self.stats(batch)
                if pin:
                    batch = {k: (v.pin_memory() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
                self._put((batch, facts, after))
        except BaseException as err:  # handed to the consumer, which raises it in the training thread
            self._put(err)

    def _put(self, item: Any) -> None:
        assert self._queue is not None
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> "DeviceFeed":
        return self

    def __next__(self) -> tuple[dict[str, Any], dict[str, int]]:
        if self._thread is None:
            self._queue = queue.Queue(maxsize=self.depth)
            self._thread = threading.Thread(target=self._produce, name="llmcore-feed", daemon=True)
            self._thread.start()
        assert self._queue is not None
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, facts, after = item
        self._state = after
        return to_device(batch, self.device), facts

    def close(self) -> None:
        """Stop the producer thread (batches built ahead are dropped; the state is unaffected)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


__all__ = ["DeviceFeed"]
