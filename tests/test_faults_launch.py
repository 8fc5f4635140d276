"""Hostile input to `llmcore launch` (reliability round 3, LH-*, LX-*, LM-*): host names that are ssh
options or shell code, odd slots, flags and environment values with `$(...)`. The real launch runs
DeepSpeed's runner against a stand-in `pdsh` that does what each node's sshd does (joins the command
and runs it with `sh -c`), with the per-node launcher replaced by a recorder, so no training starts."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest

from llmcore.errors import LLMCoreError
from llmcore.launch.cli import make_plan, node_commands, parse_hostfile
from llmcore.launch.node import decode_payload, encode_payload

ROOT = Path(__file__).resolve().parents[1]


def _hostfile(tmp_path: Path, text: str | bytes) -> Path:
    p = tmp_path / "hostfile"
    p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return p


@pytest.mark.parametrize(
    "line, message",
    [
        ("-oProxyCommand=touch${IFS}/tmp/PWNED slots=1", "is not a host name or IP address"),  # LH-proxy
        ("node2;touch${IFS}x slots=1", "is not a host name or IP address"),  # LH-semicolon
        ("$(touch${IFS}x) slots=1", "is not a host name or IP address"),  # LH-dollar
        ("`id` slots=1", "is not a host name or IP address"),  # LH-backtick
        ("nöde slots=1", "is not a host name or IP address"),  # LH-unicode
        ("node\x1b[31m slots=1", "is not a host name or IP address"),  # LH-escape
        ("a" * 5000 + " slots=1", "is not a host name or IP address"),  # LH-longhost
        ("node-.x slots=1", "is not a host name or IP address"),
        ("node2 slots=1_000", "slots must be a whole number, got '1_000'"),  # LH-slots_underscore
        ("node2 slots=\u0663", "slots must be a whole number"),  # LH-slots_arabic
        ("node2 slots=99999999999", "at most 1024 per node"),  # LH-slots_huge
    ],
)
def test_bad_hosts_and_slots_are_one_line_errors_naming_the_line(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(LLMCoreError) as err:
        parse_hostfile(_hostfile(tmp_path, "node1 slots=1\n" + line + "\n"))
    text = str(err.value)
    assert "line 2: " in text and message in text and "\n" not in text and "\x1b" not in text and len(text) < 400


def test_good_host_forms(tmp_path: Path) -> None:
    hosts = parse_hostfile(
        _hostfile(tmp_path, "node-1.cluster.local slots=8\n10.0.0.2 slots=4\nfe80::1 slots=2\ngpu_node_3 slots=1\n")
    )
    assert list(hosts.items()) == [("node-1.cluster.local", 8), ("10.0.0.2", 4), ("fe80::1", 2), ("gpu_node_3", 1)]


def test_binary_hostfile_and_directory(tmp_path: Path) -> None:
    """LH-binary, LH-adir."""
    with pytest.raises(LLMCoreError, match="line 1: not UTF-8 text"):
        parse_hostfile(_hostfile(tmp_path, b"node1 slots=1 \xd0\xff\n"))
    with pytest.raises(LLMCoreError, match="is a directory"):
        parse_hostfile(tmp_path)


def test_timeout_nan_is_refused(shards, tmp_path: Path) -> None:
    """LM-timeout-nan."""
    hf = _hostfile(tmp_path, "node1 slots=1\nnode2 slots=1\n")
    with pytest.raises(LLMCoreError, match="--timeout nan"):
        make_plan(
            hf,
            [
                "train",
                "pretrain",
                "--deepspeed",
                "zero2",
                "--data",
                str(shards["pretrain"]),
                "--out",
                str(tmp_path / "r"),
                "--model",
                "tiny",
            ],
            master_addr="10.0.0.1",
            timeout=float("nan"),
        )


def test_payload_roundtrip_is_shell_safe() -> None:
    argv = ["train", "pretrain", "--out", "runs/x$(touch y)`id`;'\"\n%n"]
    env = {"WANDB_PROJECT": "p$(touch z)", "NCCL_DEBUG": "INFO\nLD_PRELOAD=/x.so"}
    token = encode_payload(argv, env)
    assert shlex.quote(token) == token and "%" not in token
    assert decode_payload(token) == (argv, env)
    with pytest.raises(LLMCoreError, match="not a launch payload"):
        decode_payload("llmcore1.!!!")


FAKE_PDSH = r"""#!/bin/bash
# Stand-in for pdsh: record the remote command, then run it once per host with sh -c, as each node's
# sshd would, with %n replaced by the node's rank and the DeepSpeed per-node launcher replaced by a
# recorder of its argv.
while [ $# -gt 0 ]; do case "$1" in -S) shift;; -f) shift 2;; -w) hosts=$2; shift 2;; *) break;; esac; done
cmd="$*"
printf '%s' "$cmd" > "$LOG_DIR/pdsh_cmd"
IFS=, read -ra H <<< "$hosts"; i=0
for h in "${H[@]}"; do
  c="${cmd//%n/$i}"
  printf '%s' "$c" > "$LOG_DIR/node$i.cmd"
  c="${c//$PYEXE -u -m deepspeed.launcher.launch/$RECORD $LOG_DIR/node$i.argv}"
  sh -c "$c"; i=$((i+1))
done
"""

RECORD = """#!/bin/sh
out=$1; shift
for a in "$@"; do printf '%s\\n' "$a"; done > "$out"
env > "$out.env"
"""


def _main(args: list[str]) -> None:
    """`llmcore ARGS` in this process (click exits 0 on success)."""
    from llmcore.cli import main

    with pytest.raises(SystemExit) as ex:
        main(args)
    assert ex.value.code in (0, None)


def test_ssh_launch_runs_no_flag_or_env_value_in_a_shell_and_dry_run_prints_what_runs(
    shards, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """LX-args-inject, LX-args-dryrun, LM-dsenv-newline: over ssh the node's shell never evaluates a training
    flag or an environment value, and --dry-run shows the very command each node's shell runs."""
    pytest.importorskip("deepspeed", reason="deepspeed not installed")
    bin_dir, logs, work = tmp_path / "bin", tmp_path / "logs", tmp_path / "work"
    for d in (bin_dir, logs, work):
        d.mkdir()
    (bin_dir / "ssh").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "pdsh").write_text(FAKE_PDSH)
    (bin_dir / "record").write_text(RECORD)
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    hf = _hostfile(work, "node1 slots=1\nnode2 slots=1\n")
    evil_out = f"runs/L2$(touch {tmp_path}/PWNED_args)"
    train = [
        "train",
        "pretrain",
        "--deepspeed",
        "zero2",
        "--data",
        str(shards["pretrain"]),
        "--model",
        "tiny",
        "--out",
        evil_out,
        "--seq-len",
        "64",
        "--micro-batch-size",
        "1",
        "--global-batch-size",
        "2",
        "--max-steps",
        "1",
    ]
    for k in list(os.environ):
        if k.startswith(("NCCL_", "WANDB_")):
            monkeypatch.delenv(k)
    env = dict(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        LOG_DIR=str(logs),
        PYEXE=sys.executable,
        RECORD=str(bin_dir / "record"),
        WANDB_PROJECT=f"p$(touch {tmp_path}/PWNED_env)",
        NCCL_DEBUG=f"INFO\nLD_PRELOAD={tmp_path}/evil.so",
        HOME=str(tmp_path / "home"),
        DS_ACCELERATOR="cpu",
    )
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(work)
    launch = ["launch", "--hostfile", str(hf), "--master-addr", "127.0.0.1"]
    _main([*launch, "--dry-run", "--", *train])
    printed = [line.split("] ", 1)[1] for line in capsys.readouterr().out.splitlines() if line.startswith("[node ")]
    _main([*launch, "--", *train])  # DeepSpeed's runner, then the stand-in pdsh, run for real
    assert not list(tmp_path.glob("PWNED*")), "a value ran in a node's shell"
    assert not (work / ".deepspeed_env").exists()
    for i in range(2):
        assert (logs / f"node{i}.cmd").read_text() == printed[i]  # the dry run shows exactly what runs
        argv = (logs / f"node{i}.argv").read_text().splitlines()
        assert f"--node_rank={i}" in argv and argv[-2] == "llmcore.launch.node"
        got_train, got_env = decode_payload(argv[-1])
        assert got_train == train  # --out arrives byte for byte, `$(...)` included
        assert got_env["WANDB_PROJECT"] == env["WANDB_PROJECT"] and got_env["NCCL_DEBUG"] == env["NCCL_DEBUG"]
        node_env = (logs / f"node{i}.argv.env").read_text()
        assert "LD_PRELOAD" not in node_env  # the newline in NCCL_DEBUG did not become a second export


