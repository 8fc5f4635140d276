"""The stage registry from outside `stages.py`: a toy stage registered here (a model hook that trains
only the RMSNorm weights, the stock LM objective) gets a working `llmcore train NAME` command from
the CLI built after the registration; the trainer calls its hook and never its name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from llmcore.errors import LLMCoreError
from llmcore.train.stages import FullWeights, LanguageModelStage, _defaults, all_stages, get_stage, register_stage

from test_train_common import losses, pretrained_run, weights

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class NormOnly(FullWeights):
    """Freeze everything but the RMSNorm weights (a real, if modest, fine-tuning method)."""

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("layernorm.weight") or name == "norm.weight")
        return model

    def load(self, step_dir: Path) -> torch.nn.Module:
        return self.convert(super().load(step_dir))


@dataclass(frozen=True)
class NormTuneStage(LanguageModelStage):
    def model_hook(self, cfg):  # type: ignore[no-untyped-def]
        return NormOnly(cfg)


@pytest.fixture(scope="module")
def toy_stage():
    from llmcore.train import stages

    stage = register_stage(
        NormTuneStage(
            name="normtune",
            shard_kind="pretrain",
            summary="Toy: train only the norm weights.",
            example="llmcore train normtune --data shards/pretrain --init runs/pre --out runs/nt",
            defaults=_defaults(
                lr=1e-2, micro_batch_size=2, global_batch_size=4, seq_len=48, epochs=1.0, packing="packed"
            ),
            settings=("packing",),
            needs_init="it tunes a trained model's norms",
        )
    )
    yield stage
    stages._REGISTRY.pop("normtune", None)


def _app() -> typer.Typer:
    # The CLI as the root app builds it: train commands come from the registry at build time.
    from llmcore import cli_train

    app = typer.Typer()
    cli_train.register(app)
    return app


def test_toy_stage_registered_outside_gets_a_working_command(shards, tmp_path, toy_stage):
    assert get_stage("normtune") is toy_stage and toy_stage in all_stages()
    init = pretrained_run()
    app = _app()
    runner = CliRunner()
    help_out = runner.invoke(app, ["train", "normtune", "--help"])
    assert help_out.exit_code == 0 and "Toy: train only the norm weights." in help_out.output
    out = tmp_path / "nt"
    common = [
        "train",
        "normtune",
        "--data",
        str(shards["pretrain"]),
        "--init",
        str(init),
        "--out",
        str(out),
        "--log-every",
        "1",
        "--quiet",
        "--seed",
        "3",
        "--attn-backend",
        "sdpa",
    ]
    res = runner.invoke(app, [*common, "--max-steps", "3"])
    assert res.exit_code == 0, res.output
    assert [s for s, _ in losses(out)] == [1, 2, 3]
    before, after = weights(init), weights(out)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # Only the norms trained; every other weight is bit-identical to the --init run's.
    assert changed and all(k.endswith("norm.weight") for k in changed), changed
    # Resume goes through the hook's load: 3 more steps continue the same run.
    res = runner.invoke(app, [*common, "--max-steps", "5", "--resume"])
    assert res.exit_code == 0, res.output
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4, 5]
    resumed = weights(out)
    assert all(torch.equal(before[k], resumed[k]) for k in before if not k.endswith("norm.weight"))


def test_stage_names_are_unique_and_unknown_names_list_the_registry(toy_stage):
    with pytest.raises(ValueError, match="already registered"):
        register_stage(toy_stage)
    with pytest.raises(LLMCoreError, match="normtune"):
        get_stage("nope")
    from llmcore.train import stages

    assert not hasattr(stages, "STAGES")  # no import-time snapshot of the registry
