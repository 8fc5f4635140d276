"""End to end through the CLI, as a user runs it (`python -m llmcore ...` in subprocesses).

tokenizer train -> prep stats --plot -> prep pretrain/sft/dpo -> prep inspect --decode
-> train pretrain (--save-every) -> train pretrain --resume (more steps) -> train sft --init
-> train dpo --init -> eval -> generate --temperature 0 -> export hf -> generate and eval from the
export (same greedy text, same loss) -> chat on piped stdin (/reset, /exit); plus two bad inputs
that must fail with exit 2 and one `error:` line (prep on malformed JSON, train over an existing
run without --resume).

Two variants: short rows of the real sample data (skips without ../shared/data), and templated
text the test writes itself, which runs the whole path only when the real data is absent (else
just the data steps, so the file stays under ~90 s on 2 cores). Sizes are tiny: every subprocess
pays the torch import (~3-5 s), so there are few of them, with few steps and little data.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

SEQ = "64"  # pretrain rows
CHAT_SEQ = "256"  # sft / dpo rows (the chosen examples fit, so every pair has response tokens)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="offline",
        PYTHONIOENCODING="utf-8",
        COLUMNS="200",
    )
    return env


def cli(
    cwd: Path, *args: str, rc: int = 0, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run `python -m llmcore ARGS` in cwd; check the exit code, show the output when it is wrong."""
    proc = subprocess.run(
        [sys.executable, "-m", "llmcore", *args],
        cwd=cwd,
        env=_env(),
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=timeout,
    )
    assert proc.returncode == rc, (
        f"`llmcore {' '.join(args)}` exited {proc.returncode}, expected {rc}\n"
        f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"
    )
    return proc


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_lines(run: Path) -> list[dict]:
    return [m for m in read_jsonl(run / "metrics.jsonl") if "loss" in m]


# ---------------------------------------------------------------- data


def shared_subsets(shared: Path, out: Path) -> tuple[Path, Path, Path]:
    """Short rows of the real samples: 300 pretrain texts, 60 conversations, 30 preference pairs."""
    pre = []
    for line in (shared / "pretrain_sample.jsonl").open(encoding="utf-8"):
        row = json.loads(line)
        if 20 <= len(row["text"]) <= 300:
            pre.append(row)
        if len(pre) == 300:
            break
    sft = []
    for line in (shared / "sft_sample.jsonl").open(encoding="utf-8"):
        row = json.loads(line)
        conv = row["conversations"]
        # short, and no reply starting with whitespace (byte-level BPE would fuse it with the header newline)
        if sum(len(m["content"]) for m in conv) <= 200 and all(
            m["content"][:1].strip() for m in conv if m["role"] == "assistant"
        ):
            sft.append(row)
        if len(sft) == 60:
            break
    dpo = []
    for line in (shared / "dpo_sample.jsonl").open(encoding="utf-8"):
        row = json.loads(line)
        if max(sum(len(m["content"]) for m in row[side]) for side in ("chosen", "rejected")) <= 200:
            dpo.append(row)
        if len(dpo) == 30:
            break
    assert len(pre) == 300 and len(sft) == 60 and len(dpo) >= 10, (len(pre), len(sft), len(dpo))
    return (
        write_jsonl(out / "pretrain.jsonl", pre),
        write_jsonl(out / "sft.jsonl", sft),
        write_jsonl(out / "dpo.jsonl", dpo),
    )


ANIMALS = ["cat", "dog", "fox", "horse", "rabbit", "owl", "goat", "duck", "bear", "mouse"]
COLOURS = ["red", "brown", "grey", "white", "black", "small", "old", "young"]
ACTIONS = ["sleeps", "runs", "eats", "waits", "sings", "hides", "plays", "reads"]
PLACES = ["garden", "kitchen", "forest", "river", "barn", "library", "market", "hill"]
TIMES = ["in the morning", "at noon", "every evening", "after the rain", "on Sundays", "at night"]


