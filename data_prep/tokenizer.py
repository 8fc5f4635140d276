"""Byte-level BPE tokenizer: training, loading (ours and MiniMind's), chat rendering and SFT masks.

A tokenizer dir holds `tokenizer.json` (the `tokenizers` model) and `tokenizer_config.json`
(special tokens and the ChatML chat template) and loads with `transformers.AutoTokenizer`.
The `Tokenizer` wrapper below talks to the fast Rust tokenizer directly and renders the chat
template with the same Jinja settings transformers uses, so strings and ids match it exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmcore.errors import DataError, LLMCoreError
from llmcore.io import atomic_dir, atomic_write, check_out_dir, remove_leftovers, write_json

log = logging.getLogger(__name__)

PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]  # ids 0, 1, 2 in this order
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant"
MARKER_FILE = "llmcore_tokenizer.json"  # written by `train_tokenizer`: says llmcore made this dir
# What a tokenizer dir made by llmcore (or saved by transformers from one) may hold.
TOKENIZER_DIR_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", MARKER_FILE}
CHAT_ROLES = ("system", "user", "assistant")

# ChatML. For system/user/assistant messages it renders character for character like MiniMind's
# template (including its default system prompt), so a model trained with either tokenizer sees
# the same conversation layout.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else -%}\n"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}\n"
    "{%- endif -%}\n"
    "{%- for message in messages -%}\n"
    "{%- if not (loop.first and message['role'] == 'system') -%}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif -%}"
)


def _jinja_environment():
    """The sandboxed environment transformers renders chat templates in (same flags and helpers)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


