"""`llmcore launch`: run `llmcore train ...` on several nodes through DeepSpeed's own launcher.

    llmcore launch --hostfile hostfile -- train pretrain --deepspeed zero2 --data ... --out ...

Before anything starts, the hostfile and the flags are checked (one-line errors), the training
settings are resolved exactly as `llmcore train` resolves them (so a DeepSpeed JSON that disagrees
with a flag fails here, naming both), and the plan is printed: hosts, global ranks, world size,
batch arithmetic. Then DeepSpeed's runner does the launching: over ssh (pdsh) from the first node,
or with `--no-ssh` as one invocation per node (`--node-rank R` on each). The environment the run
needs (WANDB_MODE, TORCH_EXTENSIONS_DIR, DS_*, NCCL_*/GLOO_* and the process-group timeout) is
written to `.deepspeed_env` for the ssh launcher and passed directly to a `--no-ssh` node.
`--dry-run` prints the exact command each node runs and starts nothing.
"""

from __future__ import annotations

import base64
import collections
import ipaddress
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import typer

from llmcore.errors import LLMCoreError

_LINE_RE = re.compile(r"^(\S+)\s+slots=(\S+)\s*$")
_HOST_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}"
                      r"[A-Za-z0-9])?)*$")
# Variables a run needs on every node, by exact name or prefix (NCCL_/GLOO_ tune the transports).
ENV_NAMES = ("WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "WANDB_ENTITY", "TORCH_EXTENSIONS_DIR", "DS_BUILD_OPS",
             "DS_ACCELERATOR", "LLMCORE_DIST_TIMEOUT", "OMP_NUM_THREADS", "HF_HOME", "TP_SOCKET_IFNAME")
ENV_PREFIXES = ("NCCL_", "GLOO_")


