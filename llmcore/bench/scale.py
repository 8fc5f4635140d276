"""`llmcore bench scale`: what a bigger model does on a small corpus. Five or more model sizes,
spanning at least 30x in non-embedding parameters, train on the same small corpus for several
epochs with the held-out loss measured twice per epoch; the result gives, per size, the held-out
minimum and the epoch it happened in, and says (from the curves) where a larger model stops
helping and where it starts memorising (its train loss keeps falling while its held-out loss rises).

Parameters are counted without the embedding (Kaplan et al. 2020, "Scaling Laws for Neural
Language Models": loss follows the non-embedding count; with MiniMind's 6,400-token vocabulary the
tied table is most of a small model and would hide the part that grows). Totals are reported too.

Corpus: the first `--documents` pretrain_hq-shaped rows (257-519 characters) cut from the CMRC2018
dev passages with MiniMind's tokenizer (`llmcore.bench.corpus`); `--held-out` of them are never
trained on (the trainer's `--eval-docs` split, by seed). Sizes: on a CPU, the `demo` preset's
family (head dim 16-32) from hidden 32 x 2 layers to the demo itself (192 x 4); on a GPU the
`minimind-3` family (head dim 96, QK-norm, MLP ceil(pi * hidden / 64) * 64) from 192 x 4 to
minimind-3 itself (768 x 8). Every size gets the same rows in the same order, the same batch,
sequence length, epochs and recipe: llmcore's (`bench recipe`'s LLMCORE: Muon 0.02 on the hidden
matrices, AdamW 2e-3 on embeddings and norms, WSD), the same rates at every width (Muon's update
is orthogonalised, so its rate needs no 1/width rule; AdamW at a fixed width-independent rate on the
embedding, as Adam's embedding rate in muP). AdamW + cosine was tried first on the CPU and stayed on
the unigram plateau (held-out ~6.9 at every size): a study of memorisation needs models that learn
past it within the budget. The runs go smallest first; `--budget-minutes` skips (and names) a size whose
estimated time (the last size's seconds scaled by training FLOPs per token) would pass it.

Invariants: every loss reported was computed by a run; the minima, epochs and verdicts are
functions of the stored curves (`summarise` re-derives them from a result's json, and from a run
stopped part-way, which keeps the sizes that finished).
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from llmcore.bench.corpus import cmrc_passages, minimind_tokenizer_dir, pretrain_hq_rows, shared_data_dir, write_jsonl
from llmcore.bench.harness import BenchResult
from llmcore.bench.recipe import LLMCORE, curve_run_config, model_preset, train_with_curves

log = logging.getLogger(__name__)

NOISE = 0.03  # nats/token: differences below this are not called (one seed per size; see README)
EVALS_PER_EPOCH = 2


@dataclass(frozen=True)
class Size:
    """One model shape: `base` preset with this hidden size, depth and heads (head dim kept)."""

    name: str
    base: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int

    def overrides(self) -> dict[str, Any]:
        shape: dict[str, Any] = dict(
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
        )
        if self.base == "minimind-3":  # the preset fixes 768's MLP; MiniMind's rule per width
            shape["intermediate_size"] = math.ceil(self.hidden * math.pi / 64) * 64
        return shape

    def params(self, vocab: int) -> dict[str, int]:
        """Total and non-embedding parameter counts (the tied table counted once, as embedding)."""
        from llmcore.model import ModelConfig, param_report

        report = param_report(ModelConfig.from_preset(self.base, vocab_size=vocab, **self.overrides()))
        return {"total": int(report["total"]), "non_embedding": int(report["total"] - report["embedding"])}


CPU_SIZES = [
    Size("32x2", "demo", 32, 2, 2, 1),
    Size("48x2", "demo", 48, 2, 3, 1),
    Size("96x3", "demo", 96, 3, 3, 1),
    Size("128x4", "demo", 128, 4, 4, 2),
    Size("192x4 (demo)", "demo", 192, 4, 6, 2),
]
GPU_SIZES = [
    Size("192x4", "minimind-3", 192, 4, 2, 1),
    Size("192x8", "minimind-3", 192, 8, 2, 1),
    Size("384x8", "minimind-3", 384, 8, 4, 2),
    Size("576x8", "minimind-3", 576, 8, 6, 3),
    Size("768x8 (minimind-3)", "minimind-3", 768, 8, 8, 4),
]
QUICK_SIZES = [Size("toy 16x1", "demo", 16, 1, 1, 1), Size("toy 32x1", "demo", 32, 1, 2, 1)]


def default_sizes(device: torch.device, quick: bool) -> list[Size]:
    return QUICK_SIZES if quick else GPU_SIZES if device.type == "cuda" else CPU_SIZES


def pick_sizes(names: str, device: torch.device, quick: bool) -> list[Size]:
    """The default sizes named in `names` ("128x4,192x4": hidden x layers, as in the size names)."""
    from llmcore.errors import LLMCoreError

    sizes = default_sizes(device, quick)
    by_shape = {s.name.split()[0]: s for s in sizes}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by_shape]
    if unknown or not wanted:
        raise LLMCoreError(f"--sizes {names!r}: choose from {', '.join(by_shape)}")
    return [by_shape[n] for n in wanted]


def flops_per_token(size: Size, vocab: int) -> float:
    """Training FLOPs per token, 6 x (non-embedding parameters + the tied head's vocab x hidden);
    attention's seq-length term is left out (the same seq for every size)."""
    return 6.0 * (size.params(vocab)["non_embedding"] + vocab * size.hidden)


def run_scale(
    device: torch.device,
    quick: bool = False,
    epochs: int | None = None,
    documents: int | None = None,
    held_out: int | None = None,
    seq_len: int | None = None,
    batch: int | None = None,
    budget_minutes: float | None = None,
    sizes: list[Size] | None = None,
    data_dir: str | Path | None = None,
    seed: int = 0,
    command: str | None = None,
) -> BenchResult:
    """The scale study (see the module docstring); returns the result, not yet written."""
    from llmcore.data_prep.prep import prep
    from llmcore.data_prep.tokenizer import load_tokenizer
    from llmcore.errors import LLMCoreError

    cuda = device.type == "cuda"
    ddir = shared_data_dir(data_dir)
    tok_dir = minimind_tokenizer_dir(ddir)
    rows = pretrain_hq_rows(cmrc_passages(ddir), seed=seed)
    epochs = epochs or (3 if quick else 8)
    documents = documents or (16 if quick else (len(rows) if cuda else 40))
    held_out = held_out or (4 if quick else (max(4, documents // 10) if cuda else 8))
    seq_len = seq_len or (64 if quick else (512 if cuda else 256))
    batch = batch or (4 if quick else (16 if cuda else 4))
    sizes = sizes or default_sizes(device, quick)
    if not 0 < documents <= len(rows):
        raise LLMCoreError(f"--documents {documents}: the corpus has {len(rows)} rows")
    if not 0 < held_out < documents:
        raise LLMCoreError(f"--held-out {held_out}: must be between 1 and --documents - 1 ({documents - 1})")
    docs = rows[:documents]
    if quick:  # toy rows: --quick tests the study's machinery, not what it finds
        docs = [d[:100] for d in docs]
    vocab = load_tokenizer(tok_dir).vocab_size
    budget_s = 60 * budget_minutes if budget_minutes else math.inf
    counts = {s.name: s.params(vocab) for s in sizes}
    settings = {
        "corpus": f"the first {documents} pretrain_hq-shaped rows (257-519 chars) cut from the CMRC2018 dev passages"
        + (" (cut to 100 chars: --quick)" if quick else ""),
        "held_out_documents": held_out,
        "epochs": epochs,
        "evaluations_per_epoch": EVALS_PER_EPOCH,
        "seq_len": seq_len,
        "batch": batch,
        "recipe": {**LLMCORE, "min_lr": "lr/10"},
        "noise": NOISE,
        "tokenizer": "MiniMind's (vocab 6400)",
        "budget_minutes": budget_minutes,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "sizes": [
            {"name": s.name, "hidden": s.hidden, "layers": s.layers, "heads": s.heads, **counts[s.name]} for s in sizes
        ],
    }
    res = BenchResult(
        "scale",
        device,
        settings,
        quick=quick,
        command=command,
        title="Scale study: a bigger model on a small corpus (held-out loss per epoch, per size)",
    )
    non_emb = [counts[s.name]["non_embedding"] for s in sizes]
    res.extra["span_non_embedding"] = max(non_emb) / min(non_emb)
    curves: list[dict[str, Any]] = []
    res.extra["curves"] = curves  # filled as sizes finish, so a stopped study keeps the finished ones
    work = Path(tempfile.mkdtemp(prefix="llmcore-bench-scale-"))
    t_start = time.perf_counter()
    try:
        shards = work / "shards"
        prep("pretrain", [write_jsonl(docs, work / "corpus.jsonl")], tok_dir, shards, workers=1)
        res.extra["corpus"] = corpus_split(shards, held_out, seed)
        last: tuple[Size, float] | None = None
        for size in sorted(sizes, key=lambda s: counts[s.name]["non_embedding"]):
            if last is not None:
                estimate = last[1] * flops_per_token(size, vocab) / flops_per_token(last[0], vocab)
                left = budget_s - (time.perf_counter() - t_start)
                if estimate > left:
                    res.note(f"{size.name} skipped: about {estimate:.0f}s estimated, {left:.0f}s of the budget left")
                    continue
            cfg = curve_run_config(
                shards,
                work / f"run-{size.hidden}x{size.layers}",
                "bench-scale-model",
                device,
                seq_len=seq_len,
                batch=batch,
                epochs=epochs,
                eval_docs=held_out,
                seed=seed,
                **LLMCORE,
            )
            t0 = time.perf_counter()
            with model_preset("bench-scale-model", size.base, size.overrides()):
                run = train_with_curves(cfg, epochs * EVALS_PER_EPOCH)
            last = (size, time.perf_counter() - t0)
            curve = {"size": size.name, "hidden": size.hidden, "layers": size.layers}
            curve.update(counts[size.name], epochs=epochs, **run)
            curves.append(curve)
            res.measure(
                f"{size.name}: training speed",
                "throughput",
                "tokens/s",
                [run["tokens"] / run["seconds"]],
                params=counts[size.name]["total"],
            )
            _log(size, curve_summary(curve))
        summarise(res)
        res.plot = _plot
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return res


def corpus_split(shards: Path, held_out: int, seed: int) -> dict[str, int]:
    """Documents and tokens on each side of the trainer's held-out split (the same function and seed
    the trainer uses for `--eval-docs`)."""
    from llmcore.data_prep.loaders import train_eval_split
    from llmcore.data_prep.shards import ShardReader

    lengths = ShardReader(shards).lengths()
    train_idx, eval_idx = train_eval_split(len(lengths), held_out, seed)
    return {
        "documents": len(lengths),
        "train_documents": len(train_idx),
        "eval_documents": len(eval_idx),
        "train_tokens": int(lengths[train_idx].sum()),
        "eval_tokens": int(lengths[eval_idx].sum()),
    }


def _log(size: Size, s: dict[str, Any]) -> None:
    log.info(
        "%s: held-out minimum %.3f in epoch %d, final held-out %.3f, train %.3f -> %.3f (%s)",
        size.name,
        s["best_loss"],
        s["best_epoch"],
        s["final_loss"],
        s["train_at_best"],
        s["train_final"],
        "memorising" if s["memorising"] else "not memorising",
    )


def train_loss_at(train: list[Any], held_out: list[Any], index: int) -> float:
    """Mean train loss over the steps between held-out evaluation `index - 1` and `index` (one
    step's loss is one batch's, too noisy to compare; the window is 1/EVALS_PER_EPOCH epoch)."""
    index %= len(held_out)
    hi = held_out[index][0]
    lo = held_out[index - 1][0] if index > 0 else -1
    window = [loss for tokens, loss in train if lo < tokens <= hi]
    return sum(window) / len(window) if window else math.nan


def curve_summary(curve: dict[str, Any], noise: float = NOISE) -> dict[str, Any]:
    """One size's held-out minimum, the epoch it happened in, and whether it memorises: after the
    minimum its held-out loss rises by more than `noise` while its train loss falls by more than
    `noise` (both from the curves, not assumed)."""
    held = curve["held_out"]
    tokens_per_epoch = curve["tokens"] / curve["epochs"]
    best = min(range(len(held)), key=lambda i: held[i][2])
    at_epochs = held[best][0] / tokens_per_epoch
    train_best, train_final = train_loss_at(curve["train"], held, best), train_loss_at(curve["train"], held, -1)
    rise = held[-1][2] - held[best][2]
    return {
        "best_loss": held[best][2],
        "best_tokens": held[best][0],
        "best_epochs": at_epochs,  # epochs of training done at the minimum (fractional)
        "best_epoch": max(1, math.ceil(at_epochs - 1e-9)),  # the (1-based) epoch it happened in
        "final_loss": held[-1][2],
        "rise_after_best": rise,
        "train_at_best": train_best,
        "train_final": train_final,
        "memorising": rise > noise and train_best - train_final > noise,
    }


def size_verdicts(curves: list[dict[str, Any]], noise: float = NOISE) -> dict[str, Any]:
    """Across sizes (smallest first): the best size, the first size that does not beat every smaller
    one's held-out minimum by more than `noise` ("stops helping"), and the first that memorises."""
    ordered = sorted(curves, key=lambda c: c["non_embedding"])
    summaries = [curve_summary(c, noise) for c in ordered]
    stops = None
    for i in range(1, len(ordered)):
        best_smaller = min(s["best_loss"] for s in summaries[:i])
        if summaries[i]["best_loss"] > best_smaller - noise:
            stops = ordered[i]["size"]
            break
    memorises = next((c["size"] for c, s in zip(ordered, summaries) if s["memorising"]), None)
    best = min(range(len(ordered)), key=lambda i: summaries[i]["best_loss"]) if ordered else None
    return {
        "best": ordered[best]["size"] if best is not None else None,
        "stops_helping": stops,
        "first_memorising": memorises,
        "summaries": {c["size"]: s for c, s in zip(ordered, summaries)},
    }


def summarise(res: BenchResult) -> None:
    """Measurements of the held-out minima, the sizes table and the conclusions, from the stored
    curves (idempotent: what an earlier call wrote is replaced)."""
    curves = sorted(res.extra.get("curves", []), key=lambda c: c["non_embedding"])
    noise = res.settings.get("noise", NOISE)
    res.measurements[:] = [m for m in res.measurements if m["metric"] != "loss"]
    res.tables[:] = [t for t in res.tables if t["title"] != "Sizes"]
    old = set(res.extra.get("conclusions", []))
    res.notes[:] = [n for n in res.notes if n not in old]
    if not curves:
        res.extra["conclusions"] = []
        return
    v = size_verdicts(curves, noise)
    res.extra["verdicts"] = v
    first = curves[0]
    res.extra["plan"] = {  # what the report's paragraph reads
        **res.extra.get("corpus", {}),
        "eval_every_steps": first["eval_every"],
        "steps_per_epoch": round(first["steps"] / first["epochs"], 1),
        "sizes": [c["size"] for c in curves],
    }
    rows = []
    for c in curves:
        s = v["summaries"][c["size"]]
        res.measure(
            f"{c['size']}: held-out minimum",
            "loss",
            "nats/token",
            [s["best_loss"]],
            higher_is_better=False,
            params=c["total"],
            non_embedding=c["non_embedding"],
            epoch=s["best_epoch"],
        )
        rows.append(
            [
                c["size"],
                f"{c['non_embedding']:,}",
                f"{c['total']:,}",
                f"{c['tokens'] / c['epochs'] / c['non_embedding']:.2f}",
                f"{s['best_loss']:.3f}",
                f"{s['best_epoch']} ({s['best_epochs']:.1f})",
                f"{s['final_loss']:.3f} ({s['rise_after_best']:+.3f})",
                f"{s['train_at_best']:.3f} -> {s['train_final']:.3f}",
                "yes" if s["memorising"] else "no",
                f"{c['tokens'] / c['seconds']:,.0f}",
                f"{c['seconds']:.0f}",
            ]
        )
    res.table(
        "Sizes",
        [
            "size",
            "non-embedding params",
            "total params",
            "train tokens per non-emb. param (1 epoch)",
            "held-out minimum",
            "in epoch (epochs done)",
            "final held-out (rise)",
            "train loss at min -> end",
            "memorising",
            "tokens/s",
            "training s",
        ],
        rows,
    )
    lines = []
    span = curves[-1]["non_embedding"] / curves[0]["non_embedding"]
    epochs = curves[0]["epochs"]
    lines.append(
        f"{len(curves)} size{'s' if len(curves) > 1 else ''}, {span:.0f}x in non-embedding parameters "
        f"({curves[-1]['total'] / curves[0]['total']:.0f}x in total), {epochs} epochs of "
        f"{curves[0]['tokens'] / epochs:,.0f} training tokens each."
    )
    best = v["summaries"][v["best"]]
    lines.append(f"Lowest held-out loss: {v['best']}, {best['best_loss']:.3f} in epoch {best['best_epoch']}.")
    summ = [v["summaries"][c["size"]] for c in curves]
    lines.append(
        "Held-out minimum by size (epoch): "
        + ", ".join(f"{c['size']} {s['best_loss']:.3f} ({s['best_epoch']})" for c, s in zip(curves, summ))
        + (
            "; each step up in size changes it by "
            + ", ".join(f"{b['best_loss'] - a['best_loss']:+.3f}" for a, b in zip(summ, summ[1:]))
            if len(summ) > 1
            else ""
        )
        + "."
    )
    lines.append(
        "Gap between final held-out and train loss, by size: "
        + ", ".join(f"{s['final_loss'] - s['train_final']:.2f}" for s in summ)
        + " nats/token (what a size learns beyond the held-out gain is specific to the training rows)."
    )
    if len(curves) == 1:
        pass  # one size (--sizes): nothing to compare
    elif v["stops_helping"]:
        i = next(k for k, c in enumerate(curves) if c["size"] == v["stops_helping"])
        s, prev = v["summaries"][curves[i]["size"]], min(v["summaries"][c["size"]]["best_loss"] for c in curves[:i])
        lines.append(
            f"Larger models stop helping at {v['stops_helping']}: its held-out minimum {s['best_loss']:.3f} is not "
            f"lower than the smaller sizes' best {prev:.3f} by more than the noise ({noise})."
        )
    else:
        lines.append(f"Every larger size lowered the held-out minimum by more than the noise ({noise}).")
    for c in curves:
        s = v["summaries"][c["size"]]
        if s["memorising"]:
            lines.append(
                f"{c['size']} memorises: held-out minimum in epoch {s['best_epoch']}, then its held-out loss rises "
                f"by {s['rise_after_best']:.3f} while its train loss falls from {s['train_at_best']:.3f} to "
                f"{s['train_final']:.3f}."
            )
    if v["first_memorising"] is None:
        lines.append(f"No size memorised within {epochs} epochs (held-out never rose by more than {noise}).")
    res.extra["conclusions"] = lines
    for line in lines:
        res.note(line)


def targets_for(res: BenchResult) -> None:
    """Re-derive the minima, table and conclusions of a study (finished or stopped) from its curves."""
    summarise(res)


def _plot(res: BenchResult, fig: Any) -> None:
    curves = sorted(res.extra.get("curves", []), key=lambda c: c["non_embedding"])
    if not curves:
        return
    v = res.extra.get("verdicts") or size_verdicts(curves, res.settings.get("noise", NOISE))
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    ax1 = fig.add_subplot(1, 2, 1)
    for i, c in enumerate(curves):
        color = cmap(i / max(1, len(curves) - 1))
        per_epoch = c["tokens"] / c["epochs"]
        held = c["held_out"]
        ax1.plot(
            [p[0] / per_epoch for p in held],
            [p[2] for p in held],
            marker="o",
            ms=3,
            color=color,
            label=f"{c['size']} ({c['non_embedding'] / 1e6:.2g}M non-emb.)",
        )
        train = [(p[0] / per_epoch, train_loss_at(c["train"], held, k)) for k, p in enumerate(held)]
        ax1.plot([t[0] for t in train], [t[1] for t in train], ls="--", lw=1, color=color)
        s = v["summaries"][c["size"]]
        ax1.plot([s["best_epochs"]], [s["best_loss"]], marker="*", ms=13, color=color, mec="black")
    ax1.set_xlabel("epochs")
    ax1.set_ylabel("loss (nats/token)")
    ax1.set_title("held-out (solid, ★ minimum) and train loss (dashed)", fontsize=10)
    ax1.legend(fontsize=7)
    ax2 = fig.add_subplot(1, 2, 2)
    x = [c["non_embedding"] for c in curves]
    summ = [v["summaries"][c["size"]] for c in curves]
    ax2.plot(x, [s["best_loss"] for s in summ], marker="*", ms=10, label="held-out minimum")
    ax2.plot(x, [s["final_loss"] for s in summ], marker="o", label="final held-out")
    ax2.plot(x, [s["train_final"] for s in summ], marker="s", ls="--", label="final train")
    for c, s in zip(curves, summ):
        ax2.annotate(
            f"ep {s['best_epoch']}" + (" mem." if s["memorising"] else ""),
            (c["non_embedding"], s["best_loss"]),
            textcoords="offset points",
            xytext=(4, 6),
            fontsize=7,
        )
    if v.get("stops_helping"):
        xs = next(c["non_embedding"] for c in curves if c["size"] == v["stops_helping"])
        ax2.axvline(xs, color="gray", ls=":", lw=1, label=f"stops helping ({v['stops_helping']})")
    ax2.set_xscale("log")
    ax2.set_xlabel("non-embedding parameters (log scale)")
    ax2.set_ylabel("loss (nats/token)")
    ax2.set_title(f"against size, after {curves[0]['epochs']} epochs", fontsize=10)
    ax2.legend(fontsize=7)
    fig.suptitle(
        f"Scale study: {curves[0]['tokens'] / curves[0]['epochs']:,.0f} training tokens "
        f"({res.settings.get('held_out_documents')} rows held out), {curves[0]['epochs']} epochs, Muon + WSD",
        fontsize=11,
    )


def plot_for(res: BenchResult) -> Any:
    """The plot function for a result of this benchmark (used to redraw from json)."""
    return _plot


def register(bench_app: Any) -> None:
    """Add `llmcore bench scale` to the bench CLI group (one line in `llmcore.bench.cli`)."""
    import typer

    from llmcore.bench import cli

    @bench_app.command("scale")
    def scale_cmd(
        device: str = cli._DEVICE,
        out: Path = cli._OUT,
        quick: bool = cli._QUICK,
        data_dir: Optional[Path] = cli._DATA,
        epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs per size (default 8)."),
        documents: Optional[int] = typer.Option(
            None, "--documents", help="Rows in the corpus, held-out ones included (default 40 CPU, all 682 GPU)."
        ),
        held_out: Optional[int] = typer.Option(
            None, "--held-out", help="Rows never trained on (default 8 CPU, a tenth GPU)."
        ),
        seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per row (default 256 CPU, 512 GPU)."),
        batch: Optional[int] = typer.Option(None, "--batch", help="Rows per step (default 4 CPU, 16 GPU)."),
        budget_minutes: Optional[float] = typer.Option(
            None, "--budget-minutes", help="Skip a size whose estimated time would pass this (default: no bound)."
        ),
        sizes: Optional[str] = typer.Option(
            None, "--sizes", help="Only these of the default sizes, e.g. 128x4,192x4 (default: all)."
        ),
    ) -> None:
        """A bigger model on a small corpus: held-out loss per epoch for 5+ sizes (30x+ in non-embedding
        parameters); per size the held-out minimum and its epoch; where larger stops helping and memorises.

        Example: llmcore bench scale --device cpu
        """
        cli._run(
            "scale",
            lambda: run_scale(
                cli._device(device),
                quick,
                epochs,
                documents,
                held_out,
                seq_len,
                batch,
                budget_minutes,
                pick_sizes(sizes, cli._device(device), quick) if sizes else None,
                data_dir=data_dir,
                command=cli._command(),
            ),
            out,
        )


__all__ = [
    "run_scale",
    "Size",
    "default_sizes",
    "curve_summary",
    "size_verdicts",
    "summarise",
    "train_loss_at",
    "CPU_SIZES",
    "GPU_SIZES",
]
