"""Checkpoints (save/load, run-dir resolution, errors), Hugging Face export/import, and the model CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmcore.checkpoint import load_model, load_model_and_tokenizer, resolve_checkpoint, save_model
from llmcore.cli import app
from llmcore.errors import LLMCoreError
from llmcore.generate import generate
from llmcore.hf_export import export_hf, export_model_hf
from llmcore.model import LLM, ModelConfig


def tiny(seed: int = 0, **overrides) -> LLM:
    torch.manual_seed(seed)
    return LLM(ModelConfig.from_preset("tiny", **{"initializer_range": 0.2, **overrides})).eval()


def make_run_dir(root: Path, model: LLM, tokenizer_dir: Path | None = None, step: int = 7) -> Path:
    """A run dir laid out as the trainer writes it (only the parts the model side reads)."""
    run = root / "run"
    save_model(model, run / "checkpoints" / f"step-{step}")
    (run / "checkpoints" / "latest").write_text(f"step-{step}\n")
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, run / "tokenizer")
    return run


X = torch.tensor([[1, 300, 301, 302, 1500, 20, 6000, 44, 45, 2, 1, 77]])


# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize("moe", [False, True])
def test_save_load_roundtrip_is_exact(tmp_path: Path, moe: bool) -> None:
    model = tiny(use_moe=moe, attn_backend="eager")
    out = save_model(model, tmp_path / "ck")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "model_config.json"]  # no temp files left
    loaded, tok = load_model(out)
    assert tok is None and loaded.config == model.config and not loaded.training
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert torch.equal(loaded(X).logits, model(X).logits)


def test_save_unwraps_compiled_model(tmp_path: Path) -> None:
    model = tiny()
    save_model(torch.compile(model), tmp_path / "ck")  # no forward: compile is lazy, only the wrapper matters
    loaded, _ = load_model(tmp_path / "ck")
    assert torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight)


def test_load_with_dtype_and_backend(tmp_path: Path) -> None:
    save_model(tiny(), tmp_path / "ck")
    model, _ = load_model(tmp_path / "ck", dtype=torch.bfloat16, attn_backend="eager")
    assert model.embed_tokens.weight.dtype == torch.bfloat16 and model.config.attn_backend == "eager"
    assert model.rope_cos.dtype == torch.float32


def test_run_dir_follows_latest_and_finds_tokenizer(tmp_path: Path, minimind_tok_dir: Path) -> None:
    model = tiny()
    run = make_run_dir(tmp_path, model, minimind_tok_dir)
    save_model(tiny(seed=5), run / "checkpoints" / "step-3")  # an older step that must not be picked
    assert resolve_checkpoint(run) == run / "checkpoints" / "step-7"
    loaded, tok = load_model(run)
    assert torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight)
    assert tok is not None and tok.eos_id == 2 and tok.decode(tok.encode("hello world")) == "hello world"
    # The step dir on its own also finds the run's tokenizer.
    assert load_model(run / "checkpoints" / "step-7")[1] is not None


def test_load_model_and_tokenizer_needs_a_tokenizer(tmp_path: Path, minimind_tok_dir: Path) -> None:
    bare = make_run_dir(tmp_path / "bare", tiny())
    with pytest.raises(LLMCoreError, match=r"^--init .*: no tokenizer found .*pass --tokenizer DIR$"):
        load_model_and_tokenizer(bare, "cpu", flag="--init")
    model, tok = load_model_and_tokenizer(bare, "auto", tokenizer=minimind_tok_dir)
    assert tok.eos_id == 2 and model.embed_tokens.weight.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_bad_paths_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(LLMCoreError, match="no such"):
        load_model(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(LLMCoreError, match="directory"):
        load_model(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LLMCoreError, match="not a run dir"):
        load_model(tmp_path / "empty")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(LLMCoreError, match="latest"):
        load_model(run)
    (run / "checkpoints" / "latest").write_text("step-9")
    with pytest.raises(LLMCoreError, match="step-9"):
        load_model(run)


def test_corrupt_or_mismatched_weights_are_clear_errors(tmp_path: Path) -> None:
    ck = save_model(tiny(), tmp_path / "ck")
    good = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(good[:100])
    with pytest.raises(LLMCoreError, match="cannot read weights"):
        load_model(ck)
    (ck / "model.safetensors").write_bytes(good)
    cfg = json.loads((ck / "model_config.json").read_text())
    (ck / "model_config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(LLMCoreError, match="do not match"):
        load_model(ck)
    (ck / "model_config.json").write_text("{not json")
    with pytest.raises(LLMCoreError, match="JSON"):
        load_model(ck)


# ---------------------------------------------------------------- Hugging Face


def test_hf_export_matches_transformers_and_imports_back(tmp_path: Path, minimind_tok_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model = tiny()
    run = make_run_dir(tmp_path, model, minimind_tok_dir)
    out = export_hf(run, tmp_path / "hf")
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (out / name).is_file(), name

    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = hf(X).logits
    ours = model(X).logits
    torch.testing.assert_close(hf_logits, ours, atol=1e-4, rtol=0)
    assert (hf_logits - ours).abs().max() < 1e-4

    prompt = [1, 300, 301, 302, 1500]
    with torch.no_grad():
        hf_greedy = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, 5, dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    ours_greedy = generate(model, [prompt], 12, eos_id=None)[0]
    assert hf_greedy[0, 5:].tolist() == ours_greedy

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = hf_tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and hf_tok.eos_token_id == 2

    # HF import: the folder loads back into llmcore with identical logits and its tokenizer.
    back, tok = load_model(out)
    assert torch.equal(back(X).logits, ours)
    assert tok is not None and tok.encode("你好") == hf_tok.encode("你好", add_special_tokens=False)


def test_moe_export_with_shared_experts_is_refused(tmp_path: Path) -> None:
    # MiniMind2's MoE (shared + routed experts) has no transformers class; Qwen3-MoE export: test_model_import.py.
    with pytest.raises(LLMCoreError, match="shared experts"):
        export_model_hf(tiny(use_moe=True), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_refuses_run_and_checkpoint_dirs_and_non_empty_dirs(tmp_path: Path) -> None:
    """export hf never writes into a run dir (its config.json) or a checkpoint dir (which would stop
    loading), refuses a non-empty --out without --overwrite, and with it replaces only an earlier export."""
    model = tiny()
    run = make_run_dir(tmp_path, model)
    (run / "config.json").write_text(json.dumps({"stage": "pretrain"}))
    ckpt = run / "checkpoints" / "step-7"
    other = tmp_path / "other_run"
    shutil.copytree(run, other)
    for out in (other, other / "checkpoints" / "step-7", other / "checkpoints", other / "checkpoints" / "step-9", run):
        for overwrite in (False, True):
            with pytest.raises(LLMCoreError, match="run dir|checkpoint") as info:
                export_hf(run, out, overwrite=overwrite)
            assert "\n" not in str(info.value)
    assert json.loads((other / "config.json").read_text()) == {"stage": "pretrain"}
    assert torch.equal(load_model(other / "checkpoints" / "step-7")[0](X).logits, model(X).logits)
    with pytest.raises(LLMCoreError, match="holds the input"):
        export_hf(ckpt, tmp_path, overwrite=True)  # a dir above the source

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep")
    with pytest.raises(LLMCoreError, match="not empty.*--overwrite"):
        export_hf(run, notes)
    with pytest.raises(LLMCoreError, match="mine.txt"):
        export_hf(run, notes, overwrite=True)
    assert (notes / "mine.txt").read_text() == "keep"

    out = export_hf(run, tmp_path / "hf")
    with pytest.raises(LLMCoreError, match="not empty.*--overwrite"):
        export_hf(run, out)
    save_model(tiny(seed=1), run / "checkpoints" / "step-8")
    (run / "checkpoints" / "latest").write_text("step-8\n")
    assert export_hf(run, out, overwrite=True) == out  # an earlier export is replaced as a whole
    assert torch.equal(load_model(out)[0](X).logits, tiny(seed=1)(X).logits)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".hf.")) == []
    result = CliRunner().invoke(app, ["export", "hf", "--ckpt", str(run), "--out", str(out)])
    assert result.exit_code != 0 and "--overwrite" in str(result.exception or result.output)


# ---------------------------------------------------------------- CLI


def test_cli_model_info() -> None:
    result = CliRunner().invoke(app, ["model", "info", "minimind2-small"])
    assert result.exit_code == 0, result.output
    assert "25,829,888" in result.output and "per block" in result.output
    moe = CliRunner().invoke(app, ["model", "info", "minimind2-moe", "--json"])
    report = json.loads(moe.output)
    assert report["total"] == 145_029_760 and report["active_per_token"] < report["total"]
    bad = CliRunner().invoke(app, ["model", "info", "gpt5"])
    assert isinstance(bad.exception, LLMCoreError)


def test_cli_generate_greedy_equals_library_and_hf(tmp_path: Path, minimind_tok_dir: Path) -> None:
    from llmcore.data_prep.tokenizer import load_tokenizer

    model = tiny()
    run = make_run_dir(tmp_path, model, minimind_tok_dir)
    tok = load_tokenizer(minimind_tok_dir)
    prompt = "今天天气"
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "generate",
            "--ckpt",
            str(run),
            "--prompt",
            prompt,
            "--max-new-tokens",
            "10",
            "--temperature",
            "0",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    expected = tok.decode(
        generate(model, [[tok.bos_id] + tok.encode(prompt)], 10, eos_id=2)[0], skip_special_tokens=True
    )
    assert expected  # an immediate eos would make the comparison vacuous
    assert result.output == expected + "\n"
    # The exported folder, run through `llmcore generate`, continues the same way.
    assert runner.invoke(app, ["export", "hf", "--ckpt", str(run), "--out", str(tmp_path / "hf")]).exit_code == 0
    again = runner.invoke(
        app,
        [
            "generate",
            "--ckpt",
            str(tmp_path / "hf"),
            "--prompt",
            prompt,
            "--max-new-tokens",
            "10",
            "--temperature",
            "0",
            "--device",
            "cpu",
        ],
    )
    assert again.output == result.output


def test_cli_chat_repl_multi_turn(tmp_path: Path, minimind_tok_dir: Path) -> None:
    run = make_run_dir(tmp_path, tiny(), minimind_tok_dir)
    result = CliRunner().invoke(
        app,
        ["chat", "--ckpt", str(run), "--max-new-tokens", "5", "--temperature", "0", "--device", "cpu"],
        input="你好\n/reset\n再见\n/exit\nnever read\n",
    )
    assert result.exit_code == 0, result.output
    assert "(history cleared)" in result.output
    assert len(result.output.strip().splitlines()) >= 3


def test_cli_errors(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["generate", "--ckpt", str(tmp_path / "nope"), "--prompt", "x"])
    assert isinstance(result.exception, LLMCoreError)
    ck = save_model(tiny(), tmp_path / "ck")  # weights without any tokenizer
    result = CliRunner().invoke(app, ["generate", "--ckpt", str(ck), "--prompt", "x", "--device", "cpu"])
    assert isinstance(result.exception, LLMCoreError) and "tokenizer" in str(result.exception)
