"""Clear errors for bad flags and mismatched data/tokenizer/model, and a clean stop on NaN."""

from __future__ import annotations

import json
import shutil

import pytest

from llmcore.checkpoint import load_model
from llmcore.errors import LLMCoreError
from llmcore.train import TrainConfig, TrainingDiverged, build_config, train

from test_train_common import losses, pretrained_run, run_cli, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize(
    "args, message",
    [
        (["--global-batch-size", "6", "--micro-batch-size", "4"], "not a multiple of --micro-batch-size"),
        (["--lr", "-1"], "--lr must be"),
        (["--dtype", "fp8"], "--dtype must be one of"),
        (["--attn-backend", "flash"], "--attn-backend must be one of"),
        (["--seq-len", "0"], "--seq-len must be a positive integer"),
        (["--min-lr", "1", "--lr", "0.1"], "must not exceed --lr"),
        (["--init", "/nonexistent/run"], "either --model PRESET"),
        (["--deepspeed", "/nonexistent/ds.json"], "no such DeepSpeed config"),
        (["--model", "giant"], "unknown model preset"),
        (["--epochs", "nan"], "--epochs must be a finite number"),
        (["--lr", "1e39"], "--lr must be <= 1e+30"),
        (["--device", "tpu"], "expected auto, cpu, cuda or cuda:N"),
        (["--packing", "stream"], "--packing must be one of packed, bestfit, padded"),
    ],
)
def test_bad_flags_exit_2_with_one_line(shards, tmp_path, capsys, args, message):
    base = [
        "train",
        "pretrain",
        "--data",
        str(shards["pretrain"]),
        "--out",
        str(tmp_path / "run"),
        "--max-steps",
        "1",
        "--seq-len",
        "32",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "2",
        "--quiet",
    ]
    if "--model" not in args:
        base += ["--model", "tiny"]
    code, _, err = run_cli(base + args, capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_data_kind_must_match_stage(shards, tmp_path):
    with pytest.raises(LLMCoreError, match="holds sft shards, but `train pretrain` needs pretrain"):
        train("pretrain", tiny_cfg("pretrain", shards, tmp_path / "r", data=str(shards["sft"])))
    with pytest.raises(LLMCoreError, match="holds pretrain shards, but `train dpo` needs dpo"):
        train("dpo", tiny_cfg("dpo", shards, tmp_path / "r2", data=str(shards["pretrain"]), init=str(pretrained_run())))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--data", "{missing}"], "error: --data {missing}: no such shard directory"),
        (["--init", "{missing}"], "error: --init {missing}: no such run dir or checkpoint"),
        (["--deepspeed", "{missing}"], "error: --deepspeed {missing}: no such DeepSpeed config"),
    ],
)
def test_settings_are_values_and_the_run_looks_at_the_disk(shards, tmp_path, capsys, flags, message):
    """build_config checks values only (a login node checks a run whose paths exist on other
    machines); `llmcore train` looks at the paths when it starts: one line, before the run dir is made."""
    missing = str(tmp_path / "missing")
    flags = [f.format(missing=missing) for f in flags]
    given = {
        "data": str(shards["pretrain"]),
        "out": str(tmp_path / "run"),
        "model": None if "--init" in flags else "tiny",
    }
    given[flags[0][2:]] = flags[1]
    cfg = build_config("pretrain", given)
    assert getattr(cfg, flags[0][2:]) == missing
    args = ["train", "pretrain", "--out", str(tmp_path / "run"), "--max-steps", "1", "--quiet"]
    args += ["--data", str(shards["pretrain"])] if "--data" not in flags else []
    args += ["--model", "tiny"] if "--init" not in flags else []
    code, out, err = run_cli(args + flags, capsys)
    assert code == 2 and out == "" and err.startswith(message.format(missing=missing))
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_init_run_with_another_tokenizer_is_refused(shards, tmp_path):
    # A run trained on shards from tok_other cannot continue on shards made with tok.
    other = tmp_path / "other"
    train("pretrain", tiny_cfg("pretrain", shards, other, data=str(shards["pretrain_other"]), max_steps=1))
    with pytest.raises(LLMCoreError, match=r"tokenizer from --init .* does not match --data"):
        train("sft", tiny_cfg("sft", shards, tmp_path / "sft", init=str(other)))


