"""Hostile input to `llmcore eval`, `prep split`, `prep stats --plot` and the CLI's help (reliability
round 3: R4-*-eval, R6-stats-plot-*, F6, F10): one-line errors, never a traceback or a silent number."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from llmcore.errors import LLMCoreError

from test_train_common import pretrained_run

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _resign(shard_dir: Path, name: str) -> None:
    """Rewrite the manifest's sha256 and size of `name` to match the file (as a crafted dir would)."""
    m = json.loads((shard_dir / "manifest.json").read_text())
    data = (shard_dir / name).read_bytes()
    for s in m["shards"]:
        if s["file"] == name:
            s["sha256"], s["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (shard_dir / "manifest.json").write_text(json.dumps(m))


def _with_token(src: Path, dst: Path, value: int) -> Path:
    """A copy of the pretrain shard dir whose first document's second token is `value` (manifest re-signed)."""
    import pyarrow as pa

    shutil.copytree(src, dst)
    path = dst / "shard-00000.arrow"
    with pa.memory_map(str(path), "r") as f:
        table = pa.ipc.open_file(f).read_all()
    col = table.column("tokens").combine_chunks()
    values = col.values.to_numpy().copy()
    values[1] = value
    new = pa.ListArray.from_arrays(col.offsets, pa.array(values, type=col.type.value_type))
    table = table.set_column(table.schema.get_field_index("tokens"), table.schema.field("tokens"), new)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    _resign(dst, "shard-00000.arrow")
    return dst


def test_eval_refuses_a_flipped_byte(shards, tmp_path: Path, one_thread) -> None:
    """R4-flip-eval / R4-badsha-eval: train refuses this dir; eval used to score it."""
    from llmcore.evaluate import evaluate

    bad = tmp_path / "flip"
    shutil.copytree(shards["pretrain"], bad)
    p = bad / "shard-00000.arrow"
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 1
    p.write_bytes(bytes(b))
    with pytest.raises(LLMCoreError, match="corrupt shard: sha256"):
        evaluate(pretrained_run(), bad, batch_size=2, seq_len=32, device="cpu", progress=False)


def test_eval_refuses_an_id_at_or_above_the_vocab(shards, tmp_path: Path, one_thread) -> None:
    """R4-bigid-eval: an IndexError traceback before."""
    from llmcore.checkpoint import load_model
    from llmcore.evaluate import evaluate

    run = pretrained_run()
    vocab = load_model(run)[0].config.vocab_size
    bad = _with_token(shards["pretrain"], tmp_path / "bigid", vocab)
    with pytest.raises(LLMCoreError, match=f"token id {vocab} .* is not below the vocab size {vocab}"):
        evaluate(run, bad, batch_size=2, seq_len=32, device="cpu", progress=False)


def test_eval_prints_progress_and_time_left_in_a_pipe(
    shards, one_thread, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """F6: 6 min 42 s without a line before; in a pipe (no terminal) it now logs lines with the time left."""
    import llmcore.evaluate as ev
    import llmcore.log

    monkeypatch.setattr(llmcore.log, "PROGRESS_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="llmcore"):
        res = ev.evaluate(pretrained_run(), shards["pretrain"], batch_size=2, seq_len=32, device="cpu", max_batches=3)
    lines = [r.getMessage() for r in caplog.records if r.name == "llmcore.evaluate"]
    assert lines[0].startswith("eval: 3 batches of 2 rows x 32 tokens")
    assert any(line.startswith("eval: 3/3 batches") and "left" in line for line in lines), lines
    assert res.batches == 3


# ---------------------------------------------------------------- prep split (F6, README's held-out dir)


def test_prep_split_holds_out_what_train_holds_out(shards, tmp_path: Path) -> None:
    from llmcore.cli import main
    from llmcore.data_prep.loaders import train_eval_split
    from llmcore.data_prep.shards import ShardReader

    src = ShardReader(shards["pretrain"])
    before = {p.name: p.read_bytes() for p in shards["pretrain"].iterdir()}
    with pytest.raises(SystemExit) as ex:
        main(
            [
                "prep",
                "split",
                "--input",
                str(shards["pretrain"]),
                "--eval-docs",
                "25",
                "--seed",
                "3",
                "--out-train",
                str(tmp_path / "tr"),
                "--out-eval",
                str(tmp_path / "ev"),
            ]
        )
    assert ex.value.code in (0, None)
    tr, ev = ShardReader(tmp_path / "tr"), ShardReader(tmp_path / "ev")
    tr.verify()
    ev.verify()
    train_idx, eval_idx = train_eval_split(len(src), 25, 3)  # what train --eval-docs 25 --seed 3 holds out
    assert len(ev) == 25 and len(tr) == len(src) - 25
    for part, idx in ((ev, eval_idx), (tr, train_idx)):
        for j, i in enumerate(idx):
            a, b = part.doc(j), src.doc(int(i))
            assert all(np.array_equal(a[c], b[c]) for c in src.columns)
    assert ev.fingerprint == src.fingerprint and ev.manifest["split"]["part"] == "eval"
    assert {p.name: p.read_bytes() for p in shards["pretrain"].iterdir()} == before


@pytest.mark.parametrize(
    "how, msg",
    [
        ("too many", "leaves no training documents"),
        ("zero", "--eval-docs 0: must be >= 1"),
        ("same out", "are the same dir"),
        ("out holds input", "holds the input"),
        ("out is a file", "exists and is not a directory"),
    ],
)
def test_prep_split_bad_flags_are_one_line(shards, tmp_path: Path, how: str, msg: str) -> None:
    from llmcore.data_prep.split import split_shards

    src = shards["pretrain"]
    n, tr, ev = 25, tmp_path / "tr", tmp_path / "ev"
    if how == "too many":
        n = 10**6
    elif how == "zero":
        n = 0
    elif how == "same out":
        ev = tr
    elif how == "out holds input":
        tr = src.parent
    elif how == "out is a file":
        (tmp_path / "f").write_text("x")
        ev = tmp_path / "f"
    with pytest.raises(LLMCoreError, match=msg):
        split_shards(src, n, tr, ev)
    assert not (tmp_path / "tr").exists() or how == "out holds input"


# ---------------------------------------------------------------- prep stats --plot (R6-stats-plot-*)


def _stats_input(tmp_path: Path) -> Path:
    p = tmp_path / "pre.jsonl"
    p.write_text("".join(json.dumps({"text": "字" * (10 + i)}) + "\n" for i in range(30)), encoding="utf-8")
    return p


@pytest.mark.parametrize("name, fmt_magic", [("plotnoext", b"\x89PNG"), ("x.PNG", b"\x89PNG"), ("x.svg", b"<?xml")])
def test_stats_plot_names(tmp_path: Path, name: str, fmt_magic: bytes) -> None:
    """R6-stats-plot-noext: a name without an extension is a PNG (a 'Format tmp' traceback before)."""
    from llmcore.data_prep.stats import compute_stats

    compute_stats(_stats_input(tmp_path), plot=tmp_path / name)
    assert (tmp_path / name).read_bytes().startswith(fmt_magic)
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize(
    "how, msg",
    [
        ("dir", "is a directory; give a file name"),  # R6-stats-plot-dir
        ("xyz", "cannot write '.xyz' images"),  # R6-stats-plot-xyz
        ("below file", "is a file, not a directory"),
    ],
)
def test_stats_plot_bad_paths_are_one_line_before_reading(
    tmp_path: Path, how: str, msg: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from llmcore.cli import main

    src = _stats_input(tmp_path)
    target = {"dir": tmp_path / "plotdir", "xyz": tmp_path / "x.xyz", "below file": src / "p.png"}[how]
    if how == "dir":
        target.mkdir()
    with pytest.raises(SystemExit) as ex:
        main(["prep", "stats", str(src), "--plot", str(target)])
    err = capsys.readouterr().err
    assert ex.value.code == 2 and msg in err and "Traceback" not in err and err.count("\n") == 1


# ---------------------------------------------------------------- --help at 80 columns (F10)


def _commands(cmd, path=()):
    if hasattr(cmd, "commands"):  # a group (typer vendors its own click)
        for name, sub in cmd.commands.items():
            yield from _commands(sub, (*path, name))
    else:
        yield path, cmd


def test_every_help_shows_every_flag_name_whole_at_80_columns() -> None:
    """`rag eval --help` in a pipe printed `--latency-queri…`; no flag name may be cut."""
    import re

    import typer
    from typer.testing import CliRunner

    from llmcore.cli import app

    runner = CliRunner()
    root = typer.main.get_command(app)
    seen = 0
    for path, cmd in _commands(root):
        res = runner.invoke(app, [*path, "--help"], terminal_width=80, env={"COLUMNS": "80"})
        assert res.exit_code == 0, (path, res.output)
        assert "…" not in res.output, path
        for param in cmd.params:
            for opt in [*getattr(param, "opts", []), *getattr(param, "secondary_opts", [])]:
                if opt.startswith("--") and not getattr(param, "hidden", False):
                    assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", res.output), (path, opt)
                    seen += 1
    assert seen > 100


def test_prep_shows_progress_in_a_pipe(shards, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """F6/F14: prep in a pipe printed nothing until it was done; now lines with MB done and the time left."""
    from llmcore.data_prep.prep import prep

    src = tmp_path / "pre.jsonl"
    src.write_text("".join(json.dumps({"text": f"hello world {i} " * 20}) + "\n" for i in range(200)))
    with caplog.at_level(logging.INFO, logger="llmcore"):
        prep("pretrain", [src], shards["tok"], tmp_path / "out", workers=1, progress=True)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prep pretrain: ")]
    assert lines and " MB, " in lines[-1] and lines[-1].endswith("left"), lines


def test_stats_shows_progress_in_a_pipe(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a pipe `prep stats` said nothing until the table; now a count and rate every 30 s (no total is known)."""
    import llmcore.log
    from llmcore.data_prep.stats import compute_stats

    monkeypatch.setattr(llmcore.log, "PROGRESS_EVERY_S", 0.0)  # a line per row
    with caplog.at_level(logging.INFO, logger="llmcore"):
        compute_stats(_stats_input(tmp_path), progress=True)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stats: ")]
    assert lines and lines[-1].startswith("stats: 30 rows, ") and lines[-1].endswith("row/s"), lines
