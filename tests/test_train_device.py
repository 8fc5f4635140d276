"""Device handling of training and inference, as far as a CPU machine can check it: device and
backend resolution, one-line errors without CUDA, placement of model, batches and DPO reference
on the engine's device, the device feed's exactness, device-independent checkpoints, and the
speed fields (mfu, peak memory) of metrics.jsonl. GPU-only checks are in tests/test_gpu.py."""

from __future__ import annotations

import json

import pytest
import torch

from llmcore.common import default_attn_backend, resolve_device
from llmcore.errors import LLMCoreError
from llmcore.train import train
from llmcore.train.metrics import read_metrics

from test_train_common import pretrained_run, run_cli, sft_run, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

NO_CUDA = not torch.cuda.is_available()


def test_device_resolution_and_errors(monkeypatch):
    if NO_CUDA:
        assert resolve_device("auto") == torch.device("cpu")
        assert default_attn_backend(resolve_device("auto")) == "sdpa"
        for spec in ("cuda", "cuda:0", "CUDA:1"):
            with pytest.raises(LLMCoreError, match="CUDA is not available"):
                resolve_device(spec)
    assert resolve_device("cpu") == torch.device("cpu")
    for spec in ("tpu", "cuda:x", "gpu0"):
        if spec.startswith("cuda") and NO_CUDA:
            continue
        with pytest.raises(LLMCoreError, match="--device"):
            resolve_device(spec)
    # Under a launcher, auto picks the local rank's GPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("auto") == torch.device("cuda", 2)
    assert resolve_device("cuda") == torch.device("cuda", 2)
    with pytest.raises(LLMCoreError, match="has 4 GPU"):
        resolve_device("cuda:7")
    assert default_attn_backend(torch.device("cuda", 0)) == "triton"