def test_explicit_tokenizer_must_match_shards(shards, tmp_path):
    with pytest.raises(LLMCoreError, match="does not match --data"):
        train("pretrain", tiny_cfg("pretrain", shards, tmp_path / "r", tokenizer=str(shards["tok_other"])))


def test_model_vocab_smaller_than_shard_vocab_is_refused(shards, tmp_path):
    # Shrink a run's model vocab below the shards' tokenizer vocab (tokenizer copy kept identical).
    run = tmp_path / "small"
    shutil.copytree(pretrained_run(), run)
    from safetensors.torch import load_file, save_file

    step = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    cfg = json.loads((step / "model_config.json").read_text())
    cfg["vocab_size"] = 100
    (step / "model_config.json").write_text(json.dumps(cfg))
    w = load_file(str(step / "model.safetensors"))
    w["embed_tokens.weight"] = w["embed_tokens.weight"][:100].contiguous()
    save_file(w, str(step / "model.safetensors"))
    from llmcore.checkpoint import write_manifest

    write_manifest(step)  # an intact checkpoint of a model made for a 100-token vocab
    # With its 400-id tokenizer copy beside it, load_model already refuses the pair (the tokenizer
    # does not fit the embedding); without one, the trainer compares the model with the shards.
    shutil.rmtree(run / "tokenizer")
    with pytest.raises(LLMCoreError, match="model vocab size 100 is smaller"):
        train("sft", tiny_cfg("sft", shards, tmp_path / "sft", init=str(run)))


def test_existing_run_needs_resume_and_dpo_needs_init(shards, tmp_path):
    train("pretrain", tiny_cfg("pretrain", shards, tmp_path / "r", max_steps=1))
    with pytest.raises(LLMCoreError, match="already holds checkpoints"):
        train("pretrain", tiny_cfg("pretrain", shards, tmp_path / "r", max_steps=2))
    with pytest.raises(LLMCoreError, match="dpo needs --init"):
        train("dpo", tiny_cfg("dpo", shards, tmp_path / "d", model="tiny"))


