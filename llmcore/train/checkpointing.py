"""Run-dir checkpoints: `RUN/checkpoints/step-N/`, written complete or not at all.

A save writes everything into `checkpoints/.step-N.tmp/`, then `llmcore.io.install_dir` fsyncs it
and renames it to `step-N` (atomic on one filesystem), then `llmcore.io.write_text` rewrites
`checkpoints/latest`. A kill at
any moment therefore leaves either the old `latest` pointing at an old complete dir, or the new one
pointing at a new complete dir; leftover `.tmp` dirs are removed on the next start.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from llmcore.errors import LLMCoreError
from llmcore.io import install_dir, write_json, write_text

STEP_RE = re.compile(r"^step-(\d+)$")


def write_json_atomic(path: Path, obj: Any) -> None:
    """Deprecated alias kept while trainer.py moves over: use `llmcore.io.write_json`."""
    write_json(path, obj, ensure_ascii=True)


def rank_suffix(rank: int) -> str:
    """Rank 0 keeps the names of the run-dir contract; other ranks add `_rankN`."""
    return "" if rank == 0 else f"_rank{rank}"


def rng_state() -> dict[str, Any]:
    """CPU RNG states as tensors and plain Python values (loadable with weights_only=True)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    v, inner, gauss = state["python"]
    random.setstate((v, tuple(inner), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Saves and finds the step dirs of one run dir. All processes call `save`; rank 0 owns the
    shared files and the rename, the others only write their own shard of engine/loader/RNG state."""

    def __init__(self, run_dir: Path, rank: int = 0, world: int = 1,
                 barrier: Callable[[], None] = lambda: None) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.rank, self.world = rank, world
        self.barrier = barrier

    # -- discovery ------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = STEP_RE.match(p.name)
            if m and p.is_dir():
                out.append(int(m.group(1)))
        return sorted(out)

    def latest(self) -> Path | None:
        """The complete checkpoint `latest` names, or None when the run has none."""
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        path = self.root / name
        if not STEP_RE.match(name) or not (path / "trainer_state.json").is_file():
            raise LLMCoreError(f"{pointer} names {name!r}, which is not a complete checkpoint")
        return path

    def clean_partial(self) -> None:
        """Remove temp dirs that a killed save left behind (rank 0 only; call before any save)."""
        if self.rank == 0 and self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(".step-") and p.name.endswith(".tmp"):
                    shutil.rmtree(p, ignore_errors=True)
        self.barrier()

    # -- save ----------------------------------------------------------------------------------
    def save(self, step: int, write_model: Callable[[Path], None], write_engine: Callable[[Path], None],
             loader_state: dict[str, Any], trainer_state: dict[str, Any], keep_last: int,
             on_file: Callable[[Path], None] | None = None) -> Path:
        """Write step-N completely, point `latest` at it, then drop all but the newest `keep_last`.

        `write_model(dir)` runs on every rank (ZeRO-3 must gather on all) and writes on rank 0;
        `on_file(path)` is called after each file this rank writes (tests use it to kill mid-save)."""
        final = self.root / f"step-{step}"
        tmp = self.root / f".step-{step}.tmp"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        self.barrier()
        notify = on_file or (lambda p: None)

        write_model(tmp)
        if self.rank == 0:
            notify(tmp / "model.safetensors")
        write_engine(tmp)
        notify(tmp)
        sfx = rank_suffix(self.rank)
        write_json(tmp / f"loader_state{sfx}.json", loader_state, ensure_ascii=True)
        notify(tmp / f"loader_state{sfx}.json")
        torch.save(rng_state(), tmp / f"rng_state{sfx}.pt")
        notify(tmp / f"rng_state{sfx}.pt")
        self.barrier()
        if self.rank == 0:
            # trainer_state.json is the last file: a dir with it is complete even before the rename.
            write_json(tmp / "trainer_state.json", {**trainer_state, "world_size": self.world}, ensure_ascii=True)
            notify(tmp / "trainer_state.json")
            # fsync everything, rename into place; the same step saved again (e.g. a resumed run
            # re-saving its end) replaces the old dir as a whole.
            install_dir(tmp, final)
            write_text(self.root / "latest", f"step-{step}\n")
            notify(self.root / "latest")
            for old_step in self.steps()[:-keep_last]:
                if old_step != step:
                    shutil.rmtree(self.root / f"step-{old_step}", ignore_errors=True)
        self.barrier()
        return final

    # -- load ----------------------------------------------------------------------------------
    def load_side_state(self, step_dir: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """(trainer_state, loader_state, rng_state) of this rank from a complete step dir."""
        trainer_state = json.loads((step_dir / "trainer_state.json").read_text())
        saved_world = int(trainer_state.get("world_size", 1))
        if saved_world != self.world:
            raise LLMCoreError(f"{step_dir} was written by {saved_world} process(es); resume it with the same "
                               f"number (this run has {self.world}) so every rank continues its own data")
        sfx = rank_suffix(self.rank)
        loader_state = json.loads((step_dir / f"loader_state{sfx}.json").read_text())
        rng = torch.load(step_dir / f"rng_state{sfx}.pt", weights_only=True)
        return trainer_state, loader_state, rng
