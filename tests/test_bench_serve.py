"""`llmcore bench serve`: the quick run starts the real server in a subprocess, writes the
harness's three files, and every completion token it counts is one the server reported (random
weights: greedy never meets eos within 4 tokens, so each request returns exactly --max-tokens);
bad flags are one line before any server starts. Needs MiniMind's tokenizer from ../shared/data."""

from __future__ import annotations

from pathlib import Path

import pytest
from _bench_helpers import load_and_check, run_cli

pytest.importorskip("fastapi", reason="llmcore serve needs fastapi and uvicorn (pip install -e '.[serve]')")


def test_bench_serve_quick(tmp_path: Path, minimind_tok_dir: Path) -> None:
    run_cli(
        ["bench", "serve", "--quick", "--tokenizer", str(minimind_tok_dir), "--device", "cpu", "--out", str(tmp_path)]
    )
    d = load_and_check(tmp_path, "serve")
    runs = {r["setting"]: r for r in d["extra"]["runs"]}
    assert list(runs) == ["direct", "--max-batch 2"]
    assert runs["direct"]["requests_done"] == 2 and runs["--max-batch 2"]["requests_done"] == 4
    for name, r in runs.items():
        assert r["completion_tokens"] == 4 * r["requests_done"], name  # --quick: max_tokens 4
        assert r["completion_tokens_per_s"] == pytest.approx(r["completion_tokens"] / r["wall_s"], rel=1e-2)
        ttft = next(m for m in d["measurements"] if m["case"] == name and m["metric"] == "time to first token")
        lat = next(m for m in d["measurements"] if m["case"] == name and m["metric"] == "latency")
        assert ttft["n"] == lat["n"] == r["requests_done"] and 0 < ttft["median"] <= lat["max"]
    assert [r["name"] for r in d["ratios"]] == ["--max-batch 2 vs direct"]


@pytest.mark.usefixtures("no_leftover_handlers")
def test_bench_serve_bad_flags_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llmcore.bench.__main__ import main

    for args, words in (
        (["--requests", "0"], "--requests must be 1..10000"),
        (["--max-batch", "2,x"], "--max-batch '2,x'"),
        (["--ckpt", str(tmp_path / "nope")], "--ckpt"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["serve", "--quick", "--tokenizer", str(tmp_path), *args, "--out", str(tmp_path)])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert not list(tmp_path.glob("*.json"))
