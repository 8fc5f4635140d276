"""Multi-turn chat through the tokenizer's chat template, with streamed output.

Each turn re-renders the whole conversation with the chat template (the same string
transformers would build) and continues it; the oldest turns are dropped when the prompt would
not leave room for the reply. Text is streamed as soon as it decodes to complete characters
(byte-level BPE can split a multi-byte character across tokens).

With thinking on (MiniMind-3's `open_thinking`), the reply is split by `llmcore.chat_format`
into reasoning and answer: both are shown (the reasoning dimmed or labelled `thinking:`), and only
the answer is kept in the history, as MiniMind's own chat does.
"""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TextIO

from llmcore.chat_format import OutputParser, check_thinking, prompt_ids
from llmcore.errors import LLMCoreError
from llmcore.generate import check_sampling, seeded_generator, stream_generate
from llmcore.model import LLM


def stream_text(tokenizer: Any, token_iter: Iterator[int]) -> Iterator[str]:
    """Turn a token stream into text pieces, holding back incomplete UTF-8 sequences."""
    ids: list[int] = []
    emitted = ""
    for tok in token_iter:
        ids.append(tok)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue  # the last character is not complete yet
        if len(text) > len(emitted):
            yield text[len(emitted) :]
        emitted = text
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if len(text) > len(emitted):
        yield text[len(emitted) :]


def stream_reply(
    model: LLM, tokenizer: Any, prompt_ids: Sequence[int], seed: int | None = None, **sampling: Any
) -> Iterator[str]:
    """The model's continuation of `prompt_ids` as text pieces, sampled with `seed` (None: fresh entropy);
    `sampling` as `generate_steps` (max_new_tokens, temperature, top_k, top_p, repetition_penalty); the
    tokenizer's eos ends it."""
    tokens = stream_generate(
        model, prompt_ids, eos_id=tokenizer.eos_id, generator=seeded_generator(model, seed), **sampling
    )
    yield from stream_text(tokenizer, tokens)


class ChatSession:
    """A conversation with one model; `reply()` appends the user message and the model's answer."""

    def __init__(
        self,
        model: LLM,
        tokenizer: Any,
        system: str | None = None,
        max_new_tokens: int = 512,
        temperature: float = 0.85,
        top_k: int = 0,
        top_p: float = 0.85,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        thinking: bool = False,
    ) -> None:
        check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
        if thinking:
            check_thinking(tokenizer)
        self.thinking = thinking
        context = model.config.max_position_embeddings
        if max_new_tokens >= context:
            raise LLMCoreError(
                f"--max-new-tokens {max_new_tokens} leaves no room for a prompt: the model's context is "
                f"{context} tokens (prompt + reply)"
            )
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.gen_kwargs = dict(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            eos_id=tokenizer.eos_id,
        )
        self.generator = seeded_generator(model, seed)
        self.messages: list[dict[str, str]] = []

    def reset(self) -> None:
        self.messages = []

    def set_thinking(self, on: bool) -> None:
        """Turn thinking on or off for the next replies (the history is kept)."""
        if on:
            check_thinking(self.tokenizer, "/think")
        self.thinking = on

    def _prompt_ids(self) -> list[int]:
        limit = self.model.config.max_position_embeddings - int(self.gen_kwargs["max_new_tokens"])
        history = list(self.messages)
        while True:
            msgs = ([{"role": "system", "content": self.system}] if self.system else []) + history
            ids = prompt_ids(self.tokenizer, msgs, thinking=self.thinking)
            if len(ids) <= limit:
                return ids
            if len(history) <= 1:
                raise LLMCoreError(f"message too long: {len(ids)} tokens, the model takes {limit} before the reply")
            history = history[2:]  # drop the oldest user/assistant exchange

    def reply_events(self, user_text: str) -> Iterator[tuple[str, str]]:
        """Yield `("reasoning", piece)` and `("content", piece)` as they are generated; the answer
        (without the reasoning) is added to the history at the end."""
        self.messages.append({"role": "user", "content": user_text})
        tokens = stream_generate(self.model, self._prompt_ids(), generator=self.generator, **self.gen_kwargs)
        parser = OutputParser(thinking=self.thinking)
        for piece in stream_text(self.tokenizer, tokens):
            yield from parser.feed(piece)
        yield from parser.finish()
        self.messages.append({"role": "assistant", "content": parser.content})

    def reply_stream(self, user_text: str) -> Iterator[str]:
        """Yield the answer piece by piece (the reasoning, if any, is not part of it)."""
        for kind, piece in self.reply_events(user_text):
            if kind == "content":
                yield piece

    def reply(self, user_text: str, on_text: Callable[[str], None] | None = None) -> str:
        parts = []
        for piece in self.reply_stream(user_text):
            parts.append(piece)
            if on_text is not None:
                on_text(piece)
        return "".join(parts)


