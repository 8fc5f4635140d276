"""CLI for the model part: `model info`, `generate`, `chat`, `export hf`. Each command parses flags and
calls one library function."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from llmcore.common import DEVICE_HELP
from llmcore.errors import LLMCoreError

model_app = typer.Typer(
    help="Model presets and parameter counts.\n\nExample: llmcore model info minimind2-small", no_args_is_help=True
)
export_app = typer.Typer(
    help="Export a checkpoint to other formats.\n\nExample: llmcore export hf --ckpt runs/dpo --out hf/",
    no_args_is_help=True,
)


@model_app.command("list")
def list_presets() -> None:
    """The model presets with their shape and parameter count.

    Example: llmcore model list
    """
    from llmcore.model import PRESETS, ModelConfig, param_report

    typer.echo(f"{'preset':16s} {'params':>9s}  {'d':>4s} {'layers':>6s} {'heads':>5s} {'kv':>3s} {'vocab':>6s}  notes")
    for name in PRESETS:
        cfg = ModelConfig.from_preset(name)
        r = param_report(cfg)
        note = (
            f"MoE {cfg.num_experts}x top-{cfg.num_experts_per_tok}, {r['active_per_token'] / 1e6:.1f}M active"
            if cfg.use_moe
            else ""
        )
        typer.echo(
            f"{name:16s} {r['total'] / 1e6:8.2f}M  {cfg.hidden_size:4d} {cfg.num_hidden_layers:6d} "
            f"{cfg.num_attention_heads:5d} {cfg.num_key_value_heads:3d} {cfg.vocab_size:6d}  {note}"
        )


@model_app.command("info")
def info(
    name: str = typer.Argument(..., help="a preset (`llmcore model list`)"),
    as_json: bool = typer.Option(False, "--json", help="print the counts as JSON"),
) -> None:
    """Parameter counts of a preset: total, embedding, per block, and active per token for MoE.

    Example: llmcore model info minimind2-moe
    """
    from llmcore.model import ModelConfig, param_report

    cfg = ModelConfig.from_preset(name)
    r = param_report(cfg)
    if as_json:
        typer.echo(json.dumps({"preset": name, "config": cfg.to_dict(), **r}, indent=2))
        return

    def m(n: int) -> str:
        return f"{n:,} ({n / 1e6:.2f}M)"

    lines = [
        f"preset              {name}",
        f"shape               d={cfg.hidden_size} layers={cfg.num_hidden_layers} heads={cfg.num_attention_heads} "
        f"kv_heads={cfg.num_key_value_heads} head_dim={cfg.head_dim} mlp={cfg.intermediate_size} vocab={cfg.vocab_size}",
        f"total               {m(r['total'])}",
        f"embedding (tied)    {m(r['embedding'])}",
        f"per block           {m(r['per_block'])}  = attention {r['attention_per_block']:,} + mlp {r['mlp_per_block']:,}"
        f" + norms {r['norms_per_block']:,}",
        f"blocks              {r['blocks']} x {r['per_block']:,} = {r['blocks'] * r['per_block']:,}",
        f"final norm          {r['final_norm']:,}",
    ]
    if cfg.use_moe:
        lines += [
            f"experts             {cfg.num_experts} routed (top-{cfg.num_experts_per_tok}) + {cfg.num_shared_experts} "
            f"shared, {r['expert']:,} each; router {r['router']:,}",
            f"active per token    {m(r['active_per_token'])}",
        ]
    typer.echo("\n".join(lines))


@model_app.command("import")
def import_cmd(
    src: Path = typer.Argument(
        ...,
        help="a MiniMind .pth (or .safetensors) state dict, or a transformers folder "
        "(model_type minimind, qwen3, qwen3_moe or llama)",
    ),
    out: Path = typer.Option(
        ..., "--out", help="run dir to write (generate/chat/eval/serve --ckpt and train --init take it)"
    ),
    preset: Optional[str] = typer.Option(
        None,
        "--preset",
        help=".pth only: take RoPE, norm and routing settings from "
        "this preset (default: the preset whose shapes match)",
    ),
    tokenizer: Optional[Path] = typer.Option(
        None, "--tokenizer", help="tokenizer dir to store with the weights (default: the one in the source folder)"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier import at --out (nothing else)"),
) -> None:
    """Import MiniMind's or Hugging Face weights into a run dir (read without running code: weights_only / safetensors).

    Example: llmcore model import out/full_sft_768.pth --tokenizer minimind/model --out runs/mm3
    """
    from llmcore.convert import import_model

    result = import_model(src, out, preset=preset, tokenizer=tokenizer, overwrite=overwrite)
    preset_note = f", preset {result.preset}" if result.preset else ""
    typer.echo(
        f"imported {src} ({result.kind}{preset_note}): {result.num_params / 1e6:.2f}M parameters -> {result.run_dir}"
    )
    if result.tokenizer_dir is None:
        typer.echo(
            "note: no tokenizer stored; pass --tokenizer DIR to generate/chat/serve, or import again with "
            "--tokenizer (MiniMind's is its repo's model/ folder)"
        )


def generate_cmd(
    ckpt: Path = typer.Option(..., "--ckpt", help="run dir, checkpoint dir or exported HF folder"),
    prompt: str = typer.Option(..., "--prompt", help="text to continue"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy"),
    top_k: int = typer.Option(0, "--top-k", help="0 = off"),
    top_p: float = typer.Option(1.0, "--top-p", help="1 = off"),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty"),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt in the chat template as a user message"),
    thinking: bool = typer.Option(
        False,
        "--thinking",
        help="with --chat: open the think block (MiniMind-3's "
        "open_thinking); the model reasons, writes </think>, then answers",
    ),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed for sampling"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer dir (default: the checkpoint's)"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Continue a prompt and print the continuation as it is generated.

    Example: llmcore generate --ckpt runs/pre --prompt "The capital of China is" --max-new-tokens 50 --temperature 0
    """

    from llmcore.chat import chat_prompt_ids, stream_reply
    from llmcore.checkpoint import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(ckpt, device, tokenizer=tokenizer)
    # Pretraining documents start with bos (`<|im_start|>`), so a plain prompt does too; the chat
    # template already opens with it.
    if thinking and not chat:
        raise LLMCoreError("--thinking needs --chat (thinking is a setting of the chat template)")
    ids = chat_prompt_ids(tok, prompt, thinking=thinking) if chat else [tok.bos_id] + tok.encode(prompt)
    pieces = stream_reply(
        model,
        tok,
        ids,
        seed=seed,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
    )
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def chat_cmd(
    ckpt: Path = typer.Option(..., "--ckpt", help="run dir, checkpoint dir or exported HF folder"),
    system: Optional[str] = typer.Option(None, "--system", help="system message"),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.85, "--temperature", help="0 = greedy"),
    top_k: int = typer.Option(0, "--top-k", help="0 = off"),
    top_p: float = typer.Option(0.85, "--top-p", help="1 = off"),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed for sampling"),
    thinking: bool = typer.Option(
        False,
        "--thinking",
        help="open the think block (MiniMind-3's open_thinking): "
        "the reasoning is shown apart, only the answer stays in the history",
    ),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer dir (default: the checkpoint's)"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Multi-turn chat REPL through the chat template; answers stream as they are generated.

    One message per line (end a line with a backslash to continue it, or put three double quotes on a line to open
    and close a multi-line block); `/reset` clears the history, `/think` toggles thinking, `/exit` (or EOF)
    quits. In a terminal lines are edited with readline and the history is kept in ~/.local/state/llmcore/chat_history;
    when stdout is not a terminal each turn is labelled `user:` / `assistant:`.

    Example: llmcore chat --ckpt runs/sft      (or: echo "你好" | llmcore chat --ckpt runs/sft)
    """
    from llmcore.chat import HELP, ChatSession, enable_line_editing, run_repl
    from llmcore.checkpoint import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(ckpt, device, tokenizer=tokenizer)
    session = ChatSession(
        model,
        tok,
        system=system,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        thinking=thinking,
    )
    n_params = sum(p.numel() for p in model.parameters())
    # The banner goes to stderr: a piped transcript on stdout stays just the conversation.
    typer.echo(
        f"llmcore chat: {ckpt} ({n_params / 1e6:.1f}M parameters) on {model.embed_tokens.weight.device}; {HELP}",
        err=True,
    )
    if sys.stdin.isatty():
        enable_line_editing()
    run_repl(session, sys.stdin, sys.stdout)


@model_app.command("merge-lora")
def merge_lora_cmd(
    ckpt: Path = typer.Option(..., "--ckpt", help="LoRA run dir or checkpoint dir (`llmcore train lora`)"),
    out: Path = typer.Option(..., "--out", help="output checkpoint dir (plain weights, tokenizer, manifest)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier merge at --out"),
) -> None:
    """Merge LoRA adapters into their base: a plain checkpoint dir that every command (and --init) takes.

    The base must be where the adapters' run recorded it, unchanged (its weights' sha256 is checked).

    Example: llmcore model merge-lora --ckpt runs/lora --out runs/merged
    """
    from llmcore.lora import merge_lora

    typer.echo(f"merged {merge_lora(ckpt, out, overwrite=overwrite)}")


@export_app.command("hf")
def export_hf_cmd(
    ckpt: Path = typer.Option(..., "--ckpt", help="run dir or checkpoint dir"),
    out: Path = typer.Option(..., "--out", help="output folder (Llama, Qwen3 or Qwen3-MoE format)"),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="replace an earlier export at --out (never a run or checkpoint dir)"
    ),
) -> None:
    """Export to a transformers folder: Qwen3ForCausalLM (QK-norm), Qwen3MoeForCausalLM (QK-norm MoE), else LlamaForCausalLM.

    MoE with shared experts (minimind2-moe) is refused: no transformers class computes it.

    A non-empty --out is refused unless --overwrite, which replaces only an earlier export; run and
    checkpoint dirs are always refused. The folder appears complete or not at all.

    Example: llmcore export hf --ckpt runs/dpo --out hf/   then   AutoModelForCausalLM.from_pretrained("hf/")
    """
    from llmcore.hf_export import export_hf

    path = export_hf(ckpt, out, overwrite=overwrite)
    typer.echo(f"exported {path}")


def register(app: typer.Typer) -> None:
    """Add `model`, `generate`, `chat` and `export` to the root app."""
    app.add_typer(model_app, name="model")
    app.command("generate")(generate_cmd)
    app.command("chat")(chat_cmd)
    app.add_typer(export_app, name="export")
