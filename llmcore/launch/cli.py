"""`llmcore launch`: run `llmcore train ...` on several nodes through DeepSpeed's own launcher.

    llmcore launch --hostfile hostfile -- train pretrain --deepspeed zero2 --data ... --out ...

Before anything starts, the hostfile and the flags are checked (one-line errors), the training
settings are resolved exactly as `llmcore train` resolves them (so a DeepSpeed JSON that disagrees
with a flag fails here, naming both), and the plan is printed: hosts, global ranks, world size,
batch arithmetic. Then DeepSpeed's runner does the launching: over ssh (pdsh) from the first node,
or with `--no-ssh` as one invocation per node (`--node-rank R` on each).

Nothing a user wrote reaches a shell unchecked. DeepSpeed's pdsh runner joins its command for each
node's shell without quoting, so over ssh:
- host names must be host names, IPv4 or IPv6 addresses (no leading `-`: ssh would read it as an
  option), slots plain ASCII integers 1..1024, each error naming the hostfile line;
- the training command and the environment the run needs (WANDB_MODE, TORCH_EXTENSIONS_DIR, DS_*,
  NCCL_*/GLOO_*, the process-group timeout) travel as one base64 token to `python -m
  llmcore.launch.node`, which decodes them on each rank, so no node's shell reads a flag or a value;
- what DeepSpeed still puts into the shell command itself (the working dir, the variables it exports,
  `.deepspeed_env` lines) must hold only characters no shell interprets, else a one-line error.
`--dry-run` prints the exact shell command each node runs (built as DeepSpeed builds it) and starts
nothing. A `--no-ssh` node runs the runner as an argv list (no shell), with the environment passed directly.
"""

from __future__ import annotations

import base64
import collections
import ipaddress
import json
import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import typer

from llmcore.cli_train import parse_train_flags
from llmcore.errors import LLMCoreError

_LINE_RE = re.compile(r"^(\S+)\s+slots=(\S+)\s*$")
# A host name: dot-separated labels of ASCII letters, digits, `-` and `_`, never starting or ending
# with `-` (so never an ssh option); 253 characters at most.
_HOST_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9_-]{0,61}"
    r"[A-Za-z0-9])?)*$"
)
_SLOTS_RE = re.compile(r"^-?[0-9]+$")
MAX_SLOTS = 1024
# Characters that mean nothing to a POSIX shell (DeepSpeed's own "no quoting needed" set, less `%`,
# which pdsh substitutes): a value made only of these reaches a node's shell as itself.
_SHELL_SAFE = re.compile(r"[\w@+=:,./-]*", re.ASCII)
# Variables a run needs on every node, by exact name or prefix (NCCL_/GLOO_ tune the transports).
ENV_NAMES = (
    "WANDB_MODE",
    "WANDB_PROJECT",
    "WANDB_DIR",
    "WANDB_ENTITY",
    "TORCH_EXTENSIONS_DIR",
    "DS_BUILD_OPS",
    "DS_ACCELERATOR",
    "LLMCORE_DIST_TIMEOUT",
    "OMP_NUM_THREADS",
    "HF_HOME",
    "TP_SOCKET_IFNAME",
)
ENV_PREFIXES = ("NCCL_", "GLOO_")


def _is_host(name: str) -> bool:
    """A host name (`_HOST_RE`) or an IPv4/IPv6 address."""
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return bool(_HOST_RE.match(name))


