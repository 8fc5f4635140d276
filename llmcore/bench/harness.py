"""The shared benchmark harness: machine facts, interleaved timing, medians with spread, ratios
measured in one run, a load monitor, and the three result files (json, md, png; drawn by `report`).

Invariants (every `llmcore bench` subcommand relies on them):
- A measurement is a named case with one sample per repeat; its summary is the median with the
  min/max spread and the count. Nothing is reported that was not measured in this process.
- Repeats are interleaved: round r runs one repeat of every case, in an order rotated by r, so
  slow drift and other jobs' load hit every case alike.
- A ratio names two measurements of the same result (numerator, denominator) and is computed
  from their samples; with equally many samples it is the median of the per-round ratios
  (paired, so a slow round slows both sides), else the ratio of the medians.
- On CPU every sample has CPU-seconds (user+system of this process, all threads) beside the wall
  time; the load monitor samples the 1-minute load average during the run, and the result carries
  a warning (printed with the results) when it was high for this machine.
- Results are written atomically (`llmcore.io`) as `<name>-<device>-<date>.{json,md,png}`; the
  json holds everything the md and the report pages are built from.
- A part that fails (a loop that raises while being built, warmed up or timed) is recorded in
  `failures` with its error and the rest goes on; a run stopped by SIGINT/SIGTERM (a phase
  deadline) keeps what it measured: `interleaved` returns the complete rounds, `stop_requested()`
  tells the benchmark to stop, and the CLI writes the partial result marked `interrupted`.
- Fault hooks for rehearsing those paths without a GPU: `LLMCORE_BENCH_FAULT="ACTION:TEXT,..."`
  makes every `fault_point(site)` whose site contains TEXT raise (`raise`) or sleep until the
  phase deadline kills it (`hang`); unset, a fault point does nothing.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch

from llmcore.bench.report import default_plot, render_markdown, render_png, slug
from llmcore.io import write_json, write_text

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
T = TypeVar("T")


# ----------------------------------------------------------------------------------------------
# failures, interrupts and fault hooks

FAULT_ENV = "LLMCORE_BENCH_FAULT"
_STOP: dict[str, str | None] = {"reason": None}


class InjectedFault(RuntimeError):
    """Raised by `fault_point` where LLMCORE_BENCH_FAULT asks for a failure (rehearsals only)."""


def fault_point(site: str) -> None:
    """Raise or hang here when LLMCORE_BENCH_FAULT names this site (see the module docstring)."""
    spec = os.environ.get(FAULT_ENV, "")
    for item in filter(None, (x.strip() for x in spec.split(","))):
        action, _, text = item.partition(":")
        if not text or text not in site:
            continue
        if action == "raise":
            raise InjectedFault(f"fault injected by {FAULT_ENV} at {site!r}")
        if action == "hang":
            log.warning("%s: hanging at %r until stopped", FAULT_ENV, site)
            while True:  # a KeyboardInterrupt from the deadline's signal ends it
                time.sleep(0.2)


def request_stop(reason: str) -> None:
    """Ask the running benchmark to stop and keep what it has measured (set by the signal handler)."""
    _STOP["reason"] = reason


def stop_requested() -> str | None:
    """Why the benchmark must stop (a signal, a deadline), or None."""
    return _STOP["reason"]


def clear_stop() -> None:
    _STOP["reason"] = None


def error_line(err: BaseException) -> str:
    """`Type: first line of the message`, short enough for a table."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


