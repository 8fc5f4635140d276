"""CPU model benchmark: training-step tokens/s (forward + backward + AdamW) for the attention
backends and torch.compile, and generation tokens/s with and without the KV cache.

    python benchmarks/bench_model.py                       # minimind2-small, seq 512, batch 2
    python benchmarks/bench_model.py --steps 2 --out benchmarks/model_results.md

Every variant starts from the same weights and batch; timings exclude warmup steps (which also
absorb torch.compile's compilation, reported separately).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llmcore.generate import generate
from llmcore.model import LLM, ModelConfig


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               pos: torch.Tensor | None) -> float:
    out = model(x, position_ids=pos)
    loss = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1)) + out.aux_loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach().item()


def bench_train(preset: str, batch: int, seq: int, steps: int, warmup: int, seed: int = 0
                ) -> list[tuple[str, str, dict[str, float]]]:
    """Interleaved rounds: each round runs one step of every variant, so a busy shared CPU slows
    all variants alike and the ratios stay meaningful. Median step time per variant."""
    g = torch.Generator().manual_seed(seed)
    vocab = ModelConfig.from_preset(preset).vocab_size
    x = torch.randint(3, vocab, (batch, seq), generator=g)
    y = torch.randint(3, vocab, (batch, seq), generator=g)
    # Packed rows as the loader makes them: four documents per row, positions restarting at 0.
    packed_pos = (torch.arange(seq) % max(seq // 4, 1)).expand(batch, seq)
    engines = []
    for backend, compiled in (("eager", False), ("sdpa", False), ("sdpa", True)):
        torch.manual_seed(seed)
        model = LLM(ModelConfig.from_preset(preset, attn_backend=backend)).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        name = backend + (" + torch.compile" if compiled else "")
        engines.append((name, torch.compile(model) if compiled else model, opt))
    variants = [(name, fwd, opt, kind, pos) for name, fwd, opt in engines
                for kind, pos in (("causal rows", None), ("packed (4 docs/row)", packed_pos))]
    warm = {}
    for name, fwd, opt, kind, pos in variants:
        t0 = time.perf_counter()
        for _ in range(warmup):
            train_step(fwd, opt, x, y, pos)
        warm[(name, kind)] = time.perf_counter() - t0
    times: dict[tuple[str, str], list[float]] = {(v[0], v[3]): [] for v in variants}
    cpu: dict[tuple[str, str], list[float]] = {(v[0], v[3]): [] for v in variants}
    for _ in range(steps):
        for name, fwd, opt, kind, pos in variants:
            t0, c0 = time.perf_counter(), time.process_time()
            train_step(fwd, opt, x, y, pos)
            times[(name, kind)].append(time.perf_counter() - t0)
            cpu[(name, kind)].append(time.process_time() - c0)
    rows = []
    for (name, kind), ts in times.items():
        step_s = statistics.median(ts)
        cpu_s = statistics.median(cpu[(name, kind)])
        # CPU seconds per step (all threads) are much less disturbed by other processes than wall time.
        rows.append((name, kind, {"tokens_per_s": batch * seq / step_s, "step_s": step_s,
                                  "tokens_per_cpu_s": batch * seq / cpu_s, "warmup_s": warm[(name, kind)]}))
    return rows


def bench_generate(preset: str, use_cache: bool, prompt_len: int, new_tokens: int, batch: int = 1) -> dict[str, float]:
    torch.manual_seed(0)
    model = LLM(ModelConfig.from_preset(preset, attn_backend="sdpa")).eval()
    prompts = [list(range(3, 3 + prompt_len)) for _ in range(batch)]
    # One full untimed run first: the first call at each new key length pays one-off setup costs.
    generate(model, prompts, new_tokens, eos_id=None, use_cache=use_cache)
    best, best_cpu = float("inf"), float("inf")
    for _ in range(2):
        t0, c0 = time.perf_counter(), time.process_time()
        out = generate(model, prompts, new_tokens, eos_id=None, use_cache=use_cache)
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    n = sum(len(o) for o in out)
    return {"tokens_per_s": n / best, "total_s": best, "tokens_per_cpu_s": n / best_cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="minimind2-small")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=None, help="write a markdown report here")
    args = ap.parse_args()

    load_before = os.getloadavg()
    # Generation first: after torch.compile has run in this process, inductor's OpenMP threads
    # compete with eager kernels and slow later eager code several-fold on a 2-core machine.
    gen_rows = []
    for cache in (True, False):
        r = bench_generate(args.preset, cache, args.prompt_len, args.new_tokens)
        gen_rows.append(("KV cache" if cache else "no cache (full forward per token)", r))
        print(f"generate {gen_rows[-1][0]:<34} {r['tokens_per_s']:8.1f} tok/s", flush=True)

    rows = bench_train(args.preset, args.batch, args.seq, args.steps, args.warmup)
    for name, kind, r in rows:
        print(f"train {name:<22} {kind:<20} {r['tokens_per_s']:8.0f} tok/s  {r['tokens_per_cpu_s']:6.0f} tok/cpu-s  "
              f"step {r['step_s']:.2f}s  warmup {r['warmup_s']:.1f}s", flush=True)

    if args.out:
        base = rows[0][2]["tokens_per_cpu_s"]
        lines = [
            "# Model benchmark (CPU)",
            "",
            f"`python benchmarks/bench_model.py --steps {args.steps} --out {args.out}` — "
            f"preset `{args.preset}`, fp32, batch {args.batch} x seq {args.seq}, median of {args.steps} timed steps "
            f"after {args.warmup} warmup step(s) each; torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{platform.processor() or platform.machine()}. Load average (1 min) before/after: "
            f"{load_before[0]:.1f} / {os.getloadavg()[0]:.1f} — the machine is shared, so absolute numbers are "
            "noisy; variants run interleaved (one step of each per round) to keep the ratios fair.",
            "",
            "## Training step (forward + backward + AdamW)",
            "",
            "| backend | rows | tokens/s (wall) | s/step | tokens per CPU-second | vs eager (CPU-s) | "
            "warmup s (incl. compile) |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for name, kind, r in rows:
            lines.append(f"| {name} | {kind} | {r['tokens_per_s']:.0f} | {r['step_s']:.2f} | "
                         f"{r['tokens_per_cpu_s']:.0f} | {r['tokens_per_cpu_s'] / base:.2f}x | {r['warmup_s']:.1f} |")
        lines += [
            "",
            f"## Generation (batch 1, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, sdpa)",
            "",
            "(best of 2 runs after an untimed one; includes the prompt's prefill)",
            "",
            "| mode | tokens/s (wall) | total s | tokens per CPU-second |",
            "|---|---:|---:|---:|",
        ]
        for name, r in gen_rows:
            lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['total_s']:.2f} | {r['tokens_per_cpu_s']:.1f} |")
        kv = gen_rows[0][1]["tokens_per_cpu_s"] / gen_rows[1][1]["tokens_per_cpu_s"]
        lines += ["", f"KV cache speed-up (CPU-seconds): {kv:.1f}x.", ""]
        args.out.write_text("\n".join(lines))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
