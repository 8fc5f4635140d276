"""Export a dense llmcore model to a Hugging Face `LlamaForCausalLM` folder.

Our architecture is Llama's (pre-norm RMSNorm, rotate-half RoPE, GQA, SwiGLU, tied embeddings)
and our parameter names are Llama's without the `model.` prefix, so export is a rename plus a
config.json. MoE models are refused: transformers has no Llama variant with shared + routed
SwiGLU experts and this exact router, and a look-alike architecture would not give the same logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from llmcore.checkpoint import find_tokenizer_dir, load_model, model_state_dict, resolve_checkpoint
from llmcore.errors import LLMCoreError
from llmcore.io import atomic_write, write_json
from llmcore.model import LLM, ModelConfig, unwrap_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# ChatML, as MiniMind's tokenizer uses; written only when the source tokenizer carries no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def hf_config(config: ModelConfig) -> dict[str, Any]:
    """config.json for LlamaForCausalLM (both the 4.x `rope_theta` and 5.x `rope_parameters` spellings)."""
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    rope_scaling = None
    if config.rope_scaling is not None:
        # transformers' YaRN uses the same frequency blend; note its correction-range rounding can
        # differ from MiniMind's by one dim at the edges, so long-context logits may differ slightly.
        s = config.rope_scaling
        rope_scaling = {"rope_type": "yarn", "factor": float(s.get("factor", 16)),
                        "original_max_position_embeddings": int(s.get("original_max_position_embeddings", 2048)),
                        "beta_fast": float(s.get("beta_fast", 32.0)), "beta_slow": float(s.get("beta_slow", 1.0)),
                        "attention_factor": float(s.get("attention_factor", 1.0))}
        rope_parameters = {**rope_scaling, "rope_theta": config.rope_theta}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
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


def export_model_hf(model: LLM, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Write config.json, model.safetensors, generation_config.json and (if given) tokenizer files."""
    config = unwrap_model(model).config
    if config.use_moe:
        raise LLMCoreError("Hugging Face export supports dense models only: transformers' Llama has no "
                           "shared+routed expert MLP, so an MoE checkpoint cannot be exported as LlamaForCausalLM")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {"model." + k: v for k, v in model_state_dict(model).items()}
    cfg = hf_config(config)
    cfg["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    atomic_write(out / "model.safetensors", lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    write_json(out / "config.json", cfg, ensure_ascii=True)
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
           "pad_token_id": config.pad_token_id, "do_sample": True, "temperature": 0.85, "top_p": 0.85,
           "max_new_tokens": 512}
    write_json(out / "generation_config.json", gen, ensure_ascii=True)
    if tokenizer_dir is not None:
        copy_tokenizer_files(Path(tokenizer_dir), out)
    return out


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
    if not tc.get("chat_template"):
        tc["chat_template"] = CHATML_TEMPLATE
    write_json(tc_path, tc)


def export_hf(ckpt: str | Path, out_dir: str | Path) -> Path:
    """`llmcore export hf`: resolve a run/checkpoint dir, export it and its tokenizer to `out_dir`."""
    src = resolve_checkpoint(ckpt)
    model, _ = load_model(src, with_tokenizer=False)
    tok_dir = find_tokenizer_dir(src)
    return export_model_hf(model, out_dir, tok_dir)
