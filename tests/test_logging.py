"""The CLI turns `llmcore.*` records into plain lines. (That library code logs instead of printing is
ruff's T201, run by `make test`; the CLI modules are its per-file exceptions in pyproject.toml.)"""

from __future__ import annotations

import logging

import pytest

from llmcore.log import PlainHandler, setup_cli_logging
from llmcore.train.metrics import MetricsLogger


@pytest.fixture
def cli_logging():
    logger = setup_cli_logging()
    yield logger
    for h in [h for h in logger.handlers if isinstance(h, PlainHandler)]:
        logger.removeHandler(h)
    logger.setLevel(logging.NOTSET)


def test_cli_logging_prints_the_plain_message(cli_logging, capsys):
    setup_cli_logging()  # idempotent: still one line per record
    logging.getLogger("llmcore.train.metrics").info("step 3/10 loss 1.2345")
    logging.getLogger("llmcore.data_prep.tokenizer").warning("tokenizer: skipped 2 lines")
    logging.getLogger("llmcore.something").debug("not shown at INFO")
    out, err = capsys.readouterr()
    assert out == "step 3/10 loss 1.2345\n"
    assert err == "tokenizer: skipped 2 lines\n"  # no "INFO:root:"-style prefix


def test_metrics_progress_lines_for_pipes(tmp_path, caplog):
    """Without a terminal each logged step is one line with elapsed time and ETA as h:mm:ss."""
    log = MetricsLogger(tmp_path, enabled=True, total_steps=10_000, start_step=0, quiet=False)
    try:
        with caplog.at_level(logging.INFO, logger="llmcore"):
            log.progress(4, 1.5, 3e-4, 12345.0, elapsed=8.0, steps_done=4)
            log.progress(5, 1.25, 3e-4, 999.0, elapsed=3725.0, steps_done=5)
            log.message("step 5: eval_loss 1.2000")
    finally:
        log.close()
    assert [r.name for r in caplog.records] == ["llmcore.train.metrics"] * 3
    assert [r.getMessage() for r in caplog.records] == [
        "step 4/10000 loss 1.5000 lr 3.00e-04 12.35k tok/s elapsed 0:08 eta 5:33:12",
        "step 5/10000 loss 1.2500 lr 3.00e-04 999 tok/s elapsed 1:02:05 eta 2068:24:35",
        "step 5: eval_loss 1.2000",
    ]


def test_warnings_only_from_rank_zero(cli_logging, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    logging.getLogger("llmcore.train").warning("warning: said once per run")
    logging.getLogger("llmcore.train").error("error: every rank says this")
    monkeypatch.setenv("RANK", "0")
    logging.getLogger("llmcore.train").warning("warning: rank 0")
    err = capsys.readouterr().err
    assert err == "error: every rank says this\nwarning: rank 0\n"
