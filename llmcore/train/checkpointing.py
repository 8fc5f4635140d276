"""Run-dir checkpoints: `RUN/checkpoints/step-N/`, written complete or not at all, verified on resume.

A save writes everything into `checkpoints/.step-N.tmp/`; rank 0 writes `trainer_state.json` and
then `manifest.json` (size and SHA-256 of every file) last, `llmcore.io.install_dir` fsyncs the dir
and renames it to `step-N` (atomic on one filesystem), then `llmcore.io.write_text` rewrites
`checkpoints/latest`. Only then are older step dirs pruned, and only once the `keep_last` newest
ones verify against their manifests.

Resume (`resume_point`) takes the newest step dir whose manifest verifies, whether or not `latest`
names it (a kill between the rename and the write of `latest` leaves a complete step-N that
`latest` does not name yet), and reports every newer dir it skipped and why. Leftover `.tmp` dirs
are removed on the next start. No file is read with a full unpickler: the RNG state is
`torch.load(weights_only=True)`, everything else is JSON or safetensors.
"""

from __future__ import annotations

import errno
import logging
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from llmcore.checkpoint import MANIFEST, STEP_RE, checkpoint_problem, resume_point, step_dirs, write_manifest
from llmcore.errors import LLMCoreError
from llmcore.io import install_dir, read_json, write_json, write_text

log = logging.getLogger(__name__)


def rank_suffix(rank: int) -> str:
    """Rank 0 keeps the names of the run-dir contract; other ranks add `_rankN`."""
    return "" if rank == 0 else f"_rank{rank}"


def rng_state() -> dict[str, Any]:
    """CPU RNG states as tensors and plain Python values (loadable with weights_only=True)."""
    py = random.getstate()
    np_state: Any = np.random.get_state()  # the legacy tuple (name, keys, pos, has_gauss, cached)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
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


def read_rng_file(path: Path) -> dict[str, Any]:
    """A checkpoint's RNG state (tensors and plain values only: weights_only=True refuses pickled code)."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise LLMCoreError(f"{path}: missing") from None
    except Exception as err:  # truncated zip, a pickle payload refused by the weights-only unpickler
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LLMCoreError(f"{path}: cannot be read safely ({first[:200]})") from None


def rescale_loader_state(saved: dict[str, Any], loader: Any) -> dict[str, Any]:
    """The state for `loader` (this run's world size and micro batch) that continues at the same
    *global* row as `saved` (written by a run with another world size or micro batch).

    Rank r of W takes global rows r, r+W, ... in steps of W*micro, so a saved (epoch, step) is the
    global position step*W*micro of that epoch; at a global-batch boundary it is a multiple of this
    run's W*micro too. A position at or past the epoch's end is the end of the epoch."""
    mine = loader.state_dict()
    for key in ("mode", "seq_len", "seed", "shuffle", "num_docs", "fingerprint"):
        if saved.get(key) != mine.get(key):
            raise LLMCoreError(
                f"loader state does not match this run ({key}: saved {saved.get(key)!r} vs now {mine.get(key)!r})"
            )
    per_step_saved = int(saved["world_size"]) * int(saved["micro_batch_size"])
    per_step = int(mine["world_size"]) * int(mine["micro_batch_size"])
    epoch, step = int(saved["epoch"]), int(saved["step"])
    row = step * per_step_saved
    if row >= int(loader.rows_per_epoch):
        new_step = int(loader.steps_per_epoch)
    else:
        if row % per_step:
            raise LLMCoreError(
                f"the checkpoint stopped at global row {row} of its epoch, which {mine['world_size']} "
                f"process(es) x micro batch {mine['micro_batch_size']} cannot continue at; "
                "resume with a world size and micro batch that divide it"
            )
        new_step = row // per_step
    return {**mine, "epoch": epoch, "step": new_step}


LOCK_NAME = ".train.lock"
_HELD: set[str] = set()  # run dirs this process holds: POSIX locks do not exclude their own process


class RunDirLock:
    """One training writes into a run dir at a time: an exclusive `fcntl` lock on `RUN/.train.lock`,
    held from the start of a run to its end. The kernel drops the lock when its process dies
    (however it dies), so a stale lock file never blocks; the file itself stays (removing it would
    let a waiting process lock an unlinked file). POSIX locks (`lockf`) also hold across NFS.

    `acquire` creates the run dir if needed; `release(failed=True)` removes a run dir that it
    created and that holds nothing but the lock file, so a run refused at start leaves nothing.
    POSIX locks belong to a process (a second lock from the same process succeeds, and closing any
    descriptor of the file drops them), so a second writer inside this process is refused through
    `_HELD` before the file is opened again."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self._key = ""
        self._created = False

    def acquire(self) -> "RunDirLock":
        import fcntl
        import os
        import socket
        import time

        key = str(self.run_dir.resolve())
        if key in _HELD:
            raise LLMCoreError(
                f"--out {self.run_dir} is in use by another training in this process; wait for it to "
                "end or choose another --out"
            )
        try:
            self._created = not self.run_dir.exists()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise LLMCoreError(
                f"--out {self.run_dir}: cannot create the run dir there ({err.strerror or err})"
            ) from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = ""
            try:
                holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
            except OSError:
                pass
            os.close(fd)
            raise LLMCoreError(
                f"--out {self.run_dir} is in use by another training "
                f"({holder or 'holder unknown'}); wait for it to end or choose another --out"
            ) from None
        info = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode("utf-8") + b"\n", 0)
        self._fd, self._key = fd, key
        _HELD.add(key)
        return self

    def release(self, failed: bool = False) -> None:
        import os

        if self._fd is None:
            return
        try:
            if failed and self._created and [p.name for p in self.run_dir.iterdir()] == [LOCK_NAME]:
                self.path.unlink(missing_ok=True)
                self.run_dir.rmdir()
        except OSError:
            pass
        finally:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None
            _HELD.discard(self._key)

    @property
    def held(self) -> bool:
        return self._fd is not None


