"""Multi-node launching support: the DeepSpeed configs that ship inside the package.

`--deepspeed` takes a name (`zero0`, `zero1`, `zero2`, `zero3`, `zero3-offload`) or the path of
a DeepSpeed JSON file. The shipped configs leave micro batch, accumulation, global batch,
clipping and the optimizer's hyperparameters as "auto": the engine fills them from the run's
settings. `zero3-offload` is ZeRO-3 with parameters and optimizer state offloaded to CPU memory
(torch's AdamW, so no DeepSpeed op has to be compiled).
"""

from __future__ import annotations

from pathlib import Path

from llmcore.errors import LLMCoreError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEEPSPEED_CONFIGS = ("zero0", "zero1", "zero2", "zero3", "zero3-offload")


def deepspeed_config_path(name_or_path: str | Path) -> Path:
    """The DeepSpeed JSON config for `--deepspeed`: a shipped one by name, or an existing file.

    Raises LLMCoreError naming the flag and the known names when it is neither.
    """
    spec = str(name_or_path)
    if spec in DEEPSPEED_CONFIGS:
        path = CONFIG_DIR / f"{spec}.json"
        if not path.is_file():  # a broken install, not a user error we can explain better
            raise LLMCoreError(f"--deepspeed {spec}: the packaged config {path} is missing; reinstall llmcore")
        return path
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise LLMCoreError(
            f"--deepspeed {spec}: not a file; expected one of {', '.join(DEEPSPEED_CONFIGS)} "
            "or the path of a DeepSpeed JSON config"
        )
    raise LLMCoreError(
        f"--deepspeed {spec}: no such DeepSpeed config; expected one of "
        f"{', '.join(DEEPSPEED_CONFIGS)} or the path of a DeepSpeed JSON config file"
    )