def parse_hostfile(path: str | Path) -> "collections.OrderedDict[str, int]":
    """`HOST slots=N` per line (# comments, blank lines); one-line errors with the line number.

    HOST must be a host name or an IP address (never a leading `-`, a shell character or a control
    character), N a plain ASCII integer in 1..MAX_SLOTS, as DeepSpeed's own parser reads it."""
    p = Path(path)
    if p.is_dir():
        raise LLMCoreError(f"--hostfile {path}: is a directory, not a hostfile")
    if not p.is_file():
        raise LLMCoreError(f"--hostfile {path}: no such file")
    hosts: collections.OrderedDict[str, int] = collections.OrderedDict()
    for i, raw_bytes in enumerate(p.read_bytes().splitlines(), 1):
        try:
            raw = raw_bytes.decode("utf-8")
        except UnicodeDecodeError as err:
            raise LLMCoreError(f"--hostfile {path} line {i}: not UTF-8 text (byte {err.start})") from None
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE_RE.match(line)
        if not m:
            raise LLMCoreError(f"--hostfile {path} line {i}: expected 'HOST slots=N', got {raw.strip()[:80]!r}")
        host, slots_text = m.group(1), m.group(2)
        if not _is_host(host):
            raise LLMCoreError(
                f"--hostfile {path} line {i}: {host[:80]!r} is not a host name or IP address "
                "(letters, digits, '-', '_' and '.', not starting with '-')"
            )
        if not _SLOTS_RE.match(slots_text):
            raise LLMCoreError(f"--hostfile {path} line {i}: slots must be a whole number, got {slots_text[:40]!r}")
        slots = int(slots_text)
        if slots <= 0:
            raise LLMCoreError(f"--hostfile {path} line {i}: {host} has slots={slots}; each node needs at least one")
        if slots > MAX_SLOTS:
            raise LLMCoreError(f"--hostfile {path} line {i}: {host} has slots={slots}; at most {MAX_SLOTS} per node")
        if host in hosts:
            raise LLMCoreError(f"--hostfile {path} line {i}: {host} is listed twice; give each node one line")
        hosts[host] = slots
    if not hosts:
        raise LLMCoreError(f"--hostfile {path}: no hosts (expected lines like 'node1 slots=8')")
    return hosts


def check_master_addr(addr: str) -> str:
    """An IP address or a host name (no port, no scheme, no spaces)."""
    try:
        ipaddress.ip_address(addr)
        return addr
    except ValueError:
        pass
    if ":" in addr or "/" in addr or not _HOST_RE.match(addr):
        hint = " (give the port with --master-port)" if re.match(r"^[^:]+:\d+$", addr) else ""
        raise LLMCoreError(f"--master-addr {addr!r}: not an IP address or host name the nodes can reach{hint}")
    return addr


@dataclass
class Plan:
    hostfile: Path
    resources: "collections.OrderedDict[str, list[int]]"  # host -> local slot ids (after filters)
    master_addr: str
    master_port: int
    no_ssh: bool
    node_rank: int | None
    timeout: float
    train_args: list[str]
    stage: str = ""
    cfg: Any = None
    accum: int = 0
    env: dict[str, str] = field(default_factory=dict)
    filters: list[str] = field(default_factory=list)

    @property
    def world(self) -> int:
        return sum(len(v) for v in self.resources.values())

    def ranks(self) -> list[tuple[str, list[int]]]:
        out, first = [], 0
        for host, slots in self.resources.items():
            out.append((host, list(range(first, first + len(slots)))))
            first += len(slots)
        return out

    def world_info(self) -> str:
        return base64.urlsafe_b64encode(json.dumps(self.resources).encode()).decode()


def _filter_resources(
    hosts: "collections.OrderedDict[str, int]", include: str, exclude: str, num_nodes: int, num_gpus: int
) -> "collections.OrderedDict[str, list[int]]":
    if (include or exclude) and (num_nodes > 0 or num_gpus > 0):
        raise LLMCoreError("--include/--exclude and --num-nodes/--num-gpus cannot be combined; use one or the other")
    if include and exclude:
        raise LLMCoreError("--include and --exclude cannot be combined")
    resources = collections.OrderedDict((h, list(range(n))) for h, n in hosts.items())
    if include or exclude:
        from deepspeed.launcher.runner import parse_resource_filter

        try:
            resources = parse_resource_filter(
                collections.OrderedDict((h, list(range(n))) for h, n in hosts.items()),
                include_str=include,
                exclude_str=exclude,
            )
        except (ValueError, KeyError) as err:
            flag = "--include" if include else "--exclude"
            raise LLMCoreError(f"{flag} {include or exclude}: {err}") from None
        if not resources:
            raise LLMCoreError(f"--include/--exclude leave no hosts of {', '.join(hosts)}")
    if num_nodes > 0:
        if num_nodes > len(resources):
            raise LLMCoreError(
                f"--num-nodes {num_nodes}: the hostfile lists only {len(resources)} node(s) ({', '.join(resources)})"
            )
        resources = collections.OrderedDict(list(resources.items())[:num_nodes])
    if num_gpus > 0:
        short = [h for h, s in resources.items() if len(s) < num_gpus]
        if short:
            raise LLMCoreError(
                f"--num-gpus {num_gpus}: more than the hostfile's slots on "
                + ", ".join(f"{h} ({len(resources[h])})" for h in short)
            )
        resources = collections.OrderedDict((h, list(range(num_gpus))) for h in resources)
    return resources


