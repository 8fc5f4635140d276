"""CPU training throughput: real (non-pad) tokens/s of minimind2-small pretraining at seq 512.

Compares, in one process and interleaved step by step (so background load hits all alike):
  minimind  a MiniMind-style loop written here: each text tokenized in the dataset, padded to
            max length 512, eager attention, CE times the loss mask, AdamW, clip 1.0;
  ours      llmcore's Trainer step: packed rows (no padding), SDPA attention, no compile;
  ours+c    the same with torch.compile (the configuration the target is about).
All fp32 (MiniMind trains without autocast on CPU), same model, same micro batch.

Usage: python benchmarks/bench_train.py [--data ../shared/data/pretrain_sample.jsonl] [--steps 4]
Writes benchmarks/train_results.md (use --no-write to only print).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def minimind_batches(texts: list[str], tok, seq_len: int, batch: int):
    """MiniMind's PretrainDataset semantics: tokenize in __getitem__, pad/truncate to max_length,
    X = ids[:-1], Y = ids[1:], loss_mask = (Y != pad)."""
    pad = tok.pad_id
    i = 0
    while True:
        xs, ys, ms = [], [], []
        for _ in range(batch):
            ids = [tok.bos_id] + tok.encode(texts[i % len(texts)]) + [tok.eos_id]
            i += 1
            ids = ids[: seq_len + 1]
            ids = ids + [pad] * (seq_len + 1 - len(ids))
            t = torch.tensor(ids, dtype=torch.long)
            xs.append(t[:-1])
            ys.append(t[1:])
            ms.append((t[1:] != pad).long())
        yield torch.stack(xs), torch.stack(ys), torch.stack(ms)


class MiniMindLoop:
    def __init__(self, texts: list[str], tok, seq_len: int, batch: int, seed: int) -> None:
        from llmcore.model import LLM, ModelConfig

        torch.manual_seed(seed)
        self.model = LLM(ModelConfig.from_preset("minimind2-small", attn_backend="eager", vocab_size=tok.vocab_size))
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=5e-4)
        self.data = minimind_batches(texts, tok, seq_len, batch)
        self.pad = tok.pad_id

    def step(self) -> int:
        x, y, mask = next(self.data)
        out = self.model(x)  # one causal document per row, padding included
        loss = F.cross_entropy(out.logits.view(-1, out.logits.size(-1)), y.view(-1), reduction="none").view(y.shape)
        loss = (loss * mask).sum() / mask.sum() + out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return int((x != self.pad).sum())


class OursLoop:
    def __init__(self, shard_dir: Path, run_dir: Path, seq_len: int, batch: int, compile: bool, seed: int) -> None:
        from llmcore.train import TrainConfig
        from llmcore.train.trainer import Trainer

        cfg = TrainConfig(data=str(shard_dir), out=str(run_dir), model="minimind2-small", seq_len=seq_len,
                          micro_batch_size=batch, global_batch_size=batch, max_steps=1000, compile=compile,
                          attn_backend="sdpa", packing="packed", quiet=True, seed=seed).resolved("pretrain")
        self.trainer = Trainer("pretrain", cfg)

    def step(self) -> int:
        before = self.trainer.tokens
        self.trainer.train_step()
        return self.trainer.tokens - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "pretrain_sample.jsonl"))
    ap.add_argument("--tokenizer", default=str(ROOT.parent / "shared" / "data" / "minimind_tokenizer"))
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="measured steps per loop (after warm-up)")
    ap.add_argument("--docs", type=int, default=4000, help="documents of the sample to use")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    from llmcore.data_prep.prep import prep
    from llmcore.data_prep.tokenizer import load_tokenizer

    data = Path(args.data)
    if not data.is_file():
        sys.exit(f"benchmark data not found: {data}")
    tok = load_tokenizer(args.tokenizer)
    texts = []
    with open(data, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if len(texts) >= args.docs:
                break
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        src = work / "pre.jsonl"
        src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
        t0 = time.perf_counter()
        prep("pretrain", [src], args.tokenizer, work / "shards", workers=1)
        prep_s = time.perf_counter() - t0

        loops = {
            "minimind": MiniMindLoop(texts, tok, args.seq_len, args.batch, seed=0),
            "ours": OursLoop(work / "shards", work / "run_a", args.seq_len, args.batch, compile=False, seed=0),
            "ours+compile": OursLoop(work / "shards", work / "run_b", args.seq_len, args.batch, compile=True, seed=0),
        }
        warm = {}
        for name, loop in loops.items():  # warm-up (compile happens here)
            t = time.perf_counter()
            loop.step()
            loop.step()
            warm[name] = time.perf_counter() - t
            print(f"warm-up {name}: {warm[name]:.1f}s", flush=True)
        tokens = {k: 0 for k in loops}
        secs = {k: 0.0 for k in loops}
        for i in range(args.steps):
            for name, loop in loops.items():
                t = time.perf_counter()
                tokens[name] += loop.step()
                secs[name] += time.perf_counter() - t
            print(f"round {i + 1}/{args.steps}: " + ", ".join(
                f"{k} {tokens[k] / secs[k]:,.0f} tok/s" for k in loops), flush=True)
        rate = {k: tokens[k] / secs[k] for k in loops}
        positions = args.steps * args.batch * args.seq_len
        real_frac = tokens["minimind"] / positions
        ratio = rate["ours+compile"] / rate["minimind"]
        lines = [
            "# Training throughput on CPU (`benchmarks/bench_train.py`)",
            "",
            f"minimind2-small (d 512, 8 layers, vocab {tok.vocab_size}), pretraining, seq {args.seq_len}, micro batch "
            f"{args.batch}, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}; "
            f"first {len(texts):,} documents of `{data.name}`, MiniMind's tokenizer. The three loops run interleaved "
            f"step by step in one process ({args.steps} measured steps each after 2 warm-up steps), so background "
            "load affects them alike. Tokens/s counts real (non-pad) input tokens only.",
            "",
            "| loop | real tokens/s | x MiniMind-style |",
            "|---|---:|---:|",
        ]
        for k, label in (("minimind", "MiniMind-style: pad to 512, eager attention, loss mask"),
                         ("ours", "llmcore: packed rows, SDPA"),
                         ("ours+compile", "llmcore: packed rows, SDPA, torch.compile")):
            lines.append(f"| {label} | {rate[k]:,.0f} | {rate[k] / rate['minimind']:.2f}x |")
        lines += [
            "",
            f"Real tokens in the padded batches: {real_frac:.0%} of positions (packing keeps ~100%). "
            f"Ratio ours+compile / MiniMind-style: **{ratio:.2f}x** (target >= 2.5x). "
            f"Warm-up (2 steps, includes compilation): " + ", ".join(f"{k} {v:.0f}s" for k, v in warm.items()) + ". "
            f"Shard prep of the documents: {prep_s:.1f}s.",
            "",
            "Most of the gain is packing (no compute spent on padding); SDPA's fused attention and",
            "torch.compile's fused elementwise kernels add the rest. The Triton backend needs a GPU (on CPU it",
            "only runs in Triton's interpreter), so SDPA is the best CPU backend.",
        ]
        text = "\n".join(lines) + "\n"
        print(text)
        if not args.no_write:
            (ROOT / "benchmarks" / "train_results.md").write_text(text)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
