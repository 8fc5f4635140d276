"""Load run for `llmcore serve`: requests/s, completion tokens/s and time to first token (p50/p95).

    python benchmarks/bench_serve.py                                  # minimind2-small (random weights), cpu
    python benchmarks/bench_serve.py --ckpt runs/dpo --requests 64 --concurrency 8

For each `--max-batch` setting (default: 1 = a plain request queue, and 8 = batching of concurrent
requests with the KV cache) it starts the real server (`python -m llmcore serve`) in a subprocess on
127.0.0.1 and a free port, and sends `--requests` streamed greedy chat requests from `--concurrency`
client threads, each with `--max-tokens` tokens at most. The baseline (`direct`) runs
`--direct-requests` of the same requests one by one through `llmcore.generate` in this process. The
settings take turns in `--rounds` rounds, so the load of a shared machine falls on all of them.
Bounded in count (`--requests`) and time (`--time-limit` seconds per setting: no new request starts
after it); one warmup request per server is not counted. Only 127.0.0.1 is used.
Writes benchmarks/results/serve-<device>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
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


def make_random_run(preset: str, tokenizer: Path, out: Path) -> Path:
    """A run dir with random weights of `preset` (serving speed does not depend on what the weights say)."""
    import shutil

    import torch

    from llmcore.checkpoint import save_model
    from llmcore.model import LLM, ModelConfig

    torch.manual_seed(0)
    save_model(LLM(ModelConfig.from_preset(preset)), out / "checkpoints" / "step-0")
    (out / "checkpoints" / "latest").write_text("step-0\n")
    shutil.copytree(tokenizer, out / "tokenizer")
    return out


def start_server(ckpt: Path, max_batch: int, device: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmcore",
            "serve",
            "--ckpt",
            str(ckpt),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--device",
            device,
            "--max-batch",
            str(max_batch),
            "--log-level",
            "warning",
            "--model-name",
            "bench",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    if " at http://127.0.0.1:" not in line:
        proc.kill()
        raise SystemExit(f"server did not start: {line}{proc.stderr.read()}")
    return proc, line.split(" at ", 1)[1].split()[0]


def one_request(client: httpx.Client, base: str, i: int, max_tokens: int) -> dict[str, Any]:
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
    with client.stream("POST", base + "/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
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


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summarize(name: Any, results: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    ttft = [r["ttft_s"] for r in results]
    lat = [r["latency_s"] for r in results]
    tokens = sum(r["completion_tokens"] for r in results)
    return {
        "max_batch": name,
        "requests_done": len(results),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(results) / wall, 3),
        "completion_tokens": tokens,
        "completion_tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": round(pct(ttft, 0.5), 4),
        "ttft_p95_s": round(pct(ttft, 0.95), 4),
        "latency_p50_s": round(pct(lat, 0.5), 4),
        "latency_p95_s": round(pct(lat, 0.95), 4),
        "mean_completion_tokens": round(tokens / max(len(results), 1), 1),
    }


def load_run(
    base: str, first: int, requests: int, concurrency: int, max_tokens: int, time_limit: float
) -> tuple[list[dict[str, Any]], float]:
    """`requests` streamed requests (question indices from `first`) from `concurrency` threads; (results, wall)."""
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    counter = iter(range(first, first + requests))
    t0 = time.perf_counter()
    deadline = t0 + time_limit

    def client_thread() -> None:
        with httpx.Client(timeout=600) as client:
            while time.perf_counter() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                res = one_request(client, base, i, max_tokens)
                with lock:
                    results.append(res)

    threads = [threading.Thread(target=client_thread) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


class Direct:
    """Baseline: requests one after another through `llmcore.generate` in this process (no HTTP, no queue)."""

    def __init__(self, ckpt: Path, device: str, max_tokens: int) -> None:
        from llmcore.checkpoint import load_model
        from llmcore.common import default_attn_backend, resolve_device

        dev = resolve_device(device)
        self.model, self.tok = load_model(ckpt, device=dev, attn_backend=default_attn_backend(dev))
        self.max_tokens = max_tokens
        self.run(0, 1)  # warmup

    def run(self, first: int, requests: int) -> tuple[list[dict[str, Any]], float]:
        """Runs on a thread of its own, as the server's worker does: on a busy shared CPU, torch's two
        OpenMP threads on the main thread measured 5-7x slower than the same work on another thread."""
        out: list[tuple[list[dict[str, Any]], float]] = []
        t = threading.Thread(target=lambda: out.append(self._run(first, requests)))
        t.start()
        t.join()
        return out[0]

    def _run(self, first: int, requests: int) -> tuple[list[dict[str, Any]], float]:
        from llmcore.chat import chat_prompt_ids
        from llmcore.generate import stream_generate

        results = []
        t0 = time.perf_counter()
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
        return results, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", type=Path, help="run dir to serve (default: random weights of --preset)")
    ap.add_argument("--preset", default="minimind2-small")
    ap.add_argument("--tokenizer", type=Path, default=ROOT.parent / "shared" / "data" / "minimind_tokenizer")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=4, help="the settings take turns this many times")
    ap.add_argument(
        "--direct-requests",
        type=int,
        default=8,
        help="baseline: this many of the requests one by one through llmcore.generate in-process (0 = skip)",
    )
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds per setting after which no request starts")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    if not 1 <= args.requests <= 10_000 or not 1 <= args.concurrency <= 64 or not 1 <= args.rounds <= args.requests:
        raise SystemExit("--requests must be 1..10000, --concurrency 1..64 and --rounds 1..requests")

    import torch

    from llmcore.common import device_name, resolve_device

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt
        if ckpt is None:
            if not (args.tokenizer / "tokenizer.json").is_file():
                raise SystemExit(f"no tokenizer at {args.tokenizer}; pass --tokenizer DIR or --ckpt RUN")
            ckpt = make_random_run(args.preset, args.tokenizer, Path(tmp) / "run")
        # Every server is up (idle ones cost nothing) and the settings take turns in rounds, so a shared,
        # busy machine slows them alike and the ratios stay meaningful.
        servers = [(mb, *start_server(ckpt, mb, args.device)) for mb in args.max_batch]
        try:
            direct = Direct(ckpt, args.device, args.max_tokens) if args.direct_requests else None
            for _, _, base in servers:
                with httpx.Client(timeout=600) as warm:
                    one_request(warm, base, 0, args.max_tokens)  # warmup: first-call allocations, not counted
            raw: dict[Any, list[dict[str, Any]]] = {}
            walls: dict[Any, float] = {}
            per_round = max(1, args.requests // args.rounds)
            direct_per_round = max(1, args.direct_requests // args.rounds)
            for r in range(args.rounds):
                if direct is not None:
                    res, wall = direct.run(r * direct_per_round, direct_per_round)
                    raw.setdefault("direct", []).extend(res)
                    walls["direct"] = walls.get("direct", 0.0) + wall
                for mb, _, base in servers:
                    res, wall = load_run(
                        base, r * per_round, per_round, args.concurrency, args.max_tokens, args.time_limit / args.rounds
                    )
                    raw.setdefault(mb, []).extend(res)
                    walls[mb] = walls.get(mb, 0.0) + wall
                print(f"round {r + 1}/{args.rounds} done", flush=True)
        finally:
            for _, proc, _ in servers:
                proc.terminate()
                proc.wait(30)
        runs = [summarize(name, raw[name], walls[name]) for name in raw]
        for res in runs:
            print(json.dumps(res), flush=True)

    dev = resolve_device(args.device)
    base_run = runs[0]
    for r in runs:
        r["requests_per_s_vs_first"] = round(r["requests_per_s"] / base_run["requests_per_s"], 2)
        r["tokens_per_s_vs_first"] = round(r["completion_tokens_per_s"] / base_run["completion_tokens_per_s"], 2)
    report = {
        "kind": "serve",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "device": device_name(dev),
            "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": {
            "model": str(args.ckpt) if args.ckpt else f"{args.preset} (random weights)",
            "requests": args.requests,
            "rounds": args.rounds,
            "direct_requests": args.direct_requests,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "time_limit_s": args.time_limit,
            "request": "streamed greedy chat completion, one user message",
            "client": "httpx threads in another process, 127.0.0.1",
        },
        "runs": runs,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"serve-{dev.type}-{datetime.now(timezone.utc):%Y%m%d}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# llmcore serve load run ({report['date']})",
        "",
        f"Model {report['settings']['model']} on {report['machine']['device']} "
        f"({report['machine']['cpus']} CPUs, torch {report['machine']['torch']}, load average at the end "
        f"{report['machine']['load_avg_at_end']}). {args.requests} streamed greedy chat requests, "
        f"{args.concurrency} concurrent clients, max_tokens {args.max_tokens}, server in its own process on "
        "127.0.0.1. The shared CPU makes absolute numbers noisy; the settings took turns in "
        f"{args.rounds} rounds so the load fell on all of them.",
        "",
        "`direct` is the baseline: the same requests one at a time through `llmcore.generate` in the "
        "benchmark's process, on a thread as the server's worker (no HTTP, no concurrency); its TTFT has no "
        "queueing in it.",
        "",
        "| --max-batch | requests | req/s | tokens/s | TTFT p50 | TTFT p95 | latency p50 | latency p95 | "
        "tokens/s vs first row |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['max_batch']} | {r['requests_done']} | {r['requests_per_s']:.2f} | "
            f"{r['completion_tokens_per_s']:.0f} | {r['ttft_p50_s'] * 1000:.0f} ms | "
            f"{r['ttft_p95_s'] * 1000:.0f} ms | {r['latency_p50_s']:.2f} s | {r['latency_p95_s']:.2f} s | "
            f"{r['tokens_per_s_vs_first']:.2f}x |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