def resolve_training(train_args: list[str]) -> tuple[str, Any]:
    """(stage, resolved TrainConfig) of `train STAGE FLAGS...`, parsed by the training command's own
    parser (`cli_train.parse_train_flags`), so every flag means what it means there."""
    if len(train_args) < 2 or train_args[0] != "train":
        raise LLMCoreError(
            "expected the training command after `--`, e.g. "
            "llmcore launch --hostfile H -- train pretrain --deepspeed zero2 --data D --out RUN"
        )
    stage = train_args[1]
    cfg = parse_train_flags(stage, train_args[2:])
    if cfg.deepspeed is None:
        raise LLMCoreError(
            "llmcore launch runs DeepSpeed: add --deepspeed NAME (zero1, zero2, zero3, zero3-offload) "
            "to the training flags"
        )
    return stage, cfg


def run_env(timeout: float, cpu: bool = False) -> dict[str, str]:
    """The variables each node's run gets (beside PYTHON*, which DeepSpeed forwards itself);
    `cpu`: the nodes have no GPUs (DeepSpeed's CPU accelerator, gloo)."""
    env = {k: v for k, v in os.environ.items() if k in ENV_NAMES or k.startswith(ENV_PREFIXES)}
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("DS_BUILD_OPS", "0")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    env["LLMCORE_DIST_TIMEOUT"] = f"{timeout:g}"
    if cpu:
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def _shell_safe(value: str) -> bool:
    return bool(_SHELL_SAFE.fullmatch(value))


def _ds_exported(name: str) -> bool:
    """Whether DeepSpeed's runner copies the variable `name` into each node's shell command."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.launcher.runner import EXPORT_ENVS

    return name.startswith(tuple(EXPORT_ENVS) + tuple(get_accelerator().export_envs()))


def deepspeed_env_lines() -> list[tuple[str, str]]:
    """`(KEY, VALUE)` of the `.deepspeed_env` files DeepSpeed's runner reads (home dir, then the working
    dir), checked: each line KEY=VALUE with a value no shell interprets, else a one-line error naming the
    file and line (DeepSpeed puts these values into each node's shell command, only double-quoted)."""
    # DeepSpeed's runner.py: DEEPSPEED_ENVIRONMENT_NAME / _PATHS, evaluated as the runner (a fresh
    # process with this environment) will evaluate them, not as they were when deepspeed was imported here.
    name = os.getenv("DS_ENV_FILE", ".deepspeed_env")
    out = []
    for d in (os.path.expanduser("~"), "."):
        path = Path(d) / name
        if not path.is_file():
            continue
        for i, raw in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), 1):
            if "=" not in raw:
                raise LLMCoreError(f"{path} line {i}: expected KEY=VALUE (DeepSpeed's launcher exports each line)")
            key, value = raw.split("=", 1)
            key, value = key.strip(), value.strip()
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) or not _shell_safe(value):
                raise LLMCoreError(
                    f"{path} line {i}: {key[:40]}={value[:40]!r} holds characters a shell interprets; "
                    "DeepSpeed's ssh launcher would run them on every node (remove the line)"
                )
            out.append((key, value))
    return out


