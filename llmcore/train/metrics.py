"""Observability for rank 0: metrics.jsonl, loss.png, a progress bar, optional wandb."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from llmcore.errors import LLMCoreError, install_hint
from llmcore.io import atomic_write, write_text

log = logging.getLogger(__name__)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All JSON lines of a metrics.jsonl (a torn last line from a kill is skipped)."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def format_duration(seconds: float) -> str:
    """h:mm:ss (m:ss under an hour), for logs read in pipes and job files."""
    seconds = max(int(round(seconds)), 0)
    h, rest = divmod(seconds, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _fmt_tokens(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


class MetricsLogger:
    """Writes metrics on rank 0 only; every other rank gets a logger whose methods do nothing."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        total_steps: int,
        start_step: int,
        quiet: bool,
        wandb_cfg: dict[str, Any] | None = None,
        title: str = "",
        panels: tuple[tuple[str, ...], ...] = (),
        loss_unit: str = "nats/token",
        chance_loss: float | None = None,
    ) -> None:
        self.enabled = enabled
        self.chance_loss = chance_loss
        self.path = Path(run_dir) / "metrics.jsonl"
        self.plot_path = Path(run_dir) / "loss.png"
        self.title = title or Path(run_dir).name
        self.panels = panels
        self.loss_unit = loss_unit
        self.total = total_steps
        self.quiet = quiet
        self.bar = None
        self.wandb = None
        self._file = None
        if not enabled:
            return
        self._file = open(self.path, "a")
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, desc="train", leave=True
            )
        if wandb_cfg is not None:
            self._init_wandb(run_dir, wandb_cfg)

    def _init_wandb(self, run_dir: Path, wcfg: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError as err:
            raise LLMCoreError("--wandb needs the wandb package: " + install_hint("wandb")) from err
        # Offline unless the user configured wandb for online use: a run must never wait on the network.
        if "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
            os.environ["WANDB_MODE"] = "offline"
        id_file = Path(run_dir) / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        write_text(id_file, run_id + "\n")
        self.wandb = wandb.init(
            project=wcfg["project"],
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=wcfg.get("config"),
            name=Path(run_dir).name,
        )

    @staticmethod
    def truncate(run_dir: Path, after_step: int) -> None:
        """Drop lines logged after the checkpoint a resumed run restarts from, so the resumed run's
        metrics.jsonl reads exactly like one uninterrupted run's."""
        path = Path(run_dir) / "metrics.jsonl"
        keep = [r for r in read_metrics(path) if int(r.get("step", 0)) <= after_step]
        write_text(path, "".join(json.dumps(r) + "\n" for r in keep))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=int(record["step"]))

    def progress(
        self, step: int, loss: float, lr: float, tokens_per_s: float, elapsed: float, steps_done: int, extra: str = ""
    ) -> None:
        """The bar's postfix, or (no bar: a pipe, a job log) one INFO line
        `step N/T loss ... lr ... tok/s elapsed h:mm:ss eta h:mm:ss`; `extra` (a stage's own
        numbers, e.g. DPO's reward accuracy) follows the loss."""
        if not self.enabled or self.quiet:
            return
        remaining = self.total - step
        eta = elapsed / max(steps_done, 1) * remaining
        more = f" ({extra})" if extra else ""
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(
                f"loss {loss:.4f}{more} lr {lr:.2e} {_fmt_tokens(tokens_per_s)} tok/s", refresh=False
            )
            self.bar.refresh()
        else:
            log.info(
                f"step {step}/{self.total} loss {loss:.4f}{more} lr {lr:.2e} {_fmt_tokens(tokens_per_s)} tok/s "
                f"elapsed {format_duration(elapsed)} eta {format_duration(eta)}"
            )

    def message(self, text: str) -> None:
        """One INFO line on the `llmcore.train.metrics` logger (rank 0 only; not with --quiet)."""
        if not self.enabled or self.quiet:
            return
        log.info(text)

    def warning(self, text: str) -> None:
        """One WARNING line (rank 0 only; shown even with --quiet)."""
        if self.enabled:
            log.warning(text)

    def plot(self) -> None:
        """loss.png: loss, learning rate and the stage's own metrics against tokens seen."""
        if not self.enabled:
            return
        plot_losses(
            self.path,
            self.plot_path,
            title=self.title,
            panels=self.panels,
            loss_unit=self.loss_unit,
            chance_loss=self.chance_loss,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def plot_losses(
    metrics_path: Path,
    out_path: Path,
    title: str = "",
    panels: tuple[tuple[str, ...], ...] = (),
    loss_unit: str = "nats/token",
    chance_loss: float | None = None,
) -> None:
    """One PNG, panels sharing the x axis (tokens seen): train and eval loss (nats/token), the
    learning rate, then one panel per group of stage metrics (DPO: reward accuracy; margins).
    `chance_loss`: the loss of a model that has learnt nothing (DPO: ln 2), drawn as a dashed line,
    with 50% on the accuracy panel and 0 on the margin panel."""
    import matplotlib.pyplot as plt

    fig = loss_figure(metrics_path, title, panels, loss_unit, chance_loss)
    try:
        atomic_write(out_path, lambda tmp: fig.savefig(tmp, dpi=100))
    finally:
        plt.close(fig)


def loss_figure(
    metrics_path: Path,
    title: str = "",
    panels: tuple[tuple[str, ...], ...] = (),
    loss_unit: str = "nats/token",
    chance_loss: float | None = None,
) -> Any:
    """The matplotlib figure `plot_losses` writes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, FuncFormatter

    rows = read_metrics(metrics_path)
    steps = [r for r in rows if "loss" in r and "eval_loss" not in r and math.isfinite(r["loss"])]
    evals = [r for r in rows if "eval_loss" in r and math.isfinite(r["eval_loss"])]
    n = 2 + len(panels)
    fig, axes = plt.subplots(
        n, 1, figsize=(8, 2.2 + 1.9 * n), sharex=True, gridspec_kw={"height_ratios": [2.2] + [1] * (n - 1)}
    )
    loss_ax, lr_ax = axes[0], axes[1]
    if steps:
        loss_ax.plot([r["tokens"] for r in steps], [r["loss"] for r in steps], lw=1, label="train loss")
        lr_ax.plot([r["tokens"] for r in steps], [r["lr"] for r in steps], lw=1, color="tab:gray")
    if evals:
        loss_ax.plot([r["tokens"] for r in evals], [r["eval_loss"] for r in evals], "o-", lw=1.5, label="eval loss")
    if chance_loss is not None:
        loss_ax.axhline(chance_loss, ls="--", lw=1, color="tab:red", label=f"ln 2 = {chance_loss:.3f} = chance")
    # No offset notation (`1e-5+6.931e-1`): a DPO loss that barely moves must still read as 0.6931.
    loss_ax.ticklabel_format(axis="y", useOffset=False)
    loss_ax.set_ylabel(f"loss ({loss_unit})")
    lr_ax.set_ylabel("learning rate")
    lr_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.1e}" if v else "0"))
    for ax, keys in zip(axes[2:], panels):
        for i, key in enumerate(keys):
            color = f"C{i}"  # an eval dot has its train line's colour
            pts = [(r["tokens"], r[key]) for r in steps if key in r]
            if pts:
                ax.plot(*zip(*pts), lw=1, label=key, color=color)
            epts = [(r["tokens"], r[f"eval_{key}"]) for r in evals if f"eval_{key}" in r]
            if epts:
                ax.plot(*zip(*epts), "o", ms=4, label=f"eval {key}", color=color)
        if chance_loss is not None and keys[0].endswith("accuracy"):
            ax.axhline(0.5, ls="--", lw=1, color="tab:red", label="50% = chance")
        elif chance_loss is not None and keys[0].endswith("margin"):
            ax.axhline(0.0, ls="--", lw=1, color="tab:red", label="0 = chance")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_ylabel(keys[0].split("/")[-1] if len(keys) == 1 else "reward (nats)")
        if ax.lines:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    for ax in axes:
        ax.grid(alpha=0.3)
    if loss_ax.lines:
        loss_ax.legend(loc="best")
    axes[-1].xaxis.set_major_formatter(EngFormatter(unit=""))
    axes[-1].set_xlabel("tokens seen")
    fig.suptitle(title or Path(metrics_path).parent.name, fontsize=11)
    fig.tight_layout()
    return fig
