"""Thinking in `llmcore chat` and `generate --chat` (MiniMind-3's `open_thinking`): the prompt ends in
`<think>\\n` exactly as transformers renders it, the reasoning is shown apart from the answer, and only the
answer stays in the history (as MiniMind's own chat)."""

from __future__ import annotations

import io

import pytest

from llmcore.chat import ChatSession, chat_prompt_ids, run_repl
from llmcore.errors import LLMCoreError

from _scripted_model import ScriptedLM, text_replies
from _toolcall_model import minimind3_tokenizer_dir


@pytest.fixture(scope="module")
def toks():
    from transformers import AutoTokenizer

    from llmcore.data_prep.tokenizer import load_tokenizer

    path = minimind3_tokenizer_dir()
    return load_tokenizer(path), AutoTokenizer.from_pretrained(str(path))


SCRIPT = [("北京", "想一想北京。\n</think>\n\n北京是首都。"), ("1+1", "一加一\n\n是二\n</think>\n\n等于2。")]


def _session(tok, thinking: bool = True) -> tuple[ChatSession, ScriptedLM]:
    model = ScriptedLM(text_replies(tok, SCRIPT), tok.vocab_size, tok.eos_id)
    return ChatSession(model, tok, max_new_tokens=64, temperature=0, thinking=thinking), model


def test_reasoning_apart_and_only_the_answer_in_history(toks) -> None:
    tok, hf = toks
    session, model = _session(tok)
    events = list(session.reply_events("1+1等于几？"))
    assert "".join(t for k, t in events if k == "reasoning") == "一加一\n\n是二"
    assert "".join(t for k, t in events if k == "content") == "等于2。"
    assert session.messages == [{"role": "user", "content": "1+1等于几？"}, {"role": "assistant", "content": "等于2。"}]
    assert "".join(session.reply_stream("北京呢？")) == "北京是首都。"
    # Each prompt is what transformers renders: the history without reasoning, the new turn opening <think>.
    for prompt, n in zip(model.prompts, (1, 3)):
        ref = hf.apply_chat_template(
            session.messages[:n], tokenize=False, add_generation_prompt=True, open_thinking=True
        )
        assert ref.endswith("<|im_start|>assistant\n<think>\n")
        assert prompt == hf(ref, add_special_tokens=False)["input_ids"]


def test_thinking_off_keeps_the_empty_think_block(toks) -> None:
    tok, hf = toks
    ids = chat_prompt_ids(tok, "你好")
    ref = hf.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True)
    assert ref.endswith("<think>\n\n</think>\n\n") and ids == hf(ref, add_special_tokens=False)["input_ids"]
    think = chat_prompt_ids(tok, "你好", thinking=True)
    assert tok.decode(think).endswith("<|im_start|>assistant\n<think>\n")


def test_piped_transcript_labels_thinking_and_answer(toks) -> None:
    tok, _ = toks
    session, _ = _session(tok)
    out = io.StringIO()
    run_repl(session, io.StringIO("1+1等于几？\n北京呢？\n"), out)
    assert out.getvalue() == (
        "user: 1+1等于几？\nthinking: 一加一\n\n是二\nassistant: 等于2。\n"
        "user: 北京呢？\nthinking: 想一想北京。\nassistant: 北京是首都。\n"
    )
    # In a terminal the reasoning is dimmed and the answer follows on its own line.
    tty = io.StringIO()
    run_repl(_session(tok)[0], io.StringIO("1+1\n"), tty, labels=False)
    assert tty.getvalue() == "\x1b[2mthinking: 一加一\n\n是二\x1b[0m\n等于2。\n"


def test_think_command_toggles_thinking_and_keeps_the_history(toks, capsys) -> None:
    tok, _ = toks
    session, model = _session(tok, thinking=False)
    out = io.StringIO()
    run_repl(session, io.StringIO("/think\n1+1\n/think\n北京\n"), out)
    assert out.getvalue().startswith(
        "(thinking on)\nuser: 1+1\nthinking: 一加一\n\n是二\nassistant: 等于2。\n(thinking off)\nuser: 北京\n"
    )
    assert tok.decode(model.prompts[0]).endswith("<think>\n") and tok.decode(model.prompts[1]).endswith("</think>\n\n")
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]


def test_thinking_needs_a_template_with_a_thinking_mode(tmp_path, capsys) -> None:
    from test_serve import _make_run

    from llmcore.cli import main
    from llmcore.data_prep.tokenizer import load_tokenizer

    run = _make_run(tmp_path)  # MiniMind2's ChatML tokenizer: no open_thinking
    tok = load_tokenizer(run / "tokenizer")
    with pytest.raises(LLMCoreError, match="open_thinking"):
        chat_prompt_ids(tok, "hi", thinking=True)
    session = ChatSession(ScriptedLM(lambda p: [tok.eos_id], tok.vocab_size, tok.eos_id), tok, temperature=0)
    out = io.StringIO()
    run_repl(session, io.StringIO("/think\n"), out)
    assert out.getvalue() == "" and not session.thinking
    assert capsys.readouterr().err.startswith("error: /think: ")
    for argv, needle in (
        (["generate", "--ckpt", str(run), "--prompt", "hi", "--thinking"], "--chat"),
        (["generate", "--ckpt", str(run), "--prompt", "hi", "--chat", "--thinking"], "open_thinking"),
        (["chat", "--ckpt", str(run), "--thinking"], "open_thinking"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle in err and "\n" not in err, err


def test_cli_thinking_end_to_end(tmp_path, capsys, monkeypatch) -> None:
    """`generate --chat --thinking` and `chat --thinking` on a run with MiniMind-3's tokenizer (random weights)."""
    import io as _io
    import shutil
    import sys

    import torch

    from llmcore.checkpoint import save_model
    from llmcore.cli import main
    from llmcore.model import LLM, ModelConfig

    torch.manual_seed(0)
    run = tmp_path / "run3"
    save_model(LLM(ModelConfig.from_preset("tiny", vocab_size=6400)), run / "checkpoints" / "step-1")
    (run / "checkpoints" / "latest").write_text("step-1\n")
    shutil.copytree(minimind3_tokenizer_dir(), run / "tokenizer")
    from llmcore.data_prep.tokenizer import Tokenizer

    seen: list[bool] = []
    real = Tokenizer.encode_prompt
    monkeypatch.setattr(
        Tokenizer,
        "encode_prompt",
        lambda self, msgs, tools=None, open_thinking=False: (
            seen.append(open_thinking) or real(self, msgs, tools=tools, open_thinking=open_thinking)
        ),
    )
    for argv, stdin in ((["generate", "--chat", "--prompt", "你好"], ""), (["chat"], "你好\n")):
        monkeypatch.setattr(sys, "stdin", _io.StringIO(stdin))
        with pytest.raises(SystemExit) as exit_info:
            main(
                [
                    *argv,
                    "--ckpt",
                    str(run),
                    "--thinking",
                    "--max-new-tokens",
                    "4",
                    "--temperature",
                    "0",
                    "--device",
                    "cpu",
                ]
            )
        assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert seen == [True, True]  # both commands asked the template for the open think block
    # Random weights write only newlines here: leading newlines of the reasoning are not text, so the
    # piped transcript shows no thinking and an empty answer.
    assert out.endswith("user: 你好\nassistant: \n"), out
