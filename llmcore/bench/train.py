"""`llmcore bench train`: end-to-end pretraining speed of llmcore against a MiniMind-style loop,
in one process, on pretrain_hq-shaped rows (`llmcore.bench.corpus`) with MiniMind's tokenizer.

Loops compared (same model code, same weights init, same micro batch, same rows):
- `minimind`: what MiniMind's train_pretrain.py does, written here: one document per row,
  `[bos] + text + [eos]` truncated/padded to seq+1, X = ids[:-1], Y = ids[1:], loss mask Y != pad;
  SDPA causal attention (our model's `sdpa` backend without position ids, which is at least as fast
  as MiniMind's repeat-kv SDPA), bf16 autocast on CUDA and fp32 on CPU (as MiniMind), loss = masked
  mean CE + aux, backward, clip 1.0, `torch.optim.AdamW` (default implementation), zero_grad, LR set
  per step. Its rows are tokenized and padded before timing and kept on the device (on CUDA; a
  pageable host index would make the copy synchronous), so the baseline pays nothing for data
  (MiniMind tokenizes in DataLoader workers and copies pinned batches).
- `llmcore <backend> [+compile] <packed|padded> [<dtype>]`: `Trainer.from_config("pretrain", cfg)`
  and `trainer.train_step()`, exactly what `llmcore train pretrain` runs (its loader, device feed,
  engine, objective).

Measurement: every loop of a preset is built and warmed up first (compilation happens there), then
`rounds` interleaved rounds of `steps` optimizer steps each (order rotated per round, device
synchronised around each). Reported per loop: real (non-pad) input tokens per second, step time,
MFU on CUDA (6N + 6·L·H·Q·T FLOPs per real token, causal attention, over the card's dense bf16 peak, so padding
counts as waste), peak memory (CUDA: the loop's own resident tensors plus its largest step
transient; CPU: the process's max RSS, which all loops share), and on CPU tokens per CPU-second.
Every ratio is against the `minimind` loop of the same preset, measured in the same rounds.

Invariants: a loop that does not fit the time budget is reported as skipped, never estimated;
no number is reported for a loop that was not run. A loop that raises while it is built, warmed up
or timed is recorded in the result's failures and the other loops (and presets) go on; a stop
request (SIGTERM/SIGINT through the CLI) ends the rounds in progress, keeps their complete rounds
and skips what is left, naming it.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmcore.bench.corpus import cmrc_passages, minimind_tokenizer_dir, pretrain_hq_rows, shared_data_dir, write_jsonl
from llmcore.bench.harness import BenchResult, error_line, fault_point, interleaved, stop_requested, summarize
from llmcore.bench.report import bar_panel, fmt
from llmcore.errors import LLMCoreError

log = logging.getLogger(__name__)

MINIMIND_LR = 5e-4


@dataclass(frozen=True)
class Variant:
    """One training loop to time."""

    kind: str  # "minimind" or "llmcore"
    backend: str = "sdpa"
    compile: bool = False
    packing: str = "packed"
    dtype: str = "auto"

    def label(self, device: torch.device) -> str:
        if self.kind == "minimind":
            return "minimind-style (padded, sdpa" + (", bf16)" if device.type == "cuda" else ", fp32)")
        dtype = self.dtype if self.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
        return f"llmcore {self.backend}{'+compile' if self.compile else ''} {self.packing} {dtype}"


def parse_variant(spec: str) -> Variant:
    """`minimind`, or `BACKEND[+compile][:packed|padded][:fp32|bf16]` (e.g. `triton+compile:packed`)."""
    spec = spec.strip()
    if spec == "minimind":
        return Variant("minimind")
    parts = spec.split(":")
    head = parts[0]
    compiled = head.endswith("+compile")
    backend = head.removesuffix("+compile")
    if backend not in ("eager", "sdpa", "triton"):
        raise LLMCoreError(f"--variants {spec!r}: backend must be eager, sdpa or triton (or `minimind`)")
    packing, dtype = "packed", "auto"
    for p in parts[1:]:
        if p in ("packed", "padded"):
            packing = p
        elif p in ("fp32", "bf16", "auto"):
            dtype = p
        else:
            raise LLMCoreError(f"--variants {spec!r}: unknown part {p!r} (packed, padded, fp32, bf16)")
    return Variant("llmcore", backend, compiled, packing, dtype)


def default_variants(device: torch.device, preset: str, quick: bool) -> list[Variant]:
    """Priority order: loops later in the list are the first to be skipped when time runs out."""
    if quick:
        return [Variant("minimind"), Variant("llmcore", "sdpa"), Variant("llmcore", "sdpa", packing="padded")]
    if device.type == "cuda" and preset != "minimind2-small":
        # Shape coverage (head dim 96, QK-norm): the main backends without the controls.
        return [
            Variant("minimind"),
            Variant("llmcore", "triton"),
            Variant("llmcore", "triton", True),
            Variant("llmcore", "sdpa"),
        ]
    if device.type == "cuda":
        # Compilation dominates the cost on a GPU, so the uncompiled loops come first, then the target's.
        return [
            Variant("minimind"),
            Variant("llmcore", "triton"),
            Variant("llmcore", "triton", True),
            Variant("llmcore", "sdpa"),
            Variant("llmcore", "eager"),
            Variant("llmcore", "triton", packing="padded"),
            Variant("llmcore", "sdpa", True),
            Variant("llmcore", "eager", True),
        ]
    if preset == "minimind2-small":
        return [
            Variant("minimind"),
            Variant("llmcore", "sdpa"),
            Variant("llmcore", "sdpa", True),
            Variant("llmcore", "sdpa", dtype="bf16"),
            Variant("llmcore", "sdpa", packing="padded"),
        ]
    return [Variant("minimind"), Variant("llmcore", "sdpa")]


# ------------------------------------------------------------------------------------------------
# the loops


class MiniMindLoop:
    """The MiniMind-style loop (see the module docstring); `step()` returns real input tokens."""

    def __init__(
        self,
        preset: str,
        token_rows: list[list[int]],
        tok: Any,
        seq_len: int,
        batch: int,
        device: torch.device,
        seed: int,
    ) -> None:
        from llmcore.model import LLM, ModelConfig

        self.device = device
        pad = int(tok.pad_id)
        rows = []
        for ids in token_rows:  # MiniMind: tokenizer(..., max_length, padding="max_length", truncation=True)
            ids = ([tok.bos_id] + list(ids) + [tok.eos_id])[: seq_len + 1]
            rows.append(ids + [pad] * (seq_len + 1 - len(ids)))
        data = torch.tensor(rows, dtype=torch.long)
        # On the device once: indexing a pinned host tensor gives a pageable one whose copy would be
        # synchronous, a per-step cost the llmcore loops (pinned feed thread) do not pay.
        self.x, self.y = data[:, :-1].contiguous().to(device), data[:, 1:].contiguous().to(device)
        self.mask = (self.y != pad).float()
        self.real = (data[:, :-1] != pad).sum(dim=1)  # host copy: the token count needs no device read
        self.batch, self.i = batch, 0
        torch.manual_seed(seed)
        cfg = ModelConfig.from_preset(preset, attn_backend="sdpa", vocab_size=tok.vocab_size)
        self.model = LLM(cfg).to(device).train()
        self.config = cfg
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=MINIMIND_LR)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None

    def step(self) -> int:
        n = self.x.shape[0]
        idx = torch.arange(self.i, self.i + self.batch) % n
        self.i = (self.i + self.batch) % n
        didx = idx.to(self.device)
        x, y, mask = self.x[didx], self.y[didx], self.mask[didx]
        for group in self.opt.param_groups:
            group["lr"] = MINIMIND_LR
        if self.autocast is not None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = self.model(x)
                loss = self._loss(out, y, mask)
        else:
            out = self.model(x)
            loss = self._loss(out, y, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return int(self.real[idx].sum())

    @staticmethod
    def _loss(out: Any, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = out.logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), reduction="none").view(y.size())
        return (loss * mask).sum() / mask.sum() + out.aux_loss

    def close(self) -> None:
        pass


class LLMCoreLoop:
    """`llmcore train pretrain` built through `Trainer.from_config`; `step()` returns real input tokens."""

    def __init__(
        self,
        preset: str,
        shards: Path,
        run_dir: Path,
        v: Variant,
        seq_len: int,
        batch: int,
        device: torch.device,
        seed: int,
    ) -> None:
        from llmcore.train import TrainConfig, Trainer

        cfg = TrainConfig(
            data=str(shards),
            out=str(run_dir),
            model=preset,
            seq_len=seq_len,
            micro_batch_size=batch,
            global_batch_size=batch,
            max_steps=10**7,
            lr=MINIMIND_LR,
            compile=v.compile,
            attn_backend=v.backend,
            packing=v.packing,
            dtype=v.dtype,
            device=str(device),
            quiet=True,
            seed=seed,
            log_every=10**6,
        ).resolved("pretrain")
        self.trainer = Trainer.from_config("pretrain", cfg)
        self.config = self.trainer.model.config

    def step(self) -> int:
        before = self.trainer.tokens
        self.trainer.train_step()
        return self.trainer.tokens - before

    def close(self) -> None:
        self.trainer.feed.close()


def _drop(loop: Any, device: torch.device) -> None:
    """Release a loop that failed or finished (its feed thread, its device memory)."""
    if loop is not None:
        try:
            loop.close()
        except Exception as err:  # closing a broken loop must not end the benchmark
            log.warning("closing a loop failed: %s", error_line(err))
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _resident_bytes(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


class _Measured:
    """Wraps a loop: `steps` steps per call; on CUDA tracks the largest step transient."""

    def __init__(self, loop: Any, steps: int, device: torch.device) -> None:
        self.loop, self.steps, self.device = loop, steps, device
        self.transient = 0
        self.resident = 0
        self.warmup_s = 0.0
        self.step_s = 0.0  # the last warm-up step's time: what a measured step will roughly cost

    def __call__(self) -> float:
        tokens = 0
        for _ in range(self.steps):
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
                before = torch.cuda.memory_allocated(self.device)
            tokens += self.loop.step()
            if self.device.type == "cuda":
                self.transient = max(self.transient, torch.cuda.max_memory_allocated(self.device) - before)
        return float(tokens)


# ------------------------------------------------------------------------------------------------


def _prep_shards(rows: list[str], tok_dir: Path, work: Path, name: str) -> Path:
    from llmcore.data_prep.prep import prep

    src = write_jsonl(rows, work / f"{name}.jsonl")
    prep("pretrain", [src], tok_dir, work / f"{name}-shards", workers=1)
    return work / f"{name}-shards"


def real_token_share(shards: Path, mode: str, seq_len: int, batch: int = 16) -> float:
    """Share of non-pad input positions over one epoch of a loader (wrapped repeats left out)."""
    from llmcore.data_prep.loaders import first_rows, make_loader
    from llmcore.data_prep.shards import ShardReader

    reader = ShardReader(shards)
    loader = make_loader(reader, mode, seq_len, batch, seed=0, shuffle=False)
    pad = int(reader.special_ids.get("pad", 0))
    real = total = 0
    for step in range(loader.steps_per_epoch):
        b = first_rows(next(loader), loader.unwrapped_rows(step))
        if b is None:
            continue
        real += int((b["input_ids"] != pad).sum())
        total += b["input_ids"].numel()
    return real / max(total, 1)


def run_train(
    device: torch.device,
    quick: bool = False,
    presets: list[str] | None = None,
    variants: list[str] | None = None,
    seq_len: int | None = None,
    batch: int | None = None,
    rounds: int | None = None,
    steps: int | None = None,
    warmup: int | None = None,
    budget_s: float | None = None,
    data_dir: str | Path | None = None,
    seed: int = 0,
    command: str | None = None,
) -> BenchResult:
    """The training benchmark (see the module docstring); returns the result, not yet written."""
    from llmcore.data_prep.tokenizer import load_tokenizer
    from llmcore.train.speed import flops_per_token, peak_tflops

    cuda = device.type == "cuda"
    ddir = shared_data_dir(data_dir)
    tok_dir = minimind_tokenizer_dir(ddir)
    presets = presets or (["tiny"] if quick else ["minimind2-small", "minimind-3"])
    seq_len = seq_len or (64 if quick else 512)
    batch = batch or (2 if quick else (32 if cuda else 4))
    rounds = rounds or (5 if cuda else 3)
    steps = steps or (1 if quick or not cuda else 5)
    warmup = warmup if warmup is not None else (1 if not cuda else 2)  # compiled loops get one more
    if budget_s is None:
        budget_s = 60.0 if quick else (900.0 if cuda else 2400.0)
    peak, card = peak_tflops(device)
    tok = load_tokenizer(tok_dir)
    rows = pretrain_hq_rows(cmrc_passages(ddir), seed=seed, limit=200 if quick else None)
    settings = {
        "presets": presets,
        "seq_len": seq_len,
        "micro_batch": batch,
        "rounds": rounds,
        "steps_per_round": steps,
        "warmup_steps": f"{warmup} (+1 for compiled loops)",
        "budget_s": budget_s,
        "lr": MINIMIND_LR,
        "rows": f"{len(rows)} pretrain_hq-shaped rows (257-519 chars) from CMRC2018 dev passages",
        "tokenizer": "MiniMind's (vocab 6400)",
        "bf16_peak_tflops": peak,
    }
    res = BenchResult(
        "train",
        device,
        settings,
        quick=quick,
        command=command,
        title="Training benchmark: llmcore vs a MiniMind-style loop (real tokens/s)",
    )
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="llmcore-bench-train-"))
    try:
        token_rows = tok.encode_batch(rows)
        n_tokens = [len(t) + 2 for t in token_rows]
        shards = _prep_shards(rows, tok_dir, work, "rows")
        res.extra["rows"] = {
            "count": len(rows),
            "chars_mean": sum(map(len, rows)) / len(rows),
            "tokens_mean": sum(n_tokens) / len(n_tokens),
            "tokens_max": max(n_tokens),
            "truncated_share": sum(n > seq_len + 1 for n in n_tokens) / len(n_tokens),
        }
        shares = [
            [
                "pretrain_hq-shaped rows (CMRC2018)",
                real_token_share(shards, "padded", seq_len),
                real_token_share(shards, "packed", seq_len),
            ]
        ]
        sample = ddir / "pretrain_sample.jsonl"
        if sample.is_file():
            from llmcore.bench.corpus import read_texts

            texts = read_texts(sample, limit=500 if quick else None)
            sample_shards = _prep_shards(texts, tok_dir, work, "sample")
            shares.append(
                [
                    f"pretrain_sample.jsonl ({len(texts)} docs)",
                    real_token_share(sample_shards, "padded", seq_len),
                    real_token_share(sample_shards, "packed", seq_len),
                ]
            )
        res.table(
            f"Real-token share of rows at seq {seq_len} (MiniMind's tokenizer)",
            ["data", "padded (one document per row)", "packed"],
            [[n, f"{a:.1%}", f"{b:.2%}"] for n, a, b in shares],
        )
        res.extra["real_token_share"] = [{"data": n, "padded": a, "packed": b} for n, a, b in shares]
        log.info(
            "rows: %d, %.0f tokens mean; real-token share padded %.1f%%, packed %.2f%%",
            len(rows),
            res.extra["rows"]["tokens_mean"],
            100 * shares[0][1],
            100 * shares[0][2],
        )

        chosen = [parse_variant(v) for v in variants] if variants else None
        for pi, preset in enumerate(presets):
            vs = chosen or default_variants(device, preset, quick)
            if not any(v.kind == "minimind" for v in vs):
                vs = [Variant("minimind")] + vs
            left = budget_s - (time.perf_counter() - t_start)
            # The first preset (minimind2-small, the targets' model) gets 60% of the time when there are two.
            preset_budget = left if pi == len(presets) - 1 else left * (0.6 if pi == 0 else 1 / (len(presets) - pi))
            p_start = time.perf_counter()
            loops: dict[str, _Measured] = {}
            skipped: list[str] = []
            for i, v in enumerate(vs):
                label = v.label(device)
                elapsed = time.perf_counter() - p_start
                # Build another loop only while the rounds of all built loops plus an average one still fit.
                per_round = sum(m.step_s for m in loops.values()) * steps
                if loops and elapsed + rounds * per_round * (len(loops) + 1) / len(loops) > preset_budget:
                    skipped.append(label)
                    continue
                if stop_requested():
                    skipped.append(label)
                    continue
                log.info("[%s] building %s", preset, label)
                before = _resident_bytes(device)
                t0 = time.perf_counter()
                loop: Any = None
                # Built and warmed up inside its own error handling: a loop that raises (a kernel that
                # refuses a shape, an OOM, a compile error) is recorded and the others still run.
                try:
                    fault_point(f"train build {preset} {label}")
                    if v.kind == "minimind":
                        loop = MiniMindLoop(preset, token_rows, tok, seq_len, batch, device, seed)
                    else:
                        loop = LLMCoreLoop(preset, shards, work / f"run-{pi}-{i}", v, seq_len, batch, device, seed)
                    m = _Measured(loop, steps, device)
                    for _ in range(warmup + (1 if v.compile else 0)):
                        t1 = time.perf_counter()
                        fault_point(f"train warm-up {preset} {label}")
                        loop.step()
                        if cuda:
                            torch.cuda.synchronize(device)
                        m.step_s = time.perf_counter() - t1
                except LLMCoreError as err:
                    res.note(f"{preset} {label}: not run ({err})")
                    _drop(loop, device)
                    continue
                except Exception as err:
                    res.fail(f"{preset} {label}", err)
                    _drop(loop, device)
                    continue
                m.resident = _resident_bytes(device) - before
                log.info(
                    "[%s] %s ready in %.1fs (incl. %d warm-up steps)", preset, label, time.perf_counter() - t0, warmup
                )
                m.warmup_s = time.perf_counter() - t0
                loops[label] = m
            for label in skipped:
                why = "stopped" if stop_requested() else f"time budget {budget_s:.0f}s"
                res.note(f"{preset}: {label} skipped ({why})")
            if not loops:
                res.note(f"{preset}: no loop could be built, nothing measured")
                continue
            left = preset_budget - (time.perf_counter() - p_start)

            def timing_failed(label: str, err: Exception, p: str = preset) -> None:
                res.fail(f"{p} {label} (while timed)", err)
                _drop(loops.pop(label).loop, device)

            samples = interleaved(
                dict(loops),
                rounds,
                warmup=0,
                device=device,
                budget_s=max(left, 0.0),
                progress=lambda s, p=preset: log.info("[%s] %s", p, s),
                on_error=timing_failed,
            )
            base_label = Variant("minimind").label(device)
            model_cfg = next(iter(loops.values())).loop.config if loops else None
            fpt = flops_per_token(model_cfg, seq_len) if model_cfg is not None else 0.0
            for label, s in samples.items():
                if not s.wall:
                    res.note(f"{preset} {label}: built but no timed round completed")
                    continue
                m = loops[label]
                s.warmup_s = m.warmup_s
                facts: dict[str, Any] = {
                    "preset": preset,
                    "loop": label,
                    "step_s": summarize([w / steps for w in s.wall]),
                    "tokens_per_step": sum(s.units) / max(len(s.units), 1) / steps,
                }
                if cuda:
                    facts["peak_memory_gb"] = round((m.resident + m.transient) / 2**30, 3)
                    if peak:
                        facts["mfu"] = summarize([r * fpt / (peak * 1e12) for r in s.rate()])
                        fpt_palm = flops_per_token(model_cfg, seq_len, causal=False)
                        facts["mfu_palm"] = summarize([r * fpt_palm / (peak * 1e12) for r in s.rate()])
                else:
                    from llmcore.train.speed import peak_memory_gb

                    facts["process_max_rss_gb"] = round(peak_memory_gb(device), 3)
                res.measure_samples(f"{preset} {label}", s, "real tokens/s", **facts)
            measured = [lb for lb in samples if samples[lb].wall]
            for label in measured:
                if label != base_label and base_label in measured:
                    res.ratio(
                        f"{preset}: {label} vs minimind-style",
                        f"{preset} {label}",
                        f"{preset} {base_label}",
                        metric="throughput",
                        what="real tokens/s",
                    )
                    if not cuda:
                        res.ratio(
                            f"{preset}: {label} vs minimind-style, per CPU-second",
                            f"{preset} {label}",
                            f"{preset} {base_label}",
                            metric="per CPU-second",
                            what="real tokens per CPU-second",
                        )
            for m in loops.values():  # measured or not (a stop before its first round), each is closed
                _drop(m.loop, device)
            loops.clear()
            if cuda:
                torch.cuda.empty_cache()
            if stop_requested():
                for later in presets[pi + 1 :]:
                    res.note(f"{later}: not measured ({stop_requested()})")
                break
        targets_for(res)
        res.note(
            "Real tokens = non-pad input positions (what a padded loop wastes does not count). MFU counts the "
            "real tokens only: 6N + 6·L·H·Q·T FLOPs per token over the card's dense bf16 peak (the attention "
            "term counted causally, half of the PaLM convention's 12·L·H·Q·T; the PaLM-convention MFU is in "
            "`mfu_palm`)."
        )
        res.note(
            "The MiniMind-style loop uses our model's sdpa backend without position ids (one causal document per "
            "row), pre-tokenized rows fed from memory and torch's default AdamW; llmcore loops run "
            "Trainer.train_step() with its own loader and feed."
        )
        if not cuda and any("+compile" in m.get("loop", "") for m in res.measurements):
            res.note(
                "CPU caveat: once torch.compile has run in a process, eager code in the same process can slow "
                "down (inductor's OpenMP threads compete for the cores; seen on this 2-core machine), which "
                "penalises the uncompiled loops, the baseline included; compare the per-round values."
            )
        if not cuda:
            res.note(
                "CPU: bf16 autocast on this CPU uses "
                + (
                    "AMX"
                    if "amx_bf16" in res.machine["cpu_flags"]
                    else "AVX-512 BF16 (no AMX)"
                    if "avx512_bf16" in res.machine["cpu_flags"]
                    else "no bf16 hardware"
                )
                + "; MiniMind's trainer runs fp32 on CPU, so the baseline is fp32."
            )
        res.plot = _plot
        res.figsize = (16, 6.5)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return res


def _targets(res: BenchResult, device: torch.device, presets: list[str]) -> None:
    def ratio_of(preset: str, label: str) -> float | None:
        r = next((x for x in res.ratios if x["numerator"] == f"{preset} {label}" and x["metric"] == "throughput"), None)
        return r["value"] if r else None

    if device.type == "cuda":
        if "minimind2-small" in presets:
            label = Variant("llmcore", "triton", True).label(device)
            res.target(
                "minimind2-small seq 512: llmcore triton+compile vs minimind-style (real tokens/s)",
                ratio_of("minimind2-small", label),
                4.0,
                source=label,
            )
            try:
                mfu = (res.find(f"minimind2-small {label}", "throughput").get("mfu") or {}).get("median")
            except KeyError:
                mfu = None
            res.target("minimind2-small seq 512: MFU of llmcore triton+compile", mfu, 0.25, unit="", source=label)
    elif "minimind2-small" in presets:
        # DESIGN.md: llmcore may use bf16 autocast on CPU, MiniMind's trainer runs fp32 there.
        for v in (
            Variant("llmcore", "sdpa", dtype="bf16"),
            Variant("llmcore", "sdpa", True),
            Variant("llmcore", "sdpa"),
        ):
            label = v.label(device)
            if any(m.get("loop") == label for m in res.measurements):
                res.target(
                    f"CPU minimind2-small seq 512: {label} vs minimind-style (real tokens/s)",
                    ratio_of("minimind2-small", label),
                    2.5,
                    source=label,
                )


CONTROL = "Control: "


def _control_notes(res: BenchResult, device: torch.device) -> None:
    """Where an llmcore padded loop ran beside the MiniMind-style one (the same work per row: one
    padded document, same model and optimizer), its ratio is this run's noise level."""
    res.notes[:] = [n for n in res.notes if not n.startswith(CONTROL)]
    for preset in dict.fromkeys(m["preset"] for m in res.measurements if "preset" in m):
        for v in (Variant("llmcore", "sdpa", packing="padded"), Variant("llmcore", "triton", packing="padded")):
            label = v.label(device)
            wall = next(
                (r for r in res.ratios if r["numerator"] == f"{preset} {label}" and r["metric"] == "throughput"), None
            )
            if wall is None:
                continue
            cpu = next(
                (r for r in res.ratios if r["numerator"] == f"{preset} {label}" and r["metric"] == "per CPU-second"),
                None,
            )
            res.note(
                f"{CONTROL}{preset} `{label}` does the same work per row as the minimind-style loop (one padded "
                f"document per row, same model, same optimizer), so its ratio, {wall['value']:.2f}x"
                + (f" (per CPU-second {cpu['value']:.2f}x)" if cpu else "")
                + ", shows how far this run's ratios can stray from the truth: read differences within that band "
                "as noise. Its padded loader marks its rows as single documents, so the model gets no "
                "position ids and takes the same causal path (SDPA's flash kernel on CUDA) as the "
                "minimind-style loop."
            )


