"""Two processes on one node under the DeepSpeed launcher (gloo on CPU): ZeRO-2 gives the losses of the
one-process run with the same global batch, to 1e-5. This is the README's one-node command line;
ZeRO-1/2/3 across nodes (`llmcore launch`) are tested in test_launch_nodes.py, torchrun here too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmcore.train import train
from llmcore.train.deepspeed_config import deepspeed_config_path
from llmcore.train.distributed import free_port

from test_train_common import ROOT, losses, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

deepspeed = pytest.importorskip("deepspeed", reason="deepspeed not installed")

COMMON = [
    "--model",
    "tiny",
    "--seq-len",
    "48",
    "--global-batch-size",
    "4",
    "--max-steps",
    "4",
    "--log-every",
    "1",
    "--lr",
    "3e-3",
    "--seed",
    "3",
    "--quiet",
]


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> list[tuple[int, float]]:
    out = tmp_path_factory.mktemp("ref") / "run"
    train("pretrain", tiny_cfg("pretrain", shards, out, micro_batch_size=2, global_batch_size=4, max_steps=4))
    return losses(out)


# ZeRO-2 goes through the DeepSpeed launcher (which passes --local_rank), the others through torchrun.
@pytest.mark.parametrize("stage, launcher", [(2, "deepspeed"), (3, "torchrun")])
def test_two_process_zero_matches_one_process(shards, tmp_path, reference, stage, launcher):
    out = tmp_path / f"zero{stage}"
    if launcher == "deepspeed":
        runner = Path(sys.executable).with_name("deepspeed")
        head = [str(runner)] if runner.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]
        head += ["--num_gpus", "2", "--master_port", str(free_port()), "--module", "llmcore"]
    else:
        head = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "-m",
            "llmcore",
        ]
    cmd = head + [
        "train",
        "pretrain",
        "--deepspeed",
        str(deepspeed_config_path(f"zero{stage}")),
        "--data",
        str(shards["pretrain"]),
        "--out",
        str(out),
        "--micro-batch-size",
        "1",
        *COMMON,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")),
    }
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    got = losses(out)
    assert [s for s, _ in got] == [s for s, _ in reference] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(got, reference):
        assert a == pytest.approx(b, abs=1e-5)
    ck = out / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step-4"
    # Every rank wrote its own loader and RNG state; rank 0 the shared files.
    names = {p.name for p in (ck / "step-4").iterdir()}
    assert {
        "model.safetensors",
        "optimizer.safetensors",
        "loader_state.json",
        "loader_state_rank1.json",
        "rng_state.pt",
        "rng_state_rank1.pt",
        "trainer_state.json",
        "manifest.json",
    } <= names
    assert "engine" not in names  # DeepSpeed's own (pickled, per-rank) checkpoint files are not written
