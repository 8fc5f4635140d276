"""`llmcore bench generate`: generation tokens/s with and without the KV cache over prompt lengths,
output lengths and batch sizes.

The model is a preset with random weights (speed does not depend on the weights; `eos_id=None`
so every row generates exactly the asked number of tokens), greedy, through
`llmcore.generate.generate`, the function `llmcore generate`/`chat`/`serve` use. For each
(prompt, new tokens, batch) the cached and the uncached run are timed in interleaved repeats
after one untimed run each; tokens/s counts new tokens of all rows (prefill included in the
time). The ratio cached / uncached is paired per round.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from llmcore.bench.harness import BenchResult, interleaved
from llmcore.bench.report import fmt

log = logging.getLogger(__name__)


def default_grid(device: torch.device, quick: bool) -> list[tuple[int, int, int]]:
    """(prompt tokens, new tokens, batch) triples."""
    if quick:
        return [(16, 8, 1), (48, 8, 2)]
    if device.type == "cuda":
        return [(p, n, b) for p in (128, 512) for n in (128, 512) for b in (1, 8, 32)]
    return [(32, 32, 1), (128, 32, 1), (32, 32, 4)]


def run_generate(
    device: torch.device,
    quick: bool = False,
    preset: str | None = None,
    grid: list[tuple[int, int, int]] | None = None,
    repeats: int | None = None,
    backend: str | None = None,
    command: str | None = None,
) -> BenchResult:
    """The generation benchmark (see the module docstring); returns the result, not yet written."""
    from llmcore.common import default_attn_backend
    from llmcore.generate import generate
    from llmcore.model import LLM, ModelConfig

    preset = preset or ("tiny" if quick else "minimind2-small")
    grid = grid or default_grid(device, quick)
    repeats = repeats or (2 if quick or device.type != "cuda" else 3)
    backend = backend or ("sdpa" if device.type != "cuda" else default_attn_backend(device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    settings = {
        "preset": preset,
        "attn_backend": backend,
        "dtype": str(dtype).replace("torch.", ""),
        "grid (prompt, new, batch)": grid,
        "repeats": repeats,
        "decoding": "greedy, no eos",
    }
    res = BenchResult(
        "generate",
        device,
        settings,
        quick=quick,
        command=command,
        title="Generation benchmark: tokens/s with and without the KV cache",
    )
    torch.manual_seed(0)
    # Generation uses the cache's masks (sdpa/eager paths); the triton backend serves training.
    model = LLM(ModelConfig.from_preset(preset, attn_backend="sdpa" if backend == "triton" else backend))
    model = model.to(device=device, dtype=dtype).eval()
    vocab = model.config.vocab_size
    rows = []
    for prompt, new, batch in grid:
        g = torch.Generator().manual_seed(prompt * 1000 + batch)
        prompts = torch.randint(3, vocab, (batch, prompt), generator=g).tolist()

        def run(cache: bool) -> float:
            out = generate(model, prompts, new, eos_id=None, use_cache=cache)
            return float(sum(len(o) for o in out))

        key = f"prompt {prompt}, new {new}, batch {batch}"
        s = interleaved(
            {f"{key}: KV cache": lambda: run(True), f"{key}: no cache": lambda: run(False)},
            repeats,
            warmup=1,
            device=device,
            progress=lambda m: log.debug("%s", m),
        )
        for name, sm in s.items():
            res.measure_samples(
                name, sm, "new tokens/s", prompt=prompt, new=new, batch=batch, cache=name.endswith("KV cache")
            )
        r = res.ratio(f"{key}: KV cache vs no cache", f"{key}: KV cache", f"{key}: no cache", metric="throughput")
        cached = res.find(f"{key}: KV cache", "throughput")
        plain = res.find(f"{key}: no cache", "throughput")
        rows.append(
            [prompt, new, batch, fmt(cached["median"]), fmt(plain["median"]), f"{fmt(r['value'])}x" if r else "-"]
        )
        log.info("generate %s: cache %s tok/s, no cache %s tok/s", key, fmt(cached["median"]), fmt(plain["median"]))
    res.table(
        "New tokens per second (all rows)",
        ["prompt", "new tokens", "batch", "KV cache", "no cache", "cache speed-up"],
        rows,
    )
    res.note(
        "Without the cache every new token re-runs the whole sequence, so its cost grows with the square of "
        "the length; the cache's gain grows with prompt + output length."
    )
    res.plot = _plot
    return res


def _plot(res: BenchResult, fig: Any) -> None:
    ms = [m for m in res.measurements if m["metric"] == "throughput"]
    batches = sorted({m["batch"] for m in ms})
    ax1 = fig.add_subplot(1, 2, 1)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for cache, style, marker in ((True, "-", "o"), (False, "--", "s")):
        for b, color in zip(batches, colors):
            pts = sorted((m["prompt"] + m["new"], m["median"]) for m in ms if m["cache"] == cache and m["batch"] == b)
            if pts:
                ax1.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    style,
                    marker=marker,
                    color=color,
                    label=f"{'KV cache' if cache else 'no cache'}, batch {b}",
                )
    ax1.set_xlabel("prompt + new tokens (final sequence length)")
    ax1.set_ylabel("new tokens per second (all rows, median)")
    ax1.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    ax1.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v)))
    ax1.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax1.set_title("generation speed", fontsize=10)
    ax1.legend(fontsize=8)
    ax2 = fig.add_subplot(1, 2, 2)
    labels = [r["name"].split(": KV")[0] for r in res.ratios]
    vals = [r["value"] for r in res.ratios]
    ys = list(range(len(labels)))[::-1]
    ax2.barh(ys, vals, color="tab:blue")
    for y, v in zip(ys, vals):
        ax2.text(v, y, f" {v:.1f}x", va="center", fontsize=8)
    ax2.axvline(1.0, color="gray", ls="--", lw=1)
    ax2.set_yticks(ys)
    ax2.set_yticklabels(labels, fontsize=8)
    ax2.set_xlabel("KV cache speed-up (paired ratio of tokens/s)")
    ax2.set_title("cache vs no cache", fontsize=10)
    ax2.margins(x=0.15)
    fig.suptitle(
        f"llmcore generation: {res.settings['preset']}, {res.settings['attn_backend']}, "
        f"{res.settings['dtype']}, greedy",
        fontsize=11,
    )


__all__ = ["run_generate"]


def plot_for(res: BenchResult) -> Any:
    """The plot function for a result of this benchmark (used to redraw from json)."""
    return _plot