@pytest.mark.skipif(not NO_CUDA, reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize(
    "command",
    [["train", "pretrain", "--model", "tiny", "--max-steps", "1"], ["eval"], ["generate", "--prompt", "hello"]],
)
def test_device_cuda_without_cuda_is_one_line(shards, tmp_path, capsys, command):
    run = pretrained_run()
    if command[0] == "train":
        args = command + ["--data", str(shards["pretrain"]), "--out", str(tmp_path / "r")]
    elif command[0] == "eval":
        args = command + ["--ckpt", str(run), "--data", str(shards["pretrain"])]
    else:
        args = command + ["--ckpt", str(run)]
    code, _, err = run_cli(args + ["--device", "cuda"], capsys)
    assert code == 2 and err.startswith("error: ") and "CUDA is not available" in err
    assert len(err.strip().splitlines()) == 1


def test_triton_backend_on_cpu_without_interpreter_is_refused(shards, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(LLMCoreError, match="need a CUDA device"):
        train("pretrain", tiny_cfg("pretrain", shards, tmp_path / "r", attn_backend="triton", max_steps=1))


def test_auto_precision_and_backend_resolve_for_the_cpu(shards, tmp_path):
    s = train("pretrain", tiny_cfg("pretrain", shards, tmp_path / "r", attn_backend="auto", dtype="auto", max_steps=2))
    config = json.loads((s.run_dir / "config.json").read_text())
    assert config["device"] == "cpu" and config["train"]["attn_backend"] == "sdpa"
    saved = json.loads((s.run_dir / "checkpoints" / "step-2" / "model_config.json").read_text())
    assert saved["attn_backend"] == "sdpa"
    rows = read_metrics(s.run_dir / "metrics.jsonl")
    assert all(r["peak_mem_gb"] > 0 and r["step_s"] > 0 for r in rows)
    assert "mfu" not in rows[0]  # no known peak for a CPU unless --peak-tflops names one


def test_mfu_counts_causal_attention(shards, tmp_path):
    from llmcore.model import ModelConfig, param_report
    from llmcore.train.speed import flops_per_token

    cfg = ModelConfig.from_preset("minimind2-small")
    n = param_report(cfg)["total"]
    attn = cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * 512
    # Causal attention computes half the score/value products of PaLM's 12·L·H·Q·T (appendix B).
    assert flops_per_token(cfg, 512) == 6 * n + 6 * attn
    assert flops_per_token(cfg, 512, causal=False) == 6 * n + 12 * attn
    s = train("pretrain", tiny_cfg("pretrain", shards, tmp_path / "r", max_steps=2, peak_tflops=1.0))
    rec = read_metrics(s.run_dir / "metrics.jsonl")[-1]
    config = json.loads((s.run_dir / "config.json").read_text())
    fpt = flops_per_token(ModelConfig.from_dict(config["model"]), 48)
    assert rec["mfu"] == pytest.approx(rec["tokens_per_s"] * fpt / 1e12)


def test_peak_table_names_the_card(monkeypatch):
    from llmcore.train.speed import peak_tflops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H200")
    assert peak_tflops(torch.device("cuda", 0)) == (989.0, "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 PCIe")
    assert peak_tflops(torch.device("cuda", 0))[0] == 756.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Some Future GPU")
    assert peak_tflops(torch.device("cuda", 0)) == (None, "Some Future GPU")
    assert peak_tflops(torch.device("cuda", 0), 123.0)[0] == 123.0


def test_model_batches_and_reference_live_on_the_engine_device(shards, tmp_path, monkeypatch):
    """Every tensor the model sees, and the DPO reference model, are on the engine's device."""
    from llmcore.train.trainer import Trainer

    seen: list[torch.device] = []
    trainer = Trainer.from_config(
        "dpo", tiny_cfg("dpo", shards, tmp_path / "d", init=str(sft_run()), max_steps=2).resolved("dpo")
    )
    dev = trainer.engine.device
    assert dev == resolve_device("auto")
    assert all(p.device == dev for p in trainer.model.parameters())
    assert all(p.device == dev for p in trainer.objective.ref_model.parameters())
    original = trainer.engine.forward

    def spy(batch):
        seen.extend(v.device for v in batch.values() if isinstance(v, torch.Tensor))
        return original(batch)

    monkeypatch.setattr(trainer.engine, "forward", spy)
    trainer.run()
    assert seen and all(d == dev for d in seen)


def test_device_feed_is_exact_and_resumable(shards):
    """The feed yields the loader's batches in order, its state is the position after the batches
    taken (not those built ahead), and a loader error reaches the consumer."""
    from llmcore.data_prep.loaders import make_loader
    from llmcore.data_prep.shards import ShardReader
    from llmcore.train.feed import DeviceFeed

    reader = ShardReader(shards["pretrain"])
    plain = make_loader(reader, "packed", 32, 2, seed=5)
    expected = [next(plain) for _ in range(7)]
    feed = DeviceFeed(
        make_loader(reader, "packed", 32, 2, seed=5),
        torch.device("cpu"),
        lambda b: {"real": int((b["input_ids"] != 0).sum())},
        depth=3,
    )
    got = [next(feed) for _ in range(4)]
    for (batch, facts), want in zip(got, expected):
        assert torch.equal(batch["input_ids"], want["input_ids"]) and torch.equal(batch["labels"], want["labels"])
        assert facts["real"] == int((want["input_ids"] != 0).sum())
    state = feed.state_dict()
    feed.close()
    resumed = DeviceFeed(make_loader(reader, "packed", 32, 2, seed=5), torch.device("cpu"), lambda b: {})
    resumed.load_state_dict(state)
    for want in expected[4:]:
        batch, _ = next(resumed)
        assert torch.equal(batch["input_ids"], want["input_ids"])
    resumed.close()

    class Broken:
        epoch = 0
        steps_per_epoch = 1

        def state_dict(self):
            return {"epoch": 0}

        def __next__(self):
            raise LLMCoreError("shard-0.arrow: bad row")

    with pytest.raises(LLMCoreError, match="bad row"):
        next(DeviceFeed(Broken(), torch.device("cpu"), lambda b: {}))


def test_one_backend_resolver_strict_for_training_lenient_for_loading(monkeypatch):
    from llmcore.common import resolve_attn_backend

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_attn_backend("auto", cpu, strict=True) == "sdpa"
    assert resolve_attn_backend("auto", gpu, strict=True) == "triton"
    assert resolve_attn_backend("triton", gpu, strict=True) == "triton"
    assert resolve_attn_backend("eager", cpu, strict=True) == "eager"
    assert resolve_attn_backend("triton", cpu, strict=False) == "sdpa"
    with pytest.raises(LLMCoreError, match="need a CUDA device"):
        resolve_attn_backend("triton", cpu, strict=True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_attn_backend("triton", cpu, strict=True) == "triton"


def test_checkpoint_trained_with_triton_loads_on_cpu(shards, tmp_path, monkeypatch):
    """The attention backend is how the math runs, not part of the weights: a run dir whose model
    config says triton (as one trained on a GPU does) generates on a CPU through sdpa."""
    import shutil

    from llmcore.checkpoint import load_model

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    run = tmp_path / "gpu_run"
    shutil.copytree(pretrained_run(), run)
    step = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    cfg = json.loads((step / "model_config.json").read_text())
    cfg["attn_backend"] = "triton"
    (step / "model_config.json").write_text(json.dumps(cfg))
    from llmcore.checkpoint import write_manifest

    write_manifest(step)
    model, _ = load_model(run, device="cpu")
    assert model.config.attn_backend == "sdpa"
    reference, _ = load_model(pretrained_run(), device="cpu")
    ids = torch.tensor([[1, 5, 9, 11, 4]])
    assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-5)