def _speed_table(res: BenchResult) -> None:
    """The "Real tokens per second" table from the result's measurements and ratios (also for a
    partial result, so a run stopped in its second preset still shows the first)."""
    cuda = res.device.type == "cuda"

    def ratio(case: str, metric: str) -> dict[str, Any] | None:
        return next((x for x in res.ratios if x["numerator"] == case and x["metric"] == metric), None)

    rows = []
    for entry in res.measurements:
        if entry.get("metric") != "throughput" or "loop" not in entry:
            continue
        r = ratio(entry["case"], "throughput")
        row = [
            entry["preset"],
            entry["loop"],
            fmt(entry["median"]),
            f"{fmt(entry['min'])} .. {fmt(entry['max'])}",
            fmt(entry["step_s"]["median"]) + " s",
            f"{entry['mfu']['median']:.1%}" if (entry.get("mfu") or {}).get("median") is not None else "-",
            fmt(entry.get("peak_memory_gb", entry.get("process_max_rss_gb"))),
            f"{fmt(r['value'])}x" if r else "1x (baseline)",
        ]
        if not cuda:
            rc = ratio(entry["case"], "per CPU-second")
            row.append(f"{fmt(rc['value'])}x" if rc else "1x (baseline)")
        rows.append(row)
    mem_col = "peak memory GiB" if cuda else "process max RSS GiB (all loops)"
    res.tables[:] = [t for t in res.tables if t["title"] != "Real tokens per second"]
    res.table(
        "Real tokens per second",
        ["preset", "loop", "real tokens/s", "min .. max", "step", "MFU", mem_col, "vs minimind-style"]
        + ([] if cuda else ["same, per CPU-second"]),
        rows,
    )


