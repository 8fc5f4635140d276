"""Import foreign weights: MiniMind `.pth` (or `.safetensors`) state dicts and transformers folders (MiniMind's own
`model_type: minimind`, `Qwen3ForCausalLM`, `Qwen3MoeForCausalLM`, `LlamaForCausalLM`) become
llmcore's parameter names and `ModelConfig`; `import_model` writes them as a finished run dir.

Invariants:
- Nothing runs code while loading: `.pth`/`.bin` files are read with `torch.load(weights_only=True)`,
  everything else is safetensors or JSON. A pickle that needs more than tensors is refused.
- A source is accepted only if its weights fill exactly one llmcore model: every key mapped, every
  shape right (`checkpoint.model_from_state`, strict); otherwise one line naming the file and the
  first foreign key or shape.
- Floating-point weights are converted to fp32 (MiniMind ships fp16): lossless, and what training
  from them (`train --init`) needs for its master weights.
- `import_model` builds the run dir in a temp dir beside `--out` and renames it into place: the run
  dir appears complete or not at all.

Name mapping (both directions are a prefix plus two special cases): transformers and MiniMind keys
are ours with a `model.` prefix; `lm_head.weight` must equal the embedding (we tie them); transformers
5 keeps a Qwen3-MoE layer's experts fused in memory (`mlp.experts.gate_up_proj` (E, 2I, H) with gate
rows first, `mlp.experts.down_proj` (E, H, I)), which is split into per-expert `gate_proj`/`up_proj`/
`down_proj` as its `save_pretrained` writes them.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmcore.checkpoint import load_safetensors, read_json_object
from llmcore.errors import LLMCoreError
from llmcore.model import LLM, PRESETS, ModelConfig

logger = logging.getLogger(__name__)

# config.json `model_type`s we read, and the architecture each stands for.
HF_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "minimind": "MiniMindForCausalLM",
}
# Weight files of a transformers folder, in the order transformers prefers them.
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
RUN_STAGE = "import"  # the `stage` an imported run dir's config.json records
_LAYER_RE = re.compile(r"^layers\.(\d+)\.")


# ----------------------------------------------------------------------------------------------
# reading files


def read_pickled_weights(path: Path) -> dict[str, torch.Tensor]:
    """A `.pth`/`.bin` state dict, loaded with `weights_only=True` (tensors and plain containers only).
    A MiniMind resume file (`{"model": state_dict, "optimizer": ..., ...}`) gives its `model`."""
    try:
        with warnings.catch_warnings():  # a damaged file makes torch warn about odd pickle protocols; we raise
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is a page of advice; the line that matters names the global or the operand.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found:
            raise LLMCoreError(
                f"{path}: not a weights-only state dict: it needs {found.group(1)}, and loading it "
                "would run code, which llmcore never does"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(err))
        raise LLMCoreError(
            f"{path}: cannot read it as a PyTorch state dict "
            f"({detail.group(1)[:160] if detail else 'not a weights-only pickle'})"
        ) from None
    except Exception as err:  # noqa: BLE001 - arbitrary bytes through the (safe) weights-only unpickler fail in
        # many ways (struct.error, KeyError, UnicodeDecodeError, ...); each means the file is not a state dict.
        first = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise LLMCoreError(f"{path}: cannot read it as a PyTorch state dict ({type(err).__name__}: {first})") from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict) and "optimizer" in data:
        data = data["model"]
    if not isinstance(data, dict) or not data:
        raise LLMCoreError(f"{path}: holds {type(data).__name__}, not a state dict (a mapping of names to tensors)")
    for key, value in data.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise LLMCoreError(f"{path}: entry {key!r} is {type(value).__name__}, not a tensor; not a state dict")
    return data


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(path) if path.suffix == ".safetensors" else read_pickled_weights(path)


def hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All weights of a transformers folder (one file or the shards its index names)."""
    for name in HF_WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return _read_weight_file(path)
        weight_map = read_json_object(path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LLMCoreError(f"{path}: no weight_map")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(map(str, weight_map.values()))):
            shard_path = folder / shard
            if Path(shard).is_absolute() or ".." in Path(shard).parts or not shard_path.is_file():
                raise LLMCoreError(f"{path}: names shard {shard!r}, which is not a file in {folder}")
            state.update(_read_weight_file(shard_path))
        return state
    raise LLMCoreError(f"{folder}: no weights ({' or '.join(HF_WEIGHT_FILES)})")