HELP = (
    'type a message and Enter; end a line with \\ to continue it, or put """ on a line to start and end a '
    "block; /reset clears the history, /think turns thinking on or off, /exit or Ctrl-D quits"
)


def enable_line_editing(history_file: Path | None = None) -> None:
    """Arrow-key editing and a persistent history through GNU readline, when it is there (a
    terminal session; piped input never comes here)."""
    try:
        import readline
    except ImportError:  # a Python without readline: plain input() still works
        return
    path = history_file or default_history_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            readline.read_history_file(path)
    except OSError:
        return
    readline.set_history_length(1000)
    atexit.register(_save_history, readline, path)


def default_history_file() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "llmcore" / "chat_history"


def _save_history(readline: Any, path: Path) -> None:
    try:
        readline.write_history_file(path)
    except OSError:
        pass


def read_message(read_line: Callable[[str], str | None], prompt: str = "> ", more: str = ". ") -> str | None:
    """One user message from `read_line(prompt)` (None at EOF): a line; a line ending in a backslash
    continues on the next; a line that is just three double quotes opens a block that the next such
    line closes."""
    line = read_line(prompt)
    if line is None:
        return None
    if line.strip() == '"""':
        block: list[str] = []
        while True:
            nxt = read_line(more)
            if nxt is None or nxt.strip() == '"""':
                return "\n".join(block)
            block.append(nxt)
    parts = []
    while line.endswith("\\"):
        parts.append(line[:-1])
        nxt = read_line(more)
        if nxt is None:
            line = ""
            break
        line = nxt
    parts.append(line)
    return "\n".join(parts)


def run_repl(
    session: ChatSession, stdin: TextIO, stdout: TextIO, prompt: str = "> ", labels: bool | None = None
) -> None:
    """Read user messages until EOF or `/exit`; `/reset` clears the history, `/think` toggles thinking.
    Answers stream to stdout.

    In a terminal the prompt is shown and lines are edited with readline (history kept across
    sessions); when stdout is not a terminal (a pipe, a file) each turn is written with role labels
    (`user: ...`, `assistant: ...`) so the transcript reads on its own."""
    interactive = stdin.isatty() and stdin is sys.stdin
    if labels is None:
        labels = not stdout.isatty()

    def read_line(p: str) -> str | None:
        if interactive:
            try:
                return input(p)
            except EOFError:
                return None
        line = stdin.readline()
        return None if not line else line.rstrip("\n")

    while True:
        message = read_message(read_line, prompt)
        if message is None:
            break
        text = message.strip()
        if not text:
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes arrive as lone surrogates (surrogateescape)
            sys.stderr.write("error: that message is not valid UTF-8 text; it was skipped\n")
            continue
        if text == "/exit":
            break
        if text == "/reset":
            session.reset()
            stdout.write("(history cleared)\n")
            continue
        if text == "/think":
            try:
                session.set_thinking(not session.thinking)
            except LLMCoreError as err:
                sys.stderr.write(f"error: {err}\n")
                continue
            stdout.write(f"(thinking {'on' if session.thinking else 'off'})\n")
            continue
        if labels:
            stdout.write(f"user: {text}\n")
        write_reply(session.reply_events(text), stdout, labels)


DIM, NORMAL = "\x1b[2m", "\x1b[0m"


def write_reply(events: Iterator[tuple[str, str]], stdout: TextIO, labels: bool) -> None:
    """Write one streamed reply: the reasoning first (labelled `thinking:`; dimmed in a terminal),
    then the answer (labelled `assistant:` when `labels`)."""
    shown = None  # which part is being written
    for kind, piece in events:
        if kind != shown:
            if shown == "reasoning":
                stdout.write("\n" if labels else NORMAL + "\n")
            if kind == "reasoning":
                stdout.write("thinking: " if labels else DIM + "thinking: ")
            elif labels:
                stdout.write("assistant: ")
            shown = kind
        stdout.write(piece)
        stdout.flush()
    if shown == "reasoning":  # the reply ended inside its reasoning (no answer)
        stdout.write("\n" if labels else NORMAL + "\n")
    if shown != "content" and labels:
        stdout.write("assistant: ")
    stdout.write("\n")
    stdout.flush()


def chat_prompt_ids(tokenizer: Any, text: str, system: str | None = None, thinking: bool = False) -> list[int]:
    """Prompt ids for a single-turn chat (used by `llmcore generate --chat`)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return prompt_ids(tokenizer, messages, thinking=thinking)