def parse_hostfile(path: str | Path) -> "collections.OrderedDict[str, int]":
    """`HOST slots=N` per line (# comments, blank lines); one-line errors with the line number."""
    p = Path(path)
    if not p.is_file():
        raise LLMCoreError(f"--hostfile {path}: no such file")
    hosts: collections.OrderedDict[str, int] = collections.OrderedDict()
    for i, raw in enumerate(p.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE_RE.match(line)
        if not m:
            raise LLMCoreError(f"--hostfile {path} line {i}: expected 'HOST slots=N', got {raw.strip()!r}")
        host, slots_text = m.group(1), m.group(2)
        try:
            slots = int(slots_text)
        except ValueError:
            raise LLMCoreError(f"--hostfile {path} line {i}: slots must be a whole number, got {slots_text!r}") from None
        if slots <= 0:
            raise LLMCoreError(f"--hostfile {path} line {i}: {host} has slots={slots}; each node needs at least one")
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


def _filter_resources(hosts: "collections.OrderedDict[str, int]", include: str, exclude: str, num_nodes: int,
                      num_gpus: int) -> "collections.OrderedDict[str, list[int]]":
    if (include or exclude) and (num_nodes > 0 or num_gpus > 0):
        raise LLMCoreError("--include/--exclude and --num-nodes/--num-gpus cannot be combined; use one or the other")
    if include and exclude:
        raise LLMCoreError("--include and --exclude cannot be combined")
    resources = collections.OrderedDict((h, list(range(n))) for h, n in hosts.items())
    if include or exclude:
        from deepspeed.launcher.runner import parse_resource_filter

        try:
            resources = parse_resource_filter(collections.OrderedDict((h, list(range(n))) for h, n in hosts.items()),
                                              include_str=include, exclude_str=exclude)
        except (ValueError, KeyError) as err:
            flag = "--include" if include else "--exclude"
            raise LLMCoreError(f"{flag} {include or exclude}: {err}") from None
        if not resources:
            raise LLMCoreError(f"--include/--exclude leave no hosts of {', '.join(hosts)}")
    if num_nodes > 0:
        if num_nodes > len(resources):
            raise LLMCoreError(f"--num-nodes {num_nodes}: the hostfile lists only {len(resources)} node(s) "
                               f"({', '.join(resources)})")
        resources = collections.OrderedDict(list(resources.items())[:num_nodes])
    if num_gpus > 0:
        short = [h for h, s in resources.items() if len(s) < num_gpus]
        if short:
            raise LLMCoreError(f"--num-gpus {num_gpus}: more than the hostfile's slots on "
                               + ", ".join(f"{h} ({len(resources[h])})" for h in short))
        resources = collections.OrderedDict((h, list(range(num_gpus))) for h in resources)
    return resources


def resolve_training(train_args: list[str]) -> tuple[str, Any]:
    """(stage, resolved TrainConfig) of `train STAGE FLAGS...`, parsed by the same command
    `llmcore train` uses, so every flag means what it means there."""
    from llmcore.cli import app
    from llmcore.train import build_config

    if len(train_args) < 2 or train_args[0] != "train":
        raise LLMCoreError("expected the training command after `--`, e.g. "
                           "llmcore launch --hostfile H -- train pretrain --deepspeed zero2 --data D --out RUN")
    stage = train_args[1]
    group = typer.main.get_command(app)
    train_group = group.commands["train"]  # type: ignore[attr-defined]
    cmd = train_group.commands.get(stage)
    if cmd is None:
        raise LLMCoreError(f"train {stage}: unknown stage; expected one of {', '.join(train_group.commands)}")
    try:
        ctx = cmd.make_context(f"llmcore train {stage}", list(train_args[2:]))
    except Exception as err:  # click's (or typer's vendored click's) usage errors
        if not hasattr(err, "format_message"):
            raise
        raise LLMCoreError(f"train {stage}: {err.format_message()}") from None
    params = dict(ctx.params)
    config_file = params.pop("config", None)
    params.pop("print_config", None)
    flags = {k: (str(v) if isinstance(v, Path) else v) for k, v in params.items()}
    cfg = build_config(stage, flags, config_file)
    if cfg.deepspeed is None:
        raise LLMCoreError("llmcore launch runs DeepSpeed: add --deepspeed NAME (zero1, zero2, zero3, zero3-offload) "
                           "to the training flags")
    if not cfg.out:
        raise LLMCoreError(f"train {stage}: --out is required")
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


def write_deepspeed_env(path: Path, env: dict[str, str]) -> Path:
    """Merge `env` into DeepSpeed's `.deepspeed_env` (KEY=VALUE lines, which its ssh launcher exports
    on every node); other lines already there are kept."""
    from llmcore.io import write_text

    lines: list[str] = []
    if path.is_file():
        for line in path.read_text().splitlines():
            key = line.split("=", 1)[0].strip()
            if line.strip() and "=" in line and key not in env:
                lines.append(line.strip())
    lines += [f"{k}={v}" for k, v in sorted(env.items())]
    write_text(path, "\n".join(lines) + "\n")
    return path


def make_plan(hostfile: Path, train_args: list[str], include: str = "", exclude: str = "", num_nodes: int = -1,
              num_gpus: int = -1, master_addr: str | None = None, master_port: int = 29500, no_ssh: bool = False,
              node_rank: int | None = None, timeout: float = 600.0) -> Plan:
    """Check everything a launch needs, in order (hostfile, filters, master, node rank, training
    flags, DeepSpeed config vs flags); raises a one-line LLMCoreError on the first problem."""
    from llmcore.launch import deepspeed_config_path
    from llmcore.train.engine import build_ds_config, resolve_dtype

    hosts = parse_hostfile(hostfile)
    resources = _filter_resources(hosts, include, exclude, num_nodes, num_gpus)
    if not 0 < master_port < 65536:
        raise LLMCoreError(f"--master-port {master_port}: expected a port in 1..65535")
    if timeout <= 0:
        raise LLMCoreError(f"--timeout {timeout:g}: must be positive (seconds)")
    if no_ssh:
        if node_rank is None:
            raise LLMCoreError(f"--no-ssh: pass --node-rank (0..{len(resources) - 1}), this node's line in the hostfile")
        if master_addr is None:
            raise LLMCoreError("--no-ssh: pass --master-addr, the address of node 0 that every node can reach")
    if node_rank is not None:
        if not no_ssh:
            raise LLMCoreError("--node-rank goes with --no-ssh (with ssh, the launcher starts every node itself)")
        if not 0 <= node_rank < len(resources):
            raise LLMCoreError(f"--node-rank {node_rank}: the hostfile has {len(resources)} node(s), so 0.."
                               f"{len(resources) - 1}")
    if master_addr is None:
        master_addr = next(iter(resources))  # the first node; the ssh launcher reaches it by this name
    check_master_addr(master_addr)
    stage, cfg = resolve_training(train_args)
    plan = Plan(Path(hostfile), resources, master_addr, master_port, no_ssh, node_rank, timeout, list(train_args),
                stage, cfg)
    world = plan.world
    if cfg.global_batch_size % (cfg.micro_batch_size * world):
        raise LLMCoreError(f"--global-batch-size {cfg.global_batch_size} is not a multiple of --micro-batch-size "
                           f"{cfg.micro_batch_size} x {world} process(es) = {cfg.micro_batch_size * world}")
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
    plan.filters = ([f"--include={include}"] if include else []) + ([f"--exclude={exclude}"] if exclude else []) \
        + ([f"--num_nodes={num_nodes}"] if num_nodes > 0 else []) + ([f"--num_gpus={num_gpus}"] if num_gpus > 0 else [])
    return plan


def _device_type() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def describe(plan: Plan) -> str:
    cfg = plan.cfg
    mode = (f"no ssh: this invocation is node {plan.node_rank} of {len(plan.resources)}; run the same command "
            f"with --node-rank 0..{len(plan.resources) - 1} on each node") if plan.no_ssh else \
        "ssh: DeepSpeed's launcher (pdsh) starts every node from here"
    lines = [f"llmcore launch: {len(plan.resources)} node(s), world size {plan.world} ({mode})"]
    for i, (host, ranks) in enumerate(plan.ranks()):
        span = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        here = "  <- this node" if plan.no_ssh and i == plan.node_rank else ""
        lines.append(f"  node {i}: {host}, {len(ranks)} process(es), global ranks {span}{here}")
    lines.append(f"  master {plan.master_addr}:{plan.master_port}; a lost node stops the others within "
                 f"{plan.timeout:g}s (LLMCORE_DIST_TIMEOUT)")
    lines.append(f"  batch: global {cfg.global_batch_size} rows/step = micro {cfg.micro_batch_size} x accumulation "
                 f"{plan.accum} x world {plan.world}; each rank: {plan.accum} micro batch(es) of {cfg.micro_batch_size}"
                 f" per step")
    lines.append(f"  train {plan.stage} --deepspeed {cfg.deepspeed} --out {cfg.out}" + (" (resume)" if cfg.resume else ""))
    lines.append("  env: " + " ".join(f"{k}={v}" for k, v in sorted(plan.env.items())))
    return "\n".join(lines)


def runner_command(plan: Plan, node_rank: int | None = None) -> list[str]:
    """The DeepSpeed runner invocation (`node_rank`: the --no-ssh one of that node)."""
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--hostfile", str(plan.hostfile),
           *plan.filters, f"--master_addr={plan.master_addr}", f"--master_port={plan.master_port}"]
    if plan.no_ssh:
        cmd += ["--no_ssh", f"--node_rank={node_rank if node_rank is not None else plan.node_rank}"]
    return cmd + ["--module", "llmcore", *plan.train_args]