def make_plan(
    hostfile: Path,
    train_args: list[str],
    include: str = "",
    exclude: str = "",
    num_nodes: int = -1,
    num_gpus: int = -1,
    master_addr: str | None = None,
    master_port: int = 29500,
    no_ssh: bool = False,
    node_rank: int | None = None,
    timeout: float = 600.0,
) -> Plan:
    """Check everything a launch needs, in order (hostfile, filters, master, node rank, training
    flags, DeepSpeed config vs flags); raises a one-line LLMCoreError on the first problem."""
    from llmcore.train.deepspeed_config import build_ds_config, deepspeed_config_path
    from llmcore.train.engine import resolve_dtype

    hosts = parse_hostfile(hostfile)
    resources = _filter_resources(hosts, include, exclude, num_nodes, num_gpus)
    if not 0 < master_port < 65536:
        raise LLMCoreError(f"--master-port {master_port}: expected a port in 1..65535")
    if not (timeout > 0 and math.isfinite(timeout)):
        raise LLMCoreError(f"--timeout {timeout:g}: must be a positive number of seconds")
    if no_ssh:
        if node_rank is None:
            raise LLMCoreError(
                f"--no-ssh: pass --node-rank (0..{len(resources) - 1}), this node's line in the hostfile"
            )
        if master_addr is None:
            raise LLMCoreError("--no-ssh: pass --master-addr, the address of node 0 that every node can reach")
    if node_rank is not None:
        if not no_ssh:
            raise LLMCoreError("--node-rank goes with --no-ssh (with ssh, the launcher starts every node itself)")
        if not 0 <= node_rank < len(resources):
            raise LLMCoreError(
                f"--node-rank {node_rank}: the hostfile has {len(resources)} node(s), so 0..{len(resources) - 1}"
            )
    if master_addr is None:
        master_addr = next(iter(resources))  # the first node; the ssh launcher reaches it by this name
    check_master_addr(master_addr)
    stage, cfg = resolve_training(train_args)
    plan = Plan(
        Path(hostfile), resources, master_addr, master_port, no_ssh, node_rank, timeout, list(train_args), stage, cfg
    )
    world = plan.world
    if cfg.global_batch_size % (cfg.micro_batch_size * world):
        raise LLMCoreError(
            f"--global-batch-size {cfg.global_batch_size} is not a multiple of --micro-batch-size "
            f"{cfg.micro_batch_size} x {world} process(es) = {cfg.micro_batch_size * world}"
        )
    plan.accum = cfg.global_batch_size // (cfg.micro_batch_size * world)
    # The precision the ranks will run: --dtype, or for `auto` the device's default. This node is
    # one of the nodes with --no-ssh; with ssh it may be a login node without GPUs, so then a
    # config is accepted when it fits either precision `auto` can become.
    import torch

    if cfg.dtype != "auto":
        dtypes = [cfg.dtype]
    elif cfg.device == "cpu" or os.environ.get("DS_ACCELERATOR") == "cpu":
        dtypes = ["fp32"]
    elif no_ssh or torch.cuda.is_available():
        dtypes = [resolve_dtype("auto", torch.device(_device_type()))]
    else:
        dtypes = ["bf16", "fp32"]
    errors = []
    for dtype in dtypes:
        try:
            build_ds_config(deepspeed_config_path(cfg.deepspeed), cfg, world, plan.accum, dtype)
            break
        except LLMCoreError as err:
            errors.append(err)
    else:
        raise errors[0]
    plan.env = run_env(timeout, cpu=cfg.device == "cpu" or (no_ssh and _device_type() == "cpu"))
    plan.filters = (
        ([f"--include={include}"] if include else [])
        + ([f"--exclude={exclude}"] if exclude else [])
        + ([f"--num_nodes={num_nodes}"] if num_nodes > 0 else [])
        + ([f"--num_gpus={num_gpus}"] if num_gpus > 0 else [])
    )
    return plan


def _device_type() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def describe(plan: Plan) -> str:
    cfg = plan.cfg
    mode = (
        (
            f"no ssh: this invocation is node {plan.node_rank} of {len(plan.resources)}; run the same command "
            f"with --node-rank 0..{len(plan.resources) - 1} on each node"
        )
        if plan.no_ssh
        else "ssh: DeepSpeed's launcher (pdsh) starts every node from here"
    )
    lines = [f"llmcore launch: {len(plan.resources)} node(s), world size {plan.world} ({mode})"]
    for i, (host, ranks) in enumerate(plan.ranks()):
        span = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        here = "  <- this node" if plan.no_ssh and i == plan.node_rank else ""
        lines.append(f"  node {i}: {host}, {len(ranks)} process(es), global ranks {span}{here}")
    lines.append(
        f"  master {plan.master_addr}:{plan.master_port}; a lost node stops the others within "
        f"{plan.timeout:g}s (LLMCORE_DIST_TIMEOUT)"
    )
    lines.append(
        f"  batch: global {cfg.global_batch_size} rows/step = micro {cfg.micro_batch_size} x accumulation "
        f"{plan.accum} x world {plan.world}; each rank: {plan.accum} micro batch(es) of {cfg.micro_batch_size}"
        f" per step"
    )
    lines.append(
        f"  train {plan.stage} --deepspeed {cfg.deepspeed} --out {cfg.out}" + (" (resume)" if cfg.resume else "")
    )
    lines.append("  env: " + " ".join(f"{k}={v}" for k, v in sorted(plan.env.items())))
    return "\n".join(lines)


NODE_MODULE = "llmcore.launch.node"


