"""CLI: `llmcore train STAGE` for every registered stage, and `llmcore eval`.

The train commands are derived, not written: one option per `TrainConfig` field (its name, type,
help and checks come from the field's `setting(...)` declaration), shown for a stage unless another
stage claims the setting as its own, with the default that stage uses. The work is in
`llmcore.train.train`; the `eval` group is `llmcore.cli_eval`.
"""

from __future__ import annotations

import inspect
import json
import os
import shlex
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional, Sequence

import typer

from llmcore.errors import LLMCoreError


def _distributed_up() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _finish_distributed(code: int, message: str | None = None) -> None:
    """End a DeepSpeed process: print, tear the process group down, and leave with os._exit, because
    torch's gloo teardown at interpreter exit aborts some finished processes (SIGABRT)."""
    from llmcore.train.distributed import shutdown_distributed

    if message:
        typer.echo(message, err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        shutdown_distributed()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _shown_default(stage: Any, name: str, declared: Any) -> str | None:
    if name == "min_lr" and stage.defaults.get("lr") is not None:
        return f"lr/10 = {stage.defaults['lr'] / 10:g}"
    if name == "model" and stage.default_model:
        return f"{stage.default_model} (when no --init)"
    value = stage.defaults.get(name, declared)
    if value is None or value == "":
        return None
    return str(value).lower() if isinstance(value, bool) else str(value)


REQUIRED = ("data", "out")  # checked in TrainConfig.validate (not by click: --print-config needs neither)
PATH_SETTINGS = {
    "data": "DIR",
    "out": "DIR",
    "init": "RUN",
    "tokenizer": "DIR",
    "model": "PRESET",
    "deepspeed": "NAME|JSON",
    "teacher": "RUN",
}


def _metavar(name: str, typ: type, meta: Any) -> str | None:
    """What a flag's value looks like in --help: its choices, DIR/RUN for paths, N for integers."""
    if typ is bool:
        return None
    if meta.get("choices"):
        return "|".join(meta["choices"])
    return PATH_SETTINGS.get(name) or {int: "N", float: "X"}.get(typ, "TEXT")


def _options(stage: Any) -> list[inspect.Parameter]:
    from llmcore.train.config import TrainConfig, base_type, flag_name
    from llmcore.train.stages import stage_only_settings

    claimed = stage_only_settings() - set(stage.settings)
    hints = __import__("typing").get_type_hints(TrainConfig)
    params = []
    for f in fields(TrainConfig):
        if f.name in claimed:
            continue
        typ = base_type(hints[f.name])
        flag = flag_name(f.name)
        decl = f"{flag}/--no-{flag[2:]}" if typ is bool else flag
        shown = _shown_default(stage, f.name, f.default)
        # The default goes into the help text: click prints a show_default string in parentheses
        # (`[default: (512)]`), and the option's real default is None ("not given").
        text = f.metadata["help"] + (f"  [default: {shown}]" if shown is not None else "")
        if f.name in REQUIRED:
            text += "  [required]" if f.name == "out" else "  [required; --resume: the run's]"
        opt = typer.Option(None, decl, help=text, show_default=False, metavar=_metavar(f.name, typ, f.metadata))
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=Optional[typ]))
    params.append(
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Optional[Path],
            default=typer.Option(
                None, "--config", help="TOML or YAML file with any of these settings; flags override it."
            ),
        )
    )
    params.append(
        inspect.Parameter(
            "print_config",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=bool,
            default=typer.Option(
                False,
                "--print-config",
                help="Print the effective settings (defaults < config file < flags) as TOML and exit.",
            ),
        )
    )
    return params


def config_as_toml(cfg: Any, stage_name: str) -> str:
    """The resolved settings as a TOML document `--config` reads back (unset ones as comments)."""
    lines = [f"# llmcore train {stage_name}: effective settings"]
    for k, v in cfg.to_dict().items():
        if v is None:
            lines.append(f"# {k} = (not set)")
        elif isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            lines.append(f"{k} = {v!r}")
        else:
            lines.append(f"{k} = {json.dumps(str(v), ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def resume_command(stage_name: str, flags: dict[str, Any], config_file: Any) -> str:
    """The command line that continues this run: the flags it was given (None = not given), plus --resume."""
    from llmcore.train.config import flag_name

    args = ["llmcore", "train", stage_name]
    if config_file is not None:
        args += ["--config", str(config_file)]
    for name, value in flags.items():
        if value is None or name == "resume":
            continue
        if isinstance(value, bool):
            args.append(flag_name(name) if value else "--no-" + flag_name(name)[2:])
        else:
            args += [flag_name(name), str(value)]
    return shlex.join(args + ["--resume"])


def interrupted_line(stopped: Any, command: str) -> str:
    """One line for a run stopped by a signal: where its checkpoint is and the command that continues it."""
    import signal

    name = signal.Signals(stopped.signum).name
    where = f"checkpoint saved in {stopped.checkpoint}" if stopped.checkpoint is not None else "no checkpoint was saved"
    return f"stopped by {name} at step {stopped.step}/{stopped.total_steps}: {where}; resume with: {command}"


def _split_params(params: dict[str, Any]) -> tuple[dict[str, Any], Any, bool]:
    """A train command's parsed parameters as (settings flags, --config file, --print-config)."""
    params = dict(params)
    config_file = params.pop("config")
    print_config = bool(params.pop("print_config"))
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in params.items()}, config_file, print_config


