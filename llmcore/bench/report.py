"""How results look: one result's md and png (`render_markdown`, `render_png`, drawn for
`BenchResult.write`, with the table and bar helpers the benchmarks share), and `llmcore bench
report` and `llmcore bench targets`: pages built from the results files only.

- `build_index(results_dir)` writes `results_dir/README.md`: every result (newest first per
  benchmark and device) with its headline numbers, its targets and its plot.
- `readme_block(results_dir)` is the README's performance section; `update_readme(readme, text)`
  replaces what lies between `<!-- bench:begin -->` and `<!-- bench:end -->` and nothing else.
- `targets_summary(results_dir, stem)` collects the PASS/FAIL targets of every result in a folder
  (the GPU check writes one run's results into a fresh folder, so nothing older can slip in) and
  writes `<stem>.{json,md,png}`.

Invariants: nothing here measures or estimates; every number comes from a results json; quick
runs (`--quick`) never reach the README block.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable

from llmcore.errors import LLMCoreError
from llmcore.io import atomic_write, write_json, write_text

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
ORDER = ("train", "kernels", "data", "generate", "serve", "rag", "verify", "scale")


def slug(text: str) -> str:
    """`text` as a file-name part: lower case, runs of other characters as one `-` (`nvidia-h200`)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


# ----------------------------------------------------------------------------------------------
# rendering: one result's md and png (`BenchResult.write`), and the pieces the pages share