def runner_command(plan: Plan, node_rank: int | None = None) -> list[str]:
    """The DeepSpeed runner invocation (`node_rank`: the --no-ssh one of that node). Over ssh the
    training command and environment go as one base64 token to `llmcore.launch.node` (no node's shell
    reads them); a --no-ssh node runs it as an argv list, so the flags go as they are."""
    from llmcore.launch.node import encode_payload

    cmd = [
        sys.executable,
        "-u",
        "-m",
        "deepspeed.launcher.runner",
        "--hostfile",
        str(plan.hostfile),
        *plan.filters,
        f"--master_addr={plan.master_addr}",
        f"--master_port={plan.master_port}",
    ]
    if plan.no_ssh:
        cmd += ["--no_ssh", f"--node_rank={node_rank if node_rank is not None else plan.node_rank}"]
        return cmd + ["--module", "llmcore", *plan.train_args]
    return cmd + ["--module", NODE_MODULE, encode_payload(plan.train_args, plan.env)]


def _over_ssh(plan: Plan) -> bool:
    """Whether DeepSpeed's runner starts the nodes through pdsh/ssh (a shell on each node)."""
    return not plan.no_ssh and len(plan.resources) > 1


def runner_env(plan: Plan) -> dict[str, str]:
    """The environment `llmcore launch` gives DeepSpeed's runner.

    With --no-ssh (argv lists, no shell) it is this process's environment plus the run's. Over ssh the
    run's variables travel in the payload, and a value DeepSpeed would paste into the node's shell
    command must be shell-safe: the run's own unsafe values are left out (the payload has them), any
    other exported variable holding shell characters is a one-line error, and so is a working dir whose
    path has them (DeepSpeed writes `cd DIR;` and PYTHONPATH=DIR unquoted)."""
    env = {**os.environ, **plan.env}
    if not _over_ssh(plan):
        return env
    cwd = os.path.abspath(".")
    if not _shell_safe(cwd):
        raise LLMCoreError(
            f"working dir {cwd!r}: DeepSpeed's ssh launcher puts it unquoted into each node's shell "
            "command; launch from a dir whose path holds only letters, digits and @+=:,./-_"
        )
    for k, v in plan.env.items():
        if not _shell_safe(v):
            env.pop(k)
    for k, v in env.items():
        if _ds_exported(k) and not _shell_safe(v) and k != "PYTHONPATH":
            raise LLMCoreError(
                f"environment variable {k}={v[:40]!r} holds characters a shell interprets; DeepSpeed's "
                "ssh launcher would run them on every node (unset it or use --no-ssh)"
            )
    if not _shell_safe(env.get("PYTHONPATH", "")):
        raise LLMCoreError(
            f"PYTHONPATH={env['PYTHONPATH'][:60]!r} holds characters a shell interprets; DeepSpeed's "
            "ssh launcher would run them on every node (unset it or use --no-ssh)"
        )
    deepspeed_env_lines()  # checked here, so a bad line fails before anything starts
    return env


def node_commands(plan: Plan) -> list[tuple[str, str]]:
    """(host, the exact shell command that node runs) for every node.

    Over ssh this is the string DeepSpeed's pdsh runner sends (its exports, `cd`, the per-node launcher
    with that node's rank in place of pdsh's `%n`); every piece is shell-safe by `runner_env`'s checks, so
    the node's shell runs it as printed. With --no-ssh, each node's `llmcore launch` runs the runner as
    an argv list; it is shown shell-quoted."""
    from llmcore.launch.node import encode_payload

    out = []
    env_words = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(plan.env.items()))
    if plan.no_ssh:
        for i, host in enumerate(plan.resources):
            out.append((host, f"env {env_words} {shlex.join(runner_command(plan, i))}"))
        return out
    if not _over_ssh(plan):  # one host: DeepSpeed starts its launcher here as an argv list
        cmd = [
            sys.executable,
            "-u",
            "-m",
            "deepspeed.launcher.launch",
            f"--world_info={plan.world_info()}",
            f"--master_addr={plan.master_addr}",
            f"--master_port={plan.master_port}",
            "--module",
            NODE_MODULE,
            encode_payload(plan.train_args, plan.env),
        ]
        return [(next(iter(plan.resources)), f"env {env_words} {shlex.join(cmd)}")]
    # Built by DeepSpeed's own PDSHRunner from the runner's own arguments and environment, as its
    # runner.main builds it (PYTHONPATH, the exported variables, .deepspeed_env), so it is the string
    # pdsh sends; every piece is shell-safe by runner_env's checks.
    from deepspeed.launcher.multinode_runner import PDSHRunner
    from deepspeed.launcher.runner import EXCLUDE_ENVS, parse_args

    env = runner_env(plan)
    cwd = os.path.abspath(".")
    env["PYTHONPATH"] = cwd + (":" + env["PYTHONPATH"] if "PYTHONPATH" in env else "")
    args = parse_args(runner_command(plan)[4:])
    runner = PDSHRunner(args, plan.world_info())
    excluded = [v for key, names in EXCLUDE_ENVS.items() if key in env for v in names]
    for k, v in env.items():
        if _ds_exported(k) and k not in excluded:
            runner.add_export(k, v)
    for k, v in deepspeed_env_lines():
        runner.add_export(k, v)
    cmd, _, _ = runner.get_cmd(dict(env), plan.resources)
    remote = " ".join(cmd[cmd.index("-w") + 2 :])  # pdsh joins its command words with spaces
    return [(host, remote.replace("%n", str(i))) for i, host in enumerate(plan.resources)]


