"""Export an llmcore model to a transformers folder that gives the same logits:

- no QK-norm, dense (MiniMind2-style): `LlamaForCausalLM`;
- QK-norm, dense (minimind-3): `Qwen3ForCausalLM`;
- QK-norm, MoE without shared experts (minimind-3-moe): `Qwen3MoeForCausalLM` (softmax router in
  fp32, top-k, weights renormalised when `norm_topk_prob`, as our MoE routes).

Our architecture is theirs (pre-norm RMSNorm, rotate-half RoPE, GQA, SwiGLU, tied embeddings) and
our parameter names are theirs without the `model.` prefix; MoE experts are written one module per
expert (`mlp.experts.E.gate_proj.weight`), the layout transformers' `save_pretrained` writes and
fuses on load. Refused with the reason: MoE with shared experts or without QK-norm (MiniMind2's
MoE): no transformers class computes it, and a look-alike would not give the same logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from llmcore.checkpoint import find_tokenizer_dir, load_model, model_state_dict, resolve_checkpoint
from llmcore.errors import LLMCoreError
from llmcore.io import atomic_dir, atomic_write, check_out_dir, remove_leftovers, write_json
from llmcore.model import LLM, ModelConfig, unwrap_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# What an export writes (and what transformers' save_pretrained may add to such a folder).
EXPORT_FILES = {"config.json", "model.safetensors", "generation_config.json", "chat_template.jinja", *TOKENIZER_FILES}
# Files that make a dir a run dir or a checkpoint dir, which export never writes into.
RUN_DIR_MARKERS = ("checkpoints", "metrics.jsonl", "latest")
CHECKPOINT_MARKERS = ("model_config.json", "trainer_state.json", "loader_state.json", "rng_state.pt")

# ChatML, as MiniMind's tokenizer uses; written only when the source tokenizer carries no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def hf_architecture(config: ModelConfig) -> str:
    """The transformers class an export of `config` is (`HF_EXPORT_TYPES`), or LLMCoreError saying why none is."""
    if config.use_moe:
        if config.num_shared_experts:
            raise LLMCoreError(
                f"cannot export an MoE model with shared experts ({config.num_shared_experts}, as "
                "MiniMind2's MoE): no transformers class adds always-on experts to routed ones this way "
                "(Qwen3-MoE has none), so the export would not give the same logits"
            )
        if not config.qk_norm:
            raise LLMCoreError(
                "cannot export an MoE model without QK-norm: transformers' Qwen3-MoE normalises q and k, "
                "and no transformers class has this router without it"
            )
        return "Qwen3MoeForCausalLM"
    return "Qwen3ForCausalLM" if config.qk_norm else "LlamaForCausalLM"


# model_type of each architecture an export writes.
HF_EXPORT_TYPES = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe"}


def hf_config(config: ModelConfig) -> dict[str, Any]:
    """config.json for `hf_architecture(config)` (both the 4.x `rope_theta` and 5.x `rope_parameters` spellings)."""
    arch = hf_architecture(config)
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    rope_scaling = None
    if config.rope_scaling is not None:
        # transformers' YaRN uses the same frequency blend; note its correction-range rounding can
        # differ from MiniMind's by one dim at the edges, so long-context logits may differ slightly.
        s = config.rope_scaling
        rope_scaling = {
            "rope_type": "yarn",
            "factor": float(s.get("factor", 16)),
            "original_max_position_embeddings": int(s.get("original_max_position_embeddings", 2048)),
            "beta_fast": float(s.get("beta_fast", 32.0)),
            "beta_slow": float(s.get("beta_slow", 1.0)),
            "attention_factor": float(s.get("attention_factor", 1.0)),
        }
        rope_parameters = {**rope_scaling, "rope_theta": config.rope_theta}
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": HF_EXPORT_TYPES[arch],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "initializer_range": config.initializer_range,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if arch != "LlamaForCausalLM":
        del out["mlp_bias"]
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_hidden_layers)
    if arch == "Qwen3MoeForCausalLM":
        out.update(
            num_experts=config.num_experts,
            num_experts_per_tok=config.num_experts_per_tok,
            moe_intermediate_size=config.moe_intermediate_size,
            norm_topk_prob=config.norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            router_aux_loss_coef=config.aux_loss_coef,
            output_router_logits=False,
        )
    return out


def _run_or_checkpoint(path: Path) -> str | None:
    """What llmcore dir `path` is ("a run dir", "a checkpoint dir", "a run's checkpoints dir"), or None."""
    if not path.is_dir():
        return None
    if any((path / m).exists() for m in CHECKPOINT_MARKERS) or path.name.startswith(".step-"):
        return "a checkpoint dir"
    if (
        any((path / m).exists() for m in RUN_DIR_MARKERS)
        or (path / "tokenizer").is_dir()
        and (path / "config.json").is_file()
    ):
        return "a run dir"
    if path.name == "checkpoints" and (path / "latest").exists():
        return "a run's checkpoints dir"
    try:
        config = json.loads((path / "config.json").read_bytes())
        if isinstance(config, dict) and "stage" in config:
            return "a run dir"
    except (OSError, ValueError, RecursionError):
        pass
    return None


def _export_dir_problem(path: Path) -> str | None:
    """Why `path` is not an earlier export that --overwrite may replace (None when it is)."""
    for p in path.iterdir():
        if p.name not in EXPORT_FILES:
            return f"it holds {p.name}, which an export does not write"
    if not _is_hf_export(path):
        return (
            "it is not a transformers folder an export writes (config.json with model_type "
            f"{', '.join(HF_EXPORT_TYPES.values())} + model.safetensors)"
        )
    return None


def _is_hf_export(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return (
        isinstance(config, dict)
        and config.get("model_type") in HF_EXPORT_TYPES.values()
        and (path / "model.safetensors").is_file()
    )


def check_export_dir(out: Path, overwrite: bool, sources: tuple = ()) -> Path:
    """Refuse an --out that an export would damage: always a run dir, a checkpoint dir, a run's
    checkpoints dir or anything inside one, and a dir that holds the source; a non-empty dir
    without `overwrite`; with it, anything but an earlier export."""
    out = Path(out)
    for p in (out, *out.parents):
        what = _run_or_checkpoint(p)
        if what and (p == out or what != "a run dir" or p / "checkpoints" in (out, *out.parents)):
            raise LLMCoreError(
                f"--out {out}: {'is' if p == out else f'is inside {p}, which is'} {what}; "
                "export never writes there (its config.json or weights would be replaced)"
            )
    return check_out_dir(
        out, overwrite=overwrite, what="an earlier Hugging Face export", inputs=sources, replaceable=_export_dir_problem
    )


def export_model_hf(
    model: LLM,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    overwrite: bool = False,
    sources: tuple = (),
) -> Path:
    """Write config.json, model.safetensors, generation_config.json and (if given) tokenizer files into
    `out_dir`, which appears complete or not at all. A non-empty `out_dir` is refused unless
    `overwrite` (then only an earlier export is replaced); run and checkpoint dirs always are."""
    config = unwrap_model(model).config
    hf_architecture(config)  # refuses what no transformers class computes, before anything is written
    out = check_export_dir(
        Path(out_dir), overwrite, sources=tuple(sources) + ((tokenizer_dir,) if tokenizer_dir else ())
    )
    remove_leftovers(out.parent, out.name)
    try:
        with atomic_dir(out) as tmp:
            _write_export(model, config, tmp, tokenizer_dir)
    except OSError as err:
        raise LLMCoreError(
            f"--out {out}: cannot write the export: {err.strerror or err} (nothing was written there)"
        ) from err
    return out


def _write_export(model: LLM, config: ModelConfig, out: Path, tokenizer_dir: str | Path | None) -> None:
    state = {"model." + k: v for k, v in model_state_dict(model).items()}
    cfg = hf_config(config)
    cfg["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    atomic_write(out / "model.safetensors", lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    write_json(out / "config.json", cfg, ensure_ascii=True)
    gen = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "do_sample": True,
        "temperature": 0.85,
        "top_p": 0.85,
        "max_new_tokens": 512,
    }
    write_json(out / "generation_config.json", gen, ensure_ascii=True)
    if tokenizer_dir is not None:
        copy_tokenizer_files(Path(tokenizer_dir), out)


def copy_tokenizer_files(src: Path, out: Path) -> None:
    """Copy the tokenizer files; make sure tokenizer_config.json has a chat template and the special tokens."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and (src / name).resolve() != (out / name).resolve():
            atomic_write(out / name, lambda tmp, s=src / name: shutil.copyfile(s, tmp))
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
    tc.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    tc.setdefault("bos_token", "<|im_start|>")
    tc.setdefault("eos_token", "<|im_end|>")
    tc.setdefault("pad_token", "<|endoftext|>")
    tc.setdefault("unk_token", "<|endoftext|>")
    if not tc.get("chat_template") and not (out / "chat_template.jinja").is_file():
        tc["chat_template"] = CHATML_TEMPLATE
    write_json(tc_path, tc)


def export_hf(ckpt: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """`llmcore export hf`: resolve a run/checkpoint dir, export it and its tokenizer to `out_dir`
    (refused: run and checkpoint dirs, a dir holding the source, a non-empty dir without `overwrite`)."""
    src = resolve_checkpoint(ckpt)
    check_export_dir(Path(out_dir), overwrite, sources=(ckpt, src))  # before the weights are loaded
    model, _ = load_model(src, with_tokenizer=False)
    tok_dir = find_tokenizer_dir(src)
    return export_model_hf(model, out_dir, tok_dir, overwrite=overwrite, sources=(ckpt, src))
