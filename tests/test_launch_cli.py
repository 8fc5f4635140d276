"""`llmcore launch`: the hostfile and flags are checked before anything starts (one-line errors),
the plan and `--dry-run`'s per-node commands, the environment it propagates, and a DeepSpeed JSON
that disagrees with a training flag is an error naming both. No process is started here."""

from __future__ import annotations

import json
import shlex
import tomllib
from pathlib import Path

import pytest
import torch

from llmcore.cli_train import parse_train_flags
from llmcore.errors import LLMCoreError
from llmcore.launch.cli import deepspeed_env_lines, describe, make_plan, node_commands, parse_hostfile
from llmcore.launch.node import decode_payload
from llmcore.train.deepspeed_config import build_ds_config, deepspeed_config_path
from llmcore.train.stages import get_stage

from test_train_common import run_cli, tiny_cfg


def _hostfile(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "hostfile"
    p.write_text(text)
    return p


def _train(shards, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "pretrain",
        "--deepspeed",
        "zero2",
        "--data",
        str(shards["pretrain"]),
        "--out",
        str(out),
        "--model",
        "tiny",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "16",
        *extra,
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("node1 slots=8\nnode2 8\n", "line 2: expected 'HOST slots=N', got 'node2 8'"),
        ("node1 slots=8\nnode2 slots=0\n", "line 2: node2 has slots=0; each node needs at least one"),
        ("node1 slots=-2\n", "line 1: node1 has slots=-2"),
        ("node1 slots=two\n", "line 1: slots must be a whole number, got 'two'"),
        ("node1 slots=8\n# a comment\nnode1 slots=4\n", "line 3: node1 is listed twice"),
        ("# only comments\n\n", "no hosts"),
    ],
)
def test_bad_hostfiles_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(LLMCoreError) as err:
        parse_hostfile(_hostfile(tmp_path, text))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_hostfile_with_comments_and_blank_lines(tmp_path):
    hosts = parse_hostfile(_hostfile(tmp_path, "# cluster\nnode1 slots=8  # first\n\nnode2 slots=4\n"))
    assert list(hosts.items()) == [("node1", 8), ("node2", 4)]


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(num_nodes=3), "--num-nodes 3: the hostfile lists only 2 node(s)"),
        (dict(num_gpus=4), "--num-gpus 4: more than the hostfile's slots on node1 (2), node2 (1)"),
        (
            dict(master_addr="10.0.0.1:29500"),
            "--master-addr '10.0.0.1:29500': not an IP address or host name the nodes "
            "can reach (give the port with --master-port)",
        ),
        (dict(master_addr="http://node1"), "not an IP address or host name"),
        (dict(master_addr="node 1"), "not an IP address or host name"),
        (dict(master_port=70000), "--master-port 70000"),
        (dict(no_ssh=True, master_addr="10.0.0.1"), "--no-ssh: pass --node-rank"),
        (dict(no_ssh=True, node_rank=0), "--no-ssh: pass --master-addr"),
        (dict(no_ssh=True, node_rank=2, master_addr="10.0.0.1"), "--node-rank 2: the hostfile has 2 node(s)"),
        (dict(node_rank=1), "--node-rank goes with --no-ssh"),
        (dict(include="node1", num_nodes=1), "cannot be combined"),
        (dict(timeout=0), "--timeout 0"),
    ],
)
def test_bad_launch_flags_are_one_line_errors(shards, tmp_path, kw, message):
    hf = _hostfile(tmp_path, "node1 slots=2\nnode2 slots=1\n")
    with pytest.raises(LLMCoreError) as err:
        make_plan(hf, _train(shards, tmp_path / "run"), **kw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_training_flags_are_checked_before_launching(shards, tmp_path):
    hf = _hostfile(tmp_path, "node1 slots=2\nnode2 slots=1\n")
    with pytest.raises(LLMCoreError, match="add --deepspeed"):
        make_plan(hf, ["train", "pretrain", "--data", str(shards["pretrain"]), "--out", str(tmp_path / "r")])
    with pytest.raises(LLMCoreError, match="not a multiple of --micro-batch-size 2 x 3 process"):
        make_plan(hf, _train(shards, tmp_path / "r"))
    with pytest.raises(LLMCoreError, match="No such option: --no-such-flag"):
        make_plan(hf, _train(shards, tmp_path / "r", "--no-such-flag"), num_nodes=1)
    with pytest.raises(LLMCoreError, match="expected the training command after `--`"):
        make_plan(hf, ["pretrain"])


def test_plan_and_dry_run_commands(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth0")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    hf = _hostfile(tmp_path, "node1 slots=4\nnode2 slots=4\nnode3 slots=4\n")
    plan = make_plan(
        hf, _train(shards, tmp_path / "run"), num_nodes=2, master_addr="10.0.0.1", master_port=29511, timeout=120
    )
    text = describe(plan)
    assert "2 node(s), world size 8" in text
    assert "node 0: node1, 4 process(es), global ranks 0-3" in text
    assert "node 1: node2, 4 process(es), global ranks 4-7" in text
    assert "global 16 rows/step = micro 2 x accumulation 1 x world 8" in text
    assert plan.env["WANDB_MODE"] == "offline" and plan.env["NCCL_SOCKET_IFNAME"] == "eth0"
    assert plan.env["LLMCORE_DIST_TIMEOUT"] == "120"
    cmds = node_commands(plan)
    assert [h for h, _ in cmds] == ["node1", "node2"]
    for rank, (_, cmd) in enumerate(cmds):
        argv = shlex.split(cmd)
        assert f"--node_rank={rank}" in argv and "--master_addr=10.0.0.1" in argv and "--master_port=29511" in argv
        train_argv, env = decode_payload(argv[-1])  # flags and env travel as one shell-safe token
        assert train_argv == _train(shards, tmp_path / "run") and env["LLMCORE_DIST_TIMEOUT"] == "120"
        assert argv[-2:-1] == ["llmcore.launch.node"]

    # --no-ssh: every node runs DeepSpeed's runner itself, with its own --node_rank.
    plan = make_plan(
        hf,
        _train(shards, tmp_path / "run", "--global-batch-size", "24"),
        no_ssh=True,
        node_rank=2,
        master_addr="10.0.0.1",
    )
    assert "<- this node" in describe(plan).splitlines()[3]
    cmds = node_commands(plan)
    assert len(cmds) == 3 and all(
        "deepspeed.launcher.runner" in c and f"--node_rank={i}" in c and "--no_ssh" in c
        for i, (_, c) in enumerate(cmds)
    )


def test_dry_run_cli_starts_nothing(shards, tmp_path):
    from typer.testing import CliRunner

    from llmcore.cli import app

    hf = _hostfile(tmp_path, "node1 slots=1\nnode2 slots=1\n")
    res = CliRunner().invoke(
        app,
        [
            "launch",
            "--hostfile",
            str(hf),
            "--master-addr",
            "127.0.0.1",
            "--dry-run",
            "--",
            *_train(shards, tmp_path / "run", "--global-batch-size", "4"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "[node 0: node1]" in res.output and "[node 1: node2]" in res.output and "dry run" in res.output
    assert not (tmp_path / "run").exists()


def test_deepspeed_env_file_lines_are_checked(tmp_path, monkeypatch):
    pytest.importorskip("deepspeed", reason="deepspeed not installed")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    p = tmp_path / ".deepspeed_env"
    p.write_text("MY_VAR=1\nNCCL_DEBUG=WARN\n")
    assert deepspeed_env_lines() == [("MY_VAR", "1"), ("NCCL_DEBUG", "WARN")]
    p.write_text("MY_VAR=1\nWANDB_PROJECT=p$(touch x)\n")
    with pytest.raises(LLMCoreError, match=r"\.deepspeed_env line 2: WANDB_PROJECT=.* holds characters a shell"):
        deepspeed_env_lines()


@pytest.mark.parametrize(
    "key, value, flag",
    [
        ("train_micro_batch_size_per_gpu", 8, "--micro-batch-size 4"),
        ("gradient_accumulation_steps", 3, "--global-batch-size"),
        ("train_batch_size", 64, "--global-batch-size 16"),
        ("gradient_clipping", 0.5, "--grad-clip 1.0"),
    ],
)
def test_a_config_that_disagrees_with_a_flag_is_an_error_naming_both(shards, tmp_path, key, value, flag):
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({key: value, "zero_optimization": {"stage": 2}}))
    cfg = tiny_cfg("pretrain", shards, tmp_path / "r", micro_batch_size=4, global_batch_size=16, grad_clip=1.0)
    with pytest.raises(LLMCoreError) as err:
        build_ds_config(own, cfg, world=2, accum=2, dtype="fp32")
    msg = str(err.value)
    assert f"sets {key} {value!r}" in msg and flag in msg and "\n" not in msg


def test_precision_and_optimizer_disagreements(shards, tmp_path):
    cfg = tiny_cfg("pretrain", shards, tmp_path / "r", micro_batch_size=4, global_batch_size=16, dtype="fp32")
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(LLMCoreError, match="enables bf16, but --dtype fp32 runs fp32"):
        build_ds_config(own, cfg, world=2, accum=2, dtype="fp32")
    own.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}))
    with pytest.raises(LLMCoreError, match="sets lr 0.1, but --lr"):
        build_ds_config(own, cfg, world=2, accum=2, dtype="fp32")
    # "auto", absent, or equal values agree; the shipped configs are all "auto".
    own.write_text(
        json.dumps({"train_micro_batch_size_per_gpu": 4, "gradient_clipping": "auto", "bf16": {"enabled": "auto"}})
    )
    ds = build_ds_config(own, cfg, world=2, accum=2, dtype="fp32")
    assert ds["train_batch_size"] == 16 and "bf16" not in ds
    for name in ("zero0", "zero1", "zero2", "zero3", "zero3-offload"):
        build_ds_config(deepspeed_config_path(name), cfg, world=2, accum=2, dtype="fp32")


def test_include_and_exclude_use_deepspeeds_syntax(shards, tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed not installed")
    from llmcore.launch.cli import runner_command

    hf = _hostfile(tmp_path, "node1 slots=4\nnode2 slots=4\nnode3 slots=4\n")
    plan = make_plan(hf, _train(shards, tmp_path / "run"), include="node1:0,1@node3:2,3", master_addr="10.0.0.1")
    assert plan.world == 4 and list(plan.resources) == ["node1", "node3"]
    assert "--include=node1:0,1@node3:2,3" in runner_command(plan)
    plan = make_plan(
        hf, _train(shards, tmp_path / "run", "--global-batch-size", "32"), exclude="node2", master_addr="10.0.0.1"
    )
    assert plan.world == 8 and list(plan.resources) == ["node1", "node3"]
    with pytest.raises(LLMCoreError, match="--include node9"):
        make_plan(hf, _train(shards, tmp_path / "run"), include="node9", master_addr="10.0.0.1")


def test_a_login_node_plans_a_gpu_run_that_only_the_nodes_can_run(shards, tmp_path, capsys):
    """The training flags are checked as values: `--device cuda` and a --data that exists only on the
    nodes print the plan on a machine with neither (a login node; here: this CPU machine). The run
    itself looks at the machine: on this machine `train ... --device cuda` is one line, and its run
    dir is not created."""
    from typer.testing import CliRunner

    from llmcore.cli import app

    hf = _hostfile(tmp_path, "node1 slots=1\nnode2 slots=1\n")
    on_the_nodes = tmp_path / "only-on-the-nodes" / "shards"
    flags = ["--device", "cuda", "--out", str(tmp_path / "run"), "--global-batch-size", "4"]
    argv = _train({"pretrain": on_the_nodes}, tmp_path / "run", *flags)
    res = CliRunner().invoke(app, ["launch", "--hostfile", str(hf), "--dry-run", "--", *argv])
    assert res.exit_code == 0, res.output
    assert "2 node(s), world size 2" in res.output and "[node 1: node2]" in res.output
    assert decode_payload(shlex.split(res.output.split("[node 0: node1]")[1].splitlines()[1])[-1])[0] == argv
    if torch.cuda.is_available():
        return  # the rest is the error of a machine without CUDA
    code, out, err = run_cli(_train(shards, tmp_path / "run", *flags, "--max-steps", "1"), capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: --device cuda: CUDA is not available") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_launch_parses_training_flags_with_the_train_commands_own_options(shards, tmp_path):
    """`parse_train_flags` is `llmcore train STAGE`'s parser: the settings it gives are the ones the
    train command's --print-config shows for the same flags (stage defaults, derived min_lr and the
    flags' own values), and its usage errors are one line naming the stage."""
    from typer.testing import CliRunner

    from llmcore.cli import app

    run = tmp_path / "base"
    argv = ["--data", str(shards["sft"]), "--out", str(tmp_path / "dpo"), "--init", str(run), "--beta", "0.25"]
    argv += ["--deepspeed", "zero1", "--no-compile", "--micro-batch-size", "3"]
    cfg = parse_train_flags("dpo", argv)
    shown = CliRunner().invoke(app, ["train", "dpo", *argv, "--print-config"])
    assert shown.exit_code == 0, shown.output
    printed = tomllib.loads(shown.output)
    assert {k: v for k, v in cfg.to_dict().items() if v is not None} == printed
    assert (cfg.beta, cfg.micro_batch_size, cfg.compile, cfg.deepspeed) == (0.25, 3, False, "zero1")
    assert cfg.lr == get_stage("dpo").defaults["lr"] and cfg.min_lr == pytest.approx(cfg.lr / 10)
    with pytest.raises(LLMCoreError) as err:
        parse_train_flags("dpo", [*argv, "--micro-batch-size", "two"])
    assert str(err.value).startswith("train dpo: ") and "--micro-batch-size" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(LLMCoreError, match="unknown stage 'nope'; expected one of pretrain"):
        parse_train_flags("nope", argv)


def test_a_train_error_in_a_process_that_already_holds_a_group_raises_instead_of_exiting(shards, tmp_path, capsys):
    """The train command ends (os._exit) only a process group it brought up itself: called where a group
    is already up (a library or a test that ran DeepSpeed in-process), an error is the usual one line and
    exit code 2, and the calling process lives on (it used to be killed with os._exit(2))."""
    import torch.distributed as dist

    from llmcore.train.distributed import free_port

    ours = not dist.is_initialized()
    if ours:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        code, out, err = run_cli(_train(shards, tmp_path / "run", "--device", "cuda", "--max-steps", "1"), capsys)
    finally:
        if ours:
            dist.destroy_process_group()
    if torch.cuda.is_available():
        pytest.skip("the error this checks is that of a machine without CUDA")
    assert code == 2 and out == "" and err.startswith("error: --device cuda")
    assert not (tmp_path / "run").exists()