def hf_folder_type(folder: Path) -> str | None:
    """The `model_type` of a transformers folder (config.json beside a weight file), else None."""
    if not (folder / "config.json").is_file() or not any((folder / n).is_file() for n in HF_WEIGHT_FILES):
        return None
    model_type = read_json_object(folder / "config.json").get("model_type")
    return model_type if isinstance(model_type, str) else ""


# ----------------------------------------------------------------------------------------------
# names


def to_llmcore_names(state: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """Our names for a transformers/MiniMind state dict: `model.` dropped, the (tied) lm_head dropped,
    fused Qwen3-MoE experts split; floating tensors as fp32. Unknown keys are kept (the strict load
    that follows names them)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "lm_head.weight":
            continue
        name = key.removeprefix("model.")
        if value.is_floating_point():
            value = value.float()
        fused = re.match(r"^(layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$", name)
        if fused is None:
            out[name] = value
            continue
        prefix, kind = fused.groups()
        if value.dim() != 3 or (kind == "gate_up_proj" and value.shape[1] % 2):
            raise LLMCoreError(
                f"{where}: {key} has shape {tuple(value.shape)}, not fused experts "
                "(experts, 2 x intermediate, hidden) / (experts, hidden, intermediate)"
            )
        for e in range(value.shape[0]):
            if kind == "gate_up_proj":
                gate, up = value[e].chunk(2, dim=0)
                out[f"{prefix}.{e}.gate_proj.weight"] = gate.contiguous()
                out[f"{prefix}.{e}.up_proj.weight"] = up.contiguous()
            else:
                out[f"{prefix}.{e}.down_proj.weight"] = value[e].contiguous()
    head = state.get("lm_head.weight")
    embed = out.get("embed_tokens.weight")
    if head is not None and (embed is None or head.shape != embed.shape or not torch.equal(head.float(), embed)):
        raise LLMCoreError(
            f"{where}: lm_head.weight differs from the token embedding (an untied output layer); "
            "llmcore models tie them, so these weights cannot be loaded without changing the model"
        )
    return out


# ----------------------------------------------------------------------------------------------
# configs


@dataclass
class Shapes:
    """What a state dict's shapes say about the architecture."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    qk_norm: bool
    head_dim: int | None  # known only with QK-norm (its weight has head_dim entries)
    q_rows: int
    kv_rows: int
    use_moe: bool
    intermediate_size: int | None  # dense MLP
    num_experts: int
    moe_intermediate_size: int | None
    num_shared_experts: int

    def describe(self) -> str:
        parts = [
            f"vocab {self.vocab_size}",
            f"hidden {self.hidden_size}",
            f"{self.num_hidden_layers} layers",
            f"q/k rows {self.q_rows}/{self.kv_rows}",
        ]
        parts.append(f"QK-norm head_dim {self.head_dim}" if self.qk_norm else "no QK-norm")
        if self.use_moe:
            parts.append(
                f"{self.num_experts} experts of {self.moe_intermediate_size} + {self.num_shared_experts} shared"
            )
        else:
            parts.append(f"MLP {self.intermediate_size}")
        return ", ".join(parts)


def _shape(state: dict[str, torch.Tensor], key: str, where: Path, dims: int) -> tuple[int, ...]:
    t = state.get(key)
    if t is None:
        raise LLMCoreError(f"{where}: no {key} (MiniMind's `model.{key}`); not a MiniMind/Llama/Qwen3 state dict")
    if t.dim() != dims:
        raise LLMCoreError(f"{where}: {key} has shape {tuple(t.shape)}, expected {dims} dimensions")
    return tuple(t.shape)


def read_shapes(state: dict[str, torch.Tensor], where: Path) -> Shapes:
    """The architecture sizes a state dict (our names) implies; missing core keys are one-line errors."""
    vocab, hidden = _shape(state, "embed_tokens.weight", where, 2)
    layers = {int(m.group(1)) for k in state if (m := _LAYER_RE.match(k))}
    if not layers:
        raise LLMCoreError(f"{where}: no layers.N.* weights; not a MiniMind/Llama/Qwen3 state dict")
    n_layers = max(layers) + 1
    q_rows = _shape(state, "layers.0.self_attn.q_proj.weight", where, 2)[0]
    kv_rows = _shape(state, "layers.0.self_attn.k_proj.weight", where, 2)[0]
    qk_norm = "layers.0.self_attn.q_norm.weight" in state
    head_dim = _shape(state, "layers.0.self_attn.q_norm.weight", where, 1)[0] if qk_norm else None
    use_moe = "layers.0.mlp.gate.weight" in state
    intermediate = moe_intermediate = None
    n_experts = n_shared = 0
    if use_moe:
        n_experts = _shape(state, "layers.0.mlp.gate.weight", where, 2)[0]
        moe_intermediate = _shape(state, "layers.0.mlp.experts.0.gate_proj.weight", where, 2)[0]
        n_shared = len(
            {int(m.group(1)) for k in state if (m := re.match(r"^layers\.0\.mlp\.shared_experts\.(\d+)\.", k))}
        )
    else:
        intermediate = _shape(state, "layers.0.mlp.gate_proj.weight", where, 2)[0]
    return Shapes(
        vocab,
        hidden,
        n_layers,
        qk_norm,
        head_dim,
        q_rows,
        kv_rows,
        use_moe,
        intermediate,
        n_experts,
        moe_intermediate,
        n_shared,
    )


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = LLM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def config_from_shapes(
    state: dict[str, torch.Tensor], where: Path, preset: str | None = None
) -> tuple[ModelConfig, str]:
    """The config of a MiniMind `.pth` state dict (our names): the preset whose weights have exactly
    these names and shapes (vocab from the file), or with `preset` that preset's settings (RoPE, eps,
    routing, heads) with the sizes the shapes give. Returns (config, preset name)."""
    s = read_shapes(state, where)
    actual = {k: tuple(v.shape) for k, v in state.items()}
    if preset is None:
        for name in PRESETS:
            try:
                cfg = ModelConfig.from_preset(name, vocab_size=s.vocab_size)
            except LLMCoreError:
                continue
            if _expected_shapes(cfg) == actual:
                return cfg, name
        raise LLMCoreError(
            f"{where}: its shapes ({s.describe()}) match no preset (`llmcore model list`); pass "
            "--preset NAME to take RoPE, norm and routing settings from NAME with these sizes"
        )
    base = ModelConfig.from_preset(preset)  # refuses an unknown name with the known ones
    heads, head_dim = base.num_attention_heads, s.head_dim
    if head_dim is None:  # no QK-norm: heads from the preset, head_dim from the q rows
        if s.q_rows % heads:
            raise LLMCoreError(f"{where}: q_proj has {s.q_rows} rows, not a multiple of {preset}'s {heads} heads")
        head_dim = s.q_rows // heads
    elif s.q_rows % head_dim:
        raise LLMCoreError(f"{where}: q_proj has {s.q_rows} rows, not a multiple of head_dim {head_dim}")
    else:
        heads = s.q_rows // head_dim
    if s.kv_rows % head_dim:
        raise LLMCoreError(f"{where}: k_proj has {s.kv_rows} rows, not a multiple of head_dim {head_dim}")
    sizes: dict[str, Any] = dict(
        vocab_size=s.vocab_size,
        hidden_size=s.hidden_size,
        num_hidden_layers=s.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=s.kv_rows // head_dim,
        head_dim=head_dim,
        qk_norm=s.qk_norm,
        use_moe=s.use_moe,
    )
    if s.use_moe:
        sizes.update(
            num_experts=s.num_experts,
            moe_intermediate_size=s.moe_intermediate_size,
            num_shared_experts=s.num_shared_experts,
            num_experts_per_tok=min(base.num_experts_per_tok, s.num_experts),
        )
    else:
        sizes.update(intermediate_size=s.intermediate_size)
    return ModelConfig.from_preset(preset, **sizes), preset


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """RoPE theta and YaRN scaling from a transformers config (4.x `rope_theta`/`rope_scaling`, 5.x
    `rope_parameters`) or MiniMind's (`rope_scaling` with `type: yarn`)."""
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling")
    kind = rope.get("rope_type") or "default"
    if kind == "yarn":
        scaling = rope
    elif kind != "default":
        raise LLMCoreError(f"RoPE type {kind!r} is not supported (plain RoPE and YaRN are)")
    if scaling is not None:
        kind = scaling.get("rope_type") or scaling.get("type") or "default"
        if kind != "yarn":
            raise LLMCoreError(f"rope_scaling type {kind!r} is not supported (plain RoPE and YaRN are)")
        scaling = {
            "type": "yarn",
            **{
                k: v
                for k, v in scaling.items()
                if k in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor")
                and v is not None
            },
        }
    return float(theta), scaling


def _int_or(value: Any, default: int) -> int:
    if isinstance(value, list):
        value = value[0] if value else None
    return default if value is None else value


def config_from_hf(hf: dict[str, Any], state: dict[str, torch.Tensor]) -> ModelConfig:
    """Our config from a transformers `config.json` of one of `HF_MODEL_TYPES` (weights in our names:
    MiniMind folders say QK-norm by having q_norm weights). Raises LLMCoreError saying what differs."""
    kind = hf.get("model_type")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias") or hf.get("mlp_bias"):
        raise LLMCoreError("only models with SiLU MLPs and no biases can be imported")
    if hf.get("use_sliding_window"):
        raise LLMCoreError("sliding-window attention is not supported (use_sliding_window is true)")
    heads = hf["num_attention_heads"]
    theta, scaling = _rope(hf)
    if kind == "minimind" and hf.get("inference_rope_scaling") is False:
        scaling = None
    fields: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or (128 if kind in ("qwen3", "qwen3_moe") else None),
        intermediate_size=hf.get("intermediate_size"),
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=True,
        bos_token_id=_int_or(hf.get("bos_token_id"), 1),
        eos_token_id=_int_or(hf.get("eos_token_id"), 2),
        pad_token_id=_int_or(hf.get("pad_token_id"), 0),
        # MiniMind-3 has QK-norm and MiniMind2 has not; their config.json does not say, the weights do.
        qk_norm=kind in ("qwen3", "qwen3_moe") or (kind == "minimind" and "layers.0.self_attn.q_norm.weight" in state),
    )
    if kind == "qwen3_moe":
        if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
            raise LLMCoreError(
                "Qwen3-MoE with dense layers among the MoE ones (mlp_only_layers / "
                "decoder_sparse_step) is not supported: every llmcore MoE layer is sparse"
            )
        fields.update(
            use_moe=True,
            num_experts=hf.get("num_experts") or hf["num_local_experts"],
            num_experts_per_tok=hf["num_experts_per_tok"],
            num_shared_experts=0,
            moe_intermediate_size=hf["moe_intermediate_size"],
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
        )
    elif kind == "minimind" and hf.get("use_moe"):
        v2 = "n_routed_experts" in hf  # MiniMind2's names; MiniMind-3 says num_experts and has no shared experts
        top_k = hf.get("num_experts_per_tok", 2 if v2 else 1)
        norm = bool(hf.get("norm_topk_prob", True))
        fields.update(
            use_moe=True,
            num_experts=hf.get("n_routed_experts" if v2 else "num_experts", 4),
            num_experts_per_tok=top_k,
            num_shared_experts=hf.get("n_shared_experts", 1) if v2 else 0,
            moe_intermediate_size=hf.get("moe_intermediate_size"),
            # MiniMind2 normalised the top-k weights only when k > 1; ours (as MiniMind-3 and
            # Qwen3-MoE) whenever asked, so a MiniMind2 top-1 model keeps its raw weights.
            norm_topk_prob=norm and not (v2 and top_k == 1),
            aux_loss_coef=float(hf.get("aux_loss_alpha" if v2 else "router_aux_loss_coef", 5e-4)),
        )
    return ModelConfig(**fields)


