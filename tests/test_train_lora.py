"""`llmcore train lora`: adapters on a frozen base. Step 0 gives the base's logits exactly; the base
never changes; only adapters reach the optimizer; checkpoints hold only adapters (+ the base's path
and sha256); merged weights give the adapter model's logits (fp32, 1e-5), in llmcore and, exported,
in transformers; resume is exact; ZeRO-2 gives the plain engine's losses; bad input is one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from llmcore.checkpoint import load_model, resolve_checkpoint, write_manifest
from llmcore.errors import LLMCoreError
from llmcore.lora import LoRALinear, load_adapted
from llmcore.train import Trainer, train

from test_train_common import losses, sft_run, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def lora_cfg(shards, out: Path, **kw):
    base = dict(init=str(sft_run()), lr=1e-2, lora_rank=4, max_steps=4)
    base.update(kw)
    return tiny_cfg("sft", shards, out, **base).resolved("lora")


def _batch(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (2, 24), generator=g)


def _adapters(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(resolve_checkpoint(run) / "adapter.safetensors"))


@pytest.fixture(scope="module")
def lora_run(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "run"
    train("lora", lora_cfg(shards, out))
    return out


def test_step0_is_the_base_and_only_adapters_train(shards, tmp_path):
    base, _ = load_model(sft_run(), with_tokenizer=False)
    trainer = Trainer.from_config("lora", lora_cfg(shards, tmp_path / "r", max_steps=3))
    model = trainer.model
    x = _batch(model)
    with torch.no_grad():
        assert torch.equal(model.eval()(x).logits, base(x).logits)  # B = 0: exactly the base
    model.train()
    adapters = {n for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and trainable == adapters
    # Default targets: the attention projections of every layer.
    assert {n.rsplit(".", 2)[-2] for n in adapters} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    in_opt = {id(p) for g in trainer.engine.optimizer.param_groups for p in g["params"]}
    assert in_opt == {id(p) for n, p in model.named_parameters() if n in adapters}
    trainer.run()
    base_state = base.state_dict()
    for n, p in model.named_parameters():
        if n in adapters:
            continue
        assert torch.equal(p.detach(), base_state[n]), f"base weight {n} changed"
    assert any(float(p.detach().abs().max()) > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))


def test_checkpoint_holds_adapters_and_names_the_base(lora_run):
    step = resolve_checkpoint(lora_run)
    names = {p.name for p in step.iterdir()}
    assert {"adapter.safetensors", "adapter.json", "model_config.json", "manifest.json"} <= names
    assert "model.safetensors" not in names
    meta = json.loads((step / "adapter.json").read_text())
    base = resolve_checkpoint(sft_run())
    assert meta["base"]["path"] == str(base.resolve())
    import hashlib

    assert meta["base"]["sha256"] == hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    assert meta["rank"] == 4 and meta["alpha"] == 4.0
    assert set(_adapters(lora_run)) == {f"{m}.{ab}" for m in meta["modules"] for ab in ("lora_A", "lora_B")}


def test_merged_equals_adapters_in_llmcore_merge_lora_and_transformers(lora_run, tmp_path):
    adapted = load_adapted(lora_run).eval()
    assert any(isinstance(m, LoRALinear) for m in adapted.modules())
    merged, tok = load_model(lora_run)  # the shared loader merges: what generate/chat/serve/eval/rag use
    assert tok is not None and not any(isinstance(m, LoRALinear) for m in merged.modules())
    x = _batch(adapted, 1)
    with torch.no_grad():
        want = adapted(x).logits
        assert not torch.allclose(want, load_model(sft_run(), with_tokenizer=False)[0](x).logits, atol=1e-4)
        torch.testing.assert_close(merged(x).logits, want, atol=1e-5, rtol=0)
    # `llmcore model merge-lora` writes a plain checkpoint dir with the same weights.
    from llmcore.cli import main

    out = tmp_path / "merged"
    with pytest.raises(SystemExit) as info:
        main(["model", "merge-lora", "--ckpt", str(lora_run), "--out", str(out)])
    assert info.value.code in (0, None)
    assert (out / "model.safetensors").is_file() and not (out / "adapter.json").exists()
    plain, tok2 = load_model(out)
    assert tok2 is not None and tok2.fingerprint == tok.fingerprint
    with torch.no_grad():
        assert torch.equal(plain(x).logits, merged(x).logits)
    # `llmcore export hf` of the LoRA run merges; transformers gives the adapter model's logits.
    transformers = pytest.importorskip("transformers")
    from llmcore.hf_export import export_hf

    hf_dir = export_hf(lora_run, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, want, atol=1e-5, rtol=0)


def test_generate_eval_and_overwrite_take_a_lora_run(lora_run, shards, tmp_path, capsys):
    from llmcore.cli import main

    for args in (
        ["generate", "--ckpt", str(lora_run), "--prompt", "the cat", "--max-new-tokens", "4", "--device", "cpu"],
        ["eval", "--ckpt", str(lora_run), "--data", str(shards["sft"]), "--max-batches", "2", "--device", "cpu"],
    ):
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code in (0, None), capsys.readouterr()
    assert "perplexity" in capsys.readouterr().out
    out = tmp_path / "m"
    merge = ["model", "merge-lora", "--ckpt", str(lora_run), "--out", str(out)]
    for extra, code in (([], 0), ([], 2), (["--overwrite"], 0)):
        with pytest.raises(SystemExit) as info:
            main(merge + extra)
        assert (info.value.code or 0) == code
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as info:
        main(merge + ["--overwrite"])
    assert info.value.code == 2 and "notes.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["model", "merge-lora", "--ckpt", str(sft_run()), "--out", str(tmp_path / "n")])
    assert info.value.code == 2 and "not a LoRA run" in capsys.readouterr().err


def test_resume_is_exact(shards, tmp_path, lora_run):
    cut = tmp_path / "cut"
    train("lora", lora_cfg(shards, cut, save_every=2, stop_after=2))
    train("lora", lora_cfg(shards, cut, resume=True))
    assert losses(cut) == losses(lora_run)
    a, b = _adapters(cut), _adapters(lora_run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_all_linear_and_named_targets(shards, tmp_path):
    t = Trainer.from_config("lora", lora_cfg(shards, tmp_path / "a", lora_targets="all-linear"))
    kinds = {n.rsplit(".", 2)[-2] for n, p in t.model.named_parameters() if p.requires_grad}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    t = Trainer.from_config("lora", lora_cfg(shards, tmp_path / "b", lora_targets="v_proj, gate_proj", lora_alpha=8.0))
    mods = [m for m in t.model.modules() if isinstance(m, LoRALinear)]
    assert len(mods) == 2 * t.model.config.num_hidden_layers and all(m.scaling == 2.0 for m in mods)


def test_targets_naming_no_layer_is_one_line(shards, tmp_path, capsys):
    with pytest.raises(LLMCoreError, match="--lora-targets 'q_proj,nope': nope names no linear layer") as info:
        Trainer.from_config("lora", lora_cfg(shards, tmp_path / "x", lora_targets="q_proj,nope"))
    assert "\n" not in str(info.value) and "q_proj" in str(info.value)
    from llmcore.cli import main

    with pytest.raises(SystemExit) as ex:
        main(
            [
                "train",
                "lora",
                "--data",
                str(shards["sft"]),
                "--init",
                str(sft_run()),
                "--out",
                str(tmp_path / "y"),
                "--lora-targets",
                "lm_head",
                "--max-steps",
                "1",
                "--quiet",
            ]
        )
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --lora-targets 'lm_head': lm_head names no linear layer")


def test_changed_or_missing_base_is_one_line(shards, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(sft_run(), base)
    run = tmp_path / "lora"
    train("lora", lora_cfg(shards, run, init=str(base), max_steps=1))
    load_model(run)  # fine while the base is as trained on
    step = resolve_checkpoint(base)
    # Another model written over the base, with a manifest that verifies: only the sha256 can tell.
    from safetensors.torch import load_file, save_file

    state = load_file(str(step / "model.safetensors"))
    state["norm.weight"] = state["norm.weight"] * 1.5
    save_file(state, str(step / "model.safetensors"), metadata={"format": "pt"})
    (step / "manifest.json").unlink()
    write_manifest(step)
    with pytest.raises(LLMCoreError, match="has changed since the adapters were trained") as info:
        load_model(run)
    assert "\n" not in str(info.value)
    with pytest.raises(LLMCoreError, match="has changed"):  # resume checks it too
        train("lora", lora_cfg(shards, run, init=str(base), max_steps=2, resume=True))
    shutil.rmtree(base)
    with pytest.raises(LLMCoreError, match=r"its base model .* is missing") as info:
        load_model(run)
    assert "\n" not in str(info.value)


def test_lora_needs_init_and_refuses_a_lora_base(shards, tmp_path, lora_run):
    with pytest.raises(LLMCoreError, match="lora needs --init"):
        tiny_cfg("sft", shards, tmp_path / "n").resolved("lora")
    with pytest.raises(LLMCoreError, match="is a LoRA run; merge it first"):
        Trainer.from_config("lora", lora_cfg(shards, tmp_path / "m", init=str(lora_run)))


def _has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_deepspeed(), reason="deepspeed not installed")
def test_zero2_matches_plain_engine_and_resumes(shards, tmp_path, lora_run):
    from llmcore.train.deepspeed_config import deepspeed_config_path

    ds = str(deepspeed_config_path("zero2"))
    out = tmp_path / "z2"
    train("lora", lora_cfg(shards, out, deepspeed=ds, save_every=2, stop_after=2))
    train("lora", lora_cfg(shards, out, deepspeed=ds, resume=True))
    got, want = losses(out), losses(lora_run)
    assert [s for s, _ in got] == [s for s, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, abs=1e-5)
    a, b = _adapters(out), _adapters(lora_run)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_parity_with_peft_on_the_same_targets(lora_run, tmp_path):
    """Our trained adapters copied into peft's LoRA on the exported base give our logits (fp32, 1e-5),
    at a scale alpha/r = 3 (not 1), so orientation and scaling are both checked."""
    alpha = 12.0
    peft = pytest.importorskip("peft", reason="peft (test extra) not installed")
    transformers = pytest.importorskip("transformers")
    from llmcore.hf_export import export_hf

    meta = json.loads((resolve_checkpoint(lora_run) / "adapter.json").read_text())
    ours = load_adapted(lora_run).eval()
    for m in ours.modules():
        if isinstance(m, LoRALinear):
            m.scaling = alpha / m.rank  # the same adapters at another scale, on both sides
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(export_hf(sft_run(), tmp_path / "hf")), torch_dtype=torch.float32
    )
    config = peft.LoraConfig(
        r=meta["rank"],
        lora_alpha=alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    model = peft.get_peft_model(hf, config).eval()
    params = dict(model.named_parameters())
    adapters = _adapters(lora_run)
    with torch.no_grad():
        for m in meta["modules"]:
            for ab in ("lora_A", "lora_B"):
                params[f"base_model.model.model.{m}.{ab}.default.weight"].copy_(adapters[f"{m}.{ab}"])
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == sum(
        t.numel() for t in adapters.values()
    )
    x = _batch(ours, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ours(x).logits, atol=1e-5, rtol=0)