def generated_text(out: Path) -> tuple[Path, Path, Path]:
    """A few hundred natural-looking templated sentences, questions and answers (seeded)."""
    rnd = random.Random(0)

    def fact() -> tuple[str, str, str, str, str]:
        return rnd.choice(COLOURS), rnd.choice(ANIMALS), rnd.choice(ACTIONS), rnd.choice(PLACES), rnd.choice(TIMES)

    pre = []
    for _ in range(400):
        sentences = []
        for _ in range(rnd.randint(1, 3)):
            c, a, v, p, t = fact()
            sentences.append(f"The {c} {a} {v} in the {p} {t}.")
        if rnd.random() < 0.3:
            sentences.append("Nobody knows why, but everyone in the village likes it.")
        pre.append({"text": " ".join(sentences)})
    sft = []
    for _ in range(80):
        c, a, v, p, t = fact()
        conv = [
            {"role": "user", "content": f"Where does the {c} {a} go {t}?"},
            {"role": "assistant", "content": f"The {c} {a} {v} in the {p}."},
        ]
        if rnd.random() < 0.3:  # multi-turn
            conv += [
                {"role": "user", "content": "And what does it do there?"},
                {"role": "assistant", "content": f"It {v} {t}."},
            ]
        sft.append({"conversations": conv})
    dpo = []
    for _ in range(40):
        c, a, v, p, t = fact()
        other = rnd.choice([x for x in PLACES if x != p])
        prompt = [{"role": "user", "content": f"The {c} {a} {v} in the {p}. Where does it {v.rstrip('s')}?"}]
        dpo.append(
            {
                "chosen": prompt + [{"role": "assistant", "content": f"In the {p}."}],
                "rejected": prompt + [{"role": "assistant", "content": f"In the {other}, I think."}],
            }
        )
    return (
        write_jsonl(out / "pretrain.jsonl", pre),
        write_jsonl(out / "sft.jsonl", sft),
        write_jsonl(out / "dpo.jsonl", dpo),
    )


# ---------------------------------------------------------------- the path


def check_manifest(shard_dir: Path, kind: str, n_docs: int, fingerprint: str | None = None) -> dict:
    man = json.loads((shard_dir / "manifest.json").read_text())
    assert man["kind"] == kind
    assert man["num_docs"] == n_docs, (man["num_docs"], n_docs)
    assert man["lines_skipped"] == 0
    assert sum(s["num_docs"] for s in man["shards"]) == n_docs
    assert sum(s["num_tokens"] for s in man["shards"]) == man["num_tokens"] > 0
    for s in man["shards"]:
        assert (shard_dir / s["file"]).stat().st_size > 0
    if fingerprint is not None:
        assert man["tokenizer"]["fingerprint"] == fingerprint
    return man


def check_finite_losses(lines: list[dict]) -> None:
    assert lines
    for m in lines:
        assert math.isfinite(m["loss"]) and m["loss"] > 0, m
        assert math.isfinite(m["grad_norm"]), m


