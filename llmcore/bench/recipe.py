"""`llmcore bench recipe`: time to quality. The same model, data, token budget and batch trained
with MiniMind's recipe (AdamW at 5e-4, cosine to lr/10, no warmup) and with llmcore's
(`--optimizer muon --lr-schedule wsd`), several seeds each; held-out loss is measured along the
way. The result is the share of tokens, and of training seconds, llmcore's recipe needs to reach
the held-out loss MiniMind's recipe ends with (per seed, then the median). DESIGN's target: at
most 0.7x the tokens.

Corpus: pretrain_hq-shaped rows (257-519 characters) cut from the CMRC2018 dev passages with
MiniMind's tokenizer (`llmcore.bench.corpus`); each seed holds out the same documents for both
recipes and feeds them the same rows in the same order (the seed sets both), so each comparison is
paired. Model: the `demo` preset on a CPU, `minimind-3` on a GPU (`--preset`); `--quick` uses a
toy model and a slice of the rows (it tests the machinery, not what it finds).

Seconds are training seconds: wall time at each step minus the time spent in held-out evaluation
and checkpoint saves, so they include each optimizer's own cost (Muon's Newton-Schulz iterations
run in bf16 matmuls, slow on a CPU without AMX).

Invariants: both recipes see the same model shape, initial weights (same seed), rows, held-out
documents, batch and number of steps; no loss is reported that a run did not compute; a recipe
that never reaches the target counts as needing the whole budget (share 1.0) and is named.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from llmcore.bench import harness
from llmcore.bench.corpus import cmrc_passages, minimind_tokenizer_dir, pretrain_hq_rows, shared_data_dir, write_jsonl
from llmcore.bench.harness import BenchResult

log = logging.getLogger(__name__)

# MiniMind's pretraining recipe (train_pretrain.py: AdamW lr 5e-4, cosine from lr to lr/10, no warmup).
MINIMIND = {"optimizer": "adamw", "lr": 5e-4, "lr_schedule": "cosine", "warmup_steps": 0}
# llmcore's: Muon (0.02, Keller Jordan's) on the hidden matrices, AdamW on embeddings and norms at the
# demo preset's swept pretraining lr, warmup-stable-decay with the last 20% decaying to lr/10.
LLMCORE = {
    "optimizer": "muon",
    "muon_lr": 0.02,
    "lr": 2e-3,
    "lr_schedule": "wsd",
    "decay_fraction": 0.2,
    "warmup_steps": 0,
}
RECIPES = {"minimind": MINIMIND, "llmcore": LLMCORE}
LABELS = {"minimind": "MiniMind (AdamW 5e-4, cosine)", "llmcore": "llmcore (Muon 0.02 + AdamW 2e-3, WSD)"}
QUICK_SHAPE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}


def crossing(points: list[tuple[float, float, float]], target: float) -> tuple[float, float] | None:
    """(tokens, seconds) where a held-out curve [(tokens, seconds, loss), ...] first reaches `target`,
    linearly interpolated between the two evaluations around it; None if it never does."""
    for i, (tok, sec, loss) in enumerate(points):
        if loss <= target:
            if i == 0:
                return tok, sec
            t0, s0, l0 = points[i - 1]
            f = (l0 - target) / (l0 - loss) if l0 != loss else 1.0
            return t0 + f * (tok - t0), s0 + f * (sec - s0)
    return None


def run_recipe(
    device: torch.device,
    quick: bool = False,
    seeds: int | None = None,
    epochs: float | None = None,
    seq_len: int | None = None,
    batch: int | None = None,
    preset: str | None = None,
    evals: int | None = None,
    data_dir: str | Path | None = None,
    command: str | None = None,
) -> BenchResult:
    """The recipe comparison (see the module docstring); returns the result, not yet written."""
    from llmcore.data_prep.prep import prep

    cuda = device.type == "cuda"
    ddir = shared_data_dir(data_dir)
    tok_dir = minimind_tokenizer_dir(ddir)
    seeds = seeds or (2 if quick else 3)
    epochs = epochs or (1.0 if quick else (4.0 if cuda else 1.0))
    seq_len = seq_len or (64 if quick else (512 if cuda else 256))
    batch = batch or (4 if quick else (32 if cuda else 8))
    preset = preset or ("demo" if not cuda or quick else "minimind-3")
    evals = evals or (4 if quick else 10)
    rows = pretrain_hq_rows(cmrc_passages(ddir))
    if quick:
        rows = [r[:150] for r in rows[:40]]
    eval_docs = max(4, len(rows) // 10)
    settings = {
        "corpus": f"{len(rows)} pretrain_hq-shaped rows cut from the CMRC2018 dev passages",
        "held_out_documents": eval_docs,
        "preset": preset + (" (toy shape)" if quick else ""),
        "seq_len": seq_len,
        "batch": batch,
        "epochs": epochs,
        "seeds": seeds,
        "evaluations": evals,
        "recipes": {k: {**v, "min_lr": "lr/10"} for k, v in RECIPES.items()},
        "tokenizer": "MiniMind's (vocab 6400)",
        "threads": torch.get_num_threads(),
    }
    res = BenchResult(
        "recipe",
        device,
        settings,
        quick=quick,
        command=command,
        title="Recipe: tokens and seconds to MiniMind's held-out loss (Muon + WSD vs AdamW + cosine)",
    )
    work = Path(tempfile.mkdtemp(prefix="llmcore-bench-recipe-"))
    name = "bench-recipe-model"
    try:
        shards = work / "shards"
        prep("pretrain", [write_jsonl(rows, work / "rows.jsonl")], tok_dir, shards, workers=1)
        runs: list[dict[str, Any]] = []
        res.extra["runs"] = runs  # filled as runs finish, so a stopped benchmark keeps the finished ones
        for seed in range(seeds):
            for recipe, knobs in RECIPES.items():
                out = work / f"{recipe}-{seed}"
                cfg = curve_run_config(
                    shards,
                    out,
                    name,
                    device,
                    seq_len=seq_len,
                    batch=batch,
                    epochs=epochs,
                    eval_docs=eval_docs,
                    seed=seed,
                    **knobs,
                )
                with model_preset(name, preset, QUICK_SHAPE if quick else {}):
                    runs.append({"recipe": recipe, "seed": seed, **train_with_curves(cfg, evals)})
                r = runs[-1]
                log.info(
                    "%s seed %d: final held-out loss %.4f after %s tokens, %.0f training s",
                    recipe,
                    seed,
                    r["final_eval_loss"],
                    f"{r['tokens']:,}",
                    r["seconds"],
                )
        _summarise(res, runs, seeds)
        res.plot = _plot
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return res


@contextlib.contextmanager
def model_preset(name: str, base: str, overrides: dict[str, Any]) -> Iterator[str]:
    """`name` registered as preset `base` with `overrides` while the block runs (a TrainConfig names
    its model by preset; a benchmark's shapes exist only for the runs that use them)."""
    from llmcore.model import PRESETS

    PRESETS[name] = {**PRESETS[base], **overrides}
    try:
        yield name
    finally:
        PRESETS.pop(name, None)


def curve_run_config(
    shards: Path,
    out: Path,
    model: str,
    device: torch.device,
    *,
    seq_len: int,
    batch: int,
    epochs: float,
    eval_docs: int,
    seed: int,
    **recipe: Any,
) -> Any:
    """The TrainConfig of one benchmark pretraining run for `train_with_curves` (shared by `bench
    recipe` and `bench scale`): packed rows, one optimizer step per batch, every step logged, no
    saves, sdpa on CPU (the triton backend only runs in the interpreter there); `recipe` holds the
    optimizer and schedule settings."""
    from llmcore.train import TrainConfig

    return TrainConfig(
        data=str(shards),
        out=str(out),
        model=model,
        seq_len=seq_len,
        micro_batch_size=batch,
        global_batch_size=batch,
        epochs=float(epochs),
        eval_docs=eval_docs,
        log_every=1,
        device=str(device),
        quiet=True,
        seed=seed,
        packing="packed",
        save_every=0,
        save_minutes=0.0,
        attn_backend="auto" if device.type == "cuda" else "sdpa",
        **recipe,
    )


def train_with_curves(cfg: Any, evals: int) -> dict[str, Any]:
    """Pretrain one run of `cfg` (a TrainConfig) with `evals` held-out evaluations spread evenly
    over its steps (the last at its end). Returns the held-out curve as [(tokens, training seconds,
    loss), ...], the train curve as [(tokens, loss), ...] (every step: cfg.log_every must be 1),
    tokens, steps, training seconds (wall time less evaluations and saves) and the final held-out
    loss. Shared by `bench recipe` and `bench scale`."""
    from llmcore.train import Trainer, TrainHooks, TrainingInterrupted

    probe = cfg.resolved("pretrain")
    times: dict[int, float] = {}
    paused = [0.0]
    hooks = TrainHooks(on_step=lambda step, rec: times.__setitem__(step, time.perf_counter() - t0 - paused[0]))
    trainer = Trainer.from_config("pretrain", dataclasses.replace(probe, eval_every=1), hooks)
    trainer.cfg = dataclasses.replace(trainer.cfg, eval_every=max(1, trainer.total_steps // evals))

    def timed(fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            s = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                paused[0] += time.perf_counter() - s

        return wrapper

    trainer.evaluate, trainer.save = timed(trainer.evaluate), timed(trainer.save)
    t0 = time.perf_counter()
    try:
        summary = trainer.run()
    except TrainingInterrupted as stop:
        # The trainer's own SIGINT/SIGTERM handler ended this run (a deadline: gpu_check.sh's timeout):
        # stop the benchmark the way its CLI expects, so the runs that finished are written.
        harness.request_stop(f"stopped by {signal.Signals(stop.signum).name} during a training run")
        raise KeyboardInterrupt from stop
    with (Path(cfg.out) / "metrics.jsonl").open(encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    held = [(r["tokens"], times.get(r["step"], float("nan")), r["eval_loss"]) for r in recs if "eval_loss" in r]
    train = [(r["tokens"], r["loss"]) for r in recs if "loss" in r and "eval_loss" not in r]
    return {
        "held_out": held,
        "train": train,
        "tokens": summary.tokens,
        "steps": summary.steps,
        "seconds": times.get(summary.steps, float("nan")),
        "final_eval_loss": held[-1][2],
        "eval_every": trainer.cfg.eval_every,
    }


def _summarise(res: BenchResult, runs: list[dict[str, Any]], seeds: int) -> None:
    by = {(r["recipe"], r["seed"]): r for r in runs}
    shares_t, shares_s, rows, unreached = [], [], [], []
    need_t, need_s, base_t, base_s = [], [], [], []
    for seed in range(seeds):
        mm, lc = by[("minimind", seed)], by[("llmcore", seed)]
        target = mm["final_eval_loss"]
        hit = crossing(lc["held_out"], target)
        if hit is None:
            unreached.append(seed)
            hit = (float(lc["tokens"]), lc["seconds"])
        need_t.append(hit[0])
        need_s.append(hit[1])
        base_t.append(float(mm["tokens"]))
        base_s.append(mm["seconds"])
        shares_t.append(hit[0] / mm["tokens"])
        shares_s.append(hit[1] / mm["seconds"])
        rows.append(
            [
                seed,
                f"{target:.4f}",
                f"{lc['final_eval_loss']:.4f}",
                f"{hit[0]:,.0f} / {mm['tokens']:,}",
                f"{shares_t[-1]:.2f}" + (" (not reached)" if seed in unreached else ""),
                f"{hit[1]:.0f} / {mm['seconds']:.0f}",
                f"{shares_s[-1]:.2f}",
            ]
        )
    for recipe in RECIPES:
        vals = [by[(recipe, s)]["final_eval_loss"] for s in range(seeds)]
        res.measure(f"{LABELS[recipe]}: final held-out loss", "loss", "nats/token", vals, higher_is_better=False)
        secs = [by[(recipe, s)]["seconds"] for s in range(seeds)]
        toks = [by[(recipe, s)]["tokens"] for s in range(seeds)]
        res.measure(f"{LABELS[recipe]}: training speed", "throughput", "tokens/s", [t / s for t, s in zip(toks, secs)])
    res.measure("llmcore: to MiniMind's final held-out loss", "tokens", "tokens", need_t, higher_is_better=False)
    res.measure("MiniMind: to its final held-out loss", "tokens", "tokens", base_t, higher_is_better=False)
    res.measure("llmcore: to MiniMind's final held-out loss", "seconds", "s", need_s, higher_is_better=False)
    res.measure("MiniMind: to its final held-out loss", "seconds", "s", base_s, higher_is_better=False)
    tok_ratio = res.ratio(
        "tokens llmcore needs / MiniMind's (same final held-out loss)",
        "llmcore: to MiniMind's final held-out loss",
        "MiniMind: to its final held-out loss",
        metric="tokens",
        what="share of the tokens (below 1: llmcore's recipe is faster per token)",
    )
    res.ratio(
        "training seconds llmcore needs / MiniMind's (same final held-out loss)",
        "llmcore: to MiniMind's final held-out loss",
        "MiniMind: to its final held-out loss",
        metric="seconds",
        what="share of the training seconds (below 1: faster in time)",
    )
    res.target(
        "recipe: share of MiniMind's tokens to reach its final held-out loss",
        tok_ratio["value"] if tok_ratio else None,
        0.7,
        higher=False,
        source="median over seeds",
    )
    res.table(
        "Per seed (paired: same initial weights, rows and held-out documents)",
        [
            "seed",
            "MiniMind final held-out",
            "llmcore final held-out",
            "tokens (llmcore / MiniMind)",
            "token share",
            "training s (llmcore / MiniMind)",
            "time share",
        ],
        rows,
    )
    for seed in unreached:
        res.note(
            f"seed {seed}: llmcore's recipe did not reach MiniMind's final held-out loss within the same budget; "
            "counted as the whole budget (share 1.0)"
        )
    med, med_s = statistics.median(shares_t), statistics.median(shares_s)
    res.extra["share_tokens"], res.extra["share_seconds"] = shares_t, shares_s
    res.note(
        f"llmcore's recipe reached MiniMind's final held-out loss with a median {med:.2f}x the tokens and "
        f"{med_s:.2f}x the training seconds over {seeds} seed(s) (per seed: "
        f"{', '.join(f'{x:.2f}' for x in shares_t)} tokens; {', '.join(f'{x:.2f}' for x in shares_s)} seconds)."
    )
    if any(math.isnan(x) for x in shares_s):
        res.warn("a run's training seconds were not recorded; its time share is nan")


def _plot(res: BenchResult, fig: Any) -> None:
    runs = res.extra.get("runs", [])
    colors = {"minimind": "tab:blue", "llmcore": "tab:red"}
    axes = [fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)]
    targets = [r["final_eval_loss"] for r in runs if r["recipe"] == "minimind"]
    for ax, idx, xlabel in ((axes[0], 0, "training tokens"), (axes[1], 1, "training seconds")):
        seen = set()
        for r in runs:
            pts = r["held_out"]
            label = LABELS[r["recipe"]] if r["recipe"] not in seen else None
            seen.add(r["recipe"])
            ax.plot(
                [p[idx] for p in pts],
                [p[2] for p in pts],
                marker="o",
                ms=3,
                lw=1.2,
                alpha=0.8,
                color=colors[r["recipe"]],
                label=label,
            )
        if targets:
            t = statistics.median(targets)
            ax.axhline(t, ls="--", lw=0.8, color="gray", label=f"MiniMind's final held-out loss (median {t:.3f})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out loss (nats/token)")
        ax.legend(fontsize=8)
    share_t, share_s = res.extra.get("share_tokens", []), res.extra.get("share_seconds", [])
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    axes[0].set_title(f"against tokens: llmcore needs {med(share_t):.2f}x (median)", fontsize=10)
    axes[1].set_title(f"against training seconds: {med(share_s):.2f}x (median)", fontsize=10)
    s = res.settings
    fig.suptitle(
        f"{s['preset']}, seq {s['seq_len']}, batch {s['batch']}, {s['epochs']:g} epoch(s), {s['seeds']} seeds "
        f"(one line per seed)",
        fontsize=11,
    )


def register(bench_app: Any) -> None:
    """Add `llmcore bench recipe` to the bench CLI group (one line in `llmcore.bench.cli`)."""
    import typer

    from llmcore.bench import cli

    @bench_app.command("recipe")
    def recipe_cmd(
        device: str = cli._DEVICE,
        out: Path = cli._OUT,
        quick: bool = cli._QUICK,
        data_dir: Optional[Path] = cli._DATA,
        seeds: Optional[int] = typer.Option(None, "--seeds", help="Seeds per recipe (default 3)."),
        epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the rows (default 1 CPU, 4 GPU)."),
        seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per row (default 256 CPU, 512 GPU)."),
        batch: Optional[int] = typer.Option(None, "--batch", help="Rows per step (default 8 CPU, 32 GPU)."),
        preset: Optional[str] = typer.Option(None, "--preset", help="Model (default demo CPU, minimind-3 GPU)."),
        evals: Optional[int] = typer.Option(None, "--evals", help="Held-out evaluations per run (default 10)."),
    ) -> None:
        """MiniMind's recipe (AdamW 5e-4, cosine) against llmcore's (Muon + WSD): share of tokens and seconds
        to reach MiniMind's final held-out loss, same model, rows, budget and batch, several seeds.

        Example: llmcore bench recipe --device cpu
        """
        cli._run(
            "recipe",
            lambda: run_recipe(
                cli._device(device),
                quick,
                seeds,
                epochs,
                seq_len,
                batch,
                preset,
                evals,
                data_dir=data_dir,
                command=cli._command(),
            ),
            out,
        )


def targets_for(res: BenchResult) -> None:
    """The shares and target of a run stopped part-way (a deadline: gpu_check.sh's recipe phase),
    from the seeds whose two recipes both finished (seeds run in order, so those are the first
    ones); a finished result already has them and is left as it is."""
    if res.measurements:
        return
    runs = res.extra.get("runs", [])
    done = {r["seed"] for r in runs if r["recipe"] == "minimind"} & {
        r["seed"] for r in runs if r["recipe"] == "llmcore"
    }
    complete = 0
    while complete in done:
        complete += 1
    if complete:
        _summarise(res, [r for r in runs if r["seed"] < complete], complete)
        res.note(f"stopped part-way: the shares are over the {complete} seed(s) whose two runs both finished")


def plot_for(res: BenchResult) -> Any:
    """The plot function for a result of this benchmark (used to redraw from json)."""
    return _plot


__all__ = ["run_recipe", "crossing", "RECIPES", "plot_for", "targets_for", "train_with_curves", "model_preset"]
