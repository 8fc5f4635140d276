"""Helpers of the `llmcore bench` tests (test_bench*.py): run the CLI in-process, and check a
result's three files against the harness's documented structure (every ratio recomputed from the
two measurements it names)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner


def run_cli(args: list[str]) -> str:
    from llmcore.cli import app

    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def load_and_check(out: Path, bench: str) -> dict:
    """The three files exist, the json has the documented keys, and every ratio is recomputable
    from the two measurements it names."""
    files = sorted(out.glob(f"{bench}-cpu-*"))
    assert {p.suffix for p in files} == {".json", ".md", ".png"}, files
    json_path = next(p for p in files if p.suffix == ".json")
    d = json.loads(json_path.read_text())
    for key in (
        "schema",
        "bench",
        "device",
        "date",
        "quick",
        "machine",
        "settings",
        "load",
        "measurements",
        "ratios",
        "targets",
        "notes",
        "warnings",
    ):
        assert key in d, key
    assert d["bench"] == bench and d["device"] == "cpu" and d["quick"] is True
    for key in ("cpu", "cpu_count", "torch", "triton", "python"):
        assert d["machine"][key], key
    assert {"load_1min_mean", "load_1min_max", "high"} <= set(d["load"])
    for m in d["measurements"]:
        assert m["n"] == len([v for v in m["values"] if v is not None]) >= 1
        assert m["median"] == pytest.approx(statistics.median(m["values"]), rel=1e-3)
    check_ratios(d)
    for t in d["targets"]:
        assert t["verdict"] in ("PASS", "FAIL", "NOT MEASURED")
        if t["value"] is None:
            assert t["verdict"] == "NOT MEASURED"
    md = (out / json_path.with_suffix(".md").name).read_text()
    assert md.startswith("# ") and json_path.with_suffix(".png").name in md and "Quick run" in md
    for w in d["warnings"]:
        assert w in md
    png = json_path.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    return d


def check_ratios(d: dict) -> None:
    by = {(m["case"], m["metric"]): m for m in d["measurements"]}
    for r in d["ratios"]:
        num, den = by[(r["numerator"], r["metric"])], by[(r["denominator"], r["metric"])]
        assert num is not den and num["values"] and den["values"]
        if len(num["values"]) == len(den["values"]):
            expected = statistics.median(a / b for a, b in zip(num["values"], den["values"]))
        else:
            expected = statistics.median(num["values"]) / statistics.median(den["values"])
        assert r["value"] == pytest.approx(expected, rel=1e-3), r["name"]
