"""Long runs that lose nothing: default save intervals, a checkpoint on SIGINT/SIGTERM with the
command to resume, one writer per run dir (fcntl lock), resume that refuses changes which would
silently alter the run, and run-dir files written with the user's umask (weights included)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmcore.errors import LLMCoreError
from llmcore.train import train

from test_train_common import ROOT, run_cli, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread", "no_leftover_handlers")  # tests/conftest.py


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.parametrize("mask, want", [(0o022, 0o644), (0o027, 0o640)])
def test_every_checkpoint_file_follows_the_umask_weights_included(shards, tmp_path, mask, want):
    # safetensors' save_file recreates its file 0600; the weights were the one file a teammate or a
    # serving container with another uid could not read.
    old = os.umask(mask)
    try:
        train("pretrain", tiny_cfg("pretrain", shards, tmp_path / "run", max_steps=1))
    finally:
        os.umask(old)
    step = tmp_path / "run" / "checkpoints" / "step-1"
    files = sorted(p for p in step.rglob("*") if p.is_file())
    assert step / "model.safetensors" in files
    assert {p.name: oct(_mode(p)) for p in files} == {p.name: oct(want) for p in files}


# ----------------------------------------------------------------------------------------------
# helpers


def cli_args(shards, out: Path, *extra: str, data: str = "pretrain") -> list[str]:
    return [
        "train",
        "pretrain",
        "--data",
        str(shards[data]),
        "--out",
        str(out),
        "--model",
        "tiny",
        "--seq-len",
        "48",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "4",
        "--log-every",
        "1",
        "--attn-backend",
        "sdpa",
        "--seed",
        "3",
        "--lr",
        "0.003",
        *extra,
    ]


def _wait_for(predicate, what: str, proc: subprocess.Popen | None = None, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(
                f"the training subprocess ended (rc {proc.returncode}) before {what}: "
                f"{proc.stderr.read() if proc.stderr else ''}"
            )
        if time.monotonic() > deadline:
            if proc is not None:
                proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def _logged_steps(run: Path) -> int:
    from llmcore.train.metrics import read_metrics

    return len([r for r in read_metrics(run / "metrics.jsonl") if "loss" in r])


# ----------------------------------------------------------------------------------------------
# a default run keeps its work


def test_defaults_save_every_1000_steps_and_every_30_minutes():
    from llmcore.train import TrainConfig

    assert TrainConfig().save_every == 1000 and TrainConfig().save_minutes == 30.0


def test_save_minutes_checkpoints_on_time_without_save_every(shards, tmp_path):
    out = tmp_path / "run"
    # 1e-7 minutes: every step is "30 minutes" after the last save.
    train("pretrain", tiny_cfg("pretrain", shards, out, max_steps=3, save_every=0, save_minutes=1e-7, keep_last=5))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-1", "step-2", "step-3"]
    off = tmp_path / "off"
    train("pretrain", tiny_cfg("pretrain", shards, off, max_steps=3, save_every=0, save_minutes=0, keep_last=5))
    assert sorted(p.name for p in (off / "checkpoints").iterdir()) == ["latest", "step-3"]  # the end only


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_a_checkpoint_says_how_to_resume_and_locks_out_a_second_writer(shards, tmp_path, capsys, sig):
    from llmcore.checkpoint import checkpoint_problem

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # save-every 0 and the 30-minute default: without the signal nothing would be saved before step 100000.
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmcore", *cli_args(shards, out, "--max-steps", "100000", "--save-every", "0")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: _logged_steps(out) >= 2, "two logged steps", proc)
        # A second training into the same --out while the first runs: one line, exit 2, nothing touched.
        code, _, err = run_cli(cli_args(shards, out, "--max-steps", "3", "--resume"), capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert f"error: --out {out} is in use by another training (pid {proc.pid} on " in err
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, (proc.returncode, stderr)
    last = stderr.strip().splitlines()[-1]
    step = int((out / "checkpoints" / "latest").read_text().strip().removeprefix("step-"))
    assert step >= 2 and checkpoint_problem(out / "checkpoints" / f"step-{step}") is None
    name = signal.Signals(sig).name
    assert last.startswith(
        f"stopped by {name} at step {step}/100000: checkpoint saved in "
        f"{out / 'checkpoints' / f'step-{step}'}; resume with: llmcore train pretrain --data "
    ), last
    assert last.endswith(" --resume") and "Traceback" not in stderr
    # The printed command continues the run (the lock died with its process); one more step here.
    import shlex

    resume = shlex.split(last.split("resume with: ", 1)[1])
    assert resume[:3] == ["llmcore", "train", "pretrain"]
    code, stdout, err = run_cli(resume[1:] + ["--stop-after", "1"], capsys)
    assert code == 0, err
    assert f"resumed from step {step} (checkpoint " in stdout
    assert stdout.strip().splitlines()[-1].startswith(f"done: pretrain {step + 1}/100000 steps")


class Stop(Exception):
    pass


def test_a_run_killed_before_its_first_save_says_it_has_no_checkpoint_yet(shards, tmp_path, capsys, caplog):
    from llmcore.checkpoint import resolve_checkpoint
    from llmcore.train import TrainHooks

    out = tmp_path / "run"

    def stop(step, record):
        raise Stop

    with pytest.raises(Stop):
        train("pretrain", tiny_cfg("pretrain", shards, out, max_steps=6, save_every=0), hooks=TrainHooks(on_step=stop))
    assert (out / "config.json").is_file() and not (out / "checkpoints").exists()
    with pytest.raises(
        LLMCoreError,
        match=r"run dir that has no checkpoint yet \(its training stopped before the "
        r"first save; continue it with `llmcore train STAGE --out RUN --resume`",
    ):
        resolve_checkpoint(out)
    code, _, err = run_cli(["generate", "--ckpt", str(out), "--prompt", "hi", "--max-new-tokens", "2"], capsys)
    assert code == 2 and "has no checkpoint yet" in err and "not a run dir" not in err, err
    # --resume on it says so and trains from step 0.
    code, _, err = run_cli(["train", "pretrain", "--out", str(out), "--resume", "--max-steps", "2", "--quiet"], capsys)
    assert code == 0, err
    assert f"--resume: {out} has no checkpoint yet (its run stopped before the first save); starting at step 0" in err
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-2"


# ----------------------------------------------------------------------------------------------
# one writer per run dir


def test_a_live_lock_refuses_a_second_training_and_a_dead_one_does_not(shards, tmp_path):
    from llmcore.train.checkpointing import RunDirLock

    out = tmp_path / "run"
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: hold the lock until killed
        try:
            RunDirLock(out).acquire()
            os.write(ready_w, b"x")
            time.sleep(600)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"x"
        with pytest.raises(LLMCoreError, match=rf"--out {out} is in use by another training \(pid {pid} on "):
            train("pretrain", tiny_cfg("pretrain", shards, out, max_steps=1))
        assert [p.name for p in out.iterdir()] == [".train.lock"]  # the refused run wrote nothing
    finally:
        os.kill(pid, signal.SIGKILL)  # dies holding the lock: the kernel drops it
        os.waitpid(pid, 0)
    s = train("pretrain", tiny_cfg("pretrain", shards, out, max_steps=1))
    assert s.steps == 1
    # A run refused at start leaves no run dir behind (the lock's dir is removed when it made it).
    with pytest.raises(LLMCoreError):
        train("pretrain", tiny_cfg("pretrain", shards, tmp_path / "new", max_steps=1, eval_docs=100000))
    assert not (tmp_path / "new").exists()


def test_out_below_a_file_is_one_line(shards, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code, _, err = run_cli(cli_args(shards, tmp_path / "f" / "run", "--max-steps", "1"), capsys)
    assert code == 2 and err.startswith(f"error: --out {tmp_path / 'f' / 'run'}: cannot create the run dir there"), err


# ----------------------------------------------------------------------------------------------
# resume cannot silently change a run


@pytest.fixture(scope="module")
def finished_run(shards, tmp_path_factory) -> Path:
    """A tiny run of 4 steps stopped after 2 (checkpoint step-2), made through the CLI flags."""
    from llmcore.train import build_config

    out = tmp_path_factory.mktemp("resume") / "run"
    flags = dict(
        data=str(shards["pretrain"]),
        out=str(out),
        model="tiny",
        seq_len=48,
        micro_batch_size=2,
        global_batch_size=4,
        log_every=1,
        attn_backend="sdpa",
        seed=3,
        lr=0.003,
        max_steps=4,
        stop_after=2,
        quiet=True,
    )
    train("pretrain", build_config("pretrain", flags))
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--model", "demo"], "--model: the run has 'tiny', this command gives 'demo'"),
        (["--seq-len", "32"], "--seq-len: the run has 48, this command gives 32"),
        (["--global-batch-size", "8"], "--global-batch-size: the run has 4, this command gives 8"),
        (["--seed", "4"], "--seed: the run has 3, this command gives 4"),
        (["--packing", "padded"], "--packing: the run has 'packed', this command gives 'padded'"),
    ],
)
def test_resume_refuses_a_change_that_alters_the_run_and_changes_nothing(finished_run, tmp_path, capsys, flags, named):
    run = _copy(finished_run, tmp_path)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".train.lock"}
    code, _, err = run_cli(["train", "pretrain", "--out", str(run), "--resume", *flags], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert named in err and "Drop those flags to continue it" in err, err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".train.lock"} == before


def test_resume_refuses_other_data_and_another_stage(finished_run, shards, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    code, _, err = run_cli(
        ["train", "pretrain", "--out", str(run), "--resume", "--data", str(shards["pretrain_other"])], capsys
    )
    assert code == 2 and f"--data: the run trained on '{shards['pretrain']}'" in err, err
    with pytest.raises(LLMCoreError, match=r"is a `train pretrain` run, not `train sft`"):
        train("sft", tiny_cfg("sft", shards, run, model="tiny", resume=True))


def test_resume_needs_allow_lr_change_for_the_schedule(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    code, _, err = run_cli(["train", "pretrain", "--out", str(run), "--resume", "--lr", "0.001"], capsys)
    assert code == 2 and "--lr 0.003 -> 0.001" in err and "pass --allow-lr-change" in err, err
    code, _, err = run_cli(
        ["train", "pretrain", "--out", str(run), "--resume", "--lr", "0.001", "--allow-lr-change", "--quiet"], capsys
    )
    assert code == 0, err
    assert "--resume: --lr 0.003 -> 0.001" in err and "--resume: --min-lr 0.0003 -> 0.0001" in err, err
    saved = json.loads((run / "config.json").read_text())["train"]
    assert saved["lr"] == 0.001 and saved["min_lr"] == pytest.approx(1e-4)


def test_resume_applies_and_reports_max_steps_and_logging(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    code, out, err = run_cli(
        ["train", "pretrain", "--out", str(run), "--resume", "--max-steps", "5", "--log-every", "2"], capsys
    )
    assert code == 0, err
    assert "--resume: --max-steps 4 -> 5" in err and "--resume: --log-every 1 -> 2" in err, err
    assert "resumed from step 2" in out and out.strip().splitlines()[-1].startswith("done: pretrain 5/5 steps")
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["max_steps"] == 5 and saved["total_steps"] == 5 and saved["train"]["seq_len"] == 48


def test_resume_with_only_out_continues_exactly(finished_run, shards, tmp_path, capsys):
    """`--out RUN --resume` takes every setting from the run: the result equals the uninterrupted run."""
    from test_train_common import assert_same_weights, losses

    run = _copy(finished_run, tmp_path)
    code, _, err = run_cli(["train", "pretrain", "--out", str(run), "--resume", "--quiet"], capsys)
    assert code == 0 and "--resume:" not in err, err  # nothing changed, nothing to report
    code, _, err = run_cli(cli_args(shards, tmp_path / "full", "--max-steps", "4", "--quiet"), capsys)
    assert code == 0, err
    assert losses(run) == losses(tmp_path / "full")
    assert_same_weights(run, tmp_path / "full")


# ----------------------------------------------------------------------------------------------
# the CLI says what it does


@pytest.mark.parametrize("stage, want", [("pretrain", "lr = 0.0005"), ("sft", "lr = 1e-05"), ("dpo", "beta = 0.1")])
def test_print_config_shows_a_stages_defaults_without_other_flags(capsys, stage, want):
    code, out, err = run_cli(["train", stage, "--print-config"], capsys)
    assert code == 0, err
    assert out.startswith(f"# llmcore train {stage}: effective settings") and want in out.splitlines()
    assert "save_every = 1000" in out and "save_minutes = 30.0" in out
    code, out, err = run_cli(["train", "sft", "--print-config", "--init", "/nonexistent/run"], capsys)
    assert code == 0 and 'init = "/nonexistent/run"' in out, err
    code, out, err = run_cli(["train", "sft", "--print-config", "--lr", "-1"], capsys)
    assert code == 2 and "--lr must be > 0" in err  # values are still checked


def test_yaml_reads_1e_minus_3_as_a_number_and_quoted_numbers_get_a_hint(shards, tmp_path):
    from llmcore.train import build_config

    y = tmp_path / "c.yaml"
    y.write_text("train:\n  lr: 1e-3\n  min_lr: 5E-5\n  max_steps: 1000\n  warmup_steps: 10\n")
    cfg = build_config("pretrain", {"data": str(shards["pretrain"]), "out": "o"}, y)
    assert cfg.lr == 1e-3 and cfg.min_lr == 5e-5 and cfg.max_steps == 1000 and isinstance(cfg.max_steps, int)
    y.write_text('lr: "1e-3"\n')
    with pytest.raises(
        LLMCoreError,
        match=r"c.yaml: lr must be a number, got '1e-3' \(a quoted string; write the "
        r"number without quotes\)",
    ):
        build_config("pretrain", {"data": str(shards["pretrain"]), "out": "o"}, y)


def test_dpo_summary_progress_and_plot_are_readable(shards, tmp_path, capsys):
    from llmcore.train.metrics import loss_figure

    from test_train_common import pretrained_run

    out = tmp_path / "dpo"
    code, stdout, err = run_cli(
        [
            "train",
            "dpo",
            "--data",
            str(shards["dpo"]),
            "--init",
            str(pretrained_run()),
            "--out",
            str(out),
            "--seq-len",
            "64",
            "--micro-batch-size",
            "2",
            "--global-batch-size",
            "4",
            "--max-steps",
            "2",
            "--eval-docs",
            "4",
            "--lr",
            "1e-3",
            "--attn-backend",
            "sdpa",
        ],
        capsys,
    )
    assert code == 0, err
    done = stdout.strip().splitlines()[-1]
    assert re.search(
        r"loss \d\.\d{4} eval_loss \d\.\d{4} \(ln 2 = 0\.6931 = chance\), reward accuracy \d+% "
        r"\(chance 50%\), margin [-+]\d\.\d{4}, eval reward accuracy \d+%, margin [-+]\d\.\d{4}, ",
        done,
    ), done
    steps = [ln for ln in stdout.splitlines() if ln.startswith("step 1/2 loss")]
    assert steps and re.search(r"loss \d\.\d{4} \(reward accuracy \d+%, margin [-+]\d\.\d{4}\) lr ", steps[0]), steps
    # The start notes name only flags `train dpo` has, and call its rows pairs.
    assert "--on-long" not in stdout + err and " pairs = " in stdout.splitlines()[0]
    fig = loss_figure(
        out / "metrics.jsonl",
        panels=(("rewards/accuracy",), ("rewards/margin", "rewards/chosen")),
        loss_unit="nats/pair",
        chance_loss=math.log(2),
    )
    labels = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes if ax.get_legend()]
    assert "ln 2 = 0.693 = chance" in labels[0] and "50% = chance" in labels[1] and "0 = chance" in labels[2]
    assert fig.axes[0].yaxis.get_major_formatter().get_useOffset() is False


def test_first_step_time_and_estimate_and_timed_progress_in_a_pipe(shards, tmp_path, capsys, monkeypatch):
    import llmcore.train.trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "PROGRESS_EVERY_S", 0.0)  # every step is "30 s later"
    code, out, err = run_cli(cli_args(shards, tmp_path / "r", "--max-steps", "4", "--log-every", "100"), capsys)
    assert code == 0, err
    lines = out.splitlines()
    first = [ln for ln in lines if ln.startswith("first step took ")]
    assert len(first) == 1 and re.fullmatch(
        r"first step took \d+\.\d\d s; at that pace the 3 remaining steps take "
        r"about \d+:\d\d \(the first step includes start-up; the progress lines "
        r"refine it\)",
        first[0],
    ), first
    # --log-every 100 logs steps 1 and 4; a pipe still gets a progress line for steps 2 and 3.
    assert [ln.split()[1] for ln in lines if ln.startswith("step ") and " loss " in ln] == ["1/4", "2/4", "3/4", "4/4"]
    from llmcore.train.metrics import read_metrics

    assert [r["step"] for r in read_metrics(tmp_path / "r" / "metrics.jsonl")] == [1, 4]


def test_summary_says_when_its_eval_loss_is_from_an_earlier_step(shards, tmp_path):
    out = tmp_path / "run"
    kw = dict(max_steps=4, eval_docs=6, eval_every=2, save_every=2)
    train("pretrain", tiny_cfg("pretrain", shards, out, stop_after=2, **kw))
    line = train("pretrain", tiny_cfg("pretrain", shards, out, resume=True, stop_after=1, **kw)).line()
    assert re.search(r"eval_loss \d\.\d{4} \(ppl [\d.]+\) \[at step 2\]", line), line
    line = train("pretrain", tiny_cfg("pretrain", shards, out, resume=True, **kw)).line()
    assert "eval_loss" in line and "[at step" not in line, line  # measured at the last step


def test_sigterm_to_two_processes_saves_one_checkpoint_from_both(shards, tmp_path):
    """torchrun forwards SIGTERM to both ranks; they agree on the step, save together (each rank its
    own loader/RNG state) and exit 143; rank 0 prints the line once."""
    pytest.importorskip("deepspeed", reason="deepspeed not installed")
    from llmcore.checkpoint import checkpoint_problem
    from llmcore.train.deepspeed_config import deepspeed_config_path
    from llmcore.train.distributed import free_port

    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "llmcore",
        "train",
        "pretrain",
        "--deepspeed",
        str(deepspeed_config_path("zero1")),
        "--data",
        str(shards["pretrain"]),
        "--out",
        str(out),
        "--model",
        "tiny",
        "--seq-len",
        "48",
        "--micro-batch-size",
        "1",
        "--global-batch-size",
        "4",
        "--max-steps",
        "100000",
        "--log-every",
        "1",
        "--save-every",
        "0",
        "--attn-backend",
        "sdpa",
        "--dtype",
        "fp32",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")),
    }
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _logged_steps(out) >= 2, "two logged steps", proc)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    step = int((out / "checkpoints" / "latest").read_text().strip().removeprefix("step-"))
    ck = out / "checkpoints" / f"step-{step}"
    assert checkpoint_problem(ck) is None
    assert {"loader_state.json", "loader_state_rank1.json", "rng_state.pt", "rng_state_rank1.pt"} <= {
        p.name for p in ck.iterdir()
    }
    assert stderr.count(f"stopped by SIGTERM at step {step}/100000: checkpoint saved in {ck}") == 1, stderr[-3000:]


def test_train_help_reads_at_80_columns():
    from typer.testing import CliRunner

    from llmcore.cli import app

    out = CliRunner().invoke(app, ["train", "pretrain", "--help"], terminal_width=80).output
    assert (
        "[default: 512]" in out
        and "(512)" not in out
        and "[default: minimind2-small (when no --init)]" in " ".join(out.split())
    )
    assert "--data DIR" in out and "--seq-len N" in out and "--lr X" in out and "--packing packed|bestfit|padded" in out
    assert "<str>" not in out and "<int>" not in out and "--compile / --no-compile" in out
    assert max(len(line) for line in out.splitlines()) <= 80


def test_resume_inherits_what_the_run_is_not_where_it_ran(tmp_path):
    from llmcore.train.config import saved_settings

    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "stage": "pretrain",
                "train": {
                    "seq_len": 48,
                    "seed": 3,
                    "device": "cuda:1",
                    "deepspeed": "zero2",
                    "stop_after": 2,
                    "resume": True,
                    "quiet": True,
                    "no_such_setting": 1,
                },
            }
        )
    )
    assert saved_settings(tmp_path) == {"seq_len": 48, "seed": 3}


def test_first_step_line_says_when_a_cpu_run_will_take_hours():
    from types import SimpleNamespace

    import torch

    from llmcore.train.trainer import Trainer

    def line(device: str, model: str | None, first_s: float) -> str:
        fake = SimpleNamespace(
            total_steps=2000,
            step=1,
            engine=SimpleNamespace(device=torch.device(device)),
            cfg=SimpleNamespace(model=model),
        )
        return Trainer._first_step_line(fake, first_s)

    slow = line("cpu", "minimind2-small", 95.31)
    assert slow.startswith("first step took 95.31 s; at that pace the 1,999 remaining steps take about 52:55:25 ")
    assert slow.endswith("; minimind2-small is slow on a CPU: --model tiny trains in minutes, a GPU runs this one")
    assert "slow on a CPU" not in line("cpu", "minimind2-small", 0.5)  # 17 minutes: fine
    assert "slow on a CPU" not in line("cuda", "minimind2-small", 95.31)
    assert "slow on a CPU" not in line("cpu", None, 95.31)  # --init: no preset to swap


def test_a_second_writer_in_the_same_process_is_refused_too(shards, tmp_path):
    from llmcore.train import TrainHooks

    out = tmp_path / "run"
    seen = []

    def nested(step, record):  # a second training into the same --out while the first runs
        with pytest.raises(LLMCoreError, match=rf"--out {out} is in use by another training in this process"):
            train("pretrain", tiny_cfg("pretrain", shards, out, max_steps=1))
        seen.append(step)

    train("pretrain", tiny_cfg("pretrain", shards, out, max_steps=2, save_every=0), hooks=TrainHooks(on_step=nested))
    assert seen == [1, 2]
    assert train("pretrain", tiny_cfg("pretrain", shards, out, max_steps=3, resume=True)).steps == 3  # released
