"""`llmcore bench scale`: the model-size study. Several model sizes train on the same small corpus
for several epochs; held-out documents are evaluated along the way; the report plots train and
held-out loss against tokens seen and against parameters, and says (from the numbers) where the
bigger model stops paying, when it starts to overfit, and what that means for choosing a size.

Corpus: the CMRC2018 dev passages (Chinese Wikipedia, `../shared/data/rag/`) with MiniMind's
tokenizer; a fixed share of the documents is held out (never trained on). Sizes: the `demo` preset
(hidden 192, 4 layers, 6 heads / 2 KV heads) and the same depth at 2x and 4x its width (heads
scaled so head dim stays 32); on a GPU also 8x width and 2x depth at 4x width. Every size gets the
same corpus, epochs, sequence length, batch, warmup and cosine schedule; the peak LR scales as
1/width from the demo's 2e-3 (the usual rule for Adam at fixed depth).

The budget (`--budget-minutes`) bounds the whole study: a short probe measures each size's
tokens/s, then the corpus is sized so that every size that fits can run all epochs (with the
evaluations) inside the budget; sizes that would not fit are left out and named. The plan and the
probe speeds are in the results.

Invariants: every size sees the same training documents in the same order (same seed) and is
evaluated on the same held-out documents; no loss is reported that was not computed by the run.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmcore.bench.corpus import cmrc_passages, minimind_tokenizer_dir, pretrain_hq_rows, shared_data_dir, write_jsonl
from llmcore.bench.harness import BenchResult, fmt

log = logging.getLogger(__name__)

BASE_LR = 2e-3  # the demo preset's pretraining LR (chosen by sweep in the demo)


@dataclass(frozen=True)
class Size:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int

    def overrides(self) -> dict[str, Any]:
        return dict(
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
        )


def default_sizes(device: torch.device, quick: bool) -> list[Size]:
    if quick:
        return [Size("toy 1x", 32, 2, 2, 1), Size("toy 2x width", 64, 2, 4, 2)]
    sizes = [Size("demo (1x)", 192, 4, 6, 2), Size("2x width", 384, 4, 12, 4), Size("4x width", 768, 4, 24, 8)]
    if device.type == "cuda":
        sizes += [Size("4x width, 2x depth", 768, 8, 24, 8), Size("8x width", 1536, 4, 48, 16)]
    return sizes


def param_count(size: Size, vocab: int) -> int:
    from llmcore.model import ModelConfig, param_report

    return int(param_report(ModelConfig.from_preset("demo", vocab_size=vocab, **size.overrides()))["total"])


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    with (run_dir / "metrics.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_scale(
    device: torch.device,
    quick: bool = False,
    budget_minutes: float | None = None,
    epochs: int | None = None,
    seq_len: int | None = None,
    batch: int | None = None,
    eval_share: float = 0.1,
    data_dir: str | Path | None = None,
    seed: int = 0,
    command: str | None = None,
) -> BenchResult:
    """The scale study (see the module docstring); returns the result, not yet written."""
    from llmcore.data_prep.prep import prep
    from llmcore.data_prep.shards import ShardReader
    from llmcore.data_prep.tokenizer import load_tokenizer
    from llmcore.train import TrainConfig, Trainer

    cuda = device.type == "cuda"
    ddir = shared_data_dir(data_dir)
    tok_dir = minimind_tokenizer_dir(ddir)
    budget_s = 60 * (budget_minutes if budget_minutes is not None else (0.4 if quick else (6.0 if cuda else 15.0)))
    epochs = epochs or (2 if quick else (8 if cuda else 4))
    seq_len = seq_len or (64 if quick else (512 if cuda else 256))
    batch = batch or (8 if quick else (32 if cuda else 8))
    sizes = default_sizes(device, quick)
    tok = load_tokenizer(tok_dir)
    vocab = tok.vocab_size
    t_start = time.perf_counter()
    passages = pretrain_hq_rows(cmrc_passages(ddir), seed=seed)
    if quick:  # toy documents: --quick tests the study's machinery, not what it finds
        passages = [p[:120] for p in passages[:12]]
    lengths = [len(t) + 2 for t in tok.encode_batch(passages)]
    work = Path(tempfile.mkdtemp(prefix="llmcore-bench-scale-"))
    settings = {
        "corpus": "pretrain_hq-shaped rows (257-519 chars) cut from the CMRC2018 dev passages",
        "epochs": epochs,
        "seq_len": seq_len,
        "batch": batch,
        "eval_share": eval_share,
        "budget_minutes": round(budget_s / 60, 2),
        "lr": f"{BASE_LR} x 192/hidden",
        "schedule": "warmup 5% then cosine to lr/10",
        "tokenizer": "MiniMind's (vocab 6400)",
        "seed": seed,
    }
    res = BenchResult(
        "scale",
        device,
        settings,
        quick=quick,
        command=command,
        title="Scale study: model size against a small corpus (train and held-out loss)",
    )
    try:

        def config(
            size: Size,
            shards: Path,
            out: Path,
            eval_docs: int,
            max_steps: int | None,
            total_epochs: float,
            eval_every: int,
        ) -> Any:
            lr = BASE_LR * 192 / size.hidden if not quick else 3e-3
            cfg = TrainConfig(
                data=str(shards),
                out=str(out),
                model="demo",
                seq_len=seq_len,
                micro_batch_size=batch,
                global_batch_size=batch,
                lr=lr,
                epochs=float(total_epochs),
                max_steps=max_steps,
                eval_docs=eval_docs,
                eval_every=eval_every,
                log_every=1 if not cuda else 5,
                device=str(device),
                quiet=True,
                seed=seed,
                packing="packed",
                save_every=0,
            )
            return cfg

        # 1. probe: tokens/s of each size on the whole corpus (3 timed steps after 1 warm-up).
        all_shards = work / "probe-shards"
        if not quick:
            prep("pretrain", [write_jsonl(passages, work / "all.jsonl")], tok_dir, all_shards, workers=1)
        probe: dict[str, float] = {}
        for size in sizes:
            if quick:  # --quick keeps every size whatever its speed, so there is nothing to plan
                probe[size.name] = float("nan")
                continue
            cfg = config(size, all_shards, work / f"probe-{size.hidden}-{size.layers}", 0, 10**6, 1.0, 0).resolved(
                "pretrain"
            )
            trainer = _trainer_for(Trainer, cfg, size)
            trainer.train_step()
            t0, tokens0 = time.perf_counter(), trainer.tokens
            for _ in range(3):
                trainer.train_step()
            if cuda:
                torch.cuda.synchronize(device)
            probe[size.name] = (trainer.tokens - tokens0) / (time.perf_counter() - t0)
            trainer.feed.close()
            del trainer
            log.info("probe %s: %s tokens/s", size.name, fmt(probe[size.name]))
        res.extra["probe_tokens_per_s"] = {k: (None if v != v else v) for k, v in probe.items()}

        # 2. plan: the largest corpus (whole passages, in file order) that lets every size that fits run all epochs.
        left = budget_s - (time.perf_counter() - t_start) - (5 if quick else 20)  # leave time for writing
        # Held-out evaluations (4 per epoch, each redrawing loss.png), the final checkpoint, start-up: measured
        # 2.4x the probe time on the shared 2-core CPU, about 1.25x on a GPU.
        overhead = 1.25 if cuda else 2.0
        chosen = list(sizes)
        corpus_tokens = sum(lengths)
        min_docs = 8 if quick else 40
        min_tokens = sum(lengths[:min_docs])
        while len(chosen) > 1 and not quick:  # --quick keeps every size: it tests the study's machinery
            per_token = sum(overhead * epochs / probe[s.name] for s in chosen)
            if left / per_token >= min_tokens:
                break
            res.note(
                f"{chosen[-1].name} left out: the budget of {budget_s / 60:.1f} min cannot fit {epochs} epochs of "
                f"even {min_docs} documents with it (probe: {fmt(probe[chosen[-1].name])} tokens/s)"
            )
            chosen.pop()
        fit = min_tokens if quick else left / sum(overhead * epochs / probe[s.name] for s in chosen)
        if fit < min_tokens:
            res.warn(
                f"the budget of {budget_s / 60:.1f} min is too short for {epochs} epochs of {min_docs} documents "
                f"even for {chosen[0].name}; running that minimum anyway"
            )
        corpus_tokens = max(min_tokens, min(corpus_tokens, int(fit)))
        n_docs, acc = 0, 0
        for n in lengths:
            if acc + n > corpus_tokens and n_docs >= min_docs:
                break
            acc += n
            n_docs += 1
        docs = passages[:n_docs]
        eval_docs = max(2, int(round(eval_share * n_docs)))
        shards = work / "corpus-shards"
        prep("pretrain", [write_jsonl(docs, work / "corpus.jsonl")], tok_dir, shards, workers=1)
        reader = ShardReader(shards)
        from llmcore.data_prep.loaders import train_eval_split

        train_idx, eval_idx = train_eval_split(len(reader), eval_docs, seed)
        doc_len = reader.lengths()
        train_tokens, eval_tokens = int(doc_len[train_idx].sum()), int(doc_len[eval_idx].sum())
        steps_per_epoch = max(1, math.ceil(train_tokens / (seq_len + 1) / batch))
        eval_every = max(1, steps_per_epoch // (1 if quick else 4))
        res.extra["plan"] = {
            "documents": n_docs,
            "train_documents": len(train_idx),
            "eval_documents": len(eval_idx),
            "train_tokens": train_tokens,
            "eval_tokens": eval_tokens,
            "steps_per_epoch": steps_per_epoch,
            "eval_every_steps": eval_every,
            "sizes": [s.name for s in chosen],
        }
        log.info(
            "scale plan: %d documents (%s train tokens, %s held-out tokens), %d epochs, sizes %s",
            n_docs,
            f"{train_tokens:,}",
            f"{eval_tokens:,}",
            epochs,
            ", ".join(s.name for s in chosen),
        )

        # 3. train each size on the same documents.
        curves: list[dict[str, Any]] = []
        for size in chosen:
            elapsed = time.perf_counter() - t_start
            estimate = 0.0 if quick else overhead * epochs * train_tokens / probe[size.name]
            if size is not chosen[0] and not quick and elapsed + estimate > budget_s + 30:
                res.note(
                    f"{size.name} skipped: {estimate:.0f}s estimated, {budget_s - elapsed:.0f}s of the budget left"
                )
                continue
            out = work / f"run-{size.hidden}-{size.layers}"
            cfg = config(size, shards, out, eval_docs, None, epochs, eval_every).resolved("pretrain")
            log.info(
                "training %s (%s parameters, lr %.2g) for %d epochs",
                size.name,
                f"{param_count(size, vocab):,}",
                cfg.lr,
                epochs,
            )
            t0 = time.perf_counter()
            trainer = _trainer_for(Trainer, cfg, size)
            summary = trainer.run()
            seconds = time.perf_counter() - t0
            recs = _metrics(out)
            train_pts = [(r["tokens"], r["loss"]) for r in recs if "loss" in r and "eval_loss" not in r]
            eval_pts = [(r["tokens"], r["eval_loss"]) for r in recs if "eval_loss" in r]
            n_params = param_count(size, vocab)
            best = min(eval_pts, key=lambda p: p[1])
            curves.append(
                {
                    "size": size.name,
                    "hidden": size.hidden,
                    "layers": size.layers,
                    "params": n_params,
                    "train": _smooth(train_pts, max(1, eval_every // cfg.log_every)),
                    "eval": eval_pts,
                    "best_eval_loss": best[1],
                    "best_eval_tokens": best[0],
                    "final_eval_loss": eval_pts[-1][1],
                    "final_train_loss": _tail_mean(train_pts, max(1, steps_per_epoch // 2)),
                    "seconds": seconds,
                    "tokens_per_s": summary.tokens_per_s,
                    "lr": cfg.lr,
                    "epochs_at_best": best[0] / max(train_tokens, 1),
                }
            )
            res.measure(
                f"{size.name}: best held-out loss",
                "loss",
                "nats/token",
                [best[1]],
                higher_is_better=False,
                params=n_params,
            )
            res.measure(
                f"{size.name}: training speed", "throughput", "tokens/s", [summary.tokens_per_s], params=n_params
            )
            log.info(
                "%s: best held-out loss %.3f at %.1f epochs, final %.3f, train %.3f (%.0fs)",
                size.name,
                best[1],
                curves[-1]["epochs_at_best"],
                eval_pts[-1][1],
                curves[-1]["final_train_loss"],
                seconds,
            )
        res.extra["curves"] = curves
        base = curves[0]["size"] if curves else None
        for c in curves[1:]:
            res.ratio(
                f"best held-out loss: {c['size']} vs {base}",
                f"{c['size']}: best held-out loss",
                f"{base}: best held-out loss",
                what="loss ratio (below 1: the bigger model is better)",
            )
        _conclusions(res, curves, train_tokens)
        res.table(
            "Sizes",
            [
                "size",
                "parameters",
                "tokens / parameter (1 epoch)",
                "best held-out loss",
                "at epoch",
                "final held-out",
                "final train",
                "gap (held-out - train)",
                "tokens/s",
                "time s",
            ],
            [
                [
                    c["size"],
                    f"{c['params']:,}",
                    f"{train_tokens / c['params']:.2f}",
                    f"{c['best_eval_loss']:.3f}",
                    f"{c['epochs_at_best']:.1f}",
                    f"{c['final_eval_loss']:.3f}",
                    f"{c['final_train_loss']:.3f}",
                    f"{c['final_eval_loss'] - c['final_train_loss']:+.3f}",
                    fmt(c["tokens_per_s"]),
                    f"{c['seconds']:.0f}",
                ]
                for c in curves
            ],
        )
        res.plot = _plot
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return res


def _trainer_for(Trainer: Any, cfg: Any, size: Size) -> Any:
    """A pretraining Trainer whose model is the demo preset with this size's shape."""
    import dataclasses

    from llmcore.model import PRESETS

    # TrainConfig names a preset; this size is registered under its own name only while the model is built.
    name = f"bench-scale-{size.hidden}x{size.layers}"
    PRESETS[name] = {**PRESETS["demo"], **size.overrides()}
    try:
        return Trainer.from_config("pretrain", dataclasses.replace(cfg, model=name))
    finally:
        PRESETS.pop(name, None)