def user_path(work: Path, pre_jsonl: Path, sft_jsonl: Path, dpo_jsonl: Path, prompt: str, full: bool = True) -> None:
    """The user's path in `work`; `full=False` stops after the data steps (tokenizer, stats, prep, inspect)."""
    pre_rows, sft_rows, dpo_rows = read_jsonl(pre_jsonl), read_jsonl(sft_jsonl), read_jsonl(dpo_jsonl)
    pre, sft, dpo = pre_jsonl.name, sft_jsonl.name, dpo_jsonl.name  # commands use paths relative to work

    # -- tokenizer
    cli(work, "tokenizer", "train", "--input", pre, "--input", sft, "--vocab-size", "512", "--out", "tok/")
    tok_json = json.loads((work / "tok" / "tokenizer.json").read_text(encoding="utf-8"))
    assert (work / "tok" / "tokenizer_config.json").is_file()
    n_vocab = len(tok_json["model"]["vocab"])
    assert 256 + 36 < n_vocab <= 512, n_vocab  # bytes, added tokens, merges (templated text may run out of merges)
    specials = {t["content"]: t["id"] for t in tok_json["added_tokens"]}
    # MiniMind-3's 36 added tokens by default: <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2, ..., <think>=25
    assert len(specials) == 36 and {
        k: specials[k] for k in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>")
    } == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<think>": 25}

    # -- stats
    out = cli(work, "prep", "stats", pre, "--plot", "stats.png").stdout
    fields = dict(line.split(None, 1) for line in out.splitlines() if line.strip() and not line.startswith("bad"))
    assert fields["kind"].strip() == "pretrain"
    assert int(fields["rows"]) == len(pre_rows)
    assert "bad lines   0" in out
    assert (work / "stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # -- prep: manifests count every line, all with the same tokenizer
    cli(work, "prep", "pretrain", "--input", pre, "--tokenizer", "tok/", "--out", "shards/pretrain")
    man = check_manifest(work / "shards/pretrain", "pretrain", len(pre_rows))
    fp = man["tokenizer"]["fingerprint"]
    from tokenizers import Tokenizer  # the HF tokenizer alone (no torch): tokens = [bos] + encode(text) + [eos]

    enc = Tokenizer.from_file(str(work / "tok" / "tokenizer.json"))
    expect = sum(len(e.ids) + 2 for e in enc.encode_batch([r["text"] for r in pre_rows], add_special_tokens=False))
    assert man["num_tokens"] == expect
    cli(work, "prep", "sft", "--input", sft, "--tokenizer", "tok/", "--out", "shards/sft", "--workers", "1")
    check_manifest(work / "shards/sft", "sft", len(sft_rows), fp)
    cli(work, "prep", "dpo", "--input", dpo, "--tokenizer", "tok/", "--out", "shards/dpo", "--workers", "1")
    check_manifest(work / "shards/dpo", "dpo", len(dpo_rows), fp)

    # -- inspect: the loss spans are exactly the assistant turns (MiniMind-3 template: the empty think
    # block, the reply) and their <|im_end|>
    out = cli(work, "prep", "inspect", "shards/sft", "--start", "0", "--count", "2", "--decode").stdout
    docs = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert [d["index"] for d in docs] == [0, 1]
    for d, row in zip(docs, sft_rows[:2]):
        assert len(d["tokens"]) == len(d["loss_mask"]) and 0 < sum(d["loss_mask"]) < len(d["tokens"])
        for msg in row["conversations"]:
            if msg["role"] == "assistant":
                assert f"[[<think>\n\n</think>\n\n{msg['content']}<|im_end|>]]" in d["text"], d["text"]
            else:
                assert msg["content"] in d["text"] and f"[[{msg['content']}" not in d["text"]
        assert d["text"].count("[[") == sum(m["role"] == "assistant" for m in row["conversations"])

    # -- bad input: one line naming the file and line, exit 2, nothing written
    bad = work / "bad.jsonl"
    bad.write_text(
        pre_jsonl.read_text(encoding="utf-8").splitlines()[0] + "\n" + '{"text": "unterminated\n', encoding="utf-8"
    )
    err = cli(
        work, "prep", "pretrain", "--input", "bad.jsonl", "--tokenizer", "tok/", "--out", "shards/bad", rc=2
    ).stderr
    assert err.strip().splitlines()[-1].startswith("error: bad.jsonl:2: malformed JSON"), (
        err
    )  # before it: progress bar only
    assert "Traceback" not in err
    assert not (work / "shards/bad").exists()
    if not full:
        return

    # -- pretrain, stopped after 2 steps, then resumed to 4
    common = ["--seq-len", SEQ, "--micro-batch-size", "4", "--global-batch-size", "8", "--log-every", "1"]
    pre_args = ["train", "pretrain", "--data", "shards/pretrain", "--model", "tiny", "--out", "runs/pre", *common]
    cli(work, *pre_args, "--max-steps", "2", "--save-every", "1", "--quiet")
    ck = work / "runs/pre/checkpoints"
    assert sorted(p.name for p in ck.glob("step-*")) == ["step-1", "step-2"]
    assert (ck / "latest").read_text().strip() == "step-2"
    assert (ck / "step-2" / "model.safetensors").is_file()
    assert [m["step"] for m in train_lines(work / "runs/pre")] == [1, 2]
    # without --resume the existing run is refused with one line on stderr, and nothing changes
    err = cli(work, *pre_args, "--max-steps", "4", rc=2).stderr
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert (ck / "latest").read_text().strip() == "step-2"

    cli(work, *pre_args, "--max-steps", "4", "--save-every", "1", "--resume", "--quiet")
    assert sorted(p.name for p in ck.glob("step-*")) == ["step-3", "step-4"]  # --keep-last defaults to 2
    assert (ck / "latest").read_text().strip() == "step-4"
    lines = train_lines(work / "runs/pre")
    assert [m["step"] for m in lines] == [1, 2, 3, 4]  # continued: not restarted, no step repeated
    check_finite_losses(lines)
    assert [m["tokens"] for m in lines] == [8 * int(SEQ) * s for s in (1, 2, 3, 4)]
    assert (work / "runs/pre/loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (work / "runs/pre/tokenizer/tokenizer.json").is_file()
    cfg = json.loads((work / "runs/pre/config.json").read_text())
    assert cfg["model"]["vocab_size"] == n_vocab and cfg["tokenizer_fingerprint"] == fp

    # -- sft from the pretrain run
    chat_common = ["--seq-len", CHAT_SEQ, "--micro-batch-size", "2", "--global-batch-size", "4", "--log-every", "1"]
    cli(
        work,
        "train",
        "sft",
        "--data",
        "shards/sft",
        "--init",
        "runs/pre",
        "--out",
        "runs/sft",
        "--max-steps",
        "2",
        *chat_common,
        "--quiet",
    )
    lines = train_lines(work / "runs/sft")
    assert [m["step"] for m in lines] == [1, 2]
    check_finite_losses(lines)
    assert (work / "runs/sft/checkpoints/latest").read_text().strip() == "step-2"

    # -- dpo from the sft run: at step 1 policy == reference, so the loss is exactly ln 2
    cli(
        work,
        "train",
        "dpo",
        "--data",
        "shards/dpo",
        "--init",
        "runs/sft",
        "--out",
        "runs/dpo",
        "--max-steps",
        "2",
        "--lr",
        "1e-3",
        *chat_common,
        "--quiet",
    )
    lines = train_lines(work / "runs/dpo")
    assert [m["step"] for m in lines] == [1, 2]
    check_finite_losses(lines)
    assert abs(lines[0]["loss"] - math.log(2)) < 1e-5, lines[0]
    assert lines[0]["grad_norm"] > 0, lines[0]  # the responses fit in the rows: there is something to learn
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin"):
        assert key in lines[1] and math.isfinite(lines[1][key])
    assert lines[1]["rewards/chosen"] != 0.0 or lines[1]["rewards/rejected"] != 0.0, lines[1]  # the policy moved

    # -- eval
    def eval_loss(ckpt: str) -> float:
        # --seq-len and --batch-size explicit: an exported folder has no run config to take the run's from
        out = cli(
            work, "eval", "--ckpt", ckpt, "--data", "shards/sft", "--seq-len", CHAT_SEQ, "--batch-size", "2"
        ).stdout
        words = out.split()
        loss, ppl = float(words[words.index("loss") + 1]), float(words[words.index("perplexity") + 1])
        assert math.isfinite(loss) and 0 < loss < 2 * math.log(n_vocab), out
        assert ppl == pytest.approx(math.exp(loss), rel=1e-3), out
        return loss

    run_loss = eval_loss("runs/dpo")

    # -- export, then the same greedy text and the same eval loss from the exported folder
    gen = ["--prompt", prompt, "--max-new-tokens", "16", "--temperature", "0"]
    from_run = cli(work, "generate", "--ckpt", "runs/dpo", *gen).stdout
    assert from_run.strip(), f"greedy generation printed nothing: {from_run!r}"
    cli(work, "export", "hf", "--ckpt", "runs/dpo", "--out", "hf/")
    hf_cfg = json.loads((work / "hf/config.json").read_text())
    assert hf_cfg["architectures"] == ["LlamaForCausalLM"] and hf_cfg["vocab_size"] == n_vocab
    for name in ("model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (work / "hf" / name).is_file(), name
    assert cli(work, "generate", "--ckpt", "hf/", *gen).stdout == from_run
    assert eval_loss("hf/") == run_loss

    # -- chat on piped stdin: after /reset the same message gets the same greedy answer; /exit quits
    out = cli(
        work,
        "chat",
        "--ckpt",
        "runs/dpo",
        "--temperature",
        "0",
        "--max-new-tokens",
        "8",
        stdin="hello\n/reset\nhello\n/exit\nnever answered\n",
        timeout=60,
    ).stdout
    notices = [line for line in out.splitlines() if "clear" in line.lower()]
    assert len(notices) == 1, out
    first, second = out.split(notices[0] + "\n")
    assert first.endswith("\n") and first == second, (first, second)  # one answer each, none after /exit


def test_user_path_on_shared_data(shared_data: Path, tmp_path: Path) -> None:
    """The whole path on short rows of the real samples (Chinese and English text, poems, conversations)."""
    user_path(tmp_path, *shared_subsets(shared_data, tmp_path), prompt="春风")


def test_user_path_on_generated_text(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """On text written here, so a checkout without ../shared/data runs the path too.

    The whole path when the real data is absent; with it present the test above already runs the
    model steps, so this one stops after the data steps (keeps the file under 90 s on 2 cores).
    """
    try:
        request.getfixturevalue("shared_data")
        full = False
    except pytest.skip.Exception:
        full = True
    user_path(tmp_path, *generated_text(tmp_path), prompt="The brown fox", full=full)
