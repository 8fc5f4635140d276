"""`llmcore bench serve`: a load run of `llmcore serve`: requests/s, completion tokens/s, time to
first token and request latency (p50/p95) for each `--max-batch` setting, against requests one at
a time through `llmcore.generate` in this process (the `direct` baseline: no HTTP, no queue).

For each `--max-batch` value the real server (`python -m llmcore serve`) runs in a subprocess on
127.0.0.1 and a free port, and `--requests` streamed greedy chat requests come from `--concurrency`
client threads in this process (stdlib `http.client`, one keep-alive connection per thread), each
with at most `--max-tokens` completion tokens. The model is `--ckpt`, or random weights of
`--preset` with MiniMind's tokenizer (serving speed does not depend on what the weights say). Only
127.0.0.1 is used.

Invariants:
- The settings take turns in `--rounds` interleaved rounds (the harness's `interleaved`, order
  rotated per round), each round a slice of the requests, so a shared machine's load falls on all
  of them alike; every server is up the whole time (an idle one costs nothing).
- One warm-up request per server and one direct request run before the first round, untimed.
- Bounded in count (`--requests`) and time (`--time-limit` seconds per setting, split evenly over
  the rounds: no new request starts after a round's share).
- Per setting: throughput and requests/s per round (units over the round's wall time), time to
  first token and latency per request (median = p50, with the nearest-rank p95 beside it); the
  table's totals are all requests over all rounds' wall time. Ratios are paired per round.
- CPU-seconds of this process say nothing about a server in another process, so none are reported.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable

import torch

from llmcore.bench.corpus import minimind_tokenizer_dir, shared_data_dir
from llmcore.bench.harness import BenchResult, interleaved, percentile, quick_or_full, stop_requested
from llmcore.bench.report import bar_panel, fmt
from llmcore.chat import chat_prompt_ids
from llmcore.checkpoint import load_model_and_tokenizer, save_model
from llmcore.common import default_attn_backend
from llmcore.errors import LLMCoreError
from llmcore.generate import stream_generate
from llmcore.model import LLM, ModelConfig

log = logging.getLogger(__name__)

QUESTIONS = [
    "你好，请介绍一下你自己。",
    "中国的首都是哪里？",
    "请写一首关于春天的短诗。",
    "为什么天空是蓝色的？",
    "推荐几本适合初学者的编程书。",
    "解释一下什么是机器学习。",
    "长城有多长？",
    "如何保持健康的生活习惯？",
    "What is the capital of France?",
    "Tell me a joke about cats.",
    "1+1等于几？",
    "大熊猫吃什么？",
]
DIRECT = "direct"
SERVER_START_S = 300.0


def setting_name(max_batch: int) -> str:
    return f"--max-batch {max_batch}"


def random_checkpoint(preset: str, out: Path) -> Path:
    """A checkpoint dir with random weights of `preset` (seed 0)."""
    torch.manual_seed(0)
    return save_model(LLM(ModelConfig.from_preset(preset)), out)


def start_server(ckpt: Path, tokenizer: Path | None, max_batch: int, device: str) -> tuple[subprocess.Popen[str], str]:
    """`python -m llmcore serve` on 127.0.0.1 and a free port; (process, base URL ending in /v1)."""
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "llmcore", "serve", "--ckpt", str(ckpt), "--host", "127.0.0.1", "--port", "0"]
    cmd += ["--device", device, "--max-batch", str(max_batch), "--log-level", "warning", "--model-name", "bench"]
    cmd += ["--no-ui"] + (["--tokenizer", str(tokenizer)] if tokenizer is not None else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    seen: list[str] = []
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:  # the server exited before it was ready
            break
        if " at http://127.0.0.1:" in line:
            # Drain stderr so a chatty server can never block on a full pipe.
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, line.split(" at ", 1)[1].split()[0]
        seen.append(line.strip())
    proc.kill()
    proc.wait(30)
    tail = " / ".join(x for x in seen[-3:] if x) or "no output"
    raise LLMCoreError(f"llmcore serve --max-batch {max_batch} did not start: {tail}")


class Client:
    """A keep-alive HTTP connection to one server (stdlib `http.client`: no client library needed)."""

    def __init__(self, base: str, timeout: float = 600.0) -> None:
        url = urllib.parse.urlsplit(base)
        self.path = url.path.rstrip("/")
        self.conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=timeout)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.close()

    def chat(self, i: int, max_tokens: int) -> dict[str, float]:
        """One streamed greedy chat request (question `i`): time to first content, latency, tokens."""
        body = {
            "model": "bench",
            "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        t0 = time.perf_counter()
        ttft = None
        usage: dict[str, int] = {}
        self.conn.request(
            "POST", self.path + "/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        resp = self.conn.getresponse()
        if resp.status != 200:
            raise LLMCoreError(f"llmcore serve answered {resp.status}: {resp.read()[:200]!r}")
        for raw in iter(resp.readline, b""):
            line = raw.decode("utf-8").strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and any(c["delta"].get("content") for c in chunk["choices"]):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                usage = chunk["usage"]
        total = time.perf_counter() - t0
        return {
            "ttft_s": ttft if ttft is not None else total,
            "latency_s": total,
            "completion_tokens": usage.get("completion_tokens", 0),
        }


def load_run(
    base: str, first: int, requests: int, concurrency: int, max_tokens: int, time_limit: float
) -> list[dict[str, float]]:
    """`requests` streamed requests (question indices from `first`) from `concurrency` threads, each
    on its own keep-alive connection; no request starts after `time_limit` seconds."""
    results: list[dict[str, float]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    counter = iter(range(first, first + requests))
    deadline = time.perf_counter() + time_limit

    def client_thread() -> None:
        try:
            with Client(base) as client:
                while time.perf_counter() < deadline:
                    with lock:
                        i = next(counter, None)
                    if i is None:
                        return
                    res = client.chat(i, max_tokens)
                    with lock:
                        results.append(res)
        except Exception as err:  # re-raised on the caller's thread: the case fails, not silently shrinks
            errors.append(err)

    threads = [threading.Thread(target=client_thread) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


class DirectBaseline:
    """Requests one after another through `llmcore.generate` in this process (no HTTP, no queue)."""

    def __init__(self, ckpt: Path, tokenizer: Path | None, device: torch.device, max_tokens: int) -> None:
        self.model, self.tok = load_model_and_tokenizer(
            ckpt, device, attn_backend=default_attn_backend(device), tokenizer=tokenizer
        )
        self.max_tokens = max_tokens

    def run(self, first: int, requests: int) -> list[dict[str, float]]:
        """On a thread of its own, as the server's worker runs: on a busy shared CPU, torch's OpenMP
        threads on the main thread measured 5-7x slower than the same work on another thread."""
        out: list[list[dict[str, float]]] = []
        errors: list[BaseException] = []

        def work() -> None:
            try:
                out.append(self._run(first, requests))
            except Exception as err:
                errors.append(err)

        t = threading.Thread(target=work)
        t.start()
        t.join()
        if errors:
            raise errors[0]
        return out[0]

    def _run(self, first: int, requests: int) -> list[dict[str, float]]:
        results = []
        for i in range(first, first + requests):
            start = time.perf_counter()
            first_token, n = None, 0
            for _ in stream_generate(
                self.model,
                chat_prompt_ids(self.tok, QUESTIONS[i % len(QUESTIONS)]),
                max_new_tokens=self.max_tokens,
                eos_id=self.tok.eos_id,
            ):
                first_token = first_token or time.perf_counter() - start
                n += 1
            total = time.perf_counter() - start
            results.append({"ttft_s": first_token or total, "latency_s": total, "completion_tokens": n})
        return results


def check_settings(
    requests: int,
    concurrency: int,
    rounds: int,
    max_tokens: int,
    max_batch: list[int],
    direct_requests: int,
    time_limit: float,
) -> None:
    """One LLMCoreError line naming the flag whose value is out of range."""
    if not 1 <= requests <= 10_000:
        raise LLMCoreError(f"--requests must be 1..10000, got {requests}")
    if not 1 <= concurrency <= 64:
        raise LLMCoreError(f"--concurrency must be 1..64, got {concurrency}")
    if not 1 <= rounds <= requests:
        raise LLMCoreError(f"--rounds must be 1..--requests ({requests}), got {rounds}")
    if max_tokens < 1:
        raise LLMCoreError(f"--max-tokens must be at least 1, got {max_tokens}")
    if not max_batch or min(max_batch) < 1 or len(set(max_batch)) != len(max_batch):
        raise LLMCoreError(f"--max-batch {max_batch}: expected distinct values of at least 1")
    if direct_requests < 0:
        raise LLMCoreError(f"--direct-requests must be 0 or more, got {direct_requests}")
    if time_limit <= 0:
        raise LLMCoreError(f"--time-limit must be above 0 seconds, got {time_limit}")


def run_serve(
    device: torch.device,
    quick: bool = False,
    ckpt: Path | None = None,
    preset: str | None = None,
    tokenizer: Path | None = None,
    requests: int | None = None,
    concurrency: int | None = None,
    max_tokens: int | None = None,
    max_batch: list[int] | None = None,
    rounds: int | None = None,
    direct_requests: int | None = None,
    time_limit: float | None = None,
    data_dir: Path | None = None,
    command: str | None = None,
) -> BenchResult:
    """The serving benchmark (see the module docstring); returns the result, not yet written."""
    preset = quick_or_full(preset, quick, "tiny", "minimind2-small")
    requests = quick_or_full(requests, quick, 4, 32)
    concurrency = quick_or_full(concurrency, quick, 2, 8)
    max_tokens = quick_or_full(max_tokens, quick, 4, 32)
    max_batch = quick_or_full(max_batch, quick, [2], [1, 8])
    rounds = quick_or_full(rounds, quick, 2, 4)
    direct_requests = quick_or_full(direct_requests, quick, 2, 8)
    time_limit = quick_or_full(time_limit, quick, 60.0, 120.0)
    check_settings(requests, concurrency, rounds, max_tokens, max_batch, direct_requests, time_limit)
    if ckpt is not None and not Path(ckpt).exists():
        raise LLMCoreError(f"--ckpt {ckpt}: no such run dir or checkpoint")
    if ckpt is None and tokenizer is None:
        tokenizer = minimind_tokenizer_dir(shared_data_dir(data_dir))
    if tokenizer is not None and not (Path(tokenizer) / "tokenizer.json").is_file():
        raise LLMCoreError(f"--tokenizer {tokenizer}: no tokenizer.json there")
    settings = {
        "model": str(ckpt) if ckpt else f"{preset} (random weights)",
        "requests": requests,
        "rounds": rounds,
        "direct_requests": direct_requests,
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "max_batch": max_batch,
        "time_limit_s": time_limit,
        "request": "streamed greedy chat completion, one user message",
        "client": "http.client threads in the benchmark's process; server in its own process on 127.0.0.1",
    }
    res = BenchResult(
        "serve",
        device,
        settings,
        quick=quick,
        command=command,
        title="Serving benchmark: llmcore serve under concurrent load vs one request at a time",
    )
    res.figsize = (13, 5.0)
    with tempfile.TemporaryDirectory(prefix="llmcore-bench-serve-") as tmp:
        model_dir = Path(ckpt) if ckpt is not None else random_checkpoint(preset, Path(tmp) / f"random-{preset}")
        servers: dict[str, tuple[subprocess.Popen[str], str]] = {}
        try:
            for mb in max_batch:
                servers[setting_name(mb)] = start_server(model_dir, tokenizer, mb, str(device))
                log.info("serve: %s up at %s", setting_name(mb), servers[setting_name(mb)][1])
            _measure(
                res,
                device,
                model_dir,
                tokenizer,
                servers,
                requests,
                rounds,
                direct_requests,
                concurrency,
                max_tokens,
                time_limit,
            )
        finally:
            for proc, _ in servers.values():
                proc.terminate()
            for proc, _ in servers.values():
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(30)
    res.plot = _plot
    return res


def _measure(
    res: BenchResult,
    device: torch.device,
    model_dir: Path,
    tokenizer: Path | None,
    servers: dict[str, tuple[subprocess.Popen[str], str]],
    requests: int,
    rounds: int,
    direct_requests: int,
    concurrency: int,
    max_tokens: int,
    time_limit: float,
) -> None:
    per_round = max(1, requests // rounds)
    direct_per_round = max(1, direct_requests // rounds)
    rounds_done: dict[str, list[list[dict[str, float]]]] = {}  # per case, per complete round: its requests
    cases: dict[str, Callable[[], float]] = {}

    def case(name: str, one_round: Callable[[int], list[dict[str, float]]]) -> Callable[[], float]:
        def run() -> float:
            done = rounds_done.setdefault(name, [])
            got = one_round(len(done))
            done.append(got)
            return float(sum(x["completion_tokens"] for x in got))

        return run

    if direct_requests:
        direct = DirectBaseline(model_dir, tokenizer, device, max_tokens)
        direct.run(0, 1)  # warm-up: first-call allocations, not counted
        cases[DIRECT] = case(DIRECT, lambda r: direct.run(r * direct_per_round, direct_per_round))
    for name, (_, base) in servers.items():
        with Client(base) as warm:
            warm.chat(0, max_tokens)  # warm-up, not counted

        def server_round(r: int, base: str = base) -> list[dict[str, float]]:
            return load_run(base, r * per_round, per_round, concurrency, max_tokens, time_limit / rounds)

        cases[name] = case(name, server_round)
    samples = interleaved(
        cases,
        rounds,
        warmup=0,
        device=device,
        progress=lambda m: log.info("serve: %s", m),
        on_error=lambda n, err: res.fail(n, err),
    )
    summaries = []
    for name, s in samples.items():
        complete = rounds_done.get(name, [])[: len(s.wall)]  # a round cut by a stop is not in the samples
        recs = [rec for rnd in complete for rec in rnd]
        if not recs:
            continue
        counts = [float(len(rnd)) for rnd in complete]
        ttft = [x["ttft_s"] for x in recs]
        lat = [x["latency_s"] for x in recs]
        res.measure(name, "throughput", "completion tokens/s", s.rate(), seconds_per_round=s.wall)
        res.measure(name, "requests/s", "requests/s", [c / w for c, w in zip(counts, s.wall) if w > 0])
        res.measure(name, "time to first token", "s", ttft, higher_is_better=False, p95=percentile(ttft, 0.95))
        res.measure(name, "latency", "s", lat, higher_is_better=False, p95=percentile(lat, 0.95))
        wall, tokens = sum(s.wall), sum(s.units)
        summaries.append(
            {
                "setting": name,
                "requests_done": len(recs),
                "wall_s": wall,
                "requests_per_s": len(recs) / wall,
                "completion_tokens": int(tokens),
                "completion_tokens_per_s": tokens / wall,
                "ttft_p50_s": res.find(name, "time to first token")["median"],
                "ttft_p95_s": percentile(ttft, 0.95),
                "latency_p50_s": res.find(name, "latency")["median"],
                "latency_p95_s": percentile(lat, 0.95),
            }
        )
    if not summaries:
        return
    first = summaries[0]["setting"]
    rows = []
    for sm in summaries:
        ratio = None
        if sm["setting"] != first:
            ratio = res.ratio(f"{sm['setting']} vs {first}", sm["setting"], first, metric="throughput")
        sm["tokens_per_s_vs_first"] = sm["completion_tokens_per_s"] / summaries[0]["completion_tokens_per_s"]
        rows.append(
            [
                sm["setting"],
                sm["requests_done"],
                f"{sm['requests_per_s']:.2f}",
                f"{sm['completion_tokens_per_s']:.0f}",
                f"{sm['ttft_p50_s'] * 1000:.0f} ms",
                f"{sm['ttft_p95_s'] * 1000:.0f} ms",
                f"{sm['latency_p50_s']:.2f} s",
                f"{sm['latency_p95_s']:.2f} s",
                f"{sm['tokens_per_s_vs_first']:.2f}x",
                f"{fmt(ratio['value'])}x" if ratio else "-",
            ]
        )
    res.extra["runs"] = summaries
    res.table(
        "Serving under load (totals over all rounds)",
        [
            "setting",
            "requests",
            "req/s",
            "tokens/s",
            "TTFT p50",
            "TTFT p95",
            "latency p50",
            "latency p95",
            "tokens/s vs first row",
            "paired per-round ratio",
        ],
        rows,
    )
    if DIRECT in rounds_done:
        res.note(
            "`direct` is the baseline: the same requests one at a time through `llmcore.generate` in the "
            "benchmark's process, on a thread as the server's worker (no HTTP, no concurrency); its time to "
            "first token has no queueing in it."
        )
    res.note(
        "req/s and tokens/s in the table are all requests (tokens) over the summed wall time of the rounds; "
        "the paired ratio is the median over rounds of the per-round throughput ratio."
    )
    if stop_requested():
        res.note("the run was stopped before all rounds: the table holds the complete rounds only")


def _plot(res: BenchResult, fig: Any) -> None:
    runs = res.extra.get("runs", [])
    names = [r["setting"] for r in runs]
    tput = [res.find(n, "throughput") for n in names]
    ax1 = fig.add_subplot(1, 2, 1)
    bar_panel(
        ax1,
        names,
        [m["median"] for m in tput],
        [(m["min"], m["max"]) for m in tput],
        "completion tokens/s (median of rounds, min..max)",
        "tokens/s",
    )
    ax2 = fig.add_subplot(1, 2, 2)
    ys = list(range(len(runs)))[::-1]
    p50 = [r["ttft_p50_s"] for r in runs]
    p95 = [r["ttft_p95_s"] for r in runs]
    ax2.barh([y + 0.2 for y in ys], p50, height=0.4, label="p50", color="tab:blue")
    ax2.barh([y - 0.2 for y in ys], p95, height=0.4, label="p95", color="tab:orange")
    for y, a, b in zip(ys, p50, p95):
        ax2.text(a, y + 0.2, f" {a:.2g} s", va="center", fontsize=8)
        ax2.text(b, y - 0.2, f" {b:.2g} s", va="center", fontsize=8)
    ax2.set_yticks(ys)
    ax2.set_yticklabels(names, fontsize=8)
    ax2.set_xlabel("seconds")
    ax2.set_title("time to first token", fontsize=10)
    ax2.legend(fontsize=8, loc="lower right")
    ax2.margins(x=0.18)
    fig.suptitle(
        f"llmcore serve: {res.settings['model']}, {res.settings['concurrency']} concurrent clients, "
        f"max_tokens {res.settings['max_tokens']}",
        fontsize=11,
    )


def plot_for(res: BenchResult) -> Any:
    """The plot function for a result of this benchmark (used to redraw from json)."""
    return _plot


__all__ = ["run_serve", "plot_for", "QUESTIONS"]
