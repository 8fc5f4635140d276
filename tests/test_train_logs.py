"""What a training run tells a person reading its log in a pipe (Slurm, CI, `| tee`): the plan
line with epochs, a repeat warning, a progress line at step 1 with elapsed/ETA as h:mm:ss, the
eval notice, the resumed-from line, and a summary with the uniform-guess reference loss."""

from __future__ import annotations

import re

import pytest

from test_train_common import run_cli

pytestmark = pytest.mark.usefixtures("one_thread", "no_leftover_handlers")  # tests/conftest.py


def test_piped_training_log(shards, tmp_path, capsys):
    base = [
        "train",
        "pretrain",
        "--data",
        str(shards["pretrain"]),
        "--out",
        str(tmp_path / "r"),
        "--model",
        "tiny",
        "--seq-len",
        "48",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "4",
        "--max-steps",
        "8",
        "--log-every",
        "5",
        "--eval-docs",
        "10",
        "--save-every",
        "4",
        "--attn-backend",
        "sdpa",
    ]
    code, out, err = run_cli(base + ["--stop-after", "4"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    plan = lines[0]
    assert re.match(
        r"pretrain: 8 steps x 4 rows of 48 tokens \(192 token slots per step\) on cpu; the training data "
        r"holds [\d,]+ tokens in 290 documents = \d+ steps per epoch, so this run makes 0\.\d\d epochs",
        plan,
    ), plan
    step_lines = [ln for ln in lines if ln.startswith("step ") and "loss" in ln and "eval" not in ln]
    assert step_lines[0].startswith("step 1/8 loss ")  # a line at step 1 even with --log-every 5
    assert all(re.search(r"elapsed \d+:\d\d eta \d+:\d\d$", ln) for ln in step_lines), step_lines
    assert "eta 0.0 min" not in out
    assert lines[-1].startswith("done: pretrain 4/8 steps") and "a uniform guess scores ln 400 = 5.99" in lines[-1]

    code, out, err = run_cli(base + ["--resume"], capsys)
    assert code == 0, err
    assert "resumed from step 4 (checkpoint " in out and "step-4" in out
    assert "step 8: evaluating on 10 held-out documents" in out
    assert "eval_loss" in out


def test_repeat_warning_shows_even_with_quiet(shards, tmp_path, capsys):
    args = [
        "train",
        "pretrain",
        "--data",
        str(shards["pretrain"]),
        "--out",
        str(tmp_path / "r"),
        "--model",
        "tiny",
        "--seq-len",
        "48",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "4",
        "--max-steps",
        "400",
        "--stop-after",
        "1",
        "--repeat-warning",
        "2",
        "--attn-backend",
        "sdpa",
        "--quiet",
    ]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    # The count depends on how the test tokenizer cuts the synthetic text; > 2 is the point.
    m = re.search(r"warning: the run passes over its data (\d+\.\d) times \(more than --repeat-warning 2\)", err)
    assert m and float(m.group(1)) > 2, err
