"""Fault injection on checkpoints: a kill -9 at every point of a save, bit flips and truncations in
checkpoint files, a full disk, and pickle payloads planted in each file a checkpoint holds. Each
test asserts the one-line error or the recovery, and that nothing already written was lost.

Kills run in a forked child (no interpreter start-up per point); resumes run in this process and
are compared with one uninterrupted run (exact losses and weights)."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import signal
import time
from pathlib import Path

import pytest
import torch

from llmcore.checkpoint import MANIFEST, checkpoint_problem, load_model, write_manifest
from llmcore.errors import LLMCoreError
from llmcore.train import TrainHooks, train
from llmcore.train.checkpointing import CheckpointManager, read_rng_file

from test_train_common import assert_same_weights, losses, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

KW = dict(max_steps=6, save_every=2, keep_last=1)


@pytest.fixture(scope="module")
def full(shards, tmp_path_factory) -> Path:
    """The uninterrupted run every recovery is compared with."""
    out = tmp_path_factory.mktemp("full") / "run"
    train("pretrain", tiny_cfg("pretrain", shards, out, **KW))
    return out


def _run_killed_at(shards, out: Path, point) -> None:
    """Train in a forked child that SIGKILLs itself when `point(path)` is true for a file the save
    of step 4 has just written (or renamed); wait for it and check it died that way."""
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:

            def on_file(path: Path) -> None:
                if point(path):
                    os.kill(os.getpid(), signal.SIGKILL)

            train("pretrain", tiny_cfg("pretrain", shards, out, **KW), hooks=TrainHooks(on_save_file=on_file))
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    deadline = time.monotonic() + 180
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:  # never hang the suite on a stuck child
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked training run did not reach its kill point within 180 s")
        time.sleep(0.05)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def _in_tmp4(name: str):
    return lambda p: p.name == name and p.parent.name == ".step-4.tmp"


# (id, kill point, the checkpoint a resume continues from)
KILL_POINTS = [
    ("after-weights", _in_tmp4("model.safetensors"), 2),
    ("after-optimizer", lambda p: p.name == ".step-4.tmp", 2),
    ("after-loader-state", _in_tmp4("loader_state.json"), 2),
    ("after-rng-state", _in_tmp4("rng_state.pt"), 2),
    ("after-trainer-state", _in_tmp4("trainer_state.json"), 2),
    ("after-manifest", _in_tmp4(MANIFEST), 2),
    ("between-rename-and-latest", lambda p: p.name == "step-4" and p.parent.name == "checkpoints", 4),
    ("after-latest-before-prune", lambda p: p.name == "latest" and p.read_text().strip() == "step-4", 4),
]


@pytest.mark.parametrize("point, resumes_at", [pytest.param(p, s, id=i) for i, p, s in KILL_POINTS])
def test_kill_at_every_point_of_a_save(shards, tmp_path, full, point, resumes_at):
    out = tmp_path / "run"
    _run_killed_at(shards, out, point)
    ck = out / "checkpoints"
    # Nothing already written was lost: step-2 is complete and intact (keep_last=1 prunes it only
    # after step-4 is in place and verified), and a finished step-4 is intact too.
    assert checkpoint_problem(ck / "step-2") is None
    if resumes_at == 4:
        assert checkpoint_problem(ck / "step-4") is None
    else:
        assert not (ck / "step-4").exists()
    assert (ck / "latest").read_text().strip() == ("step-4" if point is KILL_POINTS[-1][1] else "step-2")
    found, skipped = CheckpointManager(out).resume_point()
    assert found == ck / f"step-{resumes_at}" and skipped == []
    # What generate/eval load is the newest intact checkpoint, `latest` or not.
    assert_same_weights(out, ck / f"step-{resumes_at}")
    # A fresh run into it is refused; --resume continues it to the uninterrupted result.
    with pytest.raises(LLMCoreError, match="already holds checkpoints"):
        train("pretrain", tiny_cfg("pretrain", shards, out, **KW))
    resumed = train("pretrain", tiny_cfg("pretrain", shards, out, resume=True, **KW))
    assert resumed.steps == 6
    assert losses(out) == losses(full)
    assert_same_weights(out, full)
    assert not any(p.name.endswith(".tmp") for p in ck.iterdir())


def _two_checkpoints(shards, out: Path) -> Path:
    """A run stopped after step 4 with step-2 and step-4 on disk (keep_last=2)."""
    train("pretrain", tiny_cfg("pretrain", shards, out, max_steps=6, save_every=2, keep_last=2, stop_after=4))
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step-2", "step-4"]
    return ck


def test_without_latest_a_fresh_run_is_refused_and_resume_continues_at_the_newest(shards, tmp_path, full):
    out = tmp_path / "run"
    ck = _two_checkpoints(shards, out)
    (ck / "latest").unlink()
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(LLMCoreError, match=r"already holds checkpoints \(step-2, step-4\)"):
        train("pretrain", tiny_cfg("pretrain", shards, out, max_steps=6, save_every=2, keep_last=2))
    assert (out / "metrics.jsonl").read_text() == before and (ck / "step-2").is_dir() and (ck / "step-4").is_dir()
    resumed = train("pretrain", tiny_cfg("pretrain", shards, out, max_steps=6, save_every=2, keep_last=2, resume=True))
    assert resumed.steps == 6 and losses(out) == losses(full)


@pytest.mark.parametrize(
    "damage",
    [
        "bitflip-weights",
        "truncate-weights",
        "truncate-optimizer",
        "truncate-rng",
        "corrupt-trainer-state",
        "no-manifest",
    ],
)
def test_damaged_newest_checkpoint_is_skipped_on_resume(shards, tmp_path, full, damage, caplog):
    out = tmp_path / "run"
    ck = _two_checkpoints(shards, out)
    step4 = ck / "step-4"
    target = {
        "bitflip-weights": "model.safetensors",
        "truncate-weights": "model.safetensors",
        "truncate-optimizer": "optimizer.pt",
        "truncate-rng": "rng_state.pt",
        "corrupt-trainer-state": "trainer_state.json",
        "no-manifest": MANIFEST,
    }[damage]
    path = step4 / target
    data = bytearray(path.read_bytes())
    if damage == "bitflip-weights":
        data[len(data) // 2] ^= 0x10  # one bit in the middle of the tensor data
        path.write_bytes(bytes(data))
    elif damage.startswith("truncate"):
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "corrupt-trainer-state":
        path.write_text('{"step": 4, "tok')
    else:
        path.unlink()
    # Loading the weights of the damaged dir is a one-line error naming the file.
    if target == "model.safetensors":
        with pytest.raises(LLMCoreError, match="model.safetensors") as err:
            load_model(step4)
        assert "\n" not in str(err.value)
        with pytest.raises(LLMCoreError):
            load_model(out)  # `latest` names step-4
    # Resume says what it skipped and why, continues from step-2, and reaches the same end.
    with caplog.at_level(logging.WARNING):
        resumed = train(
            "pretrain", tiny_cfg("pretrain", shards, out, max_steps=6, save_every=2, keep_last=2, resume=True)
        )
    assert f"skipping checkpoints/step-4: {target if damage != 'no-manifest' else 'no manifest.json'}" in caplog.text
    assert resumed.steps == 6 and losses(out) == losses(full)
    assert_same_weights(out, full)


def test_no_intact_checkpoint_is_a_one_line_error_and_nothing_changes(shards, tmp_path):
    out = tmp_path / "run"
    ck = _two_checkpoints(shards, out)
    for d in (ck / "step-2", ck / "step-4"):
        p = d / "optimizer.pt"
        p.write_bytes(p.read_bytes()[:100])
    # The writer lock's file names its latest holder; everything else must stay byte for byte.
    files = lambda: {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".train.lock"}  # noqa: E731
    snapshot = files()
    with pytest.raises(LLMCoreError) as err:
        train("pretrain", tiny_cfg("pretrain", shards, out, max_steps=6, save_every=2, resume=True))
    msg = str(err.value)
    assert "no intact checkpoint" in msg and "step-4: optimizer.pt has 100 bytes" in msg and "\n" not in msg
    assert files() == snapshot


def test_truncated_and_corrupt_side_files_are_one_line_errors(shards, tmp_path):
    out = tmp_path / "run"
    ck = _two_checkpoints(shards, out)
    rng = ck / "step-4" / "rng_state.pt"
    rng.write_bytes(rng.read_bytes()[:50])
    with pytest.raises(LLMCoreError, match="rng_state.pt: cannot be read safely") as err:
        read_rng_file(rng)
    assert "\n" not in str(err.value)
    # With the manifest rewritten to match (so only the loaders stand guard), resume still stops
    # with a one-line error instead of a traceback.
    write_manifest(ck / "step-4")
    with pytest.raises(LLMCoreError, match="rng_state.pt: cannot be read safely"):
        train("pretrain", tiny_cfg("pretrain", shards, out, max_steps=6, save_every=2, resume=True))
    (ck / "step-4" / "trainer_state.json").write_text("{oops")
    write_manifest(ck / "step-4")
    with pytest.raises(LLMCoreError, match="trainer_state.json: corrupt JSON"):
        train("pretrain", tiny_cfg("pretrain", shards, out, max_steps=6, save_every=2, resume=True))


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(shards, tmp_path, full, monkeypatch):
    out = tmp_path / "run"
    import llmcore.checkpoint as ckpt_mod

    real = ckpt_mod.save_file
    calls = {"n": 0}

    def save_file(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint's weights
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*a, **k)

    monkeypatch.setattr(ckpt_mod, "save_file", save_file)
    with pytest.raises(LLMCoreError) as err:
        train("pretrain", tiny_cfg("pretrain", shards, out, **KW))
    msg = str(err.value)
    assert msg.startswith("checkpoint step-4 could not be written: No space left on device (the disk is full)")
    assert "step-2 is intact" in msg and "\n" not in msg
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step-2"]
    assert checkpoint_problem(ck / "step-2") is None
    monkeypatch.setattr(ckpt_mod, "save_file", real)
    resumed = train("pretrain", tiny_cfg("pretrain", shards, out, resume=True, **KW))
    assert resumed.steps == 6 and losses(out) == losses(full)


class Payload:
    """Unpickling this runs `open(marker, "w")`: the proof that a loader executed pickled code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize(
    "target",
    [
        "model.safetensors",
        "optimizer.pt",
        "rng_state.pt",
        "loader_state.json",
        "trainer_state.json",
        "model_config.json",
    ],
)
def test_a_planted_pickle_is_refused_and_never_runs(shards, tmp_path, target):
    out = tmp_path / "run"
    ck = _two_checkpoints(shards, out)
    marker = tmp_path / "PWNED"
    for step in ("step-2", "step-4"):
        d = ck / step
        if target.endswith(".pt"):
            torch.save({"state": Payload(marker)}, d / target)  # a real torch zip with the payload inside
        else:
            (d / target).write_bytes(pickle.dumps(Payload(marker)))
        write_manifest(d)  # the attacker fixes the manifest too: the loaders themselves must refuse
    with pytest.raises(LLMCoreError) as err:
        train("pretrain", tiny_cfg("pretrain", shards, out, max_steps=6, save_every=2, resume=True))
    assert "\n" not in str(err.value)
    if target.startswith("model"):
        with pytest.raises(LLMCoreError):
            load_model(out)
    assert not marker.exists()


