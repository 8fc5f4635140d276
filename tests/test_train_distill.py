"""`llmcore train distill`: loss = a*CE + (1-a)*T^2*KL(teacher||student) over the loss tokens. KL is
0 with teacher = student; the gradient equals one computed directly with torch's own kl_div (as
MiniMind's train_distillation.py does); top-1 agreement rises as a smaller student learns from a
bigger teacher on pretrain shards; a teacher with another vocabulary is one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmcore.errors import LLMCoreError
from llmcore.model import LLM, ModelConfig
from llmcore.train import train
from llmcore.train.metrics import read_metrics
from llmcore.train.objectives import DistillObjective

from test_train_common import sft_run, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _train_records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if "eval_loss" not in r]


def test_teacher_equal_to_student_gives_zero_kl_on_sft(shards, tmp_path):
    out = tmp_path / "same"
    cfg = tiny_cfg("sft", shards, out, init=str(sft_run()), teacher=str(sft_run()), max_steps=1, kd_alpha=0.3)
    train("distill", cfg.resolved("distill"))
    rec = _train_records(out)[0]
    assert rec["kd_loss"] == 0.0 and rec["top1_agreement"] == 1.0
    assert rec["loss"] == pytest.approx(0.3 * rec["ce_loss"], rel=1e-6)
    assert (out / "loss.png").is_file()


@pytest.mark.parametrize("alpha, temperature", [(0.5, 1.5), (0.0, 1.0), (0.8, 2.0)])
def test_gradient_equals_direct_kl_div_computation(alpha, temperature):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=97, attn_backend="eager")
    student = LLM(cfg)
    teacher = LLM(ModelConfig.from_preset("tiny", vocab_size=97, hidden_size=96, attn_backend="eager")).eval()
    ids = torch.randint(3, 97, (3, 17))
    labels = torch.roll(ids, -1, 1).clone()
    labels[0, :5] = -100  # prompt tokens carry no loss
    labels[2, 9:] = -100
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(17).expand(3, 17)}

    obj = DistillObjective(teacher, alpha, temperature)
    n = obj.count(batch)
    out = obj(lambda b: student(b["input_ids"], position_ids=b["position_ids"]), batch, float(n), 1, 1)
    out.loss.backward()
    got = {k: p.grad.clone() for k, p in student.named_parameters()}
    student.zero_grad()

    # The reference, written from the formula with torch's own functions.
    s = student(ids).logits
    with torch.no_grad():
        t = teacher(ids).logits
    keep = labels != -100
    ce = F.cross_entropy(s[keep], labels[keep])
    kl = (
        F.kl_div(F.log_softmax(s[keep] / temperature, -1), F.softmax(t[keep] / temperature, -1), reduction="batchmean")
        * temperature**2
    )
    (alpha * ce + (1 - alpha) * kl).backward()
    assert float(out.terms["ce_loss"]) == pytest.approx(float(ce.detach()), rel=1e-5)
    assert float(out.terms["kd_loss"]) == pytest.approx(float(kl.detach()), rel=1e-5)
    agree = (s[keep].argmax(-1) == t[keep].argmax(-1)).float().mean()
    assert float(out.terms["top1_agreement"]) == pytest.approx(float(agree))
    for k, p in student.named_parameters():
        torch.testing.assert_close(got[k], p.grad, atol=1e-6, rtol=1e-5, msg=k)
    assert all(p.grad is None for p in teacher.parameters())


def test_agreement_rises_for_a_smaller_student_on_pretrain_shards(shards, tmp_path):
    teacher = tmp_path / "teacher"
    train("pretrain", tiny_cfg("pretrain", shards, teacher, model="demo", max_steps=30, lr=3e-3, quiet=True))
    out = tmp_path / "kd"
    train(
        "distill",
        tiny_cfg(
            "pretrain",
            shards,
            out,
            model="tiny",
            teacher=str(teacher),
            max_steps=24,
            lr=1e-2,
            kd_alpha=0.0,
            eval_docs=20,
        ).resolved("distill"),
    )
    recs = _train_records(out)
    agree = [r["top1_agreement"] for r in recs]
    kd = [r["kd_loss"] for r in recs]
    assert sum(agree[-4:]) / 4 > sum(agree[:4]) / 4 + 0.1, agree
    assert sum(kd[-4:]) < sum(kd[:4]), kd
    ev = [r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r][-1]
    assert {"eval_kd_loss", "eval_top1_agreement"} <= set(ev)


def test_teacher_with_another_vocabulary_is_one_line(shards, tmp_path, capsys):
    other = tmp_path / "other"
    train("pretrain", tiny_cfg("pretrain", {**shards, "pretrain": shards["pretrain_other"]}, other, max_steps=1))
    with pytest.raises(LLMCoreError, match="has a vocabulary of 350 tokens, the student 400") as info:
        train(
            "distill",
            tiny_cfg("pretrain", shards, tmp_path / "kd", model="tiny", teacher=str(other), max_steps=1).resolved(
                "distill"
            ),
        )
    assert "\n" not in str(info.value)
    from llmcore.cli import main

    with pytest.raises(SystemExit) as ex:
        main(
            [
                "train",
                "distill",
                "--data",
                str(shards["sft"]),
                "--model",
                "tiny",
                "--out",
                str(tmp_path / "c"),
                "--teacher",
                str(other),
                "--max-steps",
                "1",
                "--quiet",
            ]
        )
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --teacher") and "vocabulary" in err[0]


def test_distill_needs_a_teacher(shards, tmp_path):
    with pytest.raises(LLMCoreError, match="distill needs --teacher"):
        tiny_cfg("sft", shards, tmp_path / "x", model="tiny").resolved("distill")
    # The settings are values; the teacher's path is looked at when the run starts, before its run dir exists.
    cfg = tiny_cfg("sft", shards, tmp_path / "x", model="tiny", teacher=str(tmp_path / "nope")).resolved("distill")
    with pytest.raises(LLMCoreError, match="--teacher .*: no such run dir"):
        train("distill", cfg)
    assert not (tmp_path / "x").exists()


def test_zero1_gives_the_plain_engine_losses(shards, tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed not installed")
    from llmcore.train.deepspeed_config import deepspeed_config_path

    runs = {}
    for name, ds in (("plain", None), ("zero1", str(deepspeed_config_path("zero1")))):
        runs[name] = tmp_path / name
        train(
            "distill",
            tiny_cfg(
                "sft",
                shards,
                runs[name],
                init=str(sft_run()),
                teacher=str(sft_run()),
                model=None,
                max_steps=3,
                lr=1e-3,
                deepspeed=ds,
            ).resolved("distill"),
        )
    a, b = _train_records(runs["plain"]), _train_records(runs["zero1"])
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for k in ("loss", "ce_loss", "kd_loss", "top1_agreement"):
            assert ra[k] == pytest.approx(rb[k], abs=1e-5), k
    assert a[-1]["kd_loss"] > 0  # the student moved away from its teacher copy
