"""Weights in and out: `model import` of MiniMind `.pth` state dicts and transformers folders (Llama,
Qwen3, Qwen3-MoE, MiniMind's own format), `export hf` to Qwen3/Qwen3-MoE, and the refusal of a
tokenizer that is not the model's.

Every reference model is built with transformers' own classes and random weights: parity means
transformers and llmcore compute the same logits (fp32, 1e-4) from the same numbers."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from llmcore.checkpoint import checkpoint_problem, load_model, save_model
from llmcore.cli import app
from llmcore.convert import config_from_hf, config_from_shapes, import_model
from llmcore.errors import LLMCoreError
from llmcore.generate import generate
from llmcore.hf_export import export_hf
from llmcore.model import LLM, ModelConfig

transformers = pytest.importorskip("transformers")

V = 6400  # MiniMind's vocab: the shared tokenizers fit the tiny models
X = torch.tensor([[1, 300, 301, 302, 1500, 20, 6000, 44, 45, 2, 1, 77], [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]])
ROPE = {"rope_type": "default", "rope_theta": 1e6}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights large enough that a wrong mapping shows in the logits (norm weights around 1, not 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def hf_llama(seed: int = 0):
    # The `tiny` preset's shapes and settings (what MiniMind2's architecture is at that size).
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_parameters=ROPE,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return randomize(transformers.LlamaForCausalLM(cfg), seed)


def hf_qwen3(moe: bool = False, top_k: int = 1, norm: bool = True, seed: int = 0):
    # head_dim 24 != hidden / heads: the config's head_dim must be honoured, as minimind-3's 96 is.
    common = dict(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_parameters=ROPE,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if moe:
        cfg = transformers.Qwen3MoeConfig(
            **common, num_experts=4, num_experts_per_tok=top_k, norm_topk_prob=norm, moe_intermediate_size=80
        )
        return randomize(transformers.Qwen3MoeForCausalLM(cfg), seed)
    return randomize(transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common)), seed)


def hf_logits(hf) -> torch.Tensor:
    with torch.no_grad():
        return hf(X).logits.float()


def assert_same_logits(model: LLM, reference: torch.Tensor) -> None:
    with torch.no_grad():
        ours = model(X).logits
    assert reference.std() > 0.5  # not a near-zero model, where any mapping would pass
    assert (ours - reference).abs().max().item() < 1e-4


SOURCES = {
    "llama": lambda: hf_llama(),
    "qwen3": lambda: hf_qwen3(),
    "qwen3_moe_top1_norm": lambda: hf_qwen3(moe=True, top_k=1, norm=True),
    "qwen3_moe_top2_raw": lambda: hf_qwen3(moe=True, top_k=2, norm=False),
}


def minimind_pth(hf, path: Path, resume: bool = False) -> Path:
    """A state dict as MiniMind's trainer saves it: `model.`-prefixed names, lm_head included, fp16,
    experts one module each (its MOEFeedForward), through torch.save."""
    folder = path.parent / (path.stem + "_hf")
    hf.save_pretrained(folder)  # per-expert keys, as MiniMind names them
    state = {k: v.half() for k, v in load_file(str(folder / "model.safetensors")).items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    shutil.rmtree(folder)
    torch.save(
        {"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 0, "step": 9} if resume else state,
        path,
    )
    with torch.no_grad():  # the reference computes with the fp16-rounded weights the file holds
        for p in hf.parameters():
            p.copy_(p.half().float())
    return path


# ---------------------------------------------------------------- import: transformers folders


@pytest.mark.parametrize("name", list(SOURCES))
def test_import_transformers_folder_matches_transformers(tmp_path: Path, name: str) -> None:
    hf = SOURCES[name]()
    hf.save_pretrained(tmp_path / "src")
    reference = hf_logits(hf)

    result = import_model(tmp_path / "src", tmp_path / "run")
    run = result.run_dir
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0"
    assert checkpoint_problem(run / "checkpoints" / "step-0") is None  # manifest written and verifying
    assert json.loads((run / "config.json").read_text())["stage"] == "import"
    model, tok = load_model(run)
    assert tok is None and model.config.qk_norm == name.startswith("qwen3")
    assert model.config.use_moe == ("moe" in name)
    if model.config.use_moe:
        assert model.config.num_experts_per_tok == hf.config.num_experts_per_tok
        assert model.config.norm_topk_prob == hf.config.norm_topk_prob and model.config.num_shared_experts == 0
    assert_same_logits(model, reference)
    # Every --ckpt also takes the folder itself.
    assert_same_logits(load_model(tmp_path / "src")[0], reference)


def test_import_parity_can_fail(tmp_path: Path) -> None:
    """The parity check sees a wrong mapping: q_norm and k_norm swapped (same shapes) is caught."""
    hf = hf_qwen3()
    hf.save_pretrained(tmp_path / "src")
    model, _ = load_model(tmp_path / "src")
    with torch.no_grad():
        for layer in model.layers:
            q = layer.self_attn.q_norm.weight.clone()
            layer.self_attn.q_norm.weight.copy_(layer.self_attn.k_norm.weight)
            layer.self_attn.k_norm.weight.copy_(q)
        assert (model(X).logits - hf_logits(hf)).abs().max() > 1e-2


def test_import_fused_experts_of_transformers_5(tmp_path: Path) -> None:
    """transformers 5 holds Qwen3-MoE experts fused (gate_up_proj (E, 2I, H), down_proj (E, H, I)); a
    folder saved from that in-memory layout imports the same as the per-expert one."""
    hf = hf_qwen3(moe=True, top_k=2, norm=True, seed=3)
    state = hf.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    src = tmp_path / "fused"
    src.mkdir()
    save_file({k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"}, str(src / "model.safetensors"))
    hf.config.to_json_file(src / "config.json")
    assert_same_logits(load_model(import_model(src, tmp_path / "run").run_dir)[0], hf_logits(hf))


# ---------------------------------------------------------------- import: MiniMind formats


def test_minimind2_pth_infers_its_preset(tmp_path: Path) -> None:
    hf = hf_llama(seed=1)
    pth = minimind_pth(hf, tmp_path / "pretrain_64.pth")
    result = import_model(pth, tmp_path / "run")
    assert result.preset == "tiny" and result.kind == "MiniMind state dict"
    model, _ = load_model(result.run_dir)
    assert model.embed_tokens.weight.dtype == torch.float32  # fp16 file, fp32 run
    assert_same_logits(model, hf_logits(hf))
    # The same state dict as a .safetensors file imports the same way.
    save_file(torch.load(pth, weights_only=True), str(tmp_path / "w.safetensors"))
    again = import_model(tmp_path / "w.safetensors", tmp_path / "run2")
    assert again.preset == "tiny"
    assert torch.equal(load_model(again.run_dir)[0](X).logits, model(X).logits)


@pytest.mark.parametrize("moe", [False, True])
def test_minimind3_pth_with_preset_matches_qwen3(tmp_path: Path, moe: bool) -> None:
    """MiniMind-3's model is Qwen3's (QK-norm before RoPE; top-1 MoE with the weight renormalised to 1
    and no shared expert); its .pth at other sizes imports with --preset, sizes from the shapes."""
    hf = hf_qwen3(moe=moe, top_k=1, norm=True, seed=2)
    pth = minimind_pth(hf, tmp_path / "full_sft_64.pth", resume=moe)  # a resume file gives its "model"
    with pytest.raises(LLMCoreError, match="match no preset.*--preset") as info:
        import_model(pth, tmp_path / "run")
    assert str(pth) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()
    preset = "minimind-3-moe" if moe else "minimind-3"
    result = import_model(pth, tmp_path / "run", preset=preset)
    cfg = result.config
    assert (cfg.qk_norm, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads) == (True, 24, 4, 2)
    assert cfg.rms_norm_eps == 1e-6 and cfg.rope_theta == 1e6
    if moe:
        assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.num_shared_experts, cfg.moe_intermediate_size) == (
            4,
            1,
            0,
            80,
        )
    assert_same_logits(load_model(result.run_dir)[0], hf_logits(hf))


@pytest.mark.parametrize("preset", ["minimind-3", "minimind-3-moe", "minimind2-small", "minimind2-moe"])
def test_full_size_minimind_shapes_infer_the_preset(preset: str) -> None:
    """MiniMind's released sizes are recognised from the shapes alone (zero-stride tensors: no memory)."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LLM(ModelConfig.from_preset(preset)).state_dict().items()}
    state = {k: torch.empty(()).expand(s) for k, s in shapes.items()}
    cfg, name = config_from_shapes(state, Path("x.pth"))
    assert name == preset and cfg == ModelConfig.from_preset(preset)


