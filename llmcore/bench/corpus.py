"""Benchmark inputs: where the shared sample data lives, and pretrain_hq-shaped rows cut from the
CMRC2018 passages.

MiniMind's pretrain_hq.jsonl rows are 257-519 characters of modern Chinese (mean 399). We make
rows of the same shape from the CMRC2018 dev passages in `../shared/data/rag/`: each passage is
split after sentence-ending punctuation (。！？!?；), and sentences are joined until the row reaches
a length drawn uniformly from [257, 519]; a row that would pass 519 characters ends at the
previous sentence end, and runs that cannot make a row of at least 257 characters are dropped.

Invariants: the rows are deterministic for a seed; every row is 257-519 characters and ends at a
sentence end; a missing data folder is an LLMCoreError naming the path and the override.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

from llmcore.errors import LLMCoreError

ROW_MIN, ROW_MAX = 257, 519
_SENTENCE_END = re.compile(r"(?<=[。！？!?；])")


def data_candidates() -> list[Path]:
    """Where the sample data may lie, relative to this checkout (`Path(__file__).resolve()`, so a
    folder of symlinks to the checkout, as gpu_check.sh makes, still finds it): `../shared/data`
    beside the repository, `shared/data` inside it (the device machine's copy of a checkout), and
    `.cache/shared-data` (a subset staged by `benchmarks/gpu_check.sh --stage-data` to carry)."""
    root = Path(__file__).resolve().parents[2]
    return [root.parent / "shared" / "data", root / "shared" / "data", root / ".cache" / "shared-data"]


def shared_data_dir(override: str | Path | None = None) -> Path:
    """`--data-dir`, else $LLMCORE_SHARED_DATA, else the first of `data_candidates()` that exists
    (the first candidate when none does, so the error names the usual place)."""
    if override:
        return Path(override)
    env = os.environ.get("LLMCORE_SHARED_DATA")
    if env:
        return Path(env)
    candidates = data_candidates()
    return next((c for c in candidates if c.is_dir()), candidates[0])


def need(path: Path, what: str) -> Path:
    if not path.exists():
        raise LLMCoreError(
            f"{what} not found at {path} (pass --data-dir DIR or set LLMCORE_SHARED_DATA to the "
            "folder holding pretrain_sample.jsonl, rag/ and minimind_tokenizer/)"
        )
    return path


def minimind_tokenizer_dir(data_dir: Path) -> Path:
    return need(data_dir / "minimind_tokenizer", "MiniMind's tokenizer")


def cmrc_passages(data_dir: Path) -> list[str]:
    path = need(data_dir / "rag" / "cmrc2018_dev_docs.jsonl", "the CMRC2018 passages")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def pretrain_hq_rows(passages: list[str], seed: int = 0, limit: int | None = None) -> list[str]:
    """Rows shaped like pretrain_hq.jsonl (see the module docstring), in passage order."""
    rng = random.Random(seed)
    rows: list[str] = []
    for text in passages:
        sentences = [s for s in _SENTENCE_END.split(text.strip()) if s]
        cur, target = "", rng.randint(ROW_MIN, ROW_MAX)
        for s in sentences:
            if len(cur) + len(s) > ROW_MAX:
                if len(cur) >= ROW_MIN:
                    rows.append(cur)
                cur, target = "", rng.randint(ROW_MIN, ROW_MAX)
                if len(s) > ROW_MAX:
                    continue
            cur += s
            if len(cur) >= target:
                rows.append(cur)
                cur, target = "", rng.randint(ROW_MIN, ROW_MAX)
            if limit is not None and len(rows) >= limit:
                return rows
    return rows


def write_jsonl(rows: list[str], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"text": r}, ensure_ascii=False) + "\n")
    return path


def read_texts(path: Path, limit: int | None = None) -> list[str]:
    out: list[str] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line)["text"])
                if limit is not None and len(out) >= limit:
                    break
    return out


__all__ = [
    "shared_data_dir",
    "data_candidates",
    "minimind_tokenizer_dir",
    "cmrc_passages",
    "pretrain_hq_rows",
    "write_jsonl",
    "read_texts",
    "ROW_MIN",
    "ROW_MAX",
    "need",
]