def test_toml_config_file_and_flag_precedence(shards, tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[train]\nlr = 0.002\nseq-len = 40\nwarmup_steps = 3\npacking = "padded"\n')
    cfg = build_config("pretrain", {"data": str(shards["pretrain"]), "out": str(tmp_path / "o"), "lr": 0.001}, toml)
    assert cfg.lr == 0.001 and cfg.seq_len == 40 and cfg.warmup_steps == 3 and cfg.packing == "padded"
    assert cfg.min_lr == pytest.approx(0.0001) and cfg.micro_batch_size == 32  # stage defaults fill the rest
    toml.write_text("learning_rate = 1\n")
    with pytest.raises(LLMCoreError, match="unknown training setting"):
        build_config("pretrain", {"data": str(shards["pretrain"]), "out": "o"}, toml)
    # Values in files are type-checked against the setting's declared type, never coerced from strings.
    for text, message in (
        ('lr = "1e-3"', "lr must be a number"),
        ('compile = "no"', "compile must be true or false"),
        ("seq_len = 1.5", "seq_len must be an integer"),
        ("epochs = nan", "--epochs must be a finite"),
        ('dtype = "fp8"', "--dtype must be one of"),
    ):
        toml.write_text(text + "\n")
        with pytest.raises(LLMCoreError, match=message):
            build_config("pretrain", {"data": str(shards["pretrain"]), "out": "o"}, toml)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("train:\n  lr: 0.004\n  packing: padded\n")
    cfg = build_config("pretrain", {"data": str(shards["pretrain"]), "out": "o"}, yaml_file)
    assert cfg.lr == 0.004 and cfg.packing == "padded"
    sft = TrainConfig(data=str(shards["sft"]), out="o", init=str(pretrained_run())).resolved("sft")
    assert sft.lr == 1e-5 and sft.epochs == 2
    dpo = TrainConfig(data=str(shards["dpo"]), out="o", init=str(pretrained_run())).resolved("dpo")
    assert dpo.beta == 0.1 and dpo.dpo_logp == "sum" and dpo.lr < 1e-6


def test_nan_loss_stops_cleanly_keeping_last_good_checkpoint(shards, tmp_path, capsys):
    out = tmp_path / "nan"
    # A huge LR makes step 1's update blow the weights up; step 2's loss is NaN/Inf.
    cfg = tiny_cfg("pretrain", shards, out, lr=1e30, min_lr=1e30, max_steps=5, save_every=1, grad_clip=0.0)
    with pytest.raises(TrainingDiverged, match="training stopped and nothing was saved"):
        train("pretrain", cfg)
    ck = out / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step-1"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step-1"]
    load_model(out)  # the last good checkpoint loads
    assert [s for s, _ in losses(out)] == [1]  # the bad step logged nothing

    # Through the CLI: one error line, exit code 2.
    args = [
        "train",
        "pretrain",
        "--data",
        str(shards["pretrain"]),
        "--out",
        str(tmp_path / "nan2"),
        "--model",
        "tiny",
        "--seq-len",
        "48",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "4",
        "--lr",
        "1e30",
        "--min-lr",
        "1e30",
        "--grad-clip",
        "0",
        "--max-steps",
        "5",
        "--save-every",
        "1",
        "--quiet",
    ]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "error: " in err and "step 2" in err


def test_cli_is_derived_from_the_config_per_stage(shards, tmp_path):
    """Every setting has one option; each stage's --help shows its own defaults and only its own
    stage-specific settings; --print-config prints TOML that --config reads back to the same config."""
    from dataclasses import fields

    from typer.testing import CliRunner

    from llmcore.cli import app
    from llmcore.train.config import TrainConfig, flag_name
    from llmcore.train.stages import all_stages, stage_only_settings

    runner = CliRunner()
    helps = {
        st.name: runner.invoke(app, ["train", st.name, "--help"], terminal_width=200).output for st in all_stages()
    }
    for st in all_stages():
        others = stage_only_settings() - set(st.settings)
        for f in fields(TrainConfig):
            assert (flag_name(f.name) in helps[st.name]) == (f.name not in others), (st.name, f.name)
    dpo_help, pre_help = helps["dpo"], helps["pretrain"]
    assert "--beta" in dpo_help and "--beta" not in pre_help and "--on-long" in helps["sft"]
    assert "--packing" in pre_help and "--packing" not in dpo_help
    assert "4e-08" in dpo_help and "0.0005" in pre_help  # each stage's own default lr

    args = [
        "train",
        "pretrain",
        "--data",
        str(shards["pretrain"]),
        "--out",
        str(tmp_path / "o"),
        "--lr",
        "0.003",
        "--no-compile",
        "--print-config",
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "lr = 0.003" in res.output and "micro_batch_size = 32" in res.output
    saved = tmp_path / "effective.toml"
    saved.write_text(res.output)
    again = build_config("pretrain", {}, saved)
    assert again == build_config("pretrain", {"data": str(shards["pretrain"]), "out": str(tmp_path / "o"), "lr": 0.003})
    assert not (tmp_path / "o").exists()  # --print-config trains nothing


def test_sft_rows_too_short_for_any_answer_are_refused(shards, tmp_path):
    with pytest.raises(LLMCoreError, match="no conversation keeps an assistant token within --seq-len 8"):
        train("sft", tiny_cfg("sft", shards, tmp_path / "sft", init=str(pretrained_run()), seq_len=8))