def test_deepspeed_checkpoint_files_are_never_unpickled(shards, tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed not installed")
    out = tmp_path / "run"
    kw = dict(max_steps=3, save_every=2, deepspeed="zero1")
    train("pretrain", tiny_cfg("pretrain", shards, out, stop_after=2, **kw))
    d = out / "checkpoints" / "step-2"
    names = sorted(p.name for p in d.iterdir())
    assert "engine" not in names and "optimizer.safetensors" in names  # DeepSpeed's pickles are not written
    marker = tmp_path / "PWNED"
    # What DeepSpeed's own loader would have unpickled, planted where it would look, manifest fixed:
    (d / "engine").mkdir()
    torch.save({"module": Payload(marker)}, d / "engine" / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": Payload(marker)}, d / "engine" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    write_manifest(d)
    resumed = train("pretrain", tiny_cfg("pretrain", shards, out, resume=True, **kw))
    assert resumed.steps == 3 and not marker.exists()
    # A payload in the optimizer state itself is refused (safetensors holds no code).
    d = out / "checkpoints" / "step-3"
    (d / "optimizer.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    write_manifest(d)
    with pytest.raises(LLMCoreError, match="optimizer.safetensors: cannot read the optimizer state"):
        train("pretrain", tiny_cfg("pretrain", shards, out, resume=True, max_steps=4, save_every=2, deepspeed="zero1"))
    assert not marker.exists()


@pytest.mark.parametrize(
    "outside", ["../../../../../../../../etc/passwd", "/etc/passwd", "../step-2/model.safetensors"]
)
def test_a_manifest_naming_a_file_outside_the_checkpoint_is_refused_unread(shards, tmp_path, outside):
    out = tmp_path / "run"
    ck = _two_checkpoints(shards, out)
    mpath = ck / "step-4" / MANIFEST
    manifest = json.loads(mpath.read_text())
    target = (ck / "step-4" / outside) if not outside.startswith("/") else Path(outside)
    data = target.read_bytes()
    import hashlib

    # The entry matches the outside file exactly: it would verify if the path were followed.
    manifest["files"][outside] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    mpath.write_text(json.dumps(manifest))
    assert checkpoint_problem(ck / "step-4") == f"{MANIFEST} names {outside!r}, outside the checkpoint"
    found, skipped = CheckpointManager(out).resume_point()
    assert found == ck / "step-2" and skipped[0][0] == "step-4"


@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_latest_pointing_into_another_run_is_refused(shards, tmp_path, full, how):
    from llmcore.checkpoint import resolve_checkpoint

    out = tmp_path / "run"
    ck = _two_checkpoints(shards, out)
    other = full / "checkpoints" / (full / "checkpoints" / "latest").read_text().strip()
    (ck / "latest").write_text(str(other) if how == "absolute" else os.path.relpath(other, ck) + "\n")
    with pytest.raises(LLMCoreError, match=r"which is not a step dir in .*; it must name one of this run's"):
        resolve_checkpoint(out)
    (ck / "latest").write_text(str(ck / "step-4") if how == "absolute" else "checkpoints/step-4\n")
    assert resolve_checkpoint(out) == ck / "step-4"  # this run's own dir, however it is written