def test_a_proxycommand_host_never_reaches_ssh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """LX-proxycommand: the hostfile is refused before DeepSpeed's ssh check could run the option."""
    from llmcore.cli import main

    hf = _hostfile(tmp_path, f"-oProxyCommand=touch${{IFS}}{tmp_path}/PWNED_proxy slots=1\nnode2 slots=1\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as ex:
        main(
            [
                "launch",
                "--hostfile",
                str(hf),
                "--master-addr",
                "127.0.0.1",
                "--",
                "train",
                "pretrain",
                "--deepspeed",
                "zero2",
                "--data",
                "x",
                "--out",
                "y",
            ]
        )
    err = capsys.readouterr().err
    assert ex.value.code == 2 and err.startswith("error: --hostfile") and "line 1" in err and err.count("\n") == 1
    assert not (tmp_path / "PWNED_proxy").exists()


def test_unsafe_exported_variable_and_working_dir_are_refused_over_ssh(
    shards, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("deepspeed", reason="deepspeed not installed")
    hf = _hostfile(tmp_path, "node1 slots=1\nnode2 slots=1\n")
    train = [
        "train",
        "pretrain",
        "--deepspeed",
        "zero2",
        "--data",
        str(shards["pretrain"]),
        "--out",
        str(tmp_path / "r"),
        "--model",
        "tiny",
        "--micro-batch-size",
        "1",
        "--global-batch-size",
        "2",
    ]
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONSTARTUP", "$(touch x)")  # DeepSpeed exports PYTHON* itself
    plan = make_plan(hf, train, master_addr="10.0.0.1")
    with pytest.raises(LLMCoreError, match="PYTHONSTARTUP=.* holds characters a shell interprets"):
        node_commands(plan)
    monkeypatch.delenv("PYTHONSTARTUP")
    odd = tmp_path / "a dir$(x)"
    odd.mkdir()
    monkeypatch.chdir(odd)
    with pytest.raises(LLMCoreError, match="working dir .* unquoted"):
        node_commands(plan)


def test_node_entry_refuses_a_bad_payload_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from llmcore.launch.node import main

    with pytest.raises(SystemExit) as ex:
        main(["--local_rank=0", "llmcore1.!!notbase64"])
    err = capsys.readouterr().err
    assert (
        ex.value.code == 2
        and err.startswith("error: llmcore.launch.node: not a launch payload")
        and err.count("\n") == 1
    )
