"""The RL loop (GRPO / CISPO, PPO): rollouts, rewards, then policy updates, on the training engine.

One step:
1. take the step's prompts (global rows `[step * P, (step + 1) * P)` of a per-epoch shuffle of the
   RL rows, seeded; each process takes its own share), render each with the tokenizer's chat
   template (a `--thinking-ratio` share with `open_thinking`, drawn from a seeded generator);
2. sample responses with llmcore's batched KV-cache generator (`--temperature`, `--top-p`,
   `--max-new-tokens`, stop at `<|im_end|>`), from a generator seeded by (seed, step, rank): a resumed
   run samples exactly what the uninterrupted run sampled;
3. score them with the rewards (`llmcore.rl.rewards`);
4. GRPO: group-normalised advantages over the `--num-generations` samples of a prompt; one optimizer
   step on the batch (micro batches accumulate). PPO: values from a value head on the policy's final
   hidden state, GAE (reward at the last response token), whitened advantages, `--ppo-epochs` passes
   of `--mini-batch-size` optimizer steps, stopping early when the approximate KL passes
   `--early-stop-kl`.
The log-probs the ratio divides by (`old`) are computed before the first update with the same micro
batches, so the first update of a step sees ratio 1 exactly. The KL term uses the frozen `--init`
model (not loaded when `--beta 0`). Losses are token-level normalised over the whole batch (all
processes): see `llmcore.rl.losses`.

Checkpoints, metrics.jsonl/loss.png, the run-dir lock, resume and the engine (plain or DeepSpeed ZeRO
0-2) are the training stack's own. A checkpoint holds the policy as a plain model (generate, chat,
eval, export and `--init` take the run dir), plus the value head for PPO (`value_head.safetensors`).
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmcore.errors import LLMCoreError
from llmcore.rl.data import RLRow, read_rl_rows
from llmcore.rl.losses import approx_kl, gae, group_advantages, policy_loss, token_logps, value_loss, whiten
from llmcore.rl.rewards import Reward, parse_rewards, score, total

log = logging.getLogger(__name__)

VALUE_HEAD_FILE = "value_head.safetensors"


class PolicyWithValue(nn.Module):
    """PPO's actor-critic: the policy (an `LLM`) and a linear value head on its final hidden state
    (the output of the final norm, caught by a forward hook). The head starts at zero: V = 0."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self._hidden: torch.Tensor | None = None
        policy.norm.register_forward_hook(self._catch)

    def _catch(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self._hidden = output

    @property
    def config(self) -> Any:
        return self.policy.config

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> Any:
        out = self.policy(input_ids, position_ids=position_ids)
        assert self._hidden is not None
        out.values = self.value_head(self._hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        self._hidden = None
        return out


def policy_of(module: nn.Module) -> nn.Module:
    return module.policy if isinstance(module, PolicyWithValue) else module


@dataclass
class Rollout:
    """One process's sampled rows: prompt + response, right-padded. `mask` (N, T-1) marks the
    positions whose next token is a response token (the logits that score the response)."""

    ids: torch.Tensor
    pos: torch.Tensor
    mask: torch.Tensor
    prompt_lens: list[int]
    resp_lens: list[int]
    truncated: list[bool]
    texts: list[str]
    rows: list[RLRow]
    rewards: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    reward_parts: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class RLStepStats:
    values: dict[str, float]


class RLTrainer:
    """GRPO/CISPO (`algo="grpo"`) or PPO (`algo="ppo"`) on a resolved TrainConfig."""

    def __init__(self, stage: Any, cfg: Any, algo: str) -> None:
        from llmcore.train.checkpointing import CheckpointManager, RunDirLock
        from llmcore.train.engine import make_engine

        if algo not in ("grpo", "ppo"):
            raise ValueError(algo)
        self.stage, self.cfg, self.algo = stage, cfg, algo
        self.group = cfg.num_generations if algo == "grpo" else 1
        self.run_dir = Path(cfg.out)
        if cfg.deepspeed and "zero3" in str(cfg.deepspeed):
            raise LLMCoreError(
                "RL runs generate with full weights on every process: use --deepspeed zero1 or zero2 "
                "(ZeRO-3 would gather every layer at every sampled token)"
            )
        self.rows = read_rl_rows(cfg.data)
        self.engine = make_engine(cfg)
        eng = self.engine
        self.rank, self.world = eng.rank, eng.world
        self.lock = RunDirLock(self.run_dir).acquire() if self.rank == 0 else None
        try:
            self._setup(CheckpointManager)
        except BaseException:
            if self.lock is not None:
                self.lock.release(failed=True)
            raise

    # -- setup ------------------------------------------------------------------------------------
    def _setup(self, checkpoint_manager: Any) -> None:
        from llmcore.checkpoint import load_model, load_model_and_tokenizer
        from llmcore.train.metrics import MetricsLogger, read_metrics

        cfg, eng = self.cfg, self.engine
        if cfg.global_batch_size % self.group:
            raise LLMCoreError(
                f"--global-batch-size {cfg.global_batch_size} (responses per step) must be a multiple "
                f"of --num-generations {self.group}"
            )
        self.prompts_per_step = cfg.global_batch_size // self.group
        if self.prompts_per_step % self.world:
            raise LLMCoreError(f"{self.prompts_per_step} prompts per step do not split over {self.world} processes")
        self.rows_per_rank = self.prompts_per_step // self.world * self.group
        micro = cfg.micro_batch_size
        if self.algo == "grpo":
            per_update = self.rows_per_rank
        else:
            mini = cfg.mini_batch_size or cfg.global_batch_size
            if cfg.global_batch_size % mini or mini % self.world:
                raise LLMCoreError(
                    f"--mini-batch-size {mini} must divide --global-batch-size {cfg.global_batch_size} "
                    f"and split over {self.world} processes"
                )
            per_update = mini // self.world
            self.mini_per_rank = per_update
        if per_update % micro:
            raise LLMCoreError(
                f"--micro-batch-size {micro} must divide the {per_update} responses each process "
                "contributes to an optimizer step"
            )
        self.accum = per_update // micro
        self.total_steps = cfg.max_steps or max(
            1, math.ceil((cfg.epochs or 1) * len(self.rows) / self.prompts_per_step)
        )

        self.ckpts = checkpoint_manager(self.run_dir, self.rank, self.world, eng.barrier)
        resume_from = None
        if cfg.resume:
            resume_from, skipped = self.ckpts.resume_point()
            for name, why in skipped:
                log.warning("skipping checkpoints/%s: %s", name, why)
            if resume_from is None:
                raise LLMCoreError(f"--resume: {self.run_dir} has no complete checkpoint yet")
        elif self.ckpts.has_checkpoints():
            raise LLMCoreError(
                f"--out {self.run_dir} already holds a run; pass --resume to continue it or choose another --out"
            )
        if not cfg.init:
            raise LLMCoreError(f"{self.stage.name} starts from a trained model: pass --init RUN_DIR (the SFT run)")
        init_model, self.tok = load_model_and_tokenizer(
            cfg.init, eng.device, attn_backend=cfg.attn_backend, flag="--init"
        )
        self.eos_id = self.tok.eos_id
        policy = (
            load_model(resume_from, device=eng.device, attn_backend=cfg.attn_backend, with_tokenizer=False)[0]
            if resume_from is not None
            else init_model
        )
        policy.train()
        if cfg.beta:
            if resume_from is None:
                init_model = load_model(
                    cfg.init, device=eng.device, attn_backend=cfg.attn_backend, with_tokenizer=False
                )[0]
            self.ref = init_model.eval().requires_grad_(False)
        else:
            self.ref = None
            del init_model
        module: nn.Module = PolicyWithValue(policy) if self.algo == "ppo" else policy
        if self.algo == "ppo" and resume_from is not None:
            from safetensors.torch import load_file

            state = load_file(str(resume_from / VALUE_HEAD_FILE))
            module.value_head.load_state_dict(state)  # type: ignore[union-attr]
        eng.prepare(module, self.accum)
        self.rewards: list[Reward] = parse_rewards(
            [s for s in cfg.reward.split(",") if s.strip()] if cfg.reward else [], cfg.reward_model, device=eng.device
        )
        self.step = 0
        if resume_from is not None:
            eng.load_state(resume_from)
            state, _loader, rng = self.ckpts.load_side_state(resume_from)
            self.step = int(state["step"])
            self.tokens = int(state.get("tokens", 0))
        else:
            self.tokens = 0
        self.resume_from = resume_from
        if self.rank == 0:
            self._write_run_files(policy)
            if resume_from is not None:
                MetricsLogger.truncate(self.run_dir, self.step)
        panels = [("reward", "reward_std"), ("kl", "clip_frac"), ("response_len",)]
        panels += [tuple(f"reward/{r.name}" for r in self.rewards)] if len(self.rewards) > 1 else []
        if self.algo == "ppo":
            panels.append(("value_loss",))
        self.metrics = MetricsLogger(
            self.run_dir,
            self.rank == 0,
            self.total_steps,
            self.step,
            cfg.quiet,
            {"project": cfg.wandb_project, "config": cfg.to_dict()} if cfg.wandb else None,
            title=f"{self.stage.name}: {self.run_dir.name}",
            panels=tuple(panels),
            loss_unit="policy loss",
        )
        del read_metrics

    def _write_run_files(self, policy: nn.Module) -> None:
        from llmcore.io import atomic_dir, write_json

        write_json(
            self.run_dir / "config.json",
            {
                "stage": self.stage.name,
                "model": policy.config.to_dict(),
                "train": self.cfg.to_dict(),
                "tokenizer_fingerprint": self.tok.fingerprint,
                "engine": self.engine.kind,
                "device": str(self.engine.device),
                "world_size": self.world,
                "accumulation": self.accum,
                "total_steps": self.total_steps,
            },
        )
        tok_dir = self.run_dir / "tokenizer"
        if not (tok_dir / "tokenizer.json").is_file():
            with atomic_dir(tok_dir) as tmp:
                self.tok.save(tmp)

    # -- data ----------------------------------------------------------------------------------------
    def step_rows(self, step: int) -> list[tuple[int, RLRow]]:
        """This process's (global index, row) for `step`: a seeded shuffle per epoch, rank r taking
        the r-th share of the step's prompts."""
        n = len(self.rows)
        out = []
        start = step * self.prompts_per_step
        share = self.prompts_per_step // self.world
        for k in range(start + self.rank * share, start + (self.rank + 1) * share):
            epoch, i = divmod(k, n)
            order = list(range(n))
            random.Random(self.cfg.seed * 1000003 + epoch).shuffle(order)
            out.append((k, self.rows[order[i]]))
        return out

    # -- rollout ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, step: int) -> Rollout:
        from llmcore.generate import generate_steps

        cfg, eng = self.cfg, self.engine
        rows = self.step_rows(step)
        prompts: list[list[int]] = []
        expanded: list[RLRow] = []
        for k, row in rows:
            thinking = random.Random(cfg.seed * 7919 + k).random() < cfg.thinking_ratio
            ids = self.tok.encode_prompt(row.prompt, tools=row.tools, open_thinking=thinking)
            limit = cfg.seq_len
            if len(ids) > limit:
                ids = ids[-limit:]  # keep the end: the generation header must stay
            for _ in range(self.group):
                prompts.append(ids)
                expanded.append(row)
        gen = torch.Generator(device=eng.device)
        gen.manual_seed((cfg.seed * 1_000_003 + step) * 1009 + self.rank)
        module = policy_of(eng.module)
        was_training = module.training
        module.eval()
        responses: list[list[int]] = [[] for _ in prompts]
        with eng.autocast():
            for tok, active in generate_steps(
                module,
                prompts,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                eos_id=self.eos_id,
                generator=gen,
                pad_id=self.tok.pad_id,
            ):
                for i in torch.nonzero(active).flatten().tolist():
                    responses[i].append(int(tok[i]))
        module.train(was_training)
        truncated = [not r or r[-1] != self.eos_id for r in responses]
        texts = [self.tok.decode(r[:-1] if r and r[-1] == self.eos_id else r) for r in responses]
        width = max(len(p) + len(r) for p, r in zip(prompts, responses))
        n = len(prompts)
        ids_t = torch.full((n, width), self.tok.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width - 1), dtype=torch.float32)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids_t[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
            mask[i, len(p) - 1 : len(p) - 1 + len(r)] = 1.0
        pos = torch.arange(width).unsqueeze(0).expand(n, width).contiguous()
        return Rollout(
            ids_t, pos, mask, [len(p) for p in prompts], [len(r) for r in responses], truncated, texts, expanded
        )

    def score(self, ro: Rollout) -> None:
        totals, parts = [], {r.name: [] for r in self.rewards}
        for row, text in zip(ro.rows, ro.texts):
            values = score(self.rewards, row.prompt, text, row.sample)
            for name, v in values.items():
                parts[name].append(v)
            totals.append(total(self.rewards, values))
        ro.rewards = torch.tensor(totals, dtype=torch.float32)
        ro.reward_parts = parts

    # -- forward passes --------------------------------------------------------------------------------
    def _micro_batches(self, n: int, size: int) -> list[slice]:
        return [slice(i, i + size) for i in range(0, n, size)]

    def _forward(self, ro: Rollout, sl: slice) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        eng = self.engine
        width = int(ro.mask[sl].sum(0).nonzero().max()) + 2 if ro.mask[sl].any() else 2
        ids = ro.ids[sl, :width].to(eng.device)
        out = eng.forward({"input_ids": ids, "position_ids": ro.pos[sl, :width].to(eng.device)})
        logp = token_logps(out.logits[:, :-1], ids[:, 1:])
        values = getattr(out, "values", None)
        return logp, (values[:, :-1] if values is not None else None), out.aux_loss

    @torch.no_grad()
    def _reference_passes(self, ro: Rollout) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(old_logp, ref_logp or None, old_values or None), each (N, T-1), from the same micro batches
        the update uses."""
        n, t = ro.mask.shape
        old = torch.zeros(n, t)
        ref = torch.zeros(n, t) if self.ref is not None else None
        vals = torch.zeros(n, t) if self.algo == "ppo" else None
        for sl in self._micro_batches(n, self.cfg.micro_batch_size):
            logp, values, _ = self._forward(ro, sl)
            w = logp.shape[1]
            old[sl, :w] = logp.float().cpu()
            if vals is not None and values is not None:
                vals[sl, :w] = values.float().cpu()
            if self.ref is not None and ref is not None:
                ids = ro.ids[sl, : w + 1].to(self.engine.device)
                with self.engine.autocast():
                    rl = self.ref(ids, position_ids=ro.pos[sl, : w + 1].to(self.engine.device)).logits
                ref[sl, :w] = token_logps(rl[:, :-1], ids[:, 1:]).float().cpu()
        return old, ref, vals

    # -- one step ---------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        from llmcore.train.trainer import lr_at

        cfg, eng = self.cfg, self.engine
        t0 = time.perf_counter()
        ro = self.rollout(self.step)
        self.score(ro)
        t_rollout = time.perf_counter() - t0
        old, ref, old_values = self._reference_passes(ro)
        mask = ro.mask
        local_tokens = float(mask.sum())
        sums = eng.all_sum(
            torch.tensor([local_tokens, float(len(ro.texts))], dtype=torch.float64, device=eng.device)
        ).cpu()
        global_tokens, global_rows = float(sums[0]), float(sums[1])
        lr = lr_at(
            self.step, self.total_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.lr_schedule, cfg.decay_fraction
        )
        n = mask.shape[0]
        acc = {"policy_loss": 0.0, "clipped": 0.0, "kl": 0.0, "value_loss": 0.0, "updates": 0.0}
        grad_norm = torch.tensor(float("nan"))
        if self.algo == "grpo":
            adv = group_advantages(ro.rewards, self.group)
            denom = max(global_tokens, 1.0) / self.world
            slices = self._micro_batches(n, cfg.micro_batch_size)
            for j, sl in enumerate(slices):
                logp, _, aux = self._forward(ro, sl)
                w = logp.shape[1]
                m = mask[sl, :w].to(eng.device)
                pl = policy_loss(
                    logp,
                    old[sl, :w].to(eng.device),
                    adv[sl].to(eng.device),
                    m,
                    denom,
                    loss=cfg.loss,
                    epsilon=cfg.epsilon,
                    epsilon_high=cfg.epsilon_high,
                    beta=cfg.beta,
                    ref_logp=ref[sl, :w].to(eng.device) if ref is not None else None,
                )
                eng.backward(pl.loss + aux / len(slices))
                acc["policy_loss"] += float(pl.loss.detach()) / self.world
                acc["clipped"] += float(pl.clipped)
                acc["kl"] += float(pl.kl)
                out = eng.micro_step_end(j == len(slices) - 1, lr)
                if out is not None:
                    grad_norm = out
            acc["updates"] = 1
        else:
            grad_norm = self._ppo_updates(ro, old, ref, old_values, lr, acc)
        t_update = time.perf_counter() - t0 - t_rollout
        # Everything a process measured, summed over processes in one all-reduce.
        resp_tokens = float(sum(ro.resp_lens))
        parts = [float(sum(v)) for v in ro.reward_parts.values()]
        vec = torch.tensor(
            [
                float(ro.rewards.sum()),
                float((ro.rewards**2).sum()),
                resp_tokens,
                float(sum(ro.truncated)),
                acc["clipped"],
                acc["kl"],
                acc["policy_loss"],
                acc["value_loss"],
                *parts,
            ],
            dtype=torch.float64,
            device=eng.device,
        )
        vec = eng.all_sum(vec).cpu().tolist()
        mean_r = vec[0] / global_rows
        stats = {
            "step": self.step + 1,
            "lr": lr,
            "loss": vec[6] if self.algo == "grpo" else vec[6] / max(acc["updates"], 1),
            "reward": mean_r,
            "reward_std": math.sqrt(max(vec[1] / global_rows - mean_r**2, 0.0)),
            "response_len": vec[2] / global_rows,
            "truncated": vec[3] / global_rows,
            "clip_frac": vec[4] / max(global_tokens * max(acc["updates"], 1), 1.0),
            "kl": vec[5] / max(global_tokens * max(acc["updates"], 1), 1.0),
            "grad_norm": float(grad_norm),
            "rollout_tokens_per_s": vec[2] / max(t_rollout, 1e-9),
            "update_tokens_per_s": float(ro.ids.numel()) * self.world / max(t_update, 1e-9),
        }
        for (name, _), v in zip(ro.reward_parts.items(), vec[8:]):
            stats[f"reward/{name}"] = v / global_rows
        if self.algo == "ppo":
            stats["value_loss"] = vec[7] / max(acc["updates"], 1)
            stats["ppo_updates"] = acc["updates"]
        self.tokens += int(float(ro.ids.ne(self.tok.pad_id).sum()) * self.world)
        stats["tokens"] = self.tokens
        self.step += 1
        return stats

    def _ppo_updates(
        self,
        ro: Rollout,
        old: torch.Tensor,
        ref: torch.Tensor | None,
        old_values: torch.Tensor | None,
        lr: float,
        acc: dict[str, float],
    ) -> torch.Tensor:
        cfg, eng = self.cfg, self.engine
        mask = ro.mask
        n = mask.shape[0]
        assert old_values is not None
        token_rewards = torch.zeros_like(mask)
        for i, r in enumerate(ro.resp_lens):
            if r:
                token_rewards[i, ro.prompt_lens[i] - 1 + r - 1] = float(ro.rewards[i])
        adv, returns = gae(token_rewards, old_values, mask, cfg.gamma, cfg.lam)
        adv = whiten(adv, mask)
        grad_norm = torch.tensor(float("nan"))
        gen = torch.Generator().manual_seed(cfg.seed * 31 + self.step)
        for _epoch in range(cfg.ppo_epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, self.mini_per_rank):
                idx = order[start : start + self.mini_per_rank]
                sub_tokens = float(mask[idx].sum())
                total_tokens = float(
                    eng.all_sum(torch.tensor([sub_tokens], dtype=torch.float64, device=eng.device)).cpu()[0]
                )
                denom = max(total_tokens, 1.0) / self.world
                kl_sum = 0.0
                micro = [idx[i : i + cfg.micro_batch_size] for i in range(0, len(idx), cfg.micro_batch_size)]
                for j, rows in enumerate(micro):
                    sub = Rollout(ro.ids[rows], ro.pos[rows], mask[rows], [], [], [], [], [])
                    logp, values, aux = self._forward(sub, slice(0, len(rows)))
                    w = logp.shape[1]
                    m = mask[rows, :w].to(eng.device)
                    o = old[rows, :w].to(eng.device)
                    pl = policy_loss(
                        logp,
                        o,
                        adv[rows, :w].to(eng.device),
                        m,
                        denom,
                        loss="grpo",
                        epsilon=cfg.epsilon,
                        beta=cfg.beta,
                        ref_logp=ref[rows, :w].to(eng.device) if ref is not None else None,
                    )
                    assert values is not None
                    vl = value_loss(
                        values,
                        old_values[rows, :w].to(eng.device),
                        returns[rows, :w].to(eng.device),
                        m,
                        denom,
                        cfg.value_clip,
                    )
                    eng.backward(pl.loss + cfg.vf_coef * vl + aux / len(micro))
                    kl_sum += float(approx_kl(logp.detach(), o, m))
                    acc["policy_loss"] += float(pl.loss.detach()) / self.world
                    acc["value_loss"] += float(vl.detach()) / self.world
                    acc["clipped"] += float(pl.clipped)
                    acc["kl"] += float(pl.kl)
                    out = eng.micro_step_end(j == len(micro) - 1, lr)
                    if out is not None:
                        grad_norm = out
                acc["updates"] += 1
                mean_kl = float(eng.all_sum(torch.tensor([kl_sum], dtype=torch.float64, device=eng.device)).cpu()[0])
                if cfg.early_stop_kl and mean_kl / max(total_tokens, 1.0) > cfg.early_stop_kl:
                    return grad_norm
        return grad_norm

    # -- checkpoints --------------------------------------------------------------------------------------
    def save(self) -> Path:
        from safetensors.torch import save_file

        from llmcore.checkpoint import save_model
        from llmcore.io import atomic_write

        eng = self.engine

        def write_model(d: Path) -> None:
            with eng.full_weights() as module:
                if self.rank == 0:
                    save_model(policy_of(module), d)
                    if isinstance(module, PolicyWithValue):
                        state = {
                            k: v.detach().float().cpu().contiguous() for k, v in module.value_head.state_dict().items()
                        }
                        atomic_write(d / VALUE_HEAD_FILE, lambda p: save_file(state, str(p)))

        state = {"step": self.step, "tokens": self.tokens, "stage": self.stage.name, "total_steps": self.total_steps}
        return self.ckpts.save(self.step, write_model, eng.save_state, {"step": self.step}, state, self.cfg.keep_last)

    # -- the run --------------------------------------------------------------------------------------------
    def run(self) -> Any:
        from llmcore.train.trainer import RunSummary

        cfg = self.cfg
        t_start = time.perf_counter()
        start_step = self.step
        self.metrics.message(
            f"{self.stage.name}: {self.total_steps:,} steps x {self.prompts_per_step} prompts x {self.group} "
            f"responses (up to {cfg.max_new_tokens} new tokens) from {len(self.rows):,} rows on {self.engine.device}; "
            f"rewards: {', '.join(f'{r.name}:{r.weight:g}' for r in self.rewards)}"
            + (f"; resumed from step {self.step}" if self.step else "")
        )
        self.ckpts.clean_partial()
        last: dict[str, float] = {}
        checkpoint = None
        try:
            stop_at = self.total_steps if cfg.stop_after is None else min(self.total_steps, self.step + cfg.stop_after)
            while self.step < stop_at:
                last = self.train_step()
                if not all(math.isfinite(v) for k, v in last.items() if k in ("loss", "reward")):
                    raise LLMCoreError(
                        f"step {self.step}: the loss or reward is not finite ({last.get('loss')}, "
                        f"{last.get('reward')}); lower --lr or check the rewards"
                    )
                if self.step % cfg.log_every == 0 or self.step == stop_at:
                    self.metrics.log(last)
                    self.metrics.progress(
                        self.step,
                        last["loss"],
                        last["lr"],
                        last["update_tokens_per_s"],
                        time.perf_counter() - t_start,
                        self.step - start_step,
                    )
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < stop_at:
                    checkpoint = self.save()
            checkpoint = self.save()
            self.metrics.plot()
        finally:
            self.metrics.close()
            if self.lock is not None:
                self.lock.release()
        elapsed = time.perf_counter() - t_start
        return RunSummary(
            stage=self.stage.name,
            run_dir=self.run_dir,
            steps=self.step,
            total_steps=self.total_steps,
            tokens=self.tokens,
            loss=float(last.get("loss", float("nan"))),
            eval_loss=None,
            tokens_per_s=self.tokens / max(elapsed, 1e-9),
            elapsed_s=elapsed,
            checkpoint=checkpoint,
            reports_perplexity=False,
        )


__all__ = ["RLTrainer", "PolicyWithValue", "Rollout", "VALUE_HEAD_FILE"]
