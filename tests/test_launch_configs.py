"""The DeepSpeed configs ship inside the package, beside the engine (`llmcore/train/ds_configs/`), and
are chosen by name (or given as a file)."""

from __future__ import annotations

import importlib.util
import json
import os
import tomllib
from pathlib import Path

import pytest

from llmcore.errors import LLMCoreError
from llmcore.train.deepspeed_config import CONFIG_DIR, DEEPSPEED_CONFIGS, deepspeed_config_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name,stage", [("zero0", 0), ("zero1", 1), ("zero2", 2), ("zero3", 3), ("zero3-offload", 3)])
def test_names_give_the_packaged_configs(name, stage):
    path = deepspeed_config_path(name)
    assert path == CONFIG_DIR / f"{name}.json" and path.is_file()
    cfg = json.loads(path.read_text())
    assert cfg["zero_optimization"]["stage"] == stage
    # batch arithmetic, clipping and optimizer settings come from the run's settings
    assert cfg["train_micro_batch_size_per_gpu"] == cfg["gradient_accumulation_steps"] == "auto"
    assert cfg["optimizer"]["type"] == "AdamW" and cfg["optimizer"]["params"]["torch_adam"] is True


def test_zero3_offload_puts_params_and_optimizer_on_cpu():
    z = json.loads(deepspeed_config_path("zero3-offload").read_text())["zero_optimization"]
    assert z["offload_param"]["device"] == "cpu" and z["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in json.loads(deepspeed_config_path("zero3").read_text())["zero_optimization"]


def test_an_existing_file_passes_through(tmp_path):
    own = tmp_path / "my_ds.json"
    own.write_text("{}")
    assert deepspeed_config_path(str(own)) == own and deepspeed_config_path(own) == own


@pytest.mark.parametrize("spec", ["zero4", "launch/ds_zero2.json", "."])
def test_unknown_names_and_missing_files_are_one_clear_error(spec):
    with pytest.raises(LLMCoreError) as err:
        deepspeed_config_path(spec)
    msg = str(err.value)
    assert msg.startswith(f"--deepspeed {spec}:") and ", ".join(DEEPSPEED_CONFIGS) in msg


def test_configs_are_package_data():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    assert "llmcore.train" in setuptools["packages"]
    assert "ds_configs/*.json" in setuptools["package-data"]["llmcore.train"]
    assert CONFIG_DIR == ROOT / "llmcore" / "train" / "ds_configs"
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.json")) == sorted(DEEPSPEED_CONFIGS)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_zero3_offload_by_name_trains_like_the_plain_engine(tmp_path, monkeypatch):
    from llmcore.train import train

    from test_train_common import build_shards, losses, tiny_cfg

    monkeypatch.setenv("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "cpu"))
    shards = build_shards()
    plain = train("pretrain", tiny_cfg("pretrain", shards, tmp_path / "plain", max_steps=3))
    off = train("pretrain", tiny_cfg("pretrain", shards, tmp_path / "off", deepspeed="zero3-offload", max_steps=3))
    assert plain.steps == off.steps == 3
    for (s1, a), (s2, b) in zip(losses(tmp_path / "plain"), losses(tmp_path / "off")):
        assert s1 == s2 and a == pytest.approx(b, abs=1e-5)