def fmt(x: Any, digits: int = 3) -> str:
    """A number for a table: thousands separators for big ones, 3 significant digits otherwise."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x != x:
            return "-"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def machine_line(m: dict[str, Any]) -> str:
    parts = [
        f"CPU {m['cpu']} ({m['cpu_count']} cores visible, torch threads {m['torch_threads']}"
        + (f", {' '.join(m['cpu_flags'])}" if m.get("cpu_flags") else "")
        + ")"
    ]
    if m.get("gpu"):
        parts.append(
            f"GPU {m['gpu']} ({m.get('gpu_memory_gb')} GiB, sm {m.get('gpu_capability')}, cuDNN {m.get('cudnn')})"
        )
    parts.append(
        f"torch {m['torch']}, triton {m.get('triton') or '-'}, CUDA {m.get('cuda') or '-'}, Python {m['python']}"
    )
    return "; ".join(parts)


def md_table(columns: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return out


def render_markdown(d: dict[str, Any], png_name: str) -> str:
    lines = [f"# {d['title']}", ""]
    if d.get("quick"):
        lines += ["**Quick run** (`--quick`: toy sizes to test the benchmark itself; the numbers mean little).", ""]
    if d.get("command"):
        lines += [f"Command: `{d['command']}`", ""]
    load = d.get("load") or {}
    lines += [
        f"Run {d['started']} UTC, {d['elapsed_s']} s. Machine: {machine_line(d['machine'])}.",
        f"Load (1-minute average) during the run: mean {load.get('load_1min_mean')}, max "
        f"{load.get('load_1min_max')} on {load.get('cpu_count')} CPUs.",
        "",
    ]
    if d.get("interrupted"):
        lines += [
            f"> **Interrupted:** {d['interrupted']}. Everything below was measured before that; what "
            "is missing was not measured.",
            "",
        ]
    for w in d["warnings"]:
        lines += [f"> **Warning:** {w}", ""]
    if d.get("failures"):
        lines += (
            ["## Failed (not measured)", ""]
            + md_table(["part", "error"], [[f["what"], f["error"].replace("|", "/")] for f in d["failures"]])
            + [""]
        )
    lines += [
        "Settings: " + ", ".join(f"{k} `{v}`" for k, v in d["settings"].items()),
        "",
        f"![{d['bench']}]({png_name})",
        "",
    ]
    if d["targets"]:
        lines += ["## Targets", ""]
        lines += md_table(
            ["target", "measured", "threshold", "verdict"],
            [
                [
                    t["name"],
                    fmt(t["value"]) + (t["unit"] if t["value"] is not None else ""),
                    ("≥ " if t["higher_is_better"] else "≤ ") + fmt(t["threshold"]) + t["unit"],
                    f"**{t['verdict']}**",
                ]
                for t in d["targets"]
            ],
        )
        lines.append("")
    if d["ratios"]:
        lines += ["## Ratios (both sides measured in this run)", ""]
        lines += md_table(
            ["ratio", "value", "min .. max", "numerator", "denominator", "how"],
            [
                [
                    r["name"],
                    f"{fmt(r['value'])}x",
                    f"{fmt(r['min'])} .. {fmt(r['max'])}" if r.get("min") is not None else "-",
                    r["numerator"],
                    r["denominator"],
                    r["method"],
                ]
                for r in d["ratios"]
            ],
        )
        lines.append("")
    for t in d["tables"]:
        lines += [f"## {t['title']}", ""] + md_table(t["columns"], t["rows"]) + [""]
    if d["measurements"]:
        cpu = any("per_cpu_second" in m for m in d["measurements"])
        cols = ["case", "metric", "median", "unit", "min .. max", "n"] + (
            ["per CPU-second", "CPU share"] if cpu else []
        )
        rows = []
        for m in d["measurements"]:
            row = [m["case"], m["metric"], fmt(m["median"]), m["unit"], f"{fmt(m['min'])} .. {fmt(m['max'])}", m["n"]]
            if cpu:
                pc, sh = m.get("per_cpu_second"), m.get("cpu_share")
                row += [fmt(pc["median"]) if pc else "-", fmt(sh["median"]) if sh else "-"]
            rows.append(row)
        lines += [
            "## All measurements",
            "",
            "Medians over the interleaved repeats; min .. max is the spread."
            + (
                " CPU share = CPU-seconds / wall seconds / torch threads (below 1: the process waited for "
                "the cores or for I/O)."
                if cpu
                else ""
            ),
            "",
        ]
        lines += md_table(cols, rows) + [""]
    if d["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in d["notes"]] + [""]
    return "\n".join(lines)


def render_png(
    d: dict[str, Any], path: Path, draw: Callable[[Any], None], figsize: tuple[float, float] = (12, 5.5)
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=figsize)
    try:
        draw(fig)
        sub = f"{d['machine'].get('gpu') or d['machine']['cpu']} · torch {d['machine']['torch']} · {d['date']}"
        if d.get("quick"):
            sub += " · QUICK RUN (toy sizes)"
        if d["warnings"]:
            sub += " · machine busy: wall times noisy"
        fig.text(0.5, 0.005, sub, ha="center", va="bottom", fontsize=8, color="dimgray")
        if not getattr(fig, "manual_layout", False):  # a plot that placed its own axes keeps them
            fig.tight_layout(rect=(0, 0.03, 1, 1))
        atomic_write(path, lambda p: fig.savefig(p, dpi=110))
    finally:
        plt.close(fig)


def default_plot(d: dict[str, Any], fig: Any) -> None:
    ax = fig.add_subplot(1, 1, 1)
    ms = d["measurements"][:30]
    ax.barh([m["case"] for m in ms], [m["median"] or 0 for m in ms])
    ax.set_xlabel(ms[0]["unit"] if ms else "")
    ax.set_title(d["title"])


def bar_panel(
    ax: Any,
    labels: list[str],
    values: list[float | None],
    spreads: list[tuple[float, float] | None],
    title: str,
    xlabel: str,
    colors: list[str] | None = None,
    texts: list[str] | None = None,
    ref_line: float | None = None,
    ref_label: str | None = None,
) -> None:
    """A horizontal bar chart with min..max whiskers and each value written at its bar's end."""
    ys = list(range(len(labels)))[::-1]
    vals = [v or 0.0 for v in values]
    ax.barh(ys, vals, color=colors or "tab:blue", alpha=0.85)
    for i, (y, v, s) in enumerate(zip(ys, values, spreads)):
        if v is None:
            ax.text(0, y, " not measured", va="center", fontsize=8, color="gray")
            continue
        if s is not None and s[0] is not None and s[1] is not None:
            ax.plot([s[0], s[1]], [y, y], color="black", lw=1)
        ax.text(
            max(v, s[1] if s and s[1] is not None else v),
            y,
            " " + (texts[i] if texts else fmt(v)),
            va="center",
            fontsize=8,
        )
    if ref_line is not None:
        ax.axvline(ref_line, color="gray", ls="--", lw=1, label=ref_label)
        if ref_label:
            ax.legend(fontsize=8, loc="lower right")
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.margins(x=0.18)


# ----------------------------------------------------------------------------------------------
# pages built from many results


