"""What each rank of an `llmcore launch` over ssh runs: `python -m llmcore.launch.node PAYLOAD`.

DeepSpeed's pdsh runner pastes its arguments into each node's shell command without quoting, so
`llmcore launch` never gives it a training flag or an environment value: both travel as one token,
`llmcore1.` + URL-safe base64 of `{"argv": [...], "env": {...}}`, which holds no character a shell
or pdsh interprets. This module decodes it, sets the environment before anything reads it (torch,
NCCL, wandb), and runs `llmcore` with the decoded arguments (after the launcher's `--local_rank=N`,
which `llmcore.cli.main` consumes).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import sys

PREFIX = "llmcore1."


def encode_payload(argv: list[str], env: dict[str, str]) -> str:
    """The shell-safe token carrying a training command and its environment."""
    data = json.dumps({"argv": list(argv), "env": dict(env)}, ensure_ascii=True, separators=(",", ":"))
    return PREFIX + base64.urlsafe_b64encode(data.encode("ascii")).decode("ascii")


def decode_payload(token: str) -> tuple[list[str], dict[str, str]]:
    """`(argv, env)` of a token from `encode_payload`; anything else is an LLMCoreError."""
    from llmcore.errors import LLMCoreError

    try:
        if not token.startswith(PREFIX):
            raise ValueError("no prefix")
        obj = json.loads(base64.urlsafe_b64decode(token[len(PREFIX) :].encode("ascii")))
        argv, env = obj["argv"], obj["env"]
        if not (
            isinstance(argv, list)
            and all(isinstance(a, str) for a in argv)
            and isinstance(env, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
        ):
            raise ValueError("wrong types")
    except (ValueError, KeyError, TypeError, UnicodeError, binascii.Error) as err:
        raise LLMCoreError(f"llmcore.launch.node: not a launch payload ({err})") from None
    return argv, env


def main(args: list[str] | None = None) -> None:
    """Entry point of a rank: like `llmcore` itself, a bad payload is one line on stderr and exit 2."""
    import typer

    from llmcore.errors import LLMCoreError

    args = sys.argv[1:] if args is None else list(args)
    try:
        if not args:
            raise LLMCoreError("llmcore.launch.node expects the payload from `llmcore launch`")
        argv, env = decode_payload(args[-1])
    except LLMCoreError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    os.environ.update(env)
    from llmcore.cli import main as llmcore_main

    llmcore_main(args[:-1] + argv)


if __name__ == "__main__":
    main()
