"""Model weights on disk: save/load with safetensors (never pickles), and resolution of what a user
points at — a run dir (follows `checkpoints/latest`), a checkpoint dir, or a transformers folder
(Llama, Qwen3, Qwen3-MoE or MiniMind's own format, read by `llmcore.convert`).

A model and a tokenizer loaded together must fit (`check_tokenizer_fits`): a tokenizer with more ids
than the embedding, other special ids, or another vocabulary than the one stored with the checkpoint
is refused, so generation never decodes ids through the wrong vocabulary.

A training checkpoint dir also holds `manifest.json`, written last: the size and SHA-256 of every
other file in it. `verify_checkpoint` checks a dir against it; `load_model` verifies the weights
and config of a checkpoint that has one, so flipped or truncated bytes are an error, not a model.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmcore.common import resolve_attn_backend, resolve_device
from llmcore.errors import LLMCoreError
from llmcore.io import atomic_write, read_json, sha256_file, write_text
from llmcore.model import LLM, ModelConfig, unwrap_model

WEIGHTS = "model.safetensors"
CONFIG = "model_config.json"
HF_CONFIG = "config.json"
MANIFEST = "manifest.json"
# A LoRA checkpoint (llmcore.lora): adapters + their config naming the base checkpoint, no base weights.
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
MANIFEST_FORMAT = 1
STEP_RE = re.compile(r"^step-(\d+)$")


# ----------------------------------------------------------------------------------------------
# manifests


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
    files = {
        rel: {"size": (directory / rel).stat().st_size, "sha256": sha256_file(directory / rel)}
        for rel in _files_of(directory)
    }
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
        if not _inside(directory, rel):
            # Never read (or report the size of) a file outside the checkpoint a manifest names.
            return f"{MANIFEST} names {rel!r}, outside the checkpoint"
        path = directory / rel
        entry = files.get(rel)
        if entry is None:
            return f"{rel} is not in the manifest"
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != entry.get("size"):
            return f"{rel} has {size} bytes, the manifest says {entry.get('size')} (truncated or overwritten)"
        if sha256_file(path) != entry.get("sha256"):
            return f"{rel} does not match its checksum (corrupted)"
    return None


def _inside(directory: Path, rel: str) -> bool:
    """Whether the relative path `rel` stays inside `directory` (no absolute path, no `..`, no symlink out)."""
    if not isinstance(rel, str) or not rel or rel.startswith(("/", "\\")) or ".." in Path(rel).parts:
        return False
    try:
        return (directory / rel).resolve().is_relative_to(directory.resolve())
    except (OSError, ValueError):
        return False


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
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def resume_point(run_dir: str | Path) -> tuple[Path | None, list[tuple[str, str]]]:
    """The newest step dir whose manifest verifies, whether `checkpoints/latest` names it or not (a kill
    between a save's rename and the write of `latest` leaves a complete step dir it does not name),
    and `[(name, why skipped)]` for the newer ones. The one lookup of where a run resumes and of
    the weights a run dir means (`resolve_checkpoint`, `CheckpointManager.resume_point`)."""
    skipped: list[tuple[str, str]] = []
    for step in step_dirs(run_dir):
        problem = checkpoint_problem(step)
        if problem is None:
            return step, skipped
        skipped.append((step.name, problem))
    return None, skipped


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


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, else one LLMCoreError line naming it (missing, not JSON, not an object)."""
    return read_json(path, object_only=True)


def _is_hf_folder(path: Path) -> bool:
    """A transformers folder of a model type llmcore reads; another model type is a one-line error."""
    from llmcore.convert import HF_MODEL_TYPES, hf_folder_type

    kind = hf_folder_type(path)
    if kind is None:
        return False
    if kind not in HF_MODEL_TYPES:
        raise LLMCoreError(
            f"{path / HF_CONFIG}: model_type {kind!r} is not one llmcore reads ({', '.join(HF_MODEL_TYPES)})"
        )
    return True


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
        found, _ = resume_point(p)
        if found is not None:
            return found
    if latest.is_file():
        name = latest.read_text().strip()
        if not name:
            raise LLMCoreError(f"{latest}: empty; it should name a step dir such as step-100")
        # `latest` names the step dir; accept a bare name, a path relative to the run dir, or an absolute path,
        # as long as it is a dir of this run's checkpoints/ (a pointer must not load another run's weights).
        candidates = [p / "checkpoints" / name, p / name, Path(name)]
        root = (p / "checkpoints").resolve()
        if not any(c.resolve().parent == root for c in candidates):
            raise LLMCoreError(
                f"{latest} names {name!r}, which is not a step dir in {p / 'checkpoints'}; "
                "it must name one of this run's checkpoints (e.g. step-100)"
            )
        for c in candidates:
            if c.resolve().parent != root:
                continue
            if _holds_model(c):
                found, _ = resume_point(p)
                return found if found is not None and _step_of(found) > _step_of(c) else c
        raise LLMCoreError(f"{latest} names {name!r}, but no complete checkpoint ({WEIGHTS} + {CONFIG}) is there")
    if not step_dirs(p) and _is_run_config(p / HF_CONFIG):
        # A training killed before its first save leaves config.json, tokenizer/ and metrics.
        raise LLMCoreError(
            f"{p}: run dir that has no checkpoint yet (its training stopped before the first save; "
            "continue it with `llmcore train STAGE --out RUN --resume`, which starts at step 0)"
        )
    if (p / "checkpoints").is_dir():
        raise LLMCoreError(f"{p}: run dir without a complete checkpoint ({latest} is missing)")
    if (p / WEIGHTS).is_file():
        raise LLMCoreError(f"{p}: {CONFIG} is missing beside {WEIGHTS}")
    raise LLMCoreError(
        f"{p}: not a run dir (no checkpoints/latest), checkpoint dir (no {WEIGHTS} + {CONFIG}) "
        "or transformers folder (no config.json + model.safetensors)"
    )


def _is_run_config(path: Path) -> bool:
    """Whether `path` is the config.json a training run writes (stage + train settings)."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "stage" in cfg and isinstance(cfg.get("train"), dict)


def _step_of(path: Path) -> int:
    m = STEP_RE.match(path.name)
    return int(m.group(1)) if m else -1


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, else one LLMCoreError line naming it."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise LLMCoreError(f"{path}: cannot read weights ({err})") from err


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


def model_from_state(config: ModelConfig, state: dict[str, torch.Tensor], where: str | Path) -> LLM:
    """An eval-mode CPU model holding exactly `state` (strict: every key present, none foreign, every
    shape right), else one LLMCoreError line naming `where` and the first difference."""
    with torch.device("meta"):
        model = LLM(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise LLMCoreError(f"{where}: weights do not match the model config ({_first_difference(err)})") from None
    # Buffers (RoPE tables) were built on meta; rebuild them for real.
    model.rope_cos, model.rope_sin = (t for t in _rope_for(config))
    return model.eval()


def _first_difference(err: RuntimeError) -> str:
    """The first problem torch's load_state_dict lists, on one line."""
    lines = [ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()]
    text = lines[0] if lines else str(err).splitlines()[0]
    return text[:300] + (" ..." if len(text) > 300 or len(lines) > 1 else "")


def check_tokenizer_fits(
    config: ModelConfig, tok: Any, what: str, exact: bool = True, fingerprint: str | None = None
) -> None:
    """Refuse a tokenizer that cannot be this model's (one line naming `what`): more ids than the
    embedding has rows; with `exact` (llmcore checkpoints, whose vocab size and special ids were taken
    from their tokenizer) another vocab size or other bos/eos/pad ids; with `fingerprint` (of the
    tokenizer stored with the checkpoint) another vocabulary."""
    if tok.vocab_size > config.vocab_size:
        raise LLMCoreError(
            f"{what}: the tokenizer has {tok.vocab_size} ids but the model's embedding has "
            f"{config.vocab_size} rows; it is not this model's tokenizer"
        )
    if fingerprint is not None and tok.fingerprint != fingerprint:
        raise LLMCoreError(
            f"{what}: another vocabulary than the tokenizer this model was trained with "
            f"(fingerprint {tok.fingerprint[:12]} vs {fingerprint[:12]}); its text would be garbage. "
            "Use the checkpoint's own tokenizer (leave --tokenizer out)"
        )
    if exact:
        if tok.vocab_size != config.vocab_size:
            raise LLMCoreError(
                f"{what}: the tokenizer has {tok.vocab_size} ids but the model was trained with a "
                f"vocab of {config.vocab_size}; it is not this model's tokenizer"
            )
        ours = (tok.bos_id, tok.eos_id, tok.pad_id)
        model = (config.bos_token_id, config.eos_token_id, config.pad_token_id)
        if ours != model:
            raise LLMCoreError(
                f"{what}: special ids bos/eos/pad {ours[0]}/{ours[1]}/{ours[2]} differ from the "
                f"model's {model[0]}/{model[1]}/{model[2]}; it is not this model's tokenizer"
            )


def _stored_fingerprint(ckpt: Path) -> str | None:
    """The fingerprint of the tokenizer stored with a checkpoint: its files, else its run's config.json."""
    tok_dir = find_tokenizer_dir(ckpt)
    if tok_dir is not None:
        from llmcore.data_prep.tokenizer import load_tokenizer

        return load_tokenizer(tok_dir).fingerprint
    if ckpt.parent.name == "checkpoints":
        try:
            value = json.loads((ckpt.parent.parent / HF_CONFIG).read_bytes()).get("tokenizer_fingerprint")
        except (OSError, ValueError, RecursionError, AttributeError):
            return None
        return value if isinstance(value, str) else None
    return None


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attn_backend: str | None = None,
    with_tokenizer: bool = True,
    tokenizer: str | Path | None = None,
) -> tuple[LLM, Any | None]:
    """Load `(model, tokenizer_or_None)` from a run dir, checkpoint dir or transformers folder; model in
    eval mode. `tokenizer`: a tokenizer dir to use instead of the checkpoint's (the `--tokenizer` flag);
    it must fit the model (`check_tokenizer_fits`, against the stored tokenizer's vocabulary too)."""
    ckpt = resolve_checkpoint(path)
    if (ckpt / MANIFEST).is_file():
        verify_checkpoint(
            ckpt,
            only=tuple(n for n in (WEIGHTS, CONFIG, ADAPTER_WEIGHTS, ADAPTER_CONFIG) if (ckpt / n).exists()) or None,
        )
    lora = (ckpt / ADAPTER_CONFIG).is_file()
    ours = lora or ((ckpt / CONFIG).is_file() and (ckpt / WEIGHTS).is_file())
    if lora:
        # LoRA adapters merged into the base checkpoint they name (checked there and unchanged).
        from llmcore.lora import merged_state

        config, state = merged_state(ckpt)
    elif ours:
        config = ModelConfig.from_dict(read_json_object(ckpt / CONFIG))
        state = load_safetensors(ckpt / WEIGHTS)
    else:
        from llmcore.convert import read_hf_folder

        config, state = read_hf_folder(ckpt)
    config.attn_backend = resolve_attn_backend(attn_backend or config.attn_backend, torch.device(device), strict=False)
    model = model_from_state(config, state, ckpt)
    model = model.to(device=device)
    if dtype is not None:
        model = model.to(dtype=dtype)
    model.eval()
    tok = None
    if tokenizer is not None:
        from llmcore.data_prep.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer)
        check_tokenizer_fits(config, tok, f"--tokenizer {tokenizer}", exact=ours, fingerprint=_stored_fingerprint(ckpt))
    elif with_tokenizer:
        tok = load_tokenizer_for(ckpt)
        if tok is not None:
            check_tokenizer_fits(config, tok, f"{ckpt}: its tokenizer {tok.path}", exact=False)
    return model, tok


def load_model_and_tokenizer(
    path: str | Path,
    device: str | torch.device = "auto",
    *,
    dtype: torch.dtype | None = None,
    attn_backend: str | None = None,
    tokenizer: str | Path | None = None,
    flag: str = "--ckpt",
) -> tuple[LLM, Any]:
    """`load_model` for commands that decode text: `device` resolved like every `--device` (`auto`,
    `cpu`, `cuda:N`), and a tokenizer required (the checkpoint's, or `tokenizer` for `--tokenizer`);
    without one a one-line LLMCoreError naming `flag`. The one "load model + tokenizer or fail"."""
    model, tok = load_model(
        path, device=resolve_device(device), dtype=dtype, attn_backend=attn_backend, tokenizer=tokenizer
    )
    if tok is None:
        raise LLMCoreError(
            f"{flag} {path}: no tokenizer found (looked for tokenizer.json beside the weights and in "
            "the run dir's tokenizer/); pass --tokenizer DIR"
        )
    return model, tok


def _rope_for(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    from llmcore.model import rope_tables

    head_dim = config.head_dim
    assert head_dim is not None  # ModelConfig.__post_init__ fills it
    return rope_tables(head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling)
