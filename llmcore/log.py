"""Logging for the `llmcore` command: each record of an `llmcore.*` logger becomes one plain line.

Library modules log to `logging.getLogger(__name__)` and never print; only the CLI entry point
(`llmcore.cli.main`) calls `setup_cli_logging`. Library users configure logging as they like.
"""

from __future__ import annotations

import logging
import os
import sys

LOGGER = "llmcore"  # the parent of every module logger in the package (llmcore.train.*, llmcore.data_prep.*, ...)


class PlainHandler(logging.Handler):
    """The message alone, one line: INFO and below to stdout, WARNING and above to stderr.

    The streams are looked up at each record (so redirections and test capture work), and when
    tqdm is loaded the line goes through `tqdm.write`, which clears and redraws any progress bar.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
            tqdm_module = sys.modules.get("tqdm")
            if tqdm_module is not None and hasattr(tqdm_module, "tqdm"):
                tqdm_module.tqdm.write(msg, file=stream)
            else:
                stream.write(msg + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


class RankZeroOnly(logging.Filter):
    """Under a launcher (RANK set), only rank 0 shows INFO and WARNING records, so a note is said
    once per run and not once per process; errors still come from every rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or os.environ.get("RANK", "0") == "0"


def setup_cli_logging(level: int = logging.INFO) -> logging.Logger:
    """Route `llmcore.*` records at `level` and above to the terminal as plain lines (idempotent)."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(level)
    if not any(isinstance(h, PlainHandler) for h in logger.handlers):
        handler = PlainHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(RankZeroOnly())
        logger.addHandler(handler)
    return logger


PROGRESS_EVERY_S = 30.0  # seconds between progress lines when stderr is not a terminal


class Progress:
    """Progress of a long loop the way a user sees it: a tqdm bar on a terminal; when stderr is not a
    terminal (a pipe, a log file, nohup), a log line every `every` seconds with done/total, the rate
    and the time left, so a long command is never silent. `update(n)` after each piece; `close()`.
    `total=None` (unknown) shows the count and rate only. The unit "B" (bytes) is shown in MB."""

    def __init__(
        self,
        total: int | None,
        unit: str,
        desc: str,
        logger: logging.Logger,
        every: float | None = None,
        enabled: bool = True,
    ) -> None:
        import time

        from tqdm import tqdm

        self.total, self.unit, self.desc, self.log = total, unit, desc, logger
        self.every = PROGRESS_EVERY_S if every is None else every
        self.done = 0
        self._time = time.perf_counter
        self.t0 = self._last = self._time()
        self.bar = tqdm(
            total=total,
            unit=unit,
            desc=desc,
            file=sys.stderr,
            dynamic_ncols=True,
            unit_scale=unit == "B" or total is None,
            disable=None if enabled else True,
        )
        self.lines = enabled and self.bar.disable

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        now = self._time()
        if self.lines and (now - self._last >= self.every or self.done == self.total):
            self._last = now
            rate = self.done / max(now - self.t0, 1e-9)
            mb = self.unit == "B"  # bytes: in MB
            scale, unit = (1e6, "MB") if mb else (1, self.unit)
            units = unit if mb else unit + ("es" if unit.endswith("h") else "s")
            done = f"{self.done / scale:.1f}" if mb else f"{self.done:,}"
            if self.total is None:
                self.log.info("%s: %s %s, %.2f %s/s", self.desc, done, units, rate / scale, unit)
                return
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            total = f"{self.total / scale:.1f}" if mb else f"{self.total:,}"
            self.log.info(
                "%s: %s/%s %s, %.2f %s/s, %s left", self.desc, done, total, units, rate / scale, unit, _duration(left)
            )

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "unknown time"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