# ----------------------------------------------------------------------------------------------
# sources


def read_hf_folder(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, weights in our names) of a transformers folder of one of `HF_MODEL_TYPES`."""
    hf = read_json_object(folder / "config.json")
    kind = hf.get("model_type")
    if not isinstance(kind, str) or kind not in HF_MODEL_TYPES:
        raise LLMCoreError(
            f"{folder / 'config.json'}: model_type {kind!r} is not one llmcore reads ({', '.join(HF_MODEL_TYPES)})"
        )
    state = to_llmcore_names(hf_weights(folder), folder)
    try:
        config = config_from_hf(hf, state)
    except KeyError as err:
        raise LLMCoreError(f"{folder / 'config.json'}: no {err.args[0]}") from None
    except (LLMCoreError, TypeError, ValueError, AttributeError) as err:  # a field of the wrong JSON type
        raise LLMCoreError(
            f"{folder / 'config.json'}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None
    return config, state


@dataclass
class Source:
    """What `read_source` found: the config, the weights (our names, fp32), where a tokenizer lies
    beside them (or None) and a word for the format."""

    config: ModelConfig
    state: dict[str, torch.Tensor]
    tokenizer_dir: Path | None
    kind: str
    preset: str | None = None


def read_source(src: str | Path, preset: str | None = None) -> Source:
    """Read a MiniMind `.pth` (or `.safetensors`) state dict (preset inferred from shapes, or `preset`) or a
    transformers folder."""
    path = Path(src).expanduser()
    if not path.exists():
        raise LLMCoreError(f"{path}: no such file or folder")
    if path.is_dir():
        kind = hf_folder_type(path)
        if kind is None:
            raise LLMCoreError(
                f"{path}: not a transformers folder (config.json and one of {', '.join(HF_WEIGHT_FILES)})"
            )
        if preset is not None:
            raise LLMCoreError(f"--preset applies to .pth state dicts; {path} has its own config.json")
        config, state = read_hf_folder(path)
        tok = path if (path / "tokenizer.json").is_file() else None
        return Source(config, state, tok, f"{HF_MODEL_TYPES.get(kind, kind)} folder")
    # A state dict file: MiniMind's .pth (or the same names in a .safetensors file).
    state = to_llmcore_names(_read_weight_file(path), path)
    config, name = config_from_shapes(state, path, preset)
    return Source(config, state, None, "MiniMind state dict", preset=name)


# ----------------------------------------------------------------------------------------------
# import


def _import_dir_problem(path: Path) -> str | None:
    """Why `path` is not an earlier import that --overwrite may replace (None when it is)."""
    try:
        config = json.loads((path / "config.json").read_bytes())
    except (OSError, ValueError, RecursionError):
        return "it is not a run dir `model import` wrote (no readable config.json)"
    if not isinstance(config, dict) or config.get("stage") != RUN_STAGE:
        return "it is not a run dir `model import` wrote"
    allowed = {"config.json", "tokenizer", "checkpoints"}
    for p in path.iterdir():
        if p.name not in allowed:
            return f"it holds {p.name}, which an import does not write"
    return None


@dataclass
class ImportResult:
    run_dir: Path
    config: ModelConfig
    kind: str
    preset: str | None
    tokenizer_dir: Path | None  # the tokenizer copied into the run dir (None: none was given or found)
    num_params: int


def import_model(
    src: str | Path,
    out: str | Path,
    preset: str | None = None,
    tokenizer: str | Path | None = None,
    overwrite: bool = False,
) -> ImportResult:
    """`llmcore model import`: read `src` (see `read_source`) and write a run dir at `out` laid out as a
    finished training run (config.json, tokenizer/, checkpoints/step-0 with manifest, checkpoints/latest),
    so every `--ckpt` and `train --init` take it. The tokenizer is `tokenizer`, else the one in the
    source folder; it must fit the model (`checkpoint.check_tokenizer_fits`)."""
    from llmcore.checkpoint import check_tokenizer_fits, model_from_state, save_model, write_manifest
    from llmcore.io import atomic_dir, check_out_dir, remove_leftovers, write_json, write_text

    src_path = Path(src).expanduser()
    out = Path(out).expanduser()
    inputs = (src_path,) + ((Path(tokenizer),) if tokenizer is not None else ())
    check_out_dir(
        out, overwrite=overwrite, what="an earlier `model import`", inputs=inputs, replaceable=_import_dir_problem
    )
    source = read_source(src_path, preset)
    model = model_from_state(source.config, source.state, src_path)
    tok = None
    tok_dir = Path(tokenizer) if tokenizer is not None else source.tokenizer_dir
    if tok_dir is not None:
        from llmcore.data_prep.tokenizer import load_tokenizer

        tok = load_tokenizer(tok_dir)
        # A --tokenizer over a folder that brings its own must be that vocabulary.
        own = (
            load_tokenizer(source.tokenizer_dir).fingerprint
            if tokenizer is not None and source.tokenizer_dir is not None
            else None
        )
        check_tokenizer_fits(
            model.config,
            tok,
            f"--tokenizer {tok_dir}" if tokenizer is not None else str(tok_dir),
            exact=False,
            fingerprint=own,
        )
    remove_leftovers(out.parent, out.name)
    try:
        with atomic_dir(out) as tmp:
            step = tmp / "checkpoints" / "step-0"
            save_model(model, step)
            write_manifest(step)
            write_text(tmp / "checkpoints" / "latest", "step-0\n")
            if tok is not None:
                tok.save(tmp / "tokenizer")
            write_json(
                tmp / "config.json",
                {
                    "stage": RUN_STAGE,
                    "model": model.config.to_dict(),
                    "source": str(src_path.resolve()),
                    "source_format": source.kind,
                    "preset": source.preset,
                    "tokenizer_fingerprint": tok.fingerprint if tok is not None else None,
                },
            )
    except OSError as err:
        raise LLMCoreError(
            f"--out {out}: cannot write the run dir: {err.strerror or err} (nothing was written there)"
        ) from None
    logger.debug("imported %s (%s) into %s", src_path, source.kind, out)
    return ImportResult(
        out, model.config, source.kind, source.preset, tok_dir if tok is not None else None, model.num_params()
    )