def node_commands(plan: Plan) -> list[tuple[str, str]]:
    """(host, the exact shell command that node runs) for every node."""
    cwd = shlex.quote(os.getcwd())
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(plan.env.items()))
    out = []
    for i, host in enumerate(plan.resources):
        if plan.no_ssh:
            cmd = shlex.join(runner_command(plan, i))
        else:
            # What DeepSpeed's pdsh runner executes on each node (%n = that node's rank).
            cmd = shlex.join([sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={plan.world_info()}",
                              f"--node_rank={i}", f"--master_addr={plan.master_addr}",
                              f"--master_port={plan.master_port}", "--module", "llmcore", *plan.train_args])
        out.append((host, f"cd {cwd} && env {exports} {cmd}"))
    return out


def launch_command(
    ctx: typer.Context,
    hostfile: Path = typer.Option(..., "--hostfile", help="DeepSpeed hostfile: one 'HOST slots=N' line per node."),
    include: str = typer.Option("", "--include", help="Only these hosts/slots, DeepSpeed syntax: 'node1@node2:0,1'."),
    exclude: str = typer.Option("", "--exclude", help="Leave out these hosts/slots (same syntax)."),
    num_nodes: int = typer.Option(-1, "--num-nodes", help="Use the first N hosts of the hostfile.",
                                   show_default=False),
    num_gpus: int = typer.Option(-1, "--num-gpus", help="Processes per node (default: its slots).",
                                  show_default=False),
    master_addr: Optional[str] = typer.Option(None, "--master-addr", help="Address of node 0 that all nodes reach "
                                                                       "(default: the first host)."),
    master_port: int = typer.Option(29500, "--master-port", help="Free TCP port on node 0."),
    no_ssh: bool = typer.Option(False, "--no-ssh", help="Start only this node (run the command on every node "
                                                        "with its own --node-rank)."),
    node_rank: Optional[int] = typer.Option(None, "--node-rank", help="With --no-ssh: this node's line in the "
                                                                      "hostfile, from 0."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds a collective waits for a silent node before "
                                                           "the run stops with an error."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check, print the plan and each node's command; "
                                                          "start nothing."),
) -> None:
    """Run `llmcore train ...` on the nodes of a DeepSpeed hostfile (the training command follows `--`).

    Example: llmcore launch --hostfile hostfile -- train pretrain --deepspeed zero2 --data shards/pretrain --out runs/pre
    """
    plan = make_plan(hostfile, list(ctx.args), include, exclude, num_nodes, num_gpus, master_addr, master_port,
                     no_ssh, node_rank, timeout)
    typer.echo(describe(plan))
    if dry_run:
        typer.echo("commands (dry run, nothing started):")
        for i, (host, cmd) in enumerate(node_commands(plan)):
            typer.echo(f"[node {i}: {host}] {cmd}")
        if not plan.no_ssh:
            typer.echo(f"[started here] {shlex.join(runner_command(plan))}")
        return
    env = {**os.environ, **plan.env}
    if not plan.no_ssh and len(plan.resources) > 1:  # one host: DeepSpeed starts it locally, env as is
        path = write_deepspeed_env(Path(".deepspeed_env"), plan.env)
        typer.echo(f"  wrote {path} ({len(plan.env)} variables the ssh launcher exports on every node)")
    sys.stdout.flush()
    proc = subprocess.run(runner_command(plan), env=env)
    if proc.returncode != 0:
        where = f"node {plan.node_rank}" if plan.no_ssh else "the launch"
        raise LLMCoreError(f"training failed on {where} (exit {proc.returncode}; the message is above); fix the "
                           "cause and rerun with --resume in the training flags to continue from the last checkpoint")


def register(app: typer.Typer) -> None:
    app.command("launch", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(launch_command)


__all__ = ["parse_hostfile", "check_master_addr", "make_plan", "describe", "node_commands", "runner_command",
           "write_deepspeed_env", "register"]
