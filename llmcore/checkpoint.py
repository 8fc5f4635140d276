"""Model weights on disk: save/load with safetensors (never pickles), and resolution of what a user
points at — a run dir (follows `checkpoints/latest`), a checkpoint dir, or an exported Hugging Face
`LlamaForCausalLM` folder (imported back by renaming its weights).

A training checkpoint dir also holds `manifest.json`, written last: the size and SHA-256 of every
other file in it. `verify_checkpoint` checks a dir against it; `load_model` verifies the weights
and config of a checkpoint that has one, so flipped or truncated bytes are an error, not a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmcore.errors import LLMCoreError
from llmcore.io import atomic_write, write_text
from llmcore.model import LLM, ModelConfig, unwrap_model

WEIGHTS = "model.safetensors"
CONFIG = "model_config.json"
HF_CONFIG = "config.json"
MANIFEST = "manifest.json"
# A LoRA checkpoint (llmcore.lora): adapters + their config naming the base checkpoint, no base weights.
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
MANIFEST_FORMAT = 1
_STEP_RE = re.compile(r"^step-(\d+)$")


# ----------------------------------------------------------------------------------------------
# manifests


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


sha256_file = _sha256


def _holds_model(d: Path) -> bool:
    """Weights + config of our own format, or a LoRA checkpoint (adapters over a base it names)."""
    return ((d / WEIGHTS).is_file() and (d / CONFIG).is_file()) or (d / ADAPTER_CONFIG).is_file()


def _files_of(directory: Path) -> list[str]:
    out = []
    for dirpath, _dirs, files in os.walk(directory):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), directory)
            if rel != MANIFEST:
                out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def write_manifest(directory: str | Path) -> Path:
    """Write `manifest.json` (size and SHA-256 of every other file) into a finished checkpoint dir;
    it is the last file a save writes, so a dir with a manifest that verifies is complete."""
    directory = Path(directory)
    files = {rel: {"size": (directory / rel).stat().st_size, "sha256": _sha256(directory / rel)}
             for rel in _files_of(directory)}
    return write_text(directory / MANIFEST, json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1) + "\n")


def checkpoint_problem(directory: str | Path, only: tuple[str, ...] | None = None) -> str | None:
    """Why `directory` is not an intact checkpoint (None when its manifest verifies). `only`: check
    just these files (they must be listed). Files not in the manifest are not allowed either."""
    directory = Path(directory)
    mpath = directory / MANIFEST
    if not mpath.is_file():
        if (directory / "trainer_state.json").is_file() and not directory.name.endswith(".tmp"):
            return f"no {MANIFEST} (written by an llmcore without checkpoint manifests, or damaged); not verifiable"
        return f"no {MANIFEST} (the save did not finish)"
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        assert isinstance(files, dict)
    except (ValueError, KeyError, AssertionError, UnicodeDecodeError) as err:
        return f"{MANIFEST} is unreadable ({type(err).__name__})"
    names = only if only is not None else tuple(sorted(set(files) | set(_files_of(directory))))
    for rel in names:
        path = directory / rel
        entry = files.get(rel)
        if entry is None:
            return f"{rel} is not in the manifest"
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != entry.get("size"):
            return f"{rel} has {size} bytes, the manifest says {entry.get('size')} (truncated or overwritten)"
        if _sha256(path) != entry.get("sha256"):
            return f"{rel} does not match its checksum (corrupted)"
    return None


def verify_checkpoint(directory: str | Path, only: tuple[str, ...] | None = None) -> None:
    """Raise LLMCoreError naming the file when `directory` does not match its manifest."""
    problem = checkpoint_problem(directory, only)
    if problem is not None:
        raise LLMCoreError(f"{directory}: {problem}")


def step_dirs(run_dir: str | Path) -> list[Path]:
    """The run's `checkpoints/step-N` dirs, newest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def model_state_dict(model: LLM) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of the weights, keyed by parameter name (no tied duplicates: the LM head is the embedding)."""
    # Unwrap torch.compile / DDP / DeepSpeed wrappers so keys carry no `_orig_mod.` or `module.` prefix.
    return {k: v.detach().to("cpu").contiguous() for k, v in unwrap_model(model).state_dict().items()}


