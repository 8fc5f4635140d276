"""`prep stats`: a first look at a jsonl file (rows, lengths, bad lines, tokens) and a length histogram."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmcore.data_prep.jsonl import DEFAULT_MAX_LINE_BYTES, BadLine, iter_records
from llmcore.data_prep.kinds import ShardKind, default_kind, detect_kind, get_kind
from llmcore.errors import DataError, LLMCoreError
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
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> dict:
    """Stream `path` once; return rows, chars per row, bad lines by reason and (with a tokenizer) tokens per row.

    kind is detected from the first valid record when not given (`kinds.detect_kind`: text ->
    pretrain, conversations -> sft, chosen/rejected -> dpo). With `plot`, writes a length histogram PNG.
    The file may be compressed (gzip, bzip2, xz; zstd with `zstandard`); one that cannot be read or
    decompressed is a DataError. A line over `max_line_bytes` is counted as `line_too_long`.
    """
    path = Path(path)
    shard_kind = get_kind(kind) if kind is not None else None
    plot_format = check_plot_path(plot) if plot is not None else None  # before reading anything
    if not path.is_file():
        raise DataError("cannot read input file (missing or not a file)", str(path), reason="unreadable_file")
    tok = None
    if tokenizer_dir is not None:
        from llmcore.data_prep.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer_dir)
    from array import array

    chars = array("q")  # 8 bytes a row, not a Python int's 28
    tokens = array("q")
    pending: list = []
    bad: dict[str, int] = {}
    first_bad: dict[str, int] = {}
    bar = None
    if progress:  # a bar on a terminal; in a pipe a line every 30 s
        import logging

        from llmcore.log import Progress

        bar = Progress(None, "row", "stats", logging.getLogger(__name__))

    def flush() -> None:
        if tok is None or not pending:
            pending.clear()
            return
        tokens.extend(shard_kind.count_tokens(tok, pending))
        pending.clear()

    for line_no, rec in iter_records(path, max_line_bytes):
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

    char_arr = np.frombuffer(chars, dtype=np.int64) if len(chars) else np.zeros(0, np.int64)
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
        tok_arr = np.frombuffer(tokens, dtype=np.int64) if len(tokens) else np.zeros(0, np.int64)
        result["tokens_per_row"] = _summary(tok_arr)
        result["total_tokens"] = int(tok_arr.sum())
        result["chars_per_token"] = round(result["total_chars"] / max(1, result["total_tokens"]), 3)
        result["tokenizer"] = str(tokenizer_dir)
    if plot is not None:
        result["plot"] = str(
            write_histogram(char_arr, tok_arr if tok is not None else None, plot, path.name, plot_format)
        )
    return result


def _log_bins(values: np.ndarray, n: int = 60) -> np.ndarray:
    lo, hi = max(1, int(values.min())), max(2, int(values.max()))
    return np.unique(np.geomspace(lo, hi * 1.0001, n))


def check_plot_path(out: str | Path, flag: str = "--plot") -> str:
    """The image format matplotlib will write `out` in (its extension; PNG when it has none), after
    checking `out` can be written as a file: not a directory, not below a file, an extension
    matplotlib writes. A one-line LLMCoreError otherwise, raised before any work is done."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out = Path(out)
    if out.is_dir():
        raise LLMCoreError(f"{flag} {out}: is a directory; give a file name, e.g. {out / 'stats.png'}")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise LLMCoreError(f"{flag} {out}: {parent} is a file, not a directory")
            break
    fmt = out.suffix[1:].lower() or "png"
    supported = FigureCanvasAgg.get_supported_filetypes()
    if fmt not in supported:
        raise LLMCoreError(
            f"{flag} {out}: cannot write '.{fmt}' images; use .png, .svg or .pdf "
            f"(or one of {', '.join(sorted(supported))})"
        )
    return fmt


def write_histogram(
    chars: np.ndarray, tokens: np.ndarray | None, out: str | Path, title: str, fmt: str | None = None
) -> Path:
    """Row-length histograms (characters, and tokens when counted). A long tail (max over 10x the
    p99, as on pretrain_sample.jsonl: p99 887, max 109,672) gets a log x axis with log-spaced bins,
    so the bulk and the outliers are both visible; otherwise the axis is linear. The axis label
    says which; median and p99 are marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    def plain(x, _pos=None) -> str:
        return f"{x:,.0f}" if x >= 1 else f"{x:g}"

    panels = [("characters per row", chars)] + ([("tokens per row", tokens)] if tokens is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (label, values) in zip(axes[0], panels):
        scale = "linear"
        if len(values):
            p50, p99, top = float(np.median(values)), float(np.percentile(values, 99)), int(values.max())
            if top > 10 * max(p99, 1) or (values.min() > 0 and top > 1000 * max(values.min(), 1)):
                scale = "log"
            bins = _log_bins(values) if scale == "log" else min(100, max(10, int(np.sqrt(len(values)))))
            ax.hist(values, bins=bins, color="#4477aa")
            ax.axvline(p50, color="#cc3311", linestyle="--", label=f"median {p50:,.0f}")
            ax.axvline(p99, color="#ee7733", linestyle=":", label=f"p99 {p99:,.0f}")
            ax.plot([], [], " ", label=f"max {top:,}")
            ax.legend(fontsize=9)
            if scale == "log":
                ax.set_xscale("log")
                ax.xaxis.set_major_locator(LogLocator(base=10))
                ax.xaxis.set_minor_locator(LogLocator(base=10, subs=(2, 5)))
                ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, p: plain(x) if str(int(x))[0] in "25" else ""))
            ax.xaxis.set_major_formatter(FuncFormatter(plain))
            ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.yaxis.set_major_formatter(FuncFormatter(plain))
        ax.set_xlabel(f"{label} ({'log scale, log-spaced bins' if scale == 'log' else 'linear scale'})")
        ax.set_ylabel("rows")
        ax.set_title(f"{label}: {len(values):,} rows")
        ax.grid(True, which="major", alpha=0.3)
    fig.suptitle(f"Row lengths of {title}")
    fig.tight_layout()
    out = Path(out)
    fmt = fmt or check_plot_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:  # the format is given: the temp file's name must not decide it (it ends in .tmp)
        atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100, format=fmt))
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