def _minimind3_config(hf, moe: bool) -> dict:
    """config.json as MiniMind-3's MiniMindConfig writes it (its own names, model_type minimind)."""
    c = hf.config
    cfg = {
        "architectures": ["MiniMindForCausalLM"],
        "model_type": "minimind",
        "auto_map": {
            "AutoConfig": "model_minimind.MiniMindConfig",
            "AutoModelForCausalLM": "model_minimind.MiniMindForCausalLM",
        },
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "use_moe": moe,
        "dropout": 0.0,
        "vocab_size": V,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "flash_attn": True,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "intermediate_size": c.intermediate_size,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "tie_word_embeddings": True,
        "inference_rope_scaling": False,
        "rope_scaling": None,
        "num_experts": 4,
        "num_experts_per_tok": 1,
        "moe_intermediate_size": getattr(c, "moe_intermediate_size", c.intermediate_size),
        "norm_topk_prob": True,
        "router_aux_loss_coef": 5e-4,
        "torch_dtype": "float16",
    }
    return cfg


@pytest.mark.parametrize("moe", [False, True])
def test_minimind_transformers_folder(tmp_path: Path, moe: bool, shared_data: Path) -> None:
    """MiniMind's own transformers format (`model_type: minimind`, pytorch_model.bin from
    save_pretrained(safe_serialization=False), its tokenizer beside the weights)."""
    hf = hf_qwen3(moe=moe, seed=4)
    pth = minimind_pth(hf, tmp_path / "w.pth")
    src = tmp_path / "MiniMind-3"
    src.mkdir()
    shutil.move(pth, src / "pytorch_model.bin")
    (src / "config.json").write_text(json.dumps(_minimind3_config(hf, moe)))
    for f in (shared_data / "minimind3_tokenizer").iterdir():
        shutil.copy(f, src / f.name)
    model, tok = load_model(src)
    assert tok is not None and model.config.qk_norm and model.config.use_moe == moe
    assert_same_logits(model, hf_logits(hf))
    with pytest.raises(LLMCoreError, match="another vocabulary"):  # MiniMind2's tokenizer: same size, other ids
        import_model(src, tmp_path / "run", tokenizer=shared_data / "minimind_tokenizer")
    run = import_model(src, tmp_path / "run").run_dir
    back, tok2 = load_model(run)
    assert tok2 is not None and tok2.fingerprint == tok.fingerprint
    assert_same_logits(back, hf_logits(hf))


