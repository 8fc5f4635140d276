"""`llmcore bench rag`: the quick run writes the harness's three files with every query timed once
per ef, recall against exact search that reaches 1 at a wide ef (a wrong id mapping would give
about 0), and the index dir removed; recall@k checked on a hand example."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _bench_helpers import load_and_check, run_cli

from llmcore.bench.rag import EFS, LOOKUP, recall_at, synthetic_vectors

pytest.importorskip("hnswlib", reason="llmcore bench rag needs hnswlib (pip install -e '.[rag]')")


def test_recall_at_by_hand() -> None:
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    got = np.array([[4, 3, 9, 9], [5, 6, 7, 8]])  # 2 of 4, then 4 of 4
    assert recall_at(got, truth) == pytest.approx((0.5 + 1.0) / 2)


def test_synthetic_vectors_are_unit_and_deterministic() -> None:
    a, b = synthetic_vectors(300, 16, 0), synthetic_vectors(300, 16, 0)
    assert a.shape == (300, 16) and a.dtype == np.float32 and np.array_equal(a, b)
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)


def test_bench_rag_quick(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    args = ["--n", "400", "--dim", "16", "--queries", "12", "--rounds", "2", "--work", str(work)]
    run_cli(["bench", "rag", "--quick", *args, "--out", str(tmp_path)])
    d = load_and_check(tmp_path, "rag")
    by = {(m["case"], m["metric"]): m for m in d["measurements"]}
    for ef in EFS:
        assert by[(f"ef {ef}", "query latency")]["n"] == 12  # every query, once per ef
        assert 0.0 <= by[(f"ef {ef}", "recall@10 vs exact")]["median"] <= 1.0
    assert by[("ef 256", "recall@10 vs exact")]["median"] >= 0.99  # ef 256 over 400 points is near exhaustive
    assert by[(LOOKUP, "latency")]["n"] == 12
    assert by[("build", "HNSW insert")]["single_run"] and by[("build", "HNSW insert")]["median"] > 0
    assert set(d["extra"]["files_mb"]) >= {"index.hnsw", "passages.arrow"}
    assert not list(work.iterdir())  # the index dir is removed


@pytest.mark.usefixtures("no_leftover_handlers")
def test_bench_rag_bad_flag_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llmcore.bench.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["rag", "--quick", "--queries", "4", "--rounds", "9", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rounds" in err[0], err
    assert not list(tmp_path.glob("*.json"))