def save_model(model: LLM, out_dir: str | Path) -> Path:
    """Write `model.safetensors` and `model_config.json` into `out_dir` (created if needed); returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inner = unwrap_model(model)
    state = model_state_dict(model)
    atomic_write(out / WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt", "llmcore": "1"}))
    write_text(out / CONFIG, json.dumps(inner.config.to_dict(), indent=2) + "\n")
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LLMCoreError(f"{path}: not valid JSON ({err})") from None


def _is_hf_folder(path: Path) -> bool:
    if not (path / HF_CONFIG).is_file():
        return False
    if not ((path / WEIGHTS).is_file() or (path / "model.safetensors.index.json").is_file()):
        return False
    return _read_json(path / HF_CONFIG).get("model_type") == "llama"


def resolve_checkpoint(path: str | Path) -> Path:
    """The directory holding the weights: a checkpoint dir, the one a run dir's `checkpoints/latest`
    names, or an HF folder. Raises LLMCoreError saying what is missing."""
    p = Path(path).expanduser()
    if not p.exists():
        raise LLMCoreError(f"{p}: no such checkpoint, run dir or Hugging Face folder")
    if not p.is_dir():
        raise LLMCoreError(f"{p}: expected a directory (run dir, checkpoint dir or Hugging Face folder)")
    if _holds_model(p):
        return p
    if _is_hf_folder(p):
        return p
    latest = p / "checkpoints" / "latest"
    if not latest.is_file() or not latest.read_text().strip():
        # A kill between a checkpoint's rename and the write of `latest`: the newest step dir whose
        # manifest verifies is complete.
        for step in step_dirs(p):
            if checkpoint_problem(step) is None:
                return step
    if latest.is_file():
        name = latest.read_text().strip()
        if not name:
            raise LLMCoreError(f"{latest}: empty; it should name a step dir such as step-100")
        # `latest` names the step dir; accept a bare name, a path relative to the run dir, or an absolute path.
        candidates = [p / "checkpoints" / name, p / name, Path(name)]
        for c in candidates:
            if _holds_model(c):
                newer = [d for d in step_dirs(p) if _step_of(d) > _step_of(c) and checkpoint_problem(d) is None]
                return newer[0] if newer else c
        raise LLMCoreError(f"{latest} names {name!r}, but no complete checkpoint ({WEIGHTS} + {CONFIG}) is there")
    if (p / "checkpoints").is_dir():
        raise LLMCoreError(f"{p}: run dir without a complete checkpoint ({latest} is missing)")
    if (p / WEIGHTS).is_file():
        raise LLMCoreError(f"{p}: {CONFIG} is missing beside {WEIGHTS}")
    raise LLMCoreError(f"{p}: not a run dir (no checkpoints/latest), checkpoint dir (no {WEIGHTS} + {CONFIG}) "
                       "or Hugging Face Llama folder (no config.json + model.safetensors)")


def _step_of(path: Path) -> int:
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else -1


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise LLMCoreError(f"{path}: cannot read weights ({err})") from err


def _hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / WEIGHTS).is_file():
        return _load_safetensors(folder / WEIGHTS)
    index = _read_json(folder / "model.safetensors.index.json")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index.get("weight_map", {}).values())):
        state.update(_load_safetensors(folder / shard))
    return state


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Our config from a Llama `config.json` (transformers 4.x `rope_theta` or 5.x `rope_parameters`)."""
    if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias") or hf.get("mlp_bias"):
        raise LLMCoreError("only Llama models with SiLU MLPs and no biases can be imported")
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling")
    if (rope.get("rope_type") or "default") == "yarn":
        scaling = rope
    if scaling is not None:
        scaling = {"type": "yarn", **{k: v for k, v in scaling.items()
                                      if k in ("factor", "original_max_position_embeddings", "beta_fast",
                                               "beta_slow", "attention_factor") and v is not None}}
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"), intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 32768), rope_theta=float(theta),
        rope_scaling=scaling, rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_word_embeddings=True, bos_token_id=hf.get("bos_token_id", 1) or 1,
        eos_token_id=_first(hf.get("eos_token_id", 2)), pad_token_id=hf.get("pad_token_id") or 0,
    )


