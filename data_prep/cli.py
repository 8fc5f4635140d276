"""CLI for the data pipeline: `llmcore tokenizer train` and `llmcore prep stats|download|pretrain|sft|dpo|split|inspect`.

Commands only parse flags and call one library function; errors are LLMCoreError/DataError,
which the root CLI prints as one line.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Optional

import typer

from llmcore.data_prep.kinds import KINDS, ShardKind
from llmcore.errors import LLMCoreError

tokenizer_app = typer.Typer(
    help="Train a byte-level BPE tokenizer.\n\nExample: llmcore tokenizer train --input data.jsonl --vocab-size 6400 --out tok/",
    no_args_is_help=True,
)
prep_app = typer.Typer(
    help="Look at jsonl data, download it, and tokenize it into shard dirs.\n\n"
    "Example: llmcore prep pretrain --input data.jsonl --tokenizer tok/ --out shards/pretrain",
    no_args_is_help=True,
)

InputOpt = typer.Option(..., "--input", "-i", help="jsonl file (repeat for several)")
TokOpt = typer.Option(..., "--tokenizer", "-t", help="tokenizer dir (ours or MiniMind's)")
OutShardOpt = typer.Option(..., "--out", "-o", help="shard dir to create")
WorkersOpt = typer.Option(None, "--workers", "-w", help="worker processes (default: CPU count)")
BadLineOpt = typer.Option(
    "fail", "--on-bad-line", help="fail: stop at the first bad line; skip: drop and count bad lines"
)
OverwriteOpt = typer.Option(
    False, "--overwrite", help="replace an existing shard dir of the same kind (never a dir holding an input)"
)
MaxLineOpt = typer.Option(
    16 << 20, "--max-line-bytes", help="a longer line is a bad line (line_too_long), never read whole (default 16 MiB)"
)


@tokenizer_app.command("train")
def tokenizer_train(
    input: list[Path] = InputOpt,
    out: Path = typer.Option(..., "--out", "-o", help="output tokenizer dir"),
    vocab_size: int = typer.Option(
        6400, "--vocab-size", help="vocabulary size incl. the template's added tokens (36 for minimind3, 3 for chatml)"
    ),
    field: str = typer.Option("text", "--field", help="jsonl field with the text"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing tokenizer dir that llmcore made"),
    max_line_bytes: int = MaxLineOpt,
    template: str = typer.Option(
        "minimind3",
        "--template",
        help="chat template and added tokens: minimind3 (tools, <think>) or chatml (MiniMind2)",
    ),
) -> None:
    """Train byte-level BPE with MiniMind-3's added tokens and chat template (or --template chatml).

    minimind3: the 36 added tokens of MiniMind-3's tokenizer in its order (<|endoftext|>=0,
    <|im_start|>=1, <|im_end|>=2, ..., <tool_call>, <think>, ...) and its template (tools, tool
    calls, tool responses, a <think> block per assistant turn). chatml: MiniMind2's three special
    tokens and ChatML template. The result loads with transformers.AutoTokenizer.from_pretrained(OUT).
    A non-empty --out is refused unless --overwrite, which replaces only a tokenizer dir llmcore made.

    Example: llmcore tokenizer train --input dataset/pretrain_hq.jsonl --vocab-size 6400 --out tok/
    """
    from llmcore.data_prep.tokenizer import load_tokenizer, train_tokenizer

    path = train_tokenizer(
        input,
        out,
        vocab_size=vocab_size,
        field=field,
        show_progress=True,
        overwrite=overwrite,
        max_line_bytes=max_line_bytes,
        template=template,
    )
    tok = load_tokenizer(path)
    typer.echo(f"wrote {path} (vocab {tok.vocab_size}, fingerprint {tok.fingerprint[:12]})")


@prep_app.command("stats")
def prep_stats(
    file: Path = typer.Argument(..., help=f"jsonl file ({', '.join(KINDS)} format)"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", "-t", help="also count tokens per row"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write a length histogram PNG"),
    field: str = typer.Option("text", "--field", help="text field for pretrain files"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of a table"),
    max_line_bytes: int = MaxLineOpt,
) -> None:
    """Rows, characters per row (mean/min/max/percentiles), bad lines by reason, tokens per row.

    Compressed files (gzip, bzip2, xz; zstd with the zstandard package) are read as they are. Exits
    non-zero when the file cannot be read or holds no valid row.

    Example: llmcore prep stats dataset/pretrain_hq.jsonl --tokenizer tok/ --plot stats.png
    """
    from llmcore.data_prep.stats import compute_stats, format_stats

    s = compute_stats(
        file, tokenizer_dir=tokenizer, field=field, plot=plot, progress=not as_json, max_line_bytes=max_line_bytes
    )
    typer.echo(json.dumps(s, ensure_ascii=False) if as_json else format_stats(s))
    if s["rows"] == 0:
        first = min(s["first_bad_line_by_reason"].items(), key=lambda kv: kv[1], default=None)
        why = f"{s['bad_lines']} bad lines, the first ({first[0]}) at line {first[1]}" if first else "it is empty"
        raise LLMCoreError(f"{file}: no valid rows ({why})")


@prep_app.command("download")
def prep_download(
    dataset: str = typer.Option("gongjy/minimind_dataset", "--dataset", help="ModelScope dataset repo"),
    file: Optional[str] = typer.Option(None, "--file", help="file inside the repo"),
    out: Path = typer.Option(
        ..., "--out", "-o", help="directory to put the file in (with --benchmark: the benchmark's dir)"
    ),
    timeout: float = typer.Option(30.0, "--timeout", help="give up after this many seconds without data"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing file"),
    benchmark: Optional[str] = typer.Option(
        None,
        "--benchmark",
        help="cmmlu or ceval: fetch the benchmark's official archive and unpack its layout as --out",
    ),
) -> None:
    """Download one file of a ModelScope dataset, or a benchmark for `eval bench` (needs the
    `download` extra: modelscope).

    Offline it fails within about TIMEOUT seconds; a partial file never gets the final name.

    Example: llmcore prep download --dataset gongjy/minimind_dataset --file pretrain_hq.jsonl --out dataset/

    Example: llmcore prep download --benchmark cmmlu --out cmmlu/
    """
    from llmcore.data_prep.download import download

    if benchmark is not None:
        from llmcore.eval_bench import download_benchmark

        if file is not None:
            raise LLMCoreError("--benchmark downloads a whole benchmark; drop --file")
        bench_dir = download_benchmark(benchmark, out, timeout=timeout, overwrite=overwrite, progress=True)
        typer.echo(f"wrote {bench_dir} (the official {benchmark} layout)")
        return
    if file is None:
        raise LLMCoreError("--file is required (or --benchmark cmmlu|ceval)")
    path = download(dataset, file, out, timeout=timeout, overwrite=overwrite, progress=True)
    typer.echo(f"wrote {path} ({path.stat().st_size} bytes)")


def _run_prep(
    kind: str,
    input: list[Path],
    tokenizer: Path,
    out: Path,
    workers,
    on_bad_line: str,
    overwrite: bool,
    max_line_bytes: int = 16 << 20,
    field: str = "text",
    drop_empty_think: float = 0.0,
    seed: int = 0,
) -> None:
    from llmcore.data_prep.kinds import EncodeOptions
    from llmcore.data_prep.prep import prep

    m = prep(
        kind,
        input,
        tokenizer,
        out,
        workers=workers,
        on_bad_line=on_bad_line,
        overwrite=overwrite,
        field=field,
        progress=True,
        max_line_bytes=max_line_bytes,
        options=EncodeOptions(drop_empty_think=drop_empty_think, seed=seed),
    )
    typer.echo(
        f"wrote {out}: {m['num_docs']} documents, {m['num_tokens']} tokens in {len(m['shards'])} shard(s), {m['seconds']} s"
    )
    if m["lines_skipped"]:
        typer.echo(f"skipped {m['lines_skipped']} bad lines:")
        for reason, n in sorted(m["skipped_by_reason"].items()):
            typer.echo(f"  {reason}: {n}")


# The flags of every `prep KIND` command, in help order: (parameter, type, option).
_PREP_OPTIONS = [
    ("input", list[Path], InputOpt),
    ("tokenizer", Path, TokOpt),
    ("out", Path, OutShardOpt),
    ("workers", Optional[int], WorkersOpt),
    ("on_bad_line", str, BadLineOpt),
    ("overwrite", bool, OverwriteOpt),
    ("max_line_bytes", int, MaxLineOpt),
]
FieldOpt = typer.Option("text", "--field", help="jsonl field with the text")
# Chat kinds: MiniMind's empty-think rule (its SFT drops the empty think block from 80% of rows).
_CHAT_OPTIONS = [
    (
        "drop_empty_think",
        float,
        typer.Option(
            0.0,
            "--drop-empty-think",
            metavar="P",
            help="drop the empty <think>\\n\\n</think>\\n\\n blocks from this share of conversations (MiniMind-3: 0.8; default 0: rows equal the template)",
        ),
    ),
    ("seed", int, typer.Option(0, "--seed", help="seed that picks the conversations for --drop-empty-think")),
]


def _prep_command(kind: ShardKind):
    """Register `llmcore prep KIND` from the kind: its help, the shared flags (plus --field when the
    kind reads a named text field), running ``_run_prep``."""
    options = (
        _PREP_OPTIONS + ([("field", str, FieldOpt)] if kind.text_field else []) + (_CHAT_OPTIONS if kind.chat else [])
    )

    def command(**flags) -> None:
        _run_prep(kind.name, **flags)

    command.__name__ = command.__qualname__ = f"prep_{kind.name}"
    command.__doc__ = kind.help
    command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann)
            for name, ann, opt in options
        ]
    )
    return prep_app.command(kind.name)(command)


for _kind in KINDS.values():
    _prep_command(_kind)


@prep_app.command("split")
def prep_split(
    input: Path = typer.Option(..., "--input", "-i", help="shard dir to split (left unchanged)"),
    eval_docs: int = typer.Option(..., "--eval-docs", help="documents held out (as train --eval-docs picks them)"),
    out_train: Path = typer.Option(..., "--out-train", help="shard dir for the other documents"),
    out_eval: Path = typer.Option(..., "--out-eval", help="shard dir for the held-out documents"),
    seed: int = typer.Option(0, "--seed", help="which documents are held out (train's --seed picks the same)"),
    overwrite: bool = OverwriteOpt,
) -> None:
    """Split a shard dir into a training dir and a held-out dir for `llmcore eval`.

    Example: llmcore prep split --input shards/pretrain --eval-docs 1000 --out-train shards/pretrain_train --out-eval shards/pretrain_heldout
    """
    from llmcore.data_prep.split import split_shards

    tr, ev = split_shards(input, eval_docs, out_train, out_eval, seed=seed, overwrite=overwrite)
    typer.echo(
        f"wrote {out_train}: {tr['num_docs']:,} documents, {tr['num_tokens']:,} tokens; "
        f"{out_eval}: {ev['num_docs']:,} documents, {ev['num_tokens']:,} tokens (held out, seed {seed})"
    )


@prep_app.command("inspect")
def prep_inspect(
    shard_dir: Path = typer.Argument(..., help="shard dir made by `llmcore prep`"),
    start: int = typer.Option(0, "--start", help="first document index"),
    count: int = typer.Option(3, "--count", "-n", help="number of documents"),
    decode: bool = typer.Option(
        False, "--decode", help="add the text; spans that carry loss are wrapped in double square brackets"
    ),
    tokenizer: Optional[Path] = typer.Option(
        None,
        "--tokenizer",
        "-t",
        help="tokenizer for --decode (default: the one in the manifest); refused when it is not the shards' tokenizer",
    ),
    verify: bool = typer.Option(
        False, "--verify", help="first check every shard (checksums, counts, ids below the vocab) as training does"
    ),
) -> None:
    """Print documents of a shard dir as JSON lines (token ids, masks; with --decode the text).

    Example: llmcore prep inspect shards/sft --start 0 --count 2 --decode
    """
    from llmcore.data_prep.shards import ShardReader

    reader = ShardReader(shard_dir)
    if verify:
        reader.verify()
        typer.echo(
            f"verified {shard_dir}: {len(reader.manifest['shards'])} shard(s), {len(reader)} documents", err=True
        )
    tok = None
    if decode or tokenizer is not None:  # a named tokenizer is always checked against the manifest
        from llmcore.data_prep.tokenizer import load_tokenizer

        tok_path = tokenizer or reader.manifest["tokenizer"].get("path")
        if not tok_path or not Path(tok_path).is_dir():
            raise LLMCoreError(f"--decode needs the tokenizer; {tok_path} is not there, pass --tokenizer DIR")
        tok = load_tokenizer(tok_path)
        reader.check_tokenizer(tok)
    if start < 0 or start >= len(reader):
        raise LLMCoreError(f"--start {start} is out of range: {shard_dir} has {len(reader)} documents")
    for i in range(start, min(len(reader), start + max(0, count))):
        doc = reader.doc(i)
        row: dict = {"index": i}
        for name, arr in doc.items():
            row[name] = arr.tolist()
        if tok is not None:
            row.update(reader.shard_kind.render(tok, row))
        typer.echo(json.dumps(row, ensure_ascii=False))


def register(app: typer.Typer) -> None:
    """Add the `tokenizer` and `prep` groups to the root app."""
    app.add_typer(tokenizer_app, name="tokenizer")
    app.add_typer(prep_app, name="prep")