def targets_for(res: BenchResult) -> None:
    """Recompute the table, targets and control notes of a result from its stored measurements and
    ratios (no measuring): at the end of a run, for a partial one, and when redrawing from json."""
    _speed_table(res)
    res.targets = []
    _targets(res, res.device, list(res.settings.get("presets", [])))
    _control_notes(res, res.device)


def _plot(res: BenchResult, fig: Any) -> None:
    presets = list(dict.fromkeys(m["preset"] for m in res.measurements if "preset" in m))
    n = len(presets) + 1
    grid = fig.add_gridspec(
        1, n, width_ratios=[1.4] * len(presets) + [1.0], wspace=0.9, left=0.12, right=0.97, top=0.86, bottom=0.2
    )
    fig.manual_layout = True
    for i, preset in enumerate(presets):
        ax = fig.add_subplot(grid[0, i])
        ms = [m for m in res.measurements if m.get("preset") == preset and m["metric"] == "throughput"]
        labels = [m["loop"].replace(" (padded", "\n(padded").replace("llmcore ", "llmcore\n") for m in ms]
        colors = ["tab:gray" if m["loop"].startswith("minimind") else "tab:blue" for m in ms]
        texts = []
        for m in ms:
            r = next((x for x in res.ratios if x["numerator"] == m["case"] and x["metric"] == "throughput"), None)
            texts.append(f"{fmt(m['median'])} ({fmt(r['value'])}x)" if r else f"{fmt(m['median'])} (baseline)")
        bar_panel(
            ax,
            labels,
            [m["median"] for m in ms],
            [(m["min"], m["max"]) for m in ms],
            f"{preset}",
            "real (non-pad) tokens/s\nbar: median, line: min..max, (x): paired ratio",
            colors,
            texts=texts,
        )
        ax.margins(x=0.45)
    ax = fig.add_subplot(grid[0, n - 1])
    shares = res.extra.get("real_token_share", [])
    names = [s["data"].split(" (")[0].replace(" rows", "\nrows").replace(".jsonl", "\n.jsonl") for s in shares]
    ys = range(len(shares))
    ax.barh([y + 0.2 for y in ys], [100 * s["padded"] for s in shares], height=0.4, color="tab:red", label="padded")
    ax.barh([y - 0.2 for y in ys], [100 * s["packed"] for s in shares], height=0.4, color="tab:green", label="packed")
    for y, s in zip(ys, shares):
        ax.text(100 * s["padded"], y + 0.2, f" {100 * s['padded']:.1f}%", va="center", fontsize=8)
        ax.text(100 * s["packed"], y - 0.2, f" {100 * s['packed']:.1f}%", va="center", fontsize=8)
    ax.set_yticks(list(ys))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlim(0, 135)
    ax.set_xlabel("% of row positions\nthat are real tokens")
    ax.set_title(f"real-token share, seq {res.settings['seq_len']}", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(
        f"llmcore vs a MiniMind-style loop: pretraining, seq {res.settings['seq_len']}, micro batch "
        f"{res.settings['micro_batch']} ({res.machine.get('gpu') or 'CPU'})",
        fontsize=11,
    )


__all__ = ["run_train", "Variant", "parse_variant", "MiniMindLoop", "LLMCoreLoop", "real_token_share"]


def plot_for(res: BenchResult) -> Any:
    """The plot function for a result of this benchmark (used to redraw from json)."""
    return _plot