def _smooth(points: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """Mean of each `window` consecutive logged train losses (at the window's last token count)."""
    out = []
    for i in range(0, len(points) - window + 1, window):
        chunk = points[i : i + window]
        out.append((chunk[-1][0], sum(p[1] for p in chunk) / len(chunk)))
    return out or points


def _tail_mean(points: list[tuple[int, float]], n: int) -> float:
    tail = points[-n:]
    return sum(p[1] for p in tail) / max(len(tail), 1)


def _conclusions(res: BenchResult, curves: list[dict[str, Any]], train_tokens: int) -> None:
    """What the numbers say, as sentences built from them (README shows these)."""
    lines: list[str] = []
    for prev, cur in zip(curves, curves[1:]):
        gain = prev["best_eval_loss"] - cur["best_eval_loss"]
        ratio = cur["params"] / prev["params"]
        verdict = "pays" if gain > 0.02 else "makes no difference beyond noise (0.02)" if gain > -0.02 else "does worse"
        lines.append(
            f"{cur['size']} ({cur['params'] / 1e6:.1f}M parameters, {ratio:.1f}x {prev['size']}): best held-out "
            f"loss {cur['best_eval_loss']:.3f} vs {prev['best_eval_loss']:.3f} ({gain:+.3f} nats/token): "
            f"the bigger model {verdict}."
        )
    for c in curves:
        epochs = res.settings["epochs"]
        rise = c["final_eval_loss"] - c["best_eval_loss"]
        if rise > 0.01 and c["epochs_at_best"] < epochs - 0.3:
            lines.append(
                f"{c['size']} starts to overfit after about {c['epochs_at_best']:.1f} epochs: its held-out loss "
                f"then rises by {rise:.3f} while its train loss keeps falling (final gap "
                f"{c['final_eval_loss'] - c['final_train_loss']:+.3f})."
            )
        else:
            lines.append(
                f"{c['size']} did not overfit within {epochs} epochs (held-out loss at its best at the end, "
                f"gap {c['final_eval_loss'] - c['final_train_loss']:+.3f})."
            )
    if curves:
        best = min(curves, key=lambda c: c["best_eval_loss"])
        lines.append(
            f"Best held-out loss: {best['size']} ({best['params'] / 1e6:.1f}M parameters), "
            f"{train_tokens / best['params']:.4f} training tokens per parameter per epoch. Chinchilla's rule of "
            f"thumb is about 20 tokens per parameter (over all epochs); at {train_tokens:,} tokens per "
            "epoch, sizes far above that ratio memorise the corpus before they generalise: choose the "
            "size where the held-out curve's minimum stops improving, and stop training at that minimum."
        )
    res.extra["conclusions"] = lines
    for line in lines:
        res.note(line)
    res.note("One seed per size; differences below about 0.02 nats/token are within run-to-run noise at these sizes.")


def targets_for(res: BenchResult) -> None:
    """Re-derive the conclusions of a finished study from its stored curves (no training)."""
    old = set(res.extra.get("conclusions", [])) | {n for n in res.notes if n.startswith("One seed per size")}
    res.notes[:] = [n for n in res.notes if n not in old]
    _conclusions(res, res.extra.get("curves", []), res.extra.get("plan", {}).get("train_tokens", 0))


def _plot(res: BenchResult, fig: Any) -> None:
    curves = res.extra.get("curves", [])
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    ax1 = fig.add_subplot(1, 2, 1)
    train_tokens = res.extra.get("plan", {}).get("train_tokens", 1)
    for c, color in zip(curves, colors):
        ax1.plot([p[0] / 1e6 for p in c["train"]], [p[1] for p in c["train"]], ls="--", color=color, lw=1)
        ax1.plot(
            [p[0] / 1e6 for p in c["eval"]],
            [p[1] for p in c["eval"]],
            ls="-",
            marker="o",
            ms=3,
            color=color,
            label=f"{c['size']} ({c['params'] / 1e6:.1f}M)",
        )
        ax1.plot([c["best_eval_tokens"] / 1e6], [c["best_eval_loss"]], marker="*", ms=12, color=color)
    ax1.set_xlabel(f"training tokens seen (millions; one epoch = {train_tokens / 1e6:.2f}M)")
    ax1.set_ylabel("loss (nats/token)")
    ax1.set_title("held-out loss (solid, ★ = minimum) and train loss (dashed)", fontsize=10)
    ax1.legend(fontsize=8)
    ax2 = fig.add_subplot(1, 2, 2)
    params = [c["params"] / 1e6 for c in curves]
    ax2.plot(params, [c["best_eval_loss"] for c in curves], marker="*", ms=10, label="best held-out loss")
    ax2.plot(params, [c["final_eval_loss"] for c in curves], marker="o", label="final held-out loss")
    ax2.plot(params, [c["final_train_loss"] for c in curves], marker="s", ls="--", label="final train loss")
    for c in curves:
        ax2.annotate(
            c["size"],
            (c["params"] / 1e6, c["final_train_loss"]),
            textcoords="offset points",
            xytext=(4, -12),
            fontsize=8,
        )
    ax2.set_xscale("log")
    ax2.set_xlabel("parameters (millions, log scale)")
    ax2.set_ylabel("loss (nats/token)")
    ax2.set_title(f"after {res.settings['epochs']} epochs, against model size", fontsize=10)
    ax2.legend(fontsize=8)
    plan = res.extra.get("plan", {})
    fig.suptitle(
        f"Scale study: {plan.get('train_documents', '?')} rows cut from CMRC2018 passages ({train_tokens:,} tokens) for "
        f"{res.settings['epochs']} epochs, {plan.get('eval_documents', '?')} held out",
        fontsize=11,
    )


__all__ = ["run_scale", "Size", "default_sizes"]


def plot_for(res: BenchResult) -> Any:
    """The plot function for a result of this benchmark (used to redraw from json)."""
    return _plot