def _first(x: Any) -> int:
    return int(x[0]) if isinstance(x, list) else int(x)


def _hf_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if k == "lm_head.weight":
            continue
        out[k.removeprefix("model.")] = v
    if "lm_head.weight" in state and not torch.equal(state["lm_head.weight"], out.get("embed_tokens.weight", torch.empty(0))):
        raise LLMCoreError("this Llama folder has an untied lm_head; llmcore models tie it to the embedding")
    return out


def find_tokenizer_dir(ckpt_dir: Path) -> Path | None:
    """Tokenizer files beside the weights, else in the run dir's `tokenizer/` (ckpt = RUN/checkpoints/step-N)."""
    if (ckpt_dir / "tokenizer.json").is_file():
        return ckpt_dir
    if ckpt_dir.parent.name == "checkpoints":
        run_tok = ckpt_dir.parent.parent / "tokenizer"
        if (run_tok / "tokenizer.json").is_file():
            return run_tok
    return None


def load_tokenizer_for(ckpt_dir: Path) -> Any | None:
    """The run's tokenizer (llmcore.data_prep Tokenizer) or None when none is stored with the checkpoint."""
    tok_dir = find_tokenizer_dir(ckpt_dir)
    if tok_dir is None:
        return None
    from llmcore.data_prep.tokenizer import load_tokenizer

    return load_tokenizer(tok_dir)


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               attn_backend: str | None = None, with_tokenizer: bool = True) -> tuple[LLM, Any | None]:
    """Load `(model, tokenizer_or_None)` from a run dir, checkpoint dir or HF Llama folder; model in eval mode."""
    ckpt = resolve_checkpoint(path)
    if (ckpt / MANIFEST).is_file():
        verify_checkpoint(ckpt, only=tuple(n for n in (WEIGHTS, CONFIG, ADAPTER_WEIGHTS, ADAPTER_CONFIG)
                                            if (ckpt / n).exists()) or None)
    if (ckpt / ADAPTER_CONFIG).is_file():
        # LoRA adapters merged into the base checkpoint they name (checked there and unchanged).
        from llmcore.lora import merged_state

        config, state = merged_state(ckpt)
    elif (ckpt / CONFIG).is_file() and (ckpt / WEIGHTS).is_file():
        config = ModelConfig.from_dict(_read_json(ckpt / CONFIG))
        state = _load_safetensors(ckpt / WEIGHTS)
    else:
        config = config_from_hf(_read_json(ckpt / HF_CONFIG))
        state = _hf_to_ours(_hf_weights(ckpt))
    config.attn_backend = runnable_backend(attn_backend or config.attn_backend, torch.device(device))
    with torch.device("meta"):
        model = LLM(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise LLMCoreError(f"{ckpt}: weights do not match the model config ({str(err).splitlines()[0]} ...)") from err
    # Buffers (RoPE tables) were built on meta; rebuild them for real.
    model.rope_cos, model.rope_sin = (t for t in _rope_for(config))
    model = model.to(device=device)
    if dtype is not None:
        model = model.to(dtype=dtype)
    model.eval()
    tokenizer = load_tokenizer_for(ckpt) if with_tokenizer else None
    return model, tokenizer


def runnable_backend(backend: str, device: torch.device) -> str:
    """The attention backend to run a checkpoint with on `device`: `auto` is triton on CUDA and
    sdpa elsewhere; a checkpoint trained with triton on a GPU runs with sdpa on a CPU (the backend
    is how the math runs, not part of the weights), unless the Triton interpreter is on."""
    import os

    from llmcore.common import default_attn_backend

    if backend == "auto":
        return default_attn_backend(device)
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "sdpa"
    return backend


def _rope_for(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    from llmcore.model import rope_tables

    return rope_tables(config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling)