def load_results(results_dir: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """(json path, data) of every benchmark result in the folder, newest first."""
    out = []
    for p in sorted(Path(results_dir).glob("*.json")):
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(d, dict) and "bench" in d and "measurements" in d:
            out.append((p, d))
    out.sort(key=lambda x: (x[1].get("started", ""), x[0].name), reverse=True)
    return out


def latest(
    results: list[tuple[Path, dict[str, Any]]], include_quick: bool = False
) -> dict[tuple[str, str], tuple[Path, dict[str, Any]]]:
    """The newest result per (benchmark, device)."""
    pick: dict[tuple[str, str], tuple[Path, dict[str, Any]]] = {}
    for p, d in results:
        if d.get("quick") and not include_quick:
            continue
        pick.setdefault((d["bench"], d["device"]), (p, d))
    return pick


def verdict_label(verdict: str, quick: bool) -> str:
    """How a verdict is shown: a --quick run only checks that the benchmark runs, so its PASS/FAIL
    is marked as not a measurement."""
    return f"{verdict} (quick run: not a measurement)" if quick and verdict in ("PASS", "FAIL") else verdict


def headline(d: dict[str, Any], limit: int = 8) -> list[str]:
    """A few lines that say what a result found: its targets, then its main ratios."""
    out = []
    for t in d.get("targets", []):
        val = "not measured" if t["value"] is None else f"{fmt(t['value'])}{t['unit']}"
        out.append(
            f"**{verdict_label(t['verdict'], d.get('quick', False))}** {t['name']}: {val} "
            f"(target {'≥' if t['higher_is_better'] else '≤'} {fmt(t['threshold'])}{t['unit']})"
        )
    if d["bench"] == "scale":
        out += d.get("extra", {}).get("conclusions", [])
        return out
    checks = d.get("extra", {}).get("checks")
    if checks is not None:
        failed = sum(not c["ok"] for c in checks)
        out.append(
            f"correctness sweep (Triton interpreter, no timings): {len(checks) - failed}/{len(checks)} checks "
            "within tolerance"
        )
    ratios = [r for r in d.get("ratios", []) if "per CPU-second" not in r["name"]]
    for r in ratios[: max(0, limit - len(out))]:
        out.append(f"{r['name']}: {fmt(r['value'])}x")
    return out


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(path, base).replace(os.sep, "/")


def replot(results_dir: str | Path) -> list[Path]:
    """Redraw the png and md of every result in the folder from its json, and re-derive targets from
    the stored ratios where the benchmark defines how (nothing is re-measured)."""
    from importlib import import_module

    from llmcore.bench.harness import BenchResult  # harness imports this module for its rendering

    done = []
    for p, d in load_results(results_dir):
        res = BenchResult.from_dict(d)
        try:
            mod = import_module(f"llmcore.bench.{d['bench']}")
        except ImportError:
            mod = None
        res.plot = mod.plot_for(res) if mod is not None and hasattr(mod, "plot_for") else None
        if mod is not None and hasattr(mod, "targets_for"):
            mod.targets_for(res)  # targets are functions of the stored ratios
        if d["bench"] == "train":
            res.figsize = (16, 6.5)
        if d["bench"] == "kernels":
            res.figsize = (17, 5.5) if "seqs" in d["settings"] else (12, 5.5)
        res.write(p.parent, p.stem)
        done.append(p)
    return done


def build_index(results_dir: str | Path) -> Path:
    """Write results_dir/README.md: an index of every result with its plot."""
    rdir = Path(results_dir)
    results = load_results(rdir)
    if not results:
        raise LLMCoreError(f"no benchmark results (*.json written by `llmcore bench`) in {rdir}")
    lines = [
        "# Benchmark results",
        "",
        "Built by `llmcore bench report` from the json files in this folder; each "
        "result's own `.md` has every measurement, its settings and the machine.",
        "",
    ]
    seen = latest(results, include_quick=True)
    by_bench: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for p, d in results:
        by_bench.setdefault(d["bench"], []).append((p, d))
    for bench in sorted(by_bench, key=lambda b: (ORDER.index(b) if b in ORDER else 99, b)):
        lines += [f"## {bench}", ""]
        for p, d in by_bench[bench]:
            newest = seen.get((d["bench"], d["device"]), (None,))[0] == p
            tag = " (quick run)" if d.get("quick") else ""
            lines += [
                f"### {d['title']}: {d['device']}, {d['date']}{tag}{'' if newest else ' (older)'}",
                "",
                f"{machine_line(d['machine'])}. [details]({p.with_suffix('.md').name})",
                "",
            ]
            for w in d.get("warnings", []):
                lines += [f"> Warning: {w}", ""]
            lines += [f"- {h}" for h in headline(d)] + [""]
            png = p.with_suffix(".png")
            if png.exists() and newest:
                lines += [f"![{d['bench']} {d['device']}]({png.name})", ""]
    ours = {p.with_suffix(".md").name for p, _ in results} | {"README.md"}
    others = sorted(p.name for p in rdir.glob("*.md") if p.name not in ours)
    if others:
        lines += ["## Other results in this folder", "", "Written by other tools (not `llmcore bench`):", ""]
        lines += [f"- [{name}]({name})" for name in others] + [""]
    path = rdir / "README.md"
    write_text(path, "\n".join(lines))
    return path


def readme_block(results_dir: str | Path, readme_dir: str | Path) -> str:
    """The README's performance section, from the newest full (non-quick) result of each benchmark."""
    rdir, base = Path(results_dir), Path(readme_dir)
    pick = latest(load_results(rdir))
    lines = [
        "<!-- generated by `llmcore bench report --readme` from benchmarks/results/*.json; do not edit by hand -->",
        "",
        "`llmcore bench kernels|train|data|generate|serve|rag|verify|scale` measure every speed against a "
        "baseline in the "
        "same run (interleaved repeats, medians with their spread) and write "
        "`benchmarks/results/<name>-<device>-<date>.{json,md,png}`; `llmcore bench report --readme` rebuilds "
        "this section and [the results index](" + _rel(rdir / "README.md", base) + ") from those files. "
        "`bash benchmarks/gpu_check.sh` runs the same subcommands on a GPU.",
        "",
    ]
    if not pick:
        lines += [
            "No results yet: run `llmcore bench train` (or any other) and then `llmcore bench report --readme`.",
            "",
        ]
        return "\n".join(lines)
    rows = []
    for (bench, device), (p, d) in sorted(
        pick.items(), key=lambda kv: (ORDER.index(kv[0][0]) if kv[0][0] in ORDER else 99, kv[0][1])
    ):
        for t in d.get("targets", []):
            val = "not measured" if t["value"] is None else f"{fmt(t['value'])}{t['unit']}"
            rows.append(
                [
                    f"`bench {bench}` ({device}, {d['date']})",
                    t["name"],
                    f"{'≥' if t['higher_is_better'] else '≤'} {fmt(t['threshold'])}{t['unit']}",
                    val,
                    f"**{t['verdict']}**",
                ]
            )
    if rows:
        lines += ["| result | target (DESIGN.md) | threshold | measured | verdict |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    gpu = any(dev != "cpu" for _, dev in pick)
    if not gpu:
        lines += [
            "No GPU has measured these yet: GPU targets (kernels vs SDPA and torch.compile, 4x MiniMind and 25% "
            "MFU for training) are not reported until `benchmarks/gpu_check.sh` runs on one.",
            "",
        ]
    for (bench, device), (p, d) in sorted(
        pick.items(), key=lambda kv: (ORDER.index(kv[0][0]) if kv[0][0] in ORDER else 99, kv[0][1])
    ):
        lines += [
            f"**`llmcore bench {bench}`** on {d['machine'].get('gpu') or d['machine']['cpu'] + ' (' + str(d['machine']['cpu_count']) + ' cores)'}, "
            f"{d['date']} ([details]({_rel(p.with_suffix('.md'), base)})):",
            "",
        ]
        for w in d.get("warnings", []):
            lines += [f"> {w}", ""]
        if bench == "scale":
            lines += [f"![scale study]({_rel(p.with_suffix('.png'), base)})", ""]
            plan = d.get("extra", {}).get("plan", {})
            lines += [
                f"The study trained {len(d.get('extra', {}).get('curves', []))} sizes on the same "
                f"{plan.get('train_documents')} pretrain_hq-shaped rows ({fmt(plan.get('train_tokens'))} tokens) for "
                f"{d['settings'].get('epochs')} epochs and evaluated {plan.get('eval_documents')} held-out rows "
                f"({fmt(plan.get('eval_tokens'))} tokens) every {plan.get('eval_every_steps')} steps "
                f"({plan.get('steps_per_epoch')} steps per epoch). Left: held-out loss (solid, ★ at its minimum) and "
                "train loss (dashed) against epochs; right: held-out minimum, final held-out and final train loss "
                "against non-embedding parameters. What the numbers say:",
                "",
            ]
            lines += [f"- {c}" for c in d.get("extra", {}).get("conclusions", [])] + [""]
            continue
        for t in d.get("tables", []):
            if t["title"].startswith(
                (
                    "Real tokens per second",
                    "New tokens per second",
                    "Real-token share",
                    "Prep peak memory",
                    "Serving under load",
                    "Build, open and memory",
                    "Recall and latency",
                    "Seconds per pass",
                )
            ):
                lines += [f"*{t['title']}*", ""] + md_table(t["columns"], t["rows"]) + [""]
        lines += [f"- {n}" for n in d.get("notes", []) if n.startswith(("Control:", "CPU caveat:"))]
        if any(n.startswith(("Control:", "CPU caveat:")) for n in d.get("notes", [])):
            lines.append("")
        if bench == "kernels" and device == "cpu":
            extra = d.get("extra", {})
            n = len(extra.get("checks", []))
            lines += [
                f"On CPU the kernels run only in Triton's interpreter, so this is a correctness sweep, no "
                f"timings: {n - extra.get('failed', 0)}/{n} checks within tolerance.",
                "",
            ]
        ratios = [r for r in d.get("ratios", []) if bench in ("data",)]
        for r in ratios:
            lines.append(f"- {r['name']}: {fmt(r['value'])}x")
        if ratios:
            lines.append("")
        lines += [f"![{bench} {device}]({_rel(p.with_suffix('.png'), base)})", ""]
    return "\n".join(lines)


def update_readme(readme: str | Path, block: str) -> Path:
    """Replace the text between the bench markers of `readme` with `block` (markers kept)."""
    path = Path(readme)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LLMCoreError(f"--readme {path}: no such file") from None
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        raise LLMCoreError(
            f"{path} has no `{BEGIN}` ... `{END}` block to rewrite; add the two markers where the "
            "performance section belongs"
        )
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    write_text(path, f"{head}{BEGIN}\n{block.rstrip()}\n{END}{tail}")
    return path


_NOT_MEASURED_NOTES = ("skipped", "not run", "not measured", "no timed round")


def read_phases(path: str | Path) -> list[dict[str, Any]]:
    """gpu_check.sh's phase table: one `name<TAB>status<TAB>seconds` line per phase, in run order."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) == 3:
            rows.append(
                {"phase": parts[0], "status": parts[1], "seconds": int(parts[2]) if parts[2].isdigit() else None}
            )
    return rows


def coverage(results: list[tuple[Path, dict[str, Any]]]) -> dict[str, list[dict[str, str]]]:
    """What a set of results measured and what it did not: per result, the cases measured, the
    parts that failed (with their error), the run's interruption, and the notes that name a part
    skipped or not run."""
    measured, failed, missing = [], [], []
    for p, d in results:
        cases = [m["case"] for m in d["measurements"] if m.get("n")]
        measured.append(
            {
                "result": p.name,
                "what": f"{len(cases)} measurements"
                + (
                    f" ({', '.join(sorted({m.get('preset') for m in d['measurements'] if m.get('preset')}))})"
                    if any(m.get("preset") for m in d["measurements"])
                    else ""
                ),
            }
        )
        for f in d.get("failures", []):
            failed.append({"result": p.name, "what": f["what"], "why": f["error"]})
        if d.get("interrupted"):
            missing.append({"result": p.name, "what": "the rest of this benchmark", "why": d["interrupted"]})
        for n in d.get("notes", []):
            if any(k in n for k in _NOT_MEASURED_NOTES) and not n.startswith("dry run"):
                missing.append({"result": p.name, "what": n, "why": ""})
    return {"measured": measured, "failed": failed, "not_measured": missing}


def targets_summary(
    results_dir: str | Path, out_dir: str | Path, stem: str | None = None, phases: str | Path | None = None
) -> tuple[dict[str, Path], list[dict[str, Any]]]:
    """Every target of every result in `results_dir` into `<stem>.{json,md,png}` (stem default
    `gpu-<card>`), with what was measured, what failed and what was not measured; `phases` adds
    gpu_check.sh's phase table (`read_phases`)."""
    results = load_results(results_dir)
    if not results:
        raise LLMCoreError(f"no benchmark results in {results_dir}")
    targets, machine = [], results[0][1]["machine"]
    for p, d in results:
        for t in d.get("targets", []):
            targets.append({**t, "bench": d["bench"], "result": p.name})
    cover = coverage(results)
    phase_rows = read_phases(phases) if phases else []
    card = machine.get("gpu") or "cpu"
    stem = stem or f"gpu-{slug(card.replace('NVIDIA ', ''))}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"{stem}.{k}" for k in ("json", "md", "png")}
    data = {
        "card": card,
        "machine": machine,
        "targets": targets,
        "phases": phase_rows,
        **cover,
        "results": [p.name for p, _ in results],
        "date": results[0][1]["date"],
    }
    write_json(paths["json"], data)
    lines = [
        f"# Design-card targets on {card}",
        "",
        f"{machine_line(machine)}.",
        "",
        "Every value below was measured in this run; NOT MEASURED means the phase did not produce it "
        "(it is never counted as a pass).",
        "",
    ]
    if phase_rows:
        lines += (
            ["## Phases", ""]
            + md_table(["phase", "seconds", "status"], [[r["phase"], r["seconds"], r["status"]] for r in phase_rows])
            + [""]
        )
    lines += ["## Targets", ""]
    lines += md_table(
        ["verdict", "target", "measured", "threshold", "from"],
        [
            [
                f"**{t['verdict']}**",
                t["name"],
                "-" if t["value"] is None else f"{fmt(t['value'])}{t['unit']}",
                f"{'≥' if t['higher_is_better'] else '≤'} {fmt(t['threshold'])}{t['unit']}",
                t["result"],
            ]
            for t in targets
        ],
    )
    lines += ["", "## Measured", ""] + [f"- {m['result']}: {m['what']}" for m in cover["measured"]]
    lines += ["", "## Failed (not measured)", ""] + (
        [f"- {f['result']}: {f['what']}: {f['why']}" for f in cover["failed"]] or ["- nothing failed"]
    )
    lines += ["", "## Not measured (stopped, skipped)", ""] + (
        [f"- {m['result']}: {m['what']}" + (f" ({m['why']})" if m["why"] else "") for m in cover["not_measured"]]
        or ["- nothing was cut short or skipped"]
    )
    lines += ["", f"![targets]({paths['png'].name})", ""] + [
        f"- [{p.name}]({p.with_suffix('.md').name})" for p, _ in results
    ]
    write_text(paths["md"], "\n".join(lines) + "\n")

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        shown = targets[:40]
        ys = list(range(len(shown)))[::-1]
        vals = []
        for t in shown:
            v = t["value"]
            vals.append(
                0.0 if v is None else (v / t["threshold"] if t["higher_is_better"] else t["threshold"] / v if v else 0)
            )
        colors = {"PASS": "tab:green", "FAIL": "tab:red", "NOT MEASURED": "lightgray"}
        ax.barh(ys, vals, color=[colors[t["verdict"]] for t in shown])
        for y, v, t in zip(ys, vals, shown):
            ax.text(
                v,
                y,
                f" {t['verdict']} ({'-' if t['value'] is None else fmt(t['value']) + t['unit']})",
                va="center",
                fontsize=7,
            )
        ax.axvline(1.0, color="black", ls="--", lw=1, label="target")
        ax.set_yticks(ys)
        ax.set_yticklabels([t["name"][:90] for t in shown], fontsize=7)
        ax.set_xlabel("measured / target (above 1 = met)")
        ax.set_title(f"Design-card targets on {card}", fontsize=11)
        ax.legend(fontsize=8, loc="lower right")
        ax.margins(x=0.25)

    render_png(
        {"machine": machine, "date": data["date"], "warnings": [], "quick": any(d.get("quick") for _, d in results)},
        paths["png"],
        draw,
        figsize=(12, max(4.0, 1.2 + 0.28 * min(len(targets), 40))),
    )
    return paths, targets


__all__ = [
    "fmt",
    "md_table",
    "machine_line",
    "bar_panel",
    "render_markdown",
    "render_png",
    "default_plot",
    "slug",
    "replot",
    "build_index",
    "readme_block",
    "update_readme",
    "targets_summary",
    "load_results",
    "coverage",
    "read_phases",
    "BEGIN",
    "END",
]