def launch_command(
    ctx: typer.Context,
    hostfile: Path = typer.Option(..., "--hostfile", help="DeepSpeed hostfile: one 'HOST slots=N' line per node."),
    include: str = typer.Option("", "--include", help="Only these hosts/slots, DeepSpeed syntax: 'node1@node2:0,1'."),
    exclude: str = typer.Option("", "--exclude", help="Leave out these hosts/slots (same syntax)."),
    num_nodes: int = typer.Option(-1, "--num-nodes", help="Use the first N hosts of the hostfile.", show_default=False),
    num_gpus: int = typer.Option(-1, "--num-gpus", help="Processes per node (default: its slots).", show_default=False),
    master_addr: Optional[str] = typer.Option(
        None, "--master-addr", help="Address of node 0 that all nodes reach (default: the first host)."
    ),
    master_port: int = typer.Option(29500, "--master-port", help="Free TCP port on node 0."),
    no_ssh: bool = typer.Option(
        False, "--no-ssh", help="Start only this node (run the command on every node with its own --node-rank)."
    ),
    node_rank: Optional[int] = typer.Option(
        None, "--node-rank", help="With --no-ssh: this node's line in the hostfile, from 0."
    ),
    timeout: float = typer.Option(
        600.0, "--timeout", help="Seconds a collective waits for a silent node before the run stops with an error."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Check, print the plan and each node's command; start nothing."
    ),
) -> None:
    """Run `llmcore train ...` on the nodes of a DeepSpeed hostfile (the training command follows `--`).

    Example: llmcore launch --hostfile hostfile -- train pretrain --deepspeed zero2 --data shards/pretrain --out runs/pre
    """
    plan = make_plan(
        hostfile,
        list(ctx.args),
        include,
        exclude,
        num_nodes,
        num_gpus,
        master_addr,
        master_port,
        no_ssh,
        node_rank,
        timeout,
    )
    typer.echo(describe(plan))
    if dry_run:
        typer.echo("commands (dry run, nothing started):")
        for i, (host, cmd) in enumerate(node_commands(plan)):
            typer.echo(f"[node {i}: {host}] {cmd}")
        if not plan.no_ssh:
            typer.echo(f"[started here] {shlex.join(runner_command(plan))}")
            typer.echo(
                "(the base64 token is `python -m llmcore.launch.node`'s input: "
                + " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(plan.env.items()))
                + " llmcore "
                + shlex.join(plan.train_args)
                + ")"
            )
        return
    env = runner_env(plan)
    sys.stdout.flush()
    proc = subprocess.run(runner_command(plan), env=env)
    if proc.returncode != 0:
        where = f"node {plan.node_rank}" if plan.no_ssh else "the launch"
        raise LLMCoreError(
            f"training failed on {where} (exit {proc.returncode}; the message is above); fix the "
            "cause and rerun with --resume in the training flags to continue from the last checkpoint"
        )


def register(app: typer.Typer) -> None:
    app.command("launch", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(launch_command)


__all__ = [
    "parse_hostfile",
    "check_master_addr",
    "make_plan",
    "describe",
    "node_commands",
    "runner_command",
    "runner_env",
    "deepspeed_env_lines",
    "register",
]