class CheckpointManager:
    """Saves and finds the step dirs of one run dir. All processes call `save`; rank 0 owns the
    shared files and the rename, the others only write their own loader/RNG state."""

    def __init__(
        self, run_dir: Path, rank: int = 0, world: int = 1, barrier: Callable[[], None] = lambda: None
    ) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.rank, self.world = rank, world
        self.barrier = barrier

    # -- discovery ------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """The step numbers of the run's step dirs, oldest first."""
        return sorted(int(p.name.removeprefix("step-")) for p in step_dirs(self.root.parent))

    def has_checkpoints(self) -> bool:
        """Any step dir or `latest` at all (complete or not)."""
        return bool(self.steps()) or (self.root / "latest").exists()

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

    def resume_point(self) -> tuple[Path | None, list[tuple[str, str]]]:
        """(newest step dir that verifies against its manifest, [(name, why skipped)] for newer ones):
        `llmcore.checkpoint.resume_point` of this run dir."""
        return resume_point(self.root.parent)

    def clean_partial(self) -> None:
        """Remove temp dirs that a killed save left behind (rank 0 only; call before any save)."""
        if self.rank == 0 and self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(".step-") and p.name.endswith(".tmp"):
                    shutil.rmtree(p, ignore_errors=True)
        self.barrier()

    # -- save ----------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        write_model: Callable[[Path], None],
        write_engine: Callable[[Path], None],
        loader_state: dict[str, Any],
        trainer_state: dict[str, Any],
        keep_last: int,
        on_file: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write step-N completely, point `latest` at it, then drop all but the newest `keep_last`.

        `write_model(dir)` and `write_engine(dir)` run on every rank (ZeRO-3 gathers on all) and
        write on rank 0; `on_file(path)` is called after each file this rank writes and after the
        rename (tests use it to kill mid-save). A failed write (e.g. ENOSPC) removes the temp dir
        and raises a one-line LLMCoreError; the checkpoints already there are untouched."""
        final = self.root / f"step-{step}"
        tmp = self.root / f".step-{step}.tmp"
        try:
            return self._save(
                step,
                final,
                tmp,
                write_model,
                write_engine,
                loader_state,
                trainer_state,
                keep_last,
                on_file or (lambda p: None),
            )
        except OSError as err:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            what = err.strerror or str(err)
            hint = " (the disk is full)" if err.errno == errno.ENOSPC else ""
            prev = self.steps()
            kept = f"the previous checkpoint step-{prev[-1]} is intact" if prev else "no earlier checkpoint exists"
            raise LLMCoreError(
                f"checkpoint step-{step} could not be written: {what}{hint}; nothing was replaced, {kept}"
            ) from None

    def _save(
        self,
        step: int,
        final: Path,
        tmp: Path,
        write_model: Callable[[Path], None],
        write_engine: Callable[[Path], None],
        loader_state: dict[str, Any],
        trainer_state: dict[str, Any],
        keep_last: int,
        notify: Callable[[Path], None],
    ) -> Path:
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        self.barrier()

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
            write_json(tmp / "trainer_state.json", {**trainer_state, "world_size": self.world}, ensure_ascii=True)
            notify(tmp / "trainer_state.json")
            # The manifest is the last file: a dir whose manifest verifies is complete and intact.
            write_manifest(tmp)
            notify(tmp / MANIFEST)
            # fsync everything, rename into place; the same step saved again (e.g. a resumed run
            # re-saving its end) replaces the old dir as a whole.
            install_dir(tmp, final)
            notify(final)
            write_text(self.root / "latest", f"step-{step}\n")
            notify(self.root / "latest")
            self._prune(step, keep_last)
        self.barrier()
        return final

    def _prune(self, step: int, keep_last: int) -> None:
        """Delete step dirs older than the `keep_last` newest, but only when those newest ones (up to
        and including `step`) all verify: a checkpoint is removed only once it is superseded by
        intact ones. Dirs newer than `step` (skipped as broken by a resume) are left alone."""
        older = [s for s in self.steps() if s <= step]
        keep, drop = older[-keep_last:], older[:-keep_last]
        if not drop:
            return
        for s in keep:
            problem = checkpoint_problem(self.root / f"step-{s}")
            if problem is not None:
                log.warning("checkpoints/step-%d does not verify (%s); keeping older checkpoints", s, problem)
                return
        for s in drop:
            shutil.rmtree(self.root / f"step-{s}", ignore_errors=True)

    # -- load ----------------------------------------------------------------------------------
    def load_side_state(
        self, step_dir: Path, loader: Any | None = None
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """(trainer_state, loader_state, rng_state) of this rank from a complete step dir.

        Written by another number of processes (an elastic resume), the loader state is rank 0's
        moved to the same global row for this run's world size (`rescale_loader_state`, needs
        `loader`), and ranks the old run did not have take rank 0's RNG state."""
        trainer_state = read_json(step_dir / "trainer_state.json")
        saved_world = int(trainer_state.get("world_size", 1))
        sfx = rank_suffix(self.rank)
        own = read_json(step_dir / f"loader_state{sfx}.json") if saved_world == self.world else None
        if own is not None and (loader is None or own.get("micro_batch_size") == loader.micro_batch_size):
            loader_state = own
        else:
            if loader is None:
                raise LLMCoreError(f"{step_dir} was written by {saved_world} process(es); this run has {self.world}")
            loader_state = rescale_loader_state(read_json(step_dir / "loader_state.json"), loader)
            if self.rank == 0:
                log.info(
                    "resuming a checkpoint of %d process(es) on %d: continuing at the same global data position",
                    saved_world,
                    self.world,
                )
        rng_path = step_dir / f"rng_state{sfx}.pt"
        if not rng_path.is_file() and self.rank >= saved_world:
            rng_path = step_dir / "rng_state.pt"
        return trainer_state, loader_state, read_rng_file(rng_path)