def test_minimind2_folder_config_keeps_its_routing() -> None:
    """MiniMind2's config names (n_routed_experts, n_shared_experts, aux_loss_alpha); its top-k weights
    were renormalised only for k > 1, so a top-1 MiniMind2 MoE keeps the raw probability."""
    hf = {
        "model_type": "minimind",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": V,
        "intermediate_size": None,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "use_moe": True,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "num_experts_per_tok": 1,
        "norm_topk_prob": True,
        "aux_loss_alpha": 0.01,
        "inference_rope_scaling": False,
    }
    cfg = config_from_hf(hf, {})
    assert (cfg.num_experts, cfg.num_shared_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob) == (4, 1, 1, False)
    assert not cfg.qk_norm and cfg.intermediate_size == 192 and cfg.aux_loss_coef == 0.01
    assert config_from_hf({**hf, "num_experts_per_tok": 2}, {}).norm_topk_prob


# ---------------------------------------------------------------- import: bad input


class _RunsCode:
    """Unpickling this would create a file: proof that a pickle with code is never executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _one_line_error(fn, match: str) -> str:
    with pytest.raises(LLMCoreError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_sources_are_one_line_errors_and_write_nothing(tmp_path: Path) -> None:
    hf = hf_llama()
    good = minimind_pth(hf, tmp_path / "good.pth")
    state = torch.load(good, weights_only=True)
    out = tmp_path / "run"

    foreign = tmp_path / "foreign.pth"
    torch.save({**state, "model.layers.0.self_attn.rotary.inv_freq": torch.ones(8)}, foreign)
    msg = _one_line_error(lambda: import_model(foreign, out, preset="tiny"), "rotary.inv_freq")
    assert str(foreign) in msg
    torch.save({k.replace("self_attn", "attention"): v for k, v in state.items()}, foreign)
    _one_line_error(lambda: import_model(foreign, out), "q_proj")

    wrong = tmp_path / "wrong.pth"
    torch.save({**state, "model.layers.1.mlp.up_proj.weight": torch.zeros(100, 64, dtype=torch.half)}, wrong)
    assert str(wrong) in _one_line_error(lambda: import_model(wrong, out, preset="tiny"), "do not match")
    _one_line_error(lambda: import_model(wrong, out), "match no preset")

    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth"
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "x": _RunsCode(marker)}, evil)
    assert str(evil) in _one_line_error(lambda: import_model(evil, out), "not a weights-only")
    assert not marker.exists()

    numbers = tmp_path / "numbers.pth"
    torch.save([1, 2, 3], numbers)
    _one_line_error(lambda: import_model(numbers, out), "not a state dict")
    (tmp_path / "garbage.pth").write_bytes(b"not a zip at all")
    _one_line_error(lambda: import_model(tmp_path / "garbage.pth", out), "garbage.pth: cannot read")

    # Truncated, bit-flipped and random files: always one line, never another exception.
    data, rng = good.read_bytes(), random.Random(0)
    for i in range(60):
        damaged = bytearray(data)
        if i % 3 == 0:
            damaged = damaged[: rng.randrange(len(damaged))]
        elif i % 3 == 1:
            for _ in range(5):
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        else:
            damaged = bytearray(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        (tmp_path / "damaged.pth").write_bytes(bytes(damaged))
        try:
            import_model(tmp_path / "damaged.pth", out)
        except LLMCoreError as err:
            assert "\n" not in str(err)
        shutil.rmtree(out, ignore_errors=True)  # a flip inside tensor data still loads (other numbers)

    untied = tmp_path / "untied.pth"
    torch.save({**state, "lm_head.weight": state["lm_head.weight"] + 1}, untied)
    _one_line_error(lambda: import_model(untied, out), "untied")

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    save_file({"wte.weight": torch.zeros(2, 2)}, str(gpt2 / "model.safetensors"))
    for fn in (lambda: import_model(gpt2, out), lambda: load_model(gpt2)):
        assert "config.json" in _one_line_error(fn, "model_type 'gpt2'")
    _one_line_error(lambda: import_model(tmp_path / "missing.pth", out), "no such")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".run.")] == []


def test_config_json_fields_of_wrong_type_are_one_line_errors(tmp_path: Path) -> None:
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_experts=2,
        num_experts_per_tok=1,
        moe_intermediate_size=16,
        tie_word_embeddings=True,
        max_position_embeddings=64,
    )
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(tmp_path / "src")
    good = json.loads((tmp_path / "src" / "config.json").read_text())
    for key in good:
        for value in ("x", [1, 2], {"rope_type": "weird"}):
            (tmp_path / "src" / "config.json").write_text(json.dumps({**good, key: value}))
            try:
                load_model(tmp_path / "src")
            except LLMCoreError as err:
                assert "\n" not in str(err)


def test_import_out_dir_rules_and_no_half_written_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pth = minimind_pth(hf_llama(), tmp_path / "w.pth")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep")
    _one_line_error(lambda: import_model(pth, notes), "not empty.*--overwrite")
    _one_line_error(lambda: import_model(pth, notes, overwrite=True), "only an earlier `model import`")
    assert (notes / "mine.txt").read_text() == "keep"

    run = import_model(pth, tmp_path / "run").run_dir
    _one_line_error(lambda: import_model(pth, run), "--overwrite")
    assert import_model(pth, run, overwrite=True).run_dir == run

    import llmcore.checkpoint as checkpoint

    def disk_full(directory):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_manifest", disk_full)
    _one_line_error(lambda: import_model(pth, tmp_path / "run2"), "No space left")
    assert not (tmp_path / "run2").exists()
    _one_line_error(lambda: import_model(pth, run, overwrite=True), "No space left")
    assert checkpoint_problem(run / "checkpoints" / "step-0") is None  # the earlier import is intact
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------- export


def _ours(moe: bool = False, top_k: int = 1, norm: bool = True, qk_norm: bool = True, shared: int = 0) -> LLM:
    torch.manual_seed(5)
    cfg = ModelConfig.from_preset(
        "tiny",
        qk_norm=qk_norm,
        head_dim=24,
        rms_norm_eps=1e-6,
        initializer_range=0.2,
        use_moe=moe,
        num_experts=4,
        num_experts_per_tok=top_k,
        norm_topk_prob=norm,
        num_shared_experts=shared,
        moe_intermediate_size=80,
    )
    return randomize(LLM(cfg), seed=6)


def _run_dir(root: Path, model: LLM, tok_dir: Path | None) -> Path:
    run = root / "run"
    save_model(model, run / "checkpoints" / "step-5")
    (run / "checkpoints" / "latest").write_text("step-5\n")
    if tok_dir is not None:
        shutil.copytree(tok_dir, run / "tokenizer")
    return run


@pytest.mark.parametrize("moe,top_k,norm", [(False, 1, True), (True, 1, True), (True, 2, False)])
def test_export_qwen3_matches_transformers(
    tmp_path: Path, shared_data: Path, moe: bool, top_k: int, norm: bool
) -> None:
    tok_dir = shared_data / "minimind3_tokenizer"
    model = _ours(moe, top_k, norm)
    out = export_hf(_run_dir(tmp_path, model, tok_dir), tmp_path / "hf")
    arch = "Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"
    assert json.loads((out / "config.json").read_text())["architectures"] == [arch]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == arch
    assert_same_logits(model, hf_logits(hf))

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    prompt = hf_tok.apply_chat_template(
        [{"role": "user", "content": "北京的天气怎么样？"}],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    assert isinstance(prompt, list) and len(prompt) > 5
    with torch.no_grad():
        hf_ids = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :]
    ours = generate(model, [prompt], 12, eos_id=None)[0]
    assert hf_ids.tolist() == ours
    assert hf_tok.decode(hf_ids) == hf_tok.decode(ours)
    # The template exported is MiniMind-3's own (tools, <think>), not a ChatML fallback.
    src_template = json.loads((tok_dir / "tokenizer_config.json").read_text())["chat_template"]
    assert hf_tok.chat_template == src_template and "<tool_call>" in hf_tok.decode(
        hf_tok.apply_chat_template(
            [
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}],
                }
            ],
            tokenize=True,
            return_dict=False,
        )
    )
    # ... and the export loads back into llmcore bit for bit.
    assert torch.equal(load_model(out)[0](X).logits, model(X).logits)


def test_export_refuses_what_transformers_cannot_compute(tmp_path: Path) -> None:
    for model, why in (
        (_ours(moe=True, top_k=2, shared=1), "shared experts"),
        (_ours(moe=True, top_k=2, qk_norm=False), "without QK-norm"),
    ):
        run = _run_dir(tmp_path / why.replace(" ", "_"), model, None)
        _one_line_error(lambda: export_hf(run, tmp_path / "hf"), why)
        assert not (tmp_path / "hf").exists()
    # MiniMind2-style dense stays Llama.
    run = _run_dir(tmp_path / "dense", _ours(qk_norm=False), None)
    out = export_hf(run, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


# ---------------------------------------------------------------- tokenizer must fit the model


def test_tokenizer_of_another_vocabulary_is_refused(tmp_path: Path, shared_data: Path) -> None:
    mm2, mm3 = shared_data / "minimind_tokenizer", shared_data / "minimind3_tokenizer"
    torch.manual_seed(0)
    run = _run_dir(tmp_path, LLM(ModelConfig.from_preset("tiny")), mm2)
    # Same size (6400) and special ids, another vocabulary: caught by the stored tokenizer's fingerprint.
    msg = _one_line_error(lambda: load_model(run, tokenizer=mm3), "another vocabulary")
    assert str(mm3) in msg
    assert load_model(run, tokenizer=mm2)[1].fingerprint == load_model(run)[1].fingerprint
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "generate",
            "--ckpt",
            str(run),
            "--tokenizer",
            str(mm3),
            "--prompt",
            "你好",
            "--max-new-tokens",
            "3",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code != 0 and "another vocabulary" in str(result.exception)
    ok = runner.invoke(
        app,
        [
            "generate",
            "--ckpt",
            str(run),
            "--tokenizer",
            str(mm2),
            "--prompt",
            "你好",
            "--max-new-tokens",
            "3",
            "--temperature",
            "0",
            "--device",
            "cpu",
        ],
    )
    assert ok.exit_code == 0, ok.output

    # Bare weights (no stored tokenizer): vocab size and special ids must be the model's.
    small = save_model(LLM(ModelConfig.from_preset("tiny", vocab_size=4096)), tmp_path / "small")
    _one_line_error(lambda: load_model(small, tokenizer=mm2), "6400 ids.*4096 rows")
    big = save_model(LLM(ModelConfig.from_preset("tiny", vocab_size=8000)), tmp_path / "big")
    _one_line_error(lambda: load_model(big, tokenizer=mm2), "vocab of 8000")
    other_eos = save_model(LLM(ModelConfig.from_preset("tiny", eos_token_id=5)), tmp_path / "eos")
    _one_line_error(lambda: load_model(other_eos, tokenizer=mm2), "special ids")
    assert load_model(save_model(LLM(ModelConfig.from_preset("tiny")), tmp_path / "bare"), tokenizer=mm2)[1]


# ---------------------------------------------------------------- the CLI and train --init


def test_cli_import_then_generate_and_train_init(tmp_path: Path) -> None:
    from llmcore.train import train

    from test_train_common import build_shards, tiny_cfg

    shards = build_shards()
    vocab = json.loads((shards["sft"] / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    cfg = transformers.Qwen3Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        rope_parameters=ROPE,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    hf = randomize(transformers.Qwen3ForCausalLM(cfg))
    hf.save_pretrained(tmp_path / "src")
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["model", "import", str(tmp_path / "src"), "--out", str(tmp_path / "mm"), "--tokenizer", str(shards["tok"])],
    )
    assert result.exit_code == 0, result.output
    assert "Qwen3ForCausalLM folder" in result.output and str(tmp_path / "mm") in result.output
    gen = runner.invoke(
        app,
        [
            "generate",
            "--ckpt",
            str(tmp_path / "mm"),
            "--prompt",
            "the",
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
            "--device",
            "cpu",
        ],
    )
    assert gen.exit_code == 0, gen.output
    summary = train("sft", tiny_cfg("sft", shards, tmp_path / "sft", init=str(tmp_path / "mm"), max_steps=2))
    assert summary.steps == 2
    tuned, _ = load_model(tmp_path / "sft")
    assert tuned.config.qk_norm and tuned.config.head_dim == 16
