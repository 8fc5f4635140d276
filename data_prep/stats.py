"""`prep stats`: a first look at a jsonl file (rows, lengths, bad lines, tokens) and a length histogram."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from llmcore.data_prep.jsonl import BadLine, iter_records
from llmcore.data_prep.kinds import ShardKind, default_kind, detect_kind, get_kind
from llmcore.errors import DataError
from llmcore.io import atomic_write

PERCENTILES = (50, 90, 99)


def _summary(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {}
    out = {"mean": round(float(values.mean()), 1), "min": int(values.min()), "max": int(values.max())}
    for p in PERCENTILES:
        out[f"p{p}"] = int(np.percentile(values, p))
    return out


def compute_stats(
    path: str | Path,
    tokenizer_dir: str | Path | None = None,
    kind: str | ShardKind | None = None,
    field: str = "text",
    plot: str | Path | None = None,
    progress: bool = False,
    batch: int = 2000,
) -> dict:
    """Stream `path` once; return rows, chars per row, bad lines by reason and (with a tokenizer) tokens per row.

    kind is detected from the first valid record when not given (`kinds.detect_kind`: text ->
    pretrain, conversations -> sft, chosen/rejected -> dpo). With `plot`, writes a length histogram PNG.
    """
    path = Path(path)
    shard_kind = get_kind(kind) if kind is not None else None
    if not path.is_file():
        raise DataError("cannot read input file (missing or not a file)", str(path), reason="unreadable_file")
    tok = None
    if tokenizer_dir is not None:
        from llmcore.data_prep.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer_dir)
    chars: list[int] = []
    tokens: list[int] = []
    pending: list = []
    bad: dict[str, int] = {}
    first_bad: dict[str, int] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit=" rows", unit_scale=True, desc="stats", file=sys.stderr, disable=None)

    def flush() -> None:
        if tok is None or not pending:
            pending.clear()
            return
        tokens.extend(shard_kind.count_tokens(tok, pending))
        pending.clear()

    for line_no, rec in iter_records(path):
        if bar is not None:
            bar.update(1)
        if not isinstance(rec, BadLine):
            if shard_kind is None:
                shard_kind = detect_kind(rec)
            rec = shard_kind.check(rec, field)
        if isinstance(rec, BadLine):
            bad[rec.reason] = bad.get(rec.reason, 0) + 1
            first_bad.setdefault(rec.reason, line_no)
            continue
        chars.append(len(shard_kind.row_text(rec)))
        if tok is not None:
            pending.append(rec)
            if len(pending) >= batch:
                flush()
    flush()
    if bar is not None:
        bar.close()

    char_arr = np.asarray(chars, dtype=np.int64)
    result = {
        "path": str(path),
        "kind": (shard_kind or default_kind()).name,
        "rows": len(chars),
        "bad_lines": sum(bad.values()),
        "bad_by_reason": bad,
        "first_bad_line_by_reason": first_bad,
        "chars_per_row": _summary(char_arr),
        "total_chars": int(char_arr.sum()),
    }
    if tok is not None:
        tok_arr = np.asarray(tokens, dtype=np.int64)
        result["tokens_per_row"] = _summary(tok_arr)
        result["total_tokens"] = int(tok_arr.sum())
        result["chars_per_token"] = round(result["total_chars"] / max(1, result["total_tokens"]), 3)
        result["tokenizer"] = str(tokenizer_dir)
    if plot is not None:
        result["plot"] = str(write_histogram(char_arr, np.asarray(tokens) if tok is not None else None, plot, path.name))
    return result


def write_histogram(chars: np.ndarray, tokens: np.ndarray | None, out: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("characters per row", chars)] + ([("tokens per row", tokens)] if tokens is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (label, values) in zip(axes[0], panels):
        if len(values):
            ax.hist(values, bins=min(100, max(10, int(np.sqrt(len(values))))), color="#4477aa")
            ax.axvline(float(np.median(values)), color="#cc3311", linestyle="--", label=f"median {int(np.median(values))}")
            ax.legend()
        ax.set_xlabel(label)
        ax.set_ylabel("rows")
    fig.suptitle(f"{title}: {len(chars)} rows")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100))
    finally:
        plt.close(fig)
    return out


def format_stats(s: dict) -> str:
    """Human-readable lines for the CLI."""
    lines = [f"file        {s['path']}", f"kind        {s['kind']}", f"rows        {s['rows']}"]

    def dist(name: str, d: dict) -> str:
        if not d:
            return f"{name:<12}-"
        pct = " ".join(f"p{p} {d[f'p{p}']}" for p in PERCENTILES)
        return f"{name:<12}mean {d['mean']}  min {d['min']}  max {d['max']}  {pct}"

    lines.append(dist("chars/row", s["chars_per_row"]))
    if "tokens_per_row" in s:
        lines.append(dist("tokens/row", s["tokens_per_row"]))
        lines.append(f"tokens      {s['total_tokens']} ({s['chars_per_token']} chars/token)")
    lines.append(f"bad lines   {s['bad_lines']}")
    for reason, n in sorted(s["bad_by_reason"].items()):
        lines.append(f"  {reason:<20}{n}  (first at line {s['first_bad_line_by_reason'][reason]})")
    if "plot" in s:
        lines.append(f"plot        {s['plot']}")
    return "\n".join(lines)