def parse_train_flags(stage_name: str, argv: Sequence[str]) -> Any:
    """The resolved `TrainConfig` of `llmcore train STAGE_NAME ARGV...`, parsed by that command's own
    options (the command `llmcore train` registers, so every flag, default and check means the same)
    and resolved as the command resolves it (`build_config`); --print-config is ignored. Used by
    `llmcore launch` to check a run before starting it. Raises LLMCoreError for an unknown stage, a
    usage error (unknown flag, bad value type) or a bad setting."""
    from llmcore.train import build_config
    from llmcore.train.stages import get_stage

    stage = get_stage(stage_name)
    one = typer.Typer()
    one.command(stage.name)(_make_train_command(stage))
    command = typer.main.get_command(one)  # one command and no callback: the command itself
    try:
        ctx = command.make_context(f"llmcore train {stage.name}", list(argv))
    except Exception as err:  # click's usage errors (unknown option, a value of the wrong type)
        if not hasattr(err, "format_message"):
            raise
        raise LLMCoreError(f"train {stage.name}: {err.format_message()}") from None
    flags, config_file, _ = _split_params(ctx.params)
    return build_config(stage.name, flags, config_file)


def _make_train_command(stage: Any) -> Any:
    def command(**kwargs: Any) -> None:
        from llmcore.train import TrainingInterrupted, build_config, train

        flags, config_file, print_config = _split_params(kwargs)
        if print_config:
            typer.echo(
                config_as_toml(build_config(stage.name, flags, config_file, check_paths=False), stage.name), nl=False
            )
            return
        cfg = build_config(stage.name, flags, config_file)
        if cfg.deepspeed is None:
            try:
                summary = train(stage.name, cfg)
            except TrainingInterrupted as stopped:
                typer.echo(interrupted_line(stopped, resume_command(stage.name, flags, config_file)), err=True)
                raise typer.Exit(stopped.exit_code) from None
            typer.echo(summary.line())
            return
        # DeepSpeed: once this run has brought the process group up, every exit path tears it down and
        # leaves through os._exit; errors before that (bad flags) take the normal path of the root CLI.
        # A group that was already up (the command called in a process that holds one, as a library
        # or a test does) is not this command's to end: it returns or raises as a plain run does.
        group_was_up = _distributed_up()

        def owns_group() -> bool:
            return not group_was_up and _distributed_up()

        try:
            summary = train(stage.name, cfg)
        except TrainingInterrupted as stopped:
            line = interrupted_line(stopped, resume_command(stage.name, flags, config_file))
            if not owns_group():
                typer.echo(line, err=True)
                raise typer.Exit(stopped.exit_code) from None
            _finish_distributed(stopped.exit_code, line if _is_rank0() else None)
        except LLMCoreError as err:
            if not owns_group():
                raise
            _finish_distributed(2, f"error: {err}")
        except KeyboardInterrupt:
            if not owns_group():
                raise
            _finish_distributed(130, "interrupted")
        except BaseException:
            if not owns_group():
                raise
            import traceback

            traceback.print_exc()
            _finish_distributed(1)
        if _is_rank0():
            typer.echo(summary.line())
        if owns_group():
            _finish_distributed(0)

    command.__signature__ = inspect.Signature(_options(stage))  # type: ignore[attr-defined]
    command.__doc__ = f"{stage.summary}\n\nExample: {stage.example}"
    command.__name__ = f"train_{stage.name}"
    return command


def register(app: typer.Typer) -> None:
    """Add `train STAGE` for every registered stage, and `eval`, to the root app."""
    from llmcore.train.stages import all_stages

    stages = all_stages()
    group = typer.Typer(
        help=f"Train a model: {', '.join(s.name for s in stages)}.\n\nExample: {stages[0].example}",
        no_args_is_help=True,
    )
    for stage in stages:
        group.command(stage.name)(_make_train_command(stage))
    app.add_typer(group, name="train")
    from llmcore.cli_eval import register as register_eval

    register_eval(app)