def _fingerprint(tok: tokenizers.Tokenizer) -> str:
    """sha256 over the vocab (sorted by id) and merges: equal for byte-identical models, whatever the file path."""
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model.get("vocab", {}).items(), key=lambda kv: kv[1])
    # `tokenizers` has stored merges both as "a b" strings and as [a, b] pairs; hash one form.
    merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges", [])]
    payload = json.dumps({"vocab": vocab, "merges": merges}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class Tokenizer:
    """A loaded tokenizer dir: encode/decode, chat rendering and loss masks (see docs/INTERNALS.md)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        tok_file = self.path / "tokenizer.json"
        if not tok_file.is_file():
            raise LLMCoreError(f"{self.path}: not a tokenizer dir (no tokenizer.json)")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as err:  # the Rust side raises plain Exception on bad JSON
            raise LLMCoreError(f"{tok_file}: cannot load tokenizer: {err}") from err
        config_file = self.path / "tokenizer_config.json"
        template_file = self.path / "chat_template.jinja"  # newer transformers saves the template here
        try:
            self.config: dict = json.loads(config_file.read_bytes().decode("utf-8")) if config_file.is_file() else {}
            template = template_file.read_bytes().decode("utf-8") if template_file.is_file() else None
        except (OSError, ValueError, RecursionError) as err:  # ValueError: bad JSON or invalid UTF-8
            raise LLMCoreError(f"{self.path}: cannot load tokenizer config: {err}") from None
        if not isinstance(self.config, dict):
            raise LLMCoreError(f"{config_file}: not a JSON object")
        if template is not None:
            self.chat_template: str = template
        else:
            self.chat_template = self.config.get("chat_template") or CHAT_TEMPLATE

        def special(key: str, default: str) -> tuple[str, int]:
            value = self.config.get(key) or default
            if isinstance(value, dict):  # AddedToken serialised as a dict
                value = value.get("content", default)
            token_id = self._tok.token_to_id(value)
            if token_id is None:
                raise LLMCoreError(f"{self.path}: special token {value!r} ({key}) is not in the vocab")
            return value, token_id

        self.pad_token, self.pad_id = special("pad_token", PAD_TOKEN)
        self.bos_token, self.bos_id = special("bos_token", BOS_TOKEN)
        self.eos_token, self.eos_id = special("eos_token", EOS_TOKEN)
        # max id + 1, not the entry count: ids with holes still need that many embedding rows
        self.vocab_size: int = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        self._template = None
        self._fingerprint: str | None = None
        self._plain: tokenizers.Tokenizer | None = None
        self._special_re = None

    # -- plain text -------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = _fingerprint(self._tok)
        return self._fingerprint

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (for batch work that needs offsets)."""
        return self._tok

    @property
    def plain_backend(self) -> tokenizers.Tokenizer:
        """A copy of the backend that encodes special-token strings (`<|im_end|>`, ...) found in the
        text as plain text, not as control tokens (for document and message text)."""
        if self._plain is None:
            plain = tokenizers.Tokenizer.from_str(self._tok.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain

    def special_strings(self) -> list[str]:
        """The special tokens' strings (those a template writes: pad, bos, eos and any other added special)."""
        decoder = self._tok.get_added_tokens_decoder()
        return sorted({t.content for t in decoder.values() if t.special}, key=len, reverse=True)

    def _specials_pattern(self):
        if self._special_re is None:
            import re

            self._special_re = re.compile("|".join(re.escape(t) for t in self.special_strings()) or r"(?!)")
        return self._special_re

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added; special-token strings in it ARE matched as
        control tokens (for text a template rendered; document text goes through `encode_text`)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        """Token ids of document text: special-token strings in it are encoded as plain text, so a
        document cannot forge `<|im_end|>` or turn boundaries."""
        return self.plain_backend.encode(text, add_special_tokens=False).ids

    def encode_text_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode_text` of each text (Rust batch encoder, no offsets)."""
        b = self.plain_backend
        encode = getattr(b, "encode_batch_fast", b.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # no offsets needed here
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # -- chat -------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text, the same string `transformers` renders for this tokenizer dir."""
        if self._template is None:
            self._template = _jinja_environment().from_string(self.chat_template)
        return self._template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            pad_token=self.pad_token,
            unk_token=self.config.get("unk_token", self.pad_token),
        )

    def chat_spans(self, messages: Sequence[dict], only_last: bool = False,
                   content_spans: list | None = None) -> tuple[str, list[tuple[int, int]]]:
        """Render `messages`; return the text and the character spans that carry loss.

        Each span is one assistant message's content plus the `<|im_end|>` that closes it (only the
        final assistant message with `only_last`, as DPO scores it). The spans come from rendering
        the conversation one message longer at a time: the text a message adds is located inside
        what it appended, so a template that adds headers, default system prompts or extra
        whitespace cannot shift the mask.
        """
        if not messages:
            raise LLMCoreError("empty conversation")
        assistant = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if not assistant:
            raise LLMCoreError("conversation has no assistant turn")
        wanted = assistant[-1:] if only_last else assistant
        full = self.apply_chat_template(messages)
        spans = self._locate(messages, full, wanted, content_spans, full_is_plain=True)
        return full, spans

    def _locate(self, messages: Sequence[dict], full: str, wanted: Sequence[int], content_spans: list | None,
                full_is_plain: bool = False) -> list[tuple[int, int]]:
        """Loss spans of the `wanted` assistant messages in `full`; fills `content_spans` (when a list)
        with every message's content span. Each message is located inside the text that rendering
        one more message appends, so headers and default prompts cannot shift it."""
        spans = []
        rendered = range(len(messages)) if content_spans is not None else wanted
        cache: dict[int, str] = {0: ""}
        if full_is_plain:
            cache[len(messages)] = full

        def upto(n: int) -> str:
            if n not in cache:
                cache[n] = self.apply_chat_template(messages[:n])
            return cache[n]

        for i in rendered:
            before, after = upto(i), upto(i + 1)
            if not (after.startswith(before) and full.startswith(after)):
                raise LLMCoreError("chat template does not render conversations incrementally; cannot place loss mask")
            content = messages[i]["content"]
            pos = after.rfind(content + self.eos_token, len(before))
            if pos < 0 and i not in wanted:
                pos = after.rfind(content, len(before))
            if pos < 0:
                raise LLMCoreError("chat template does not render message content verbatim; cannot place loss mask")
            if content_spans is not None:
                content_spans.append((pos, pos + len(content)))
            if i in wanted:
                spans.append((pos, pos + len(content) + len(self.eos_token)))
        return spans

    def encode_chats(self, conversations: Sequence[Sequence[dict]], only_last: bool = False,
                     add_generation_prompt: bool = False) -> list[tuple[list[int], np.ndarray]]:
        """Token ids and uint8 loss masks of many conversations (see `chat_spans`), batch-encoded.

        The template's own special tokens are control tokens; special-token strings inside message
        content are encoded as plain text (a user cannot forge `<|im_end|>` or a turn boundary).
        When no content holds one, this is exactly the encoding of the rendered string.
        With `add_generation_prompt` (a prompt for generation) the masks are all zero.
        """
        pattern = self._specials_pattern()
        whole: list[str] = []  # rendered conversations without specials in any content: encoded as one string
        pieces: list[str] = []  # the others: the text between the template's special tokens
        plans = []  # per conversation: (loss spans, index into whole | [(start, "text", piece) | (start, "special", (id, end))])
        for msgs in conversations:
            contents = [] if any(pattern.search(m["content"]) for m in msgs) else None
            if add_generation_prompt:
                text, spans = self.apply_chat_template(msgs, add_generation_prompt=True), []
                if contents is not None:
                    self._locate(msgs, text, (), contents)
            else:
                text, spans = self.chat_spans(msgs, only_last=only_last, content_spans=contents)
            if contents is None:
                plans.append((spans, len(whole)))
                whole.append(text)
                continue
            # the template's own specials are the matches outside every message's content
            plan, pos = [], 0
            for m in pattern.finditer(text):
                if any(a <= m.start() < b for a, b in contents):
                    continue
                if m.start() > pos:
                    plan.append((pos, "text", len(pieces)))
                    pieces.append(text[pos:m.start()])
                plan.append((m.start(), "special", (self._tok.token_to_id(m.group()), m.end())))
                pos = m.end()
            if pos < len(text):
                plan.append((pos, "text", len(pieces)))
                pieces.append(text[pos:])
            plans.append((spans, plan))
        whole_encs = self._tok.encode_batch(whole, add_special_tokens=False) if whole else []
        piece_encs = self.plain_backend.encode_batch(pieces, add_special_tokens=False) if pieces else []
        out = []
        for spans, plan in plans:
            if isinstance(plan, int):
                e = whole_encs[plan]
                out.append((e.ids, spans_to_mask(np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2), spans)))
                continue
            ids: list[int] = []
            offsets: list[np.ndarray] = []
            for start, what, ref in plan:
                if what == "special":
                    ids.append(ref[0])
                    offsets.append(np.array([[start, ref[1]]], dtype=np.int64))
                else:
                    e = piece_encs[ref]
                    ids.extend(e.ids)
                    offsets.append(np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2) + start)
            off = np.concatenate(offsets) if offsets else np.zeros((0, 2), np.int64)
            out.append((ids, spans_to_mask(off, spans)))
        return out

    def encode_chat(self, messages: Sequence[dict], only_last: bool = False) -> tuple[list[int], list[int]]:
        """Token ids of the rendered conversation and its loss mask (1 on assistant content + `<|im_end|>`);
        special-token strings inside message content are plain text (see `encode_chats`)."""
        ids, mask = self.encode_chats([messages], only_last=only_last)[0]
        return ids, mask.tolist()

    def encode_prompt(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of a generation prompt (template + `<|im_start|>assistant\n`), with special-token
        strings inside message content as plain text (for chat and serving)."""
        return self.encode_chats([messages], add_generation_prompt=True)[0][0]

    # -- files ------------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> Path:
        """Copy the tokenizer files into `out_dir` (e.g. a run dir's `tokenizer/`)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
            src = self.path / name
            if src.is_file() and src.resolve() != (out / name).resolve():
                atomic_write(out / name, lambda tmp, src=src: shutil.copyfile(src, tmp))
        return out

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def spans_to_mask(offsets: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """uint8 mask over tokens: 1 where a token's character span overlaps any loss span.

    Overlap (not containment) decides, because byte-level BPE can fuse the header's newline with
    leading whitespace of the content into one token; that token carries content, so it is learned.
    """
    mask = np.zeros(len(offsets), dtype=np.uint8)
    if len(offsets) == 0:
        return mask
    starts, ends = offsets[:, 0], offsets[:, 1]
    for lo, hi in spans:
        mask[(ends > lo) & (starts < hi)] = 1
    return mask


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer dir: ours (from `train_tokenizer`) or MiniMind's."""
    return Tokenizer(path)


def tokenizer_dir_problem(path: Path) -> str | None:
    """Why `path` is not a tokenizer dir that `tokenizer train --overwrite` may replace (None if it is):
    llmcore must have made it (its marker file, or our exact chat template in tokenizer_config.json
    for dirs made before the marker) and it may hold nothing but tokenizer files."""
    for p in path.iterdir():
        if p.name not in TOKENIZER_DIR_FILES:
            return f"it holds {p.name}, which is not a tokenizer file"
    if (path / MARKER_FILE).is_file():
        return None
    try:
        config = json.loads((path / "tokenizer_config.json").read_bytes())
    except (OSError, ValueError, RecursionError):
        return "it is not a tokenizer dir llmcore made (no llmcore_tokenizer.json, no readable tokenizer_config.json)"
    if isinstance(config, dict) and config.get("chat_template") == CHAT_TEMPLATE:
        return None
    return "it is not a tokenizer dir llmcore made (no llmcore_tokenizer.json)"


def _iter_training_texts(inputs: Sequence[Path], field: str, counts: dict, max_line_bytes: int) -> Iterator[str]:
    """Stream `field` strings from jsonl files; lines without a usable string are counted and skipped."""
    from llmcore.data_prep.jsonl import BadLine, iter_records

    for path in inputs:
        for _line_no, record in iter_records(path, max_line_bytes):
            if isinstance(record, BadLine):
                counts["skipped"] += 1
                continue
            value = record.get(field)
            if isinstance(value, list):  # a conversation: train on its message contents
                value = "\n".join(m["content"] for m in value if isinstance(m, dict) and isinstance(m.get("content"), str))
            if not isinstance(value, str) or not value:
                counts["skipped"] += 1
                continue
            counts["used"] += 1
            yield value


def train_tokenizer(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    vocab_size: int = 6400,
    field: str = "text",
    show_progress: bool = False,
    overwrite: bool = False,
    max_line_bytes: int | None = None,
) -> Path:
    """Train byte-level BPE on the `field` of jsonl `inputs` (streamed) and write an HF-loadable dir.

    A non-empty `out_dir` is refused unless `overwrite`, and then only a tokenizer dir llmcore made
    that holds none of the inputs is replaced (as a whole, once the new one is complete)."""
    from llmcore.data_prep.faults import fault_point
    from llmcore.data_prep.jsonl import DEFAULT_MAX_LINE_BYTES, input_files

    paths = input_files(inputs)
    out = check_out_dir(out_dir, overwrite=overwrite, what="a tokenizer dir llmcore made", inputs=paths,
                        replaceable=tokenizer_dir_problem)
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise LLMCoreError(f"vocab size {vocab_size} is too small: byte-level BPE needs at least {256 + len(SPECIAL_TOKENS)}")

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    counts = {"used": 0, "skipped": 0}
    tok.train_from_iterator(_iter_training_texts(paths, field, counts, max_line_bytes or DEFAULT_MAX_LINE_BYTES), trainer=trainer)
    if counts["used"] == 0:
        raise DataError(f'no usable "{field}" strings in the inputs', str(paths[0]), reason="empty_text")
    if counts["skipped"]:
        log.warning("tokenizer: skipped %d lines without a usable %r string", counts["skipped"], field)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == i, "special tokens must take ids 0, 1, 2"

    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [],
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": PAD_TOKEN,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "model_max_length": 32768,
        "chat_template": CHAT_TEMPLATE,
    }
    remove_leftovers(out.parent, out.name)
    try:
        with atomic_dir(out) as tmp:  # the whole dir appears at once; an old one is replaced only then
            tok.save(str(tmp / "tokenizer.json"))
            write_json(tmp / "tokenizer_config.json", config)
            write_json(tmp / MARKER_FILE, {"format": "llmcore-tokenizer", "version": 1, "vocab_size": vocab_size,
                                           "fingerprint": _fingerprint(tok), "inputs": [str(p) for p in paths], "field": field})
            fault_point("tokenizer:install")
    except OSError as err:
        raise LLMCoreError(f"--out {out}: cannot write the tokenizer dir: {err.strerror or err} "
                           "(nothing was written there; any old tokenizer dir is unchanged)") from err
    return out