# ----------------------------------------------------------------------------------------------
# machine


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The few CPU features that decide bf16 speed on CPU (AMX tiles, AVX-512 bf16)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return sorted(f for f in flags if f in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2"))


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """What ran the benchmark: CPU model and cores, GPU name and memory, library versions."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "device": str(device),
        "gpu": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            gpu_capability=f"{props.major}.{props.minor}",
            cudnn=torch.backends.cudnn.version(),
            gpu_count=torch.cuda.device_count(),
        )
    return info


def device_tag(device: torch.device) -> str:
    """`cpu`, or the GPU's name as a file-name slug (`nvidia-h200`)."""
    if device.type != "cuda":
        return "cpu"
    return slug(torch.cuda.get_device_name(device))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# samples and statistics


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """Median, min, max, relative spread ((max - min) / median) and count of a sample list."""
    vals = [float(v) for v in values if v is not None and v == v]
    if not vals:
        return {"median": None, "min": None, "max": None, "spread": None, "n": 0}
    med = statistics.median(vals)
    return {
        "median": med,
        "min": min(vals),
        "max": max(vals),
        "spread": (max(vals) - min(vals)) / abs(med) if med else None,
        "n": len(vals),
    }


def quick_or_full(value: T | None, quick: bool, quick_default: T, full_default: T) -> T:
    """A flag's value, else its `--quick` or full-run default (a given 0 stays 0, for the range checks)."""
    if value is not None:
        return value
    return quick_default if quick else full_default


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (`q` in 0..1) of `values`; None when empty."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


@dataclass
class Samples:
    """One case's repeats: wall seconds, CPU seconds (process, all threads) and units of work each."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    units: list[float] = field(default_factory=list)
    warmup_s: float = 0.0

    def add(self, wall: float, cpu: float, units: float = 1.0) -> None:
        self.wall.append(wall)
        self.cpu.append(cpu)
        self.units.append(units)

    def rate(self) -> list[float]:
        """Units per wall second, per repeat."""
        return [u / w for u, w in zip(self.units, self.wall) if w > 0]

    def cpu_rate(self) -> list[float]:
        """Units per CPU second, per repeat (much less sensitive to other jobs than wall time)."""
        return [u / c for u, c in zip(self.units, self.cpu) if c > 0]


Case = Callable[[], float | None]


def interleaved(
    cases: dict[str, Case],
    rounds: int,
    warmup: int = 1,
    device: torch.device | None = None,
    progress: Callable[[str], None] | None = None,
    budget_s: float | None = None,
    cpu_clock: Callable[[], float] = time.process_time,
    on_error: Callable[[str, Exception], None] | None = None,
) -> dict[str, Samples]:
    """Run every case `warmup` times (untimed, timed as a whole into `warmup_s`), then `rounds`
    interleaved rounds of one timed call each, the order rotated by one every round.

    A case returns the units of work it did (tokens, bytes; None means 1). On CUDA the device is
    synchronised before and after each timed call. `budget_s` stops starting new rounds once the
    time since the first timed round exceeds it (at least one round always runs). `cpu_clock` gives
    CPU seconds (default: this process, all threads; `cpu_seconds_with_children` adds reaped workers).

    With `on_error`, a case that raises is handed to it and dropped (it is absent from the result)
    while the others go on. A KeyboardInterrupt (Ctrl-C, or a deadline's SIGTERM through the CLI)
    ends the run: the samples of the complete rounds are returned and `stop_requested()` is set."""
    dev = device or torch.device("cpu")
    names = list(cases)
    out = {n: Samples() for n in names}

    def failed(n: str, err: Exception) -> None:
        if on_error is None:
            raise err
        on_error(n, err)
        names.remove(n)
        out.pop(n, None)

    done = 0
    try:
        for n in list(names):
            synchronize(dev)
            t0 = time.perf_counter()
            try:
                for _ in range(warmup):
                    cases[n]()
                synchronize(dev)
            except Exception as err:
                failed(n, err)
                continue
            out[n].warmup_s = time.perf_counter() - t0
            if progress and warmup:
                progress(f"warm-up {n}: {out[n].warmup_s:.1f}s")
        start = time.perf_counter()
        for r in range(rounds):
            if r > 0 and budget_s is not None and time.perf_counter() - start > budget_s:
                if progress:
                    progress(f"time budget reached after {r} of {rounds} rounds")
                break
            if not names or stop_requested():
                break
            k = r % len(names)
            for n in names[k:] + names[:k]:
                synchronize(dev)
                c0, t0 = cpu_clock(), time.perf_counter()
                try:
                    units = cases[n]()
                    synchronize(dev)
                except Exception as err:
                    failed(n, err)
                    continue
                out[n].add(time.perf_counter() - t0, cpu_clock() - c0, 1.0 if units is None else float(units))
            done = r + 1
            if progress:
                progress(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {out[n].wall[-1]:.3g}s" for n in names))
    except KeyboardInterrupt:
        request_stop(stop_requested() or "interrupted")
        if progress:
            progress(f"interrupted after {done} complete round(s); keeping those")
        for s in out.values():  # drop the unfinished round so every case has the same rounds
            del s.wall[done:], s.cpu[done:], s.units[done:]
    return out


def cpu_seconds_with_children() -> float:
    """User + system CPU time of this process and of its children that have been waited for (a
    process pool's workers, once it is closed)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


# ----------------------------------------------------------------------------------------------
# load


class LoadMonitor:
    """Samples the 1-minute load average every `every` seconds in a daemon thread while running.

    High load: the mean load during the run exceeded the CPU count plus one (the benchmark itself
    keeps up to one load per core busy), i.e. other jobs competed for the cores."""

    def __init__(self, every: float = 2.0) -> None:
        self.every = every
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        try:
            self.samples.append(os.getloadavg()[0])
        except OSError:
            pass

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def start(self) -> "LoadMonitor":
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="llmcore-bench-load", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.every + 1)
        self._sample()
        return self.report()

    def report(self) -> dict[str, Any]:
        cpus = os.cpu_count() or 1
        s = self.samples or [0.0]
        mean = sum(s) / len(s)
        high = mean > cpus + 1
        return {
            "load_1min_mean": round(mean, 2),
            "load_1min_max": round(max(s), 2),
            "cpu_count": cpus,
            "samples": len(self.samples),
            "high": high,
        }


# ----------------------------------------------------------------------------------------------
# results


def _round(x: Any, digits: int = 4) -> Any:
    if isinstance(x, float):
        if x != x:
            return None
        return float(f"{x:.{digits}g}")
    return x


class BenchResult:
    """Everything one `llmcore bench NAME` run measured; `write()` makes the three files.

    - `measure(case, metric, unit, values, **facts)`: one measurement (per-repeat values);
    - `ratio(name, numerator, denominator, metric)`: computed here from two measurements' values;
    - `target(name, value, threshold, ...)`: a design-card target with PASS/FAIL;
    - `table(title, columns, rows)`, `note(text)`, `warn(text)`: extra report content;
    - `plot`: a function `(result, fig) -> None` that draws the png."""

    def __init__(
        self,
        name: str,
        device: torch.device,
        settings: dict[str, Any],
        quick: bool = False,
        title: str | None = None,
        command: str | None = None,
    ) -> None:
        self.name = name
        self.device = device
        self.settings = dict(settings)
        self.quick = quick
        self.title = title or f"llmcore bench {name}"
        self.command = command
        self.machine = machine_info(device)
        self.started = _dt.datetime.now(_dt.timezone.utc)
        self.measurements: list[dict[str, Any]] = []
        self.ratios: list[dict[str, Any]] = []
        self.targets: list[dict[str, Any]] = []
        self.tables: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.warnings: list[str] = []
        self.failures: list[dict[str, str]] = []
        self.interrupted: str | None = None
        self.extra: dict[str, Any] = {}
        self.plot: Callable[["BenchResult", Any], None] | None = None
        self.figsize: tuple[float, float] = (12, 5.5)
        self.load = LoadMonitor().start()
        self.load_report: dict[str, Any] | None = None
        self.elapsed_s: float | None = None
        self._t0 = time.perf_counter()
        _CURRENT["result"] = self  # the CLI writes it if the run is interrupted or crashes

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BenchResult":
        """A finished result rebuilt from its json (to redraw its png and md; measures nothing)."""
        res = cls.__new__(cls)
        res.name, res.title, res.command, res.quick = d["bench"], d["title"], d.get("command"), d.get("quick", False)
        res.device = torch.device("cuda" if d["machine"].get("gpu") else "cpu")
        res.settings, res.machine = d["settings"], d["machine"]
        res.started = _dt.datetime.fromisoformat(d["started"])
        for key in ("measurements", "ratios", "targets", "tables", "notes", "warnings"):
            setattr(res, key, d[key])
        res.failures, res.interrupted = d.get("failures", []), d.get("interrupted")
        res.extra, res.load_report, res.elapsed_s = d["extra"], d["load"], d["elapsed_s"]
        res.plot, res.figsize = None, (12, 5.5)
        res._device_tag = d["device"]
        return res

    # -- recording -------------------------------------------------------------------------
    def measure(
        self, case: str, metric: str, unit: str, values: Sequence[float], higher_is_better: bool = True, **facts: Any
    ) -> dict[str, Any]:
        fault_point(f"{self.name} measure {case}")
        entry = {
            "case": case,
            "metric": metric,
            "unit": unit,
            "higher_is_better": higher_is_better,
            "values": [_round(float(v), 6) for v in values],
            **summarize(values),
            **facts,
        }
        self.measurements.append(entry)
        return entry

    def measure_samples(
        self, case: str, samples: Samples, unit: str, metric: str = "throughput", **facts: Any
    ) -> dict[str, Any]:
        """Rate (units per wall second) of a case's samples, with seconds per repeat and, on CPU,
        units per CPU-second and the CPU share (CPU seconds / wall seconds / torch threads)."""
        extra: dict[str, Any] = {"seconds": summarize(samples.wall), "warmup_s": round(samples.warmup_s, 3)}
        if self.device.type == "cpu":
            extra["per_cpu_second"] = summarize(samples.cpu_rate())
            shares = [c / w / max(torch.get_num_threads(), 1) for c, w in zip(samples.cpu, samples.wall) if w > 0]
            extra["cpu_share"] = summarize(shares)
        entry = self.measure(case, metric, unit, samples.rate(), **extra, **facts)
        if self.device.type == "cpu":
            # The same rate per CPU-second as its own measurement, so ratios can be taken on it too.
            self.measure(case, "per CPU-second", unit.replace("/s", "/CPU-s"), samples.cpu_rate(), **facts)
        return entry

    def find(self, case: str, metric: str | None = None) -> dict[str, Any]:
        for m in self.measurements:
            if m["case"] == case and (metric is None or m["metric"] == metric):
                return m
        raise KeyError(f"no measurement {case!r} ({metric})")

    def ratio(
        self, name: str, numerator: str, denominator: str, metric: str | None = None, what: str = ""
    ) -> dict[str, Any] | None:
        """numerator / denominator of one metric of two measured cases (see the module docstring)."""
        try:
            a, b = self.find(numerator, metric), self.find(denominator, metric)
        except KeyError:
            return None
        va, vb = [v for v in a["values"] if v is not None], [v for v in b["values"] if v is not None]
        if not va or not vb:
            return None
        if len(va) == len(vb):
            per = [x / y for x, y in zip(va, vb) if y]
            s = summarize(per)
            method = "median of per-round ratios (interleaved)"
        else:
            s = {"median": statistics.median(va) / statistics.median(vb), "min": None, "max": None, "n": 0}
            method = "ratio of medians"
        entry = {
            "name": name,
            "numerator": numerator,
            "denominator": denominator,
            "metric": a["metric"],
            "value": s["median"],
            "min": s["min"],
            "max": s["max"],
            "method": method,
            "what": what,
        }
        self.ratios.append(entry)
        return entry

    def target(
        self, name: str, value: float | None, threshold: float, unit: str = "x", higher: bool = True, source: str = ""
    ) -> dict[str, Any]:
        """A design-card target; a value that could not be measured is `NOT MEASURED`, never a pass."""
        if value is None or value != value:
            verdict = "NOT MEASURED"
        else:
            verdict = "PASS" if (value >= threshold if higher else value <= threshold) else "FAIL"
        entry = {
            "name": name,
            "value": value,
            "threshold": threshold,
            "unit": unit,
            "higher_is_better": higher,
            "verdict": verdict,
            "source": source,
            "device": self.machine.get("gpu") or self.machine["cpu"],
        }
        self.targets.append(entry)
        return entry

    def table(self, title: str, columns: list[str], rows: list[list[Any]]) -> None:
        self.tables.append({"title": title, "columns": columns, "rows": rows})

    def note(self, text: str) -> None:
        self.notes.append(text)

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        log.warning("warning: %s", text)

    def fail(self, what: str, err: BaseException) -> None:
        """Record that one part (a loop, a shape) failed; nothing of it is reported as measured."""
        self.failures.append({"what": what, "error": error_line(err)})
        log.error("%s: FAILED, not measured (%s)", what, error_line(err))

    def mark_interrupted(self, reason: str) -> None:
        """The run stopped early (signal, deadline, crash): what follows was not measured."""
        self.interrupted = reason

    # -- output ----------------------------------------------------------------------------
    def finish(self) -> None:
        if self.load_report is None:
            self.load_report = self.load.stop()
            self.elapsed_s = time.perf_counter() - self._t0
            if self.load_report["high"]:
                self.warn(
                    f"the machine was busy during this run: mean 1-minute load "
                    f"{self.load_report['load_1min_mean']} (max {self.load_report['load_1min_max']}) on "
                    f"{self.load_report['cpu_count']} CPUs; wall-clock numbers are noisy, prefer the ratios "
                    "(interleaved) and the per-CPU-second figures"
                )

    def device_tag(self) -> str:
        return getattr(self, "_device_tag", None) or device_tag(self.device)

    def stem(self) -> str:
        return f"{self.name}-{self.device_tag()}-{self.started.strftime('%Y-%m-%d')}"

    def to_dict(self) -> dict[str, Any]:
        self.finish()
        return {
            "schema": SCHEMA_VERSION,
            "bench": self.name,
            "title": self.title,
            "command": self.command,
            "device": self.device_tag(),
            "date": self.started.strftime("%Y-%m-%d"),
            "started": self.started.isoformat(timespec="seconds"),
            "elapsed_s": round(self.elapsed_s or 0.0, 1),
            "quick": self.quick,
            "machine": self.machine,
            "settings": self.settings,
            "load": self.load_report,
            "measurements": self.measurements,
            "ratios": self.ratios,
            "targets": self.targets,
            "tables": self.tables,
            "notes": self.notes,
            "warnings": self.warnings,
            "extra": self.extra,
            "failures": self.failures,
            "interrupted": self.interrupted,
        }

    def write(self, out_dir: str | Path, stem: str | None = None) -> dict[str, Path]:
        """`<stem>.json`, `.md` and `.png` in `out_dir` (created); returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = stem or self.stem()
        data = self.to_dict()
        paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
        write_json(paths["json"], data)

        def draw(fig: Any) -> None:
            if self.plot is not None:
                try:
                    self.plot(self, fig)
                    return
                except Exception as err:  # a partial result may lack what its plot expects: plain bars then
                    log.warning("%s plot failed (%s); drawing the plain one", self.name, error_line(err))
                    fig.clf()
                    fig.manual_layout = False
            default_plot(data, fig)

        render_png(data, paths["png"], draw, figsize=self.figsize)
        write_text(paths["md"], render_markdown(data, paths["png"].name))
        return paths


_CURRENT: dict[str, BenchResult | None] = {"result": None}


def current_result() -> BenchResult | None:
    """The result made last in this process (what an interrupted run has measured so far)."""
    return _CURRENT["result"]


__all__ = [
    "machine_info",
    "device_tag",
    "percentile",
    "quick_or_full",
    "summarize",
    "Samples",
    "interleaved",
    "LoadMonitor",
    "BenchResult",
    "cpu_model",
    "synchronize",
    "cpu_seconds_with_children",
    "fault_point",
    "InjectedFault",
    "request_stop",
    "stop_requested",
    "clear_stop",
    "current_result",
    "error_line",
    "FAULT_ENV",
]
