"""Benchmarks (`llmcore bench ...`): every speed measured against a baseline in the same run.

Modules: `harness` (machine facts, interleaved timing, medians and spread, ratios, load monitor,
the json/md/png writer), `corpus` (shared sample data, pretrain_hq-shaped rows), one module per
subcommand (`kernels`, `train`, `data`, `generate`, `serve`, `rag`, `verify`, `scale`, `recipe`),
`report` (index page, README block, GPU target summary) and `cli` (`register(app)`).

Invariants: each subcommand returns a `BenchResult` and writes
`<name>-<device>-<date>.{json,md,png}`; every ratio in a result is computed from two measurements
of that same result; targets whose inputs were not measured are NOT MEASURED, never PASS.
Importing this package imports neither Triton nor the training stack.
"""

from llmcore.bench.harness import BenchResult, Samples, interleaved, machine_info, summarize

__all__ = ["BenchResult", "Samples", "interleaved", "machine_info", "summarize"]
