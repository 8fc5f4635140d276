"""--optimizer muon under DeepSpeed ZeRO-1/2 (DeepSpeed's own ZeRO Muon, configured as the plain
engine's): the update of a hidden matrix really is Newton-Schulz-orthogonalised Nesterov momentum
(checked against a float64 iteration from the published formula, 2 processes, both stages); a
2-process ZeRO-2 run gives the plain engine's Muon losses; a ZeRO-2 Muon run resumes exactly from
its safetensors checkpoint, and Muon checkpoints continue across the two engines; ZeRO-0/3, optimizer offload and gradient clipping are refused in one line.

Run as a script (`torchrun --nproc_per_node 2 tests/test_train_muon_zero.py`), this file is the child
of `test_zero_update_is_newton_schulz_of_nesterov_momentum`."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmcore.errors import LLMCoreError

if __name__ != "__main__":  # the torchrun child has no tests/ on its path and needs no fixtures
    from test_train_common import ROOT, assert_same_weights, losses, tiny_cfg

    pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
    pytest.importorskip("deepspeed", reason="deepspeed not installed")

LR, MUON_LR, MU, WD, MUON_WD = 1e-3, 0.02, 0.95, 0.1, 0.1


def _env() -> dict[str, str]:
    # Without the rendezvous variables an in-process DeepSpeed run of this session may have left set.
    left = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {
        **{k: v for k, v in os.environ.items() if k not in left},
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        # DeepSpeed compiles its Muon update with torch.compile; on CPU that costs minutes of C++
        # builds per matrix shape and changes nothing the tests check (eager runs the same ops).
        "TORCHDYNAMO_DISABLE": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")),
    }


def _torchrun(args: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    from llmcore.train.distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    proc = subprocess.run(cmd + args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


# -- the update, checked independently (child: 2 processes, ZeRO-1 then ZeRO-2) ------------------------


def _child() -> None:
    """Two steps of DeepSpeed ZeRO-1 and ZeRO-2 with `zero_muon_optimizer` on a tiny model; a twin
    model computes each step's full-batch gradient on its own, and every Muon matrix must have moved
    by lr * sqrt(max(1, A/B)) * NS(Nesterov momentum) (float64 iteration) after decoupled decay."""
    import deepspeed
    import torch.distributed as dist

    from llmcore.model import LLM, PRESETS, ModelConfig
    from llmcore.train import TrainConfig
    from llmcore.train.optim import zero_muon_momentum, zero_muon_optimizer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_train_optim import newton_schulz

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank = dist.get_rank()
    cfg = TrainConfig(
        lr=LR, optimizer="muon", muon_lr=MUON_LR, muon_momentum=MU, muon_weight_decay=MUON_WD, weight_decay=WD
    )
    batch = torch.randint(0, 500, (4, 33), generator=torch.Generator().manual_seed(5))

    def loss_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        logits = model(x[:, :-1])
        logits = getattr(logits, "logits", logits)
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))

    report = {}
    for stage in (1, 2):
        torch.manual_seed(0)
        model = LLM(ModelConfig(**PRESETS["tiny"]))
        twin = LLM(ModelConfig(**PRESETS["tiny"]))
        ds = {
            "train_batch_size": 4,
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage},
            "gradient_clipping": 0.0,
            "steps_per_print": 10**9,
        }
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=zero_muon_optimizer(model, cfg), config=ds)
        muon = {n: p for n, p in model.named_parameters() if p.use_muon}
        bufs = {n: torch.zeros_like(p) for n, p in muon.items()}
        errors, nesterov_vs_plain = [], []
        for _ in range(2):
            twin.load_state_dict(model.state_dict())
            twin.zero_grad()
            loss_of(twin, batch).backward()  # the whole global batch in one process
            grads = {n: p.grad.detach().clone() for n, p in twin.named_parameters()}
            before = {n: p.detach().clone() for n, p in muon.items()}
            loss = loss_of(engine, batch[rank * 2 : rank * 2 + 2])
            engine.backward(loss)
            engine.step()
            for n, p in muon.items():
                bufs[n] = MU * bufs[n] + (1 - MU) * grads[n]
                nesterov = (1 - MU) * grads[n] + MU * bufs[n]
                rows, cols = p.shape
                lr = MUON_LR * math.sqrt(max(1.0, rows / cols))
                got = (before[n] * (1 - MUON_LR * MUON_WD) - p.detach()) / lr
                errors.append((got - newton_schulz(nesterov)).abs().max().item())
                nesterov_vs_plain.append((got - newton_schulz(bufs[n])).abs().max().item())
        # A matrix split between the two ranks' partitions: each holds a full momentum copy.
        held = {id(p) for p, _ in zero_muon_momentum(engine.optimizer)}
        report[stage] = {
            "max_error": max(errors),
            "min_gap_to_plain_momentum": min(nesterov_vs_plain[len(muon) :]),  # step 2 (step 1: same)
            "held": sorted(n for n, p in muon.items() if id(p) in held),
        }
    if rank == 0:
        from deepspeed.runtime.zero.muon.original_muon import ns_compute_dtype

        from llmcore.train.optim import MUON_NS_METHOD

        report["ns_dtype"] = str(ns_compute_dtype(MUON_NS_METHOD))
        print("REPORT " + json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


def test_zero_update_is_newton_schulz_of_nesterov_momentum():
    proc = _torchrun([str(Path(__file__).resolve()), "child"])
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT "))
    report = json.loads(line[len("REPORT ") :])
    # DeepSpeed's Newton-Schulz runs in fp32 on a CPU without fp16 matmuls, else in fp16.
    tolerance = 1e-4 if report["ns_dtype"] == "torch.float32" else 0.02
    for stage in ("1", "2"):
        r = report[stage]
        assert r["max_error"] < tolerance, (stage, r, report["ns_dtype"])
        assert r["min_gap_to_plain_momentum"] > 2 * r["max_error"], (stage, r)  # Nesterov, not plain momentum
        assert len(r["held"]) > 0, (stage, r)


# -- through the trainer: ZeRO-2 matches the plain engine, and resumes exactly ----------------------

KW = dict(
    optimizer="muon",
    grad_clip=0.0,
    max_steps=4,
    save_every=2,
    muon_weight_decay=MUON_WD,
    lr_schedule="wsd",
    warmup_steps=1,
    decay_fraction=0.5,
)


def _zero2(shards, out: Path, *extra: str) -> None:
    from llmcore.train.deepspeed_config import deepspeed_config_path

    args = ["-m", "llmcore", "train", "pretrain", "--deepspeed", str(deepspeed_config_path("zero2"))]
    args += ["--data", str(shards["pretrain"]), "--out", str(out), "--model", "tiny", "--seq-len", "48"]
    args += ["--micro-batch-size", "1", "--global-batch-size", "4", "--log-every", "1", "--lr", "3e-3"]
    args += ["--seed", "3", "--attn-backend", "sdpa", "--quiet", "--max-steps", "4", "--save-every", "2"]
    args += ["--optimizer", "muon", "--grad-clip", "0", "--muon-weight-decay", str(MUON_WD)]
    args += ["--lr-schedule", "wsd", "--warmup-steps", "1", "--decay-fraction", "0.5", *extra]
    _torchrun(args)


def _rewind(run: Path, copy: Path) -> None:
    """`run` copied to `copy` as it was when its step-2 checkpoint was written (4-step runs)."""
    from llmcore.train.metrics import MetricsLogger

    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step-4")
    (copy / "checkpoints" / "latest").write_text("step-2\n")
    MetricsLogger.truncate(copy, 2)


def test_zero2_muon_matches_one_process_and_resumes_exactly(shards, tmp_path, monkeypatch):
    from llmcore.train import train
    from llmcore.train.deepspeed_config import deepspeed_config_path
    from llmcore.train.optim_state import read_optimizer_safetensors

    train("pretrain", tiny_cfg("pretrain", shards, tmp_path / "plain", **KW))
    train("pretrain", tiny_cfg("pretrain", shards, tmp_path / "adamw", **{**KW, "optimizer": "adamw"}))
    plain, adamw = losses(tmp_path / "plain"), losses(tmp_path / "adamw")
    _zero2(shards, tmp_path / "full")
    full = losses(tmp_path / "full")
    assert [s for s, _ in full] == [s for s, _ in plain] == [1, 2, 3, 4]
    for (_, a), (_, b), (_, c) in zip(full[1:], plain[1:], adamw[1:]):
        # Same update, two bf16 Newton-Schulz implementations: ~3e-5 apart; AdamW is far away.
        assert a == pytest.approx(b, abs=2e-4)
        assert abs(b - c) > 50 * abs(a - b) + 1e-3
    # The Muon momentum and AdamW moments are in the safetensors checkpoint, one tensor per name.
    state, meta = read_optimizer_safetensors(tmp_path / "full" / "checkpoints" / "step-2")
    assert meta["zero_stage"] == "2" and meta["world_size"] == "2"
    assert "momentum_buffer/layers.0.mlp.up_proj.weight" in state
    assert "exp_avg/layers.0.mlp.up_proj.weight" not in state
    assert {"exp_avg/embed_tokens.weight", "exp_avg_sq/norm.weight"} <= state.keys()
    # Exact resume: from the step-2 checkpoint, 2 more steps == 4 uninterrupted steps, bit for bit.
    # (The run is copied and rewound to step 2: one 2-process launch fewer than a --stop-after run.)
    _rewind(tmp_path / "full", tmp_path / "cut")
    shutil.copytree(tmp_path / "cut", tmp_path / "zero_to_plain")
    _zero2(shards, tmp_path / "cut", "--resume")
    assert losses(tmp_path / "cut") == full
    assert_same_weights(tmp_path / "cut", tmp_path / "full")
    # Across engines (same checkpoint files, per parameter name): the plain engine continues the
    # ZeRO-2 run, ZeRO-2 (here one in-process rank, last: it leaves a process group) the plain run.
    train("pretrain", tiny_cfg("pretrain", shards, tmp_path / "zero_to_plain", resume=True, **KW))
    _rewind(tmp_path / "plain", tmp_path / "plain_to_zero")
    ds = str(deepspeed_config_path("zero2"))
    monkeypatch.setattr(torch._dynamo.config, "disable", True)  # as TORCHDYNAMO_DISABLE in _env()
    train("pretrain", tiny_cfg("pretrain", shards, tmp_path / "plain_to_zero", resume=True, deepspeed=ds, **KW))
    for run in ("zero_to_plain", "plain_to_zero"):
        got = losses(tmp_path / run)
        assert [s for s, _ in got] == [1, 2, 3, 4], run
        for (_, a), (_, b) in zip(got[2:], plain[2:]):
            assert a == pytest.approx(b, abs=2e-4), run


# -- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "zero, clip, match",
    [
        ({}, 0.0, r"--optimizer muon with --deepspeed z: ZeRO stage 0 is not supported"),
        ({"stage": 3}, 0.0, r"--optimizer muon with --deepspeed z: ZeRO stage 3 is not supported"),
        ({"stage": 2, "offload_optimizer": {"device": "cpu"}}, 0.0, r"--deepspeed z: optimizer offload"),
        ({"stage": 2}, 1.0, r"--optimizer muon with --deepspeed needs --grad-clip 0"),
    ],
)
def test_what_is_not_muon_is_refused_in_one_line(zero, clip, match):
    from llmcore.train.optim import check_muon_zero

    with pytest.raises(LLMCoreError, match=match) as e:
        check_muon_zero(zero, clip, "z")
    assert "\n" not in str(e.value)
    check_muon_zero({"stage": 1, "offload_optimizer": {"device": "none"}}, 0.0, "z")  # accepted


@pytest.mark.parametrize("name", ["zero0", "zero3", "zero3-offload"])
def test_muon_zero0_and_zero3_are_refused_before_the_run(shards, tmp_path, name):
    cfg = tiny_cfg("pretrain", shards, tmp_path / name, optimizer="muon", grad_clip=0.0, deepspeed=name)
    with pytest.raises(LLMCoreError, match=r"--optimizer muon with --deepspeed .*ZeRO stage [03]") as e:
        cfg.resolved("pretrain")
    assert "\n" not in str(e.value)
    tiny_cfg("pretrain", shards, tmp_path / "ok", optimizer="muon", grad_clip=0.0, deepspeed="zero2").resolved(
        "pretrain"
    )
    with pytest.raises(LLMCoreError, match="needs --grad-clip 0"):
        tiny_cfg("pretrain", shards, tmp_path / "c", optimizer="muon", deepspeed="zero1").resolved("pretrain")


if __name__ == "__main__" and sys.argv[1:] == ["child"]:
    _child()
