"""Byte-level BPE tokenizer: training, loading (ours and MiniMind's), chat rendering and SFT masks.

A tokenizer dir holds `tokenizer.json` (the `tokenizers` model) and `tokenizer_config.json`
(special tokens and the chat template) and loads with `transformers.AutoTokenizer`.
The `Tokenizer` wrapper below talks to the fast Rust tokenizer directly and renders the dir's own
jinja chat template with the same environment, inputs and message normalisation transformers uses,
so strings and ids match `PreTrainedTokenizerFast.apply_chat_template` exactly.

Invariants of chat encoding (`Tokenizer.encode_chats`):
- A conversation is rendered by the template, never by hand-written ChatML. Rows in MiniMind-3's
  format (tools on the system message, `tool_calls` as JSON strings, the `tool` role,
  `reasoning_content`) are first normalised by `normalize_conversation`, the one place that does it.
- Special-token strings typed inside any message field or tool schema stay plain text: only the
  special tokens the template itself writes are control ids. When no field holds one, the ids are
  exactly those of tokenizing the rendered string (what transformers returns).
- Cost is linear in the conversation: at most two renders (the second one with every special-token
  string in the input swapped for a private-use placeholder, which tells the template's own special
  tokens from typed ones), never one render per message.
- The loss mask is 1 from after each `<|im_start|>assistant\n` the template writes through the
  `<|im_end|>` that closes it (think block and tool-call text included: MiniMind's rule), else 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmcore.data_prep.jsonl import CHAT_ROLES, normalize_conversation  # noqa: F401 (re-exported)
from llmcore.errors import DataError, LLMCoreError
from llmcore.io import atomic_dir, atomic_write, check_out_dir, remove_leftovers, write_json

log = logging.getLogger(__name__)

PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]  # ids 0, 1, 2 in this order (both templates' first three)
# MiniMind-3's added tokens, in its id order (0..35): (content, special). The non-special ones are
# still single tokens, but `decode(skip_special_tokens=True)` keeps them, as MiniMind-3's files say.
MINIMIND3_TOKENS: list[tuple[str, bool]] = [
    *((t, True) for t in SPECIAL_TOKENS),
    *(
        (f"<|{t}|>", True)
        for t in (
            "object_ref_start",
            "object_ref_end",
            "box_start",
            "box_end",
            "quad_start",
            "quad_end",
            "vision_start",
            "vision_end",
            "vision_pad",
            "image_pad",
            "video_pad",
            "audio_start",
            "audio_end",
            "audio_pad",
        )
    ),
    *((t, True) for t in ("<tts_pad>", "<tts_text_bos>", "<tts_text_eod>", "<tts_text_bos_single>")),
    *(
        (t, False)
        for t in ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")
    ),
    *((f"<|buffer{i}|>", False) for i in range(1, 10)),
]
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant"
MARKER_FILE = "llmcore_tokenizer.json"  # written by `train_tokenizer`: says llmcore made this dir
# What a tokenizer dir made by llmcore (or saved by transformers from one) may hold.
TOKENIZER_DIR_FILES = {
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    MARKER_FILE,
}
ASSISTANT_HEADER = "assistant\n"  # after the template's <|im_start|>: where a learned turn starts
EMPTY_THINK = "<think>\n\n</think>\n\n"  # what MiniMind-3's template writes for a turn without reasoning

# ChatML (MiniMind2). For system/user/assistant messages it renders character for character like
# MiniMind's template (including its default system prompt), so a model trained with either
# tokenizer sees the same conversation layout.
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

# MiniMind-3's template (jingyaogong/minimind, Apache-2.0), verbatim, so a tokenizer we train renders
# conversations exactly as MiniMind-3's: tools in the system turn, <tool_call> blocks, tool responses
# as user turns, a <think> block in every assistant turn, `open_thinking` for the generation prompt.
MINIMIND3_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if true %}
            {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if open_thinking is defined and open_thinking is true %}
        {{- '<think>\n' }}
    {%- else %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

# `tokenizer train --template NAME`: the chat template and the added tokens it needs.
TEMPLATES: dict[str, tuple[str, list[tuple[str, bool]]]] = {
    "minimind3": (MINIMIND3_CHAT_TEMPLATE, MINIMIND3_TOKENS),
    "chatml": (CHAT_TEMPLATE, [(t, True) for t in SPECIAL_TOKENS]),
}
DEFAULT_TEMPLATE = "minimind3"


class ChatTemplateError(LLMCoreError):
    """The chat template cannot render a conversation (it needs a field the row lacks, ...).
    `index` is the conversation's position in the batch given to `encode_chats` (None for one)."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


def _jinja_environment():
    """The sandboxed environment transformers compiles chat templates in: the same flags, extensions
    (a `{% generation %}` block renders its body) and helpers (`tojson` without HTML escaping,
    `raise_exception`, `strftime_now`, `dict`, a `namespace` that refuses underscore names)."""
    from datetime import datetime

    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        # transformers uses this tag to track assistant text; rendering is unchanged by it
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes ({name!r})"
                )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' aliases, first = the standard one


def _plain(value):
    """A copy of `value` made of plain JSON types (what transformers lets a template see); anything
    else becomes an inert "<TypeName>" string. Recursive: inputs are JSON rows or API bodies whose
    depth their parsers already bound."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def _template_messages(messages: Sequence[dict]) -> list[dict]:
    """Messages as transformers hands them to a template: keys whose value is None dropped, plain
    copies, and the reasoning filled under all its names (`reasoning_content`, `thinking`)."""
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise LLMCoreError(f"a chat message must be an object, got {type(m).__name__}")
        m = _plain({k: v for k, v in m.items() if v is not None})
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


_COMPILED: dict[str, object] = {}  # template text -> compiled template (templates are few and small)


def render_chat_template(
    template: str,
    messages: Sequence[dict],
    tools: Sequence[dict] | None = None,
    add_generation_prompt: bool = False,
    **template_kwargs,
) -> str:
    """Render a jinja chat template as transformers' `render_jinja_template` does: its sandboxed
    environment, None-valued message keys dropped, plain-JSON copies, reasoning aliases, `tools`,
    `documents=None`. `template_kwargs` are the named special tokens and any template options
    (`open_thinking`). ChatTemplateError when the template cannot render the input."""
    compiled = _COMPILED.get(template)
    if compiled is None:
        try:
            compiled = _COMPILED[template] = _jinja_environment().from_string(template)
        except Exception as err:  # a syntax error in the template
            raise LLMCoreError(f"cannot compile the chat template: {str(err).splitlines()[0][:200]}") from None
    if tools is not None and not all(isinstance(t, dict) for t in tools):
        raise LLMCoreError("tools must be a list of JSON schemas (objects)")
    try:
        return compiled.render(
            messages=_template_messages(messages),
            tools=_plain(tools),
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **_plain(template_kwargs),
        )
    except LLMCoreError:
        raise
    except Exception as err:  # jinja's errors, or TypeError etc. from the template's own expressions
        detail = str(err).splitlines()[0][:200] if str(err) else ""
        raise ChatTemplateError(
            f"the chat template cannot render this conversation: {type(err).__name__}"
            + (f": {detail}" if detail else "")
        ) from None


def _strings(value) -> Iterator[str]:
    """Every string inside a JSON-like value (dict keys too), iteratively."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            yield v
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)


def _map_strings(value, fn):
    """A copy of a JSON-like value with every string value (not dict keys) passed through `fn`."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_strings(v, fn) for v in value]
    return value


def empty_think_drop(key: str, probability: float, seed: int) -> bool:
    """Whether MiniMind's empty-think rule drops `<think>\n\n</think>\n\n` from one conversation.

    MiniMind draws `random.random() > 0.2` per sample; here the draw is a hash of (seed, key), so the
    same row gets the same answer whatever the worker count or block order (prep stays reproducible)."""
    if probability <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}\0{key}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < probability


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
        raw = template if template is not None else (self.config.get("chat_template") or CHAT_TEMPLATE)
        # transformers also stores several named templates as [{"name", "template"}]: "default", and
        # "tool_use" for calls with tools (its get_chat_template picks them the same way)
        self._named_templates: dict[str, str] = {}
        if isinstance(raw, list) and all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in raw
        ):
            self._named_templates = {t["name"]: t["template"] for t in raw}
            raw = self._named_templates.get("default")
        if not isinstance(raw, str):
            raise LLMCoreError(
                f"{config_file}: chat_template is neither a template string nor named templates with a default"
            )
        self.chat_template: str = raw

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
    def _template_kwargs(self) -> dict:
        """The named special tokens a template sees (transformers' `special_tokens_map`)."""
        out = {}
        for key, value in self.config.items():
            if key.endswith("_token"):
                if isinstance(value, dict):  # AddedToken serialised as a dict
                    value = value.get("content")
                if isinstance(value, str):
                    out[key] = value
        out.update(bos_token=self.bos_token, eos_token=self.eos_token, pad_token=self.pad_token)
        return out

    def apply_chat_template(
        self,
        messages: Sequence[dict],
        add_generation_prompt: bool = False,
        tools: Sequence[dict] | None = None,
        **template_kwargs,
    ) -> str:
        """The conversation as text: exactly what transformers' `apply_chat_template(messages,
        tools=tools, add_generation_prompt=..., tokenize=False, **template_kwargs)` returns for this
        tokenizer dir (e.g. `open_thinking=True` for MiniMind-3's template). Messages are used as
        given: rows in MiniMind-3's format go through `normalize_conversation` first (the
        `encode_*` methods do that). ChatTemplateError when the template cannot render them."""
        try:
            template = (
                self._named_templates.get("tool_use", self.chat_template) if tools is not None else self.chat_template
            )
            return render_chat_template(
                template, messages, tools, add_generation_prompt, **{**self._template_kwargs(), **template_kwargs}
            )
        except ChatTemplateError:
            raise
        except LLMCoreError as err:
            raise LLMCoreError(f"{self.path}: {err}") from None

    def _render_plan(
        self,
        msgs: list[dict],
        tools: list[dict] | None,
        add_generation_prompt: bool,
        drop_think: bool,
        template_kwargs: dict,
    ) -> tuple[str, list[tuple[int, int, int]] | None]:
        """Render one normalised conversation; return the text and the template's own special tokens
        as (start, end, id), or None when no input string holds a special-token string (then every
        special in the text is the template's and the whole text encodes as one string).

        Otherwise the conversation is rendered a second time with each special-token string in the
        input replaced by a private-use placeholder character: every special left in that rendering
        is the template's. Swapping the placeholders back must give the real rendering exactly
        (it does for templates that only strip, split on other markers or copy text), else the
        template rewrites typed specials and the conversation is refused."""

        def render(m, t):
            text = self.apply_chat_template(m, add_generation_prompt, t, **template_kwargs)
            return text.replace(EMPTY_THINK, "") if drop_think else text

        pattern = self._specials_pattern()
        text = render(msgs, tools)
        inputs = (msgs, tools, template_kwargs)
        if not any(pattern.search(x) for x in _strings(inputs)):
            return text, None
        specials = self.special_strings()
        used = set("".join(_strings(inputs))) | set(self.chat_template)
        for base in (0xF0000, 0x100000, 0xE000):  # private-use areas: no real text or template uses them
            marks = [chr(base + k) for k in range(len(specials))]
            if not used.intersection(marks):
                break
        else:
            raise ChatTemplateError(
                "message text uses every private-use character range; cannot keep special-token strings as text"
            )
        to_mark = dict(zip(specials, marks))
        from_mark = dict(zip(marks, specials))

        def swap(x: str) -> str:
            return pattern.sub(lambda m: to_mark[m.group()], x)

        marked = render(_map_strings(msgs, swap), _map_strings(tools, swap) if tools is not None else None)
        parts: list[str] = []
        controls: list[tuple[int, int, int]] = []
        pos = length = 0
        for m in re.compile(pattern.pattern + "|[" + "".join(marks) + "]").finditer(marked):
            parts.append(marked[pos : m.start()])
            length += m.start() - pos
            piece = m.group()
            if piece in from_mark:  # typed by the user: plain text
                piece = from_mark[piece]
            else:
                controls.append((length, length + len(piece), self._tok.token_to_id(piece)))
            parts.append(piece)
            length += len(piece)
            pos = m.end()
        parts.append(marked[pos:])
        if "".join(parts) != text:
            raise ChatTemplateError(
                "the chat template rewrites message text that holds special-token strings; "
                "cannot tell its own special tokens from typed ones"
            )
        return text, controls

    def _assistant_spans(
        self, text: str, controls: list[tuple[int, int, int]], n_assistant: int, only_last: bool
    ) -> list[tuple[int, int]]:
        """Character spans that carry loss: from after each `<|im_start|>assistant\n` the template
        wrote through the `<|im_end|>` that closes that turn (to the end if none does)."""
        spans = []
        start = None
        for lo, hi, token_id in controls:
            if token_id == self.bos_id:
                if start is not None:
                    raise LLMCoreError(
                        "the chat template opens a turn inside an assistant turn; cannot place the loss mask"
                    )
                if text.startswith(ASSISTANT_HEADER, hi):
                    start = hi + len(ASSISTANT_HEADER)
            elif token_id == self.eos_id and start is not None:
                spans.append((start, hi))
                start = None
        if start is not None:
            spans.append((start, len(text)))
        if len(spans) != n_assistant:
            raise LLMCoreError(
                f"the chat template wrote {len(spans)} '{self.bos_token}{ASSISTANT_HEADER.strip()}' turns for "
                f"{n_assistant} assistant messages; cannot place the loss mask"
            )
        return spans[-1:] if only_last else spans

    def chat_spans(self, messages: Sequence[dict], only_last: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """Render `messages` (normalised first); return the text and the character spans that carry
        loss (see `_assistant_spans`; only the final assistant turn with `only_last`, as DPO scores it)."""
        msgs, tools = normalize_conversation(messages)
        self._check_trainable(msgs)
        text, controls = self._render_plan(msgs, tools, False, False, {})
        if controls is None:
            controls = self._controls_of(text)
        return text, self._assistant_spans(text, controls, sum(m["role"] == "assistant" for m in msgs), only_last)

    def _controls_of(self, text: str) -> list[tuple[int, int, int]]:
        return [(m.start(), m.end(), self._tok.token_to_id(m.group())) for m in self._specials_pattern().finditer(text)]

    def _check_rendered_fields(self, msgs: list[dict], tools) -> None:
        """Training rows must not lose data silently: tools, tool calls or reasoning that this
        template never reads (MiniMind2's ChatML) make the row a ChatTemplateError."""
        fields = [("tools", bool(tools))] + [
            (key, any(key in m for m in msgs)) for key in ("tool_calls", "reasoning_content")
        ]
        for key, present in fields:
            if present and key not in self.chat_template:
                raise ChatTemplateError(
                    f"the tokenizer's chat template does not render {key}, so the row's {key} would be "
                    "lost; use a tokenizer with MiniMind-3's template (`tokenizer train`'s default)"
                )

    @staticmethod
    def _check_trainable(msgs: list[dict]) -> None:
        if not msgs:
            raise LLMCoreError("empty conversation")
        if not any(m["role"] == "assistant" for m in msgs):
            raise LLMCoreError("conversation has no assistant turn")

    def encode_chats(
        self,
        conversations: Sequence[Sequence[dict]],
        only_last: bool = False,
        add_generation_prompt: bool = False,
        tools: Sequence[dict] | None = None,
        drop_empty_think: Sequence[bool] | None = None,
        **template_kwargs,
    ) -> list[tuple[list[int], np.ndarray]]:
        """Token ids and uint8 loss masks of many conversations, batch-encoded (linear time in each).

        Each conversation goes through `normalize_conversation` (tools on its system message are
        used unless `tools` is given) and the template. The template's own special tokens are
        control tokens; special-token strings inside any message field are plain text (a user
        cannot forge `<|im_end|>` or a turn boundary). When no field holds one, the ids are exactly
        transformers' `apply_chat_template(messages, tools=tools, tokenize=True)`.
        `drop_empty_think[i]` removes every `<think>\n\n</think>\n\n` from conversation i's
        rendering (MiniMind's empty-think rule; see `empty_think_drop`).
        With `add_generation_prompt` (a prompt for generation) the masks are all zero.
        A conversation the template cannot render raises ChatTemplateError with its `index`.
        """
        whole: list[str] = []  # conversations without typed specials: encoded as one string
        pieces: list[str] = []  # the others: the text between the template's special tokens
        plans = []  # per conversation: (loss spans, index into whole | [(start, "text", piece) | (start, "special", (id, end))])
        for index, conv in enumerate(conversations):
            try:
                msgs, row_tools = normalize_conversation(conv)
                if not add_generation_prompt:
                    self._check_trainable(msgs)
                    self._check_rendered_fields(msgs, row_tools if tools is None else tools)
                drop = bool(drop_empty_think[index]) if drop_empty_think is not None else False
                text, controls = self._render_plan(
                    msgs, row_tools if tools is None else list(tools), add_generation_prompt, drop, template_kwargs
                )
                spans = []
                if not add_generation_prompt:
                    spans = self._assistant_spans(
                        text,
                        controls if controls is not None else self._controls_of(text),
                        sum(m["role"] == "assistant" for m in msgs),
                        only_last,
                    )
            except ChatTemplateError as err:
                raise ChatTemplateError(str(err), index) from None
            except RecursionError:  # a field nested deeper than the copies can follow
                raise ChatTemplateError("the conversation is nested too deeply to render", index) from None
            if controls is None:
                plans.append((spans, len(whole)))
                whole.append(text)
                continue
            plan, pos = [], 0
            for lo, hi, token_id in controls:
                if lo > pos:
                    plan.append((pos, "text", len(pieces)))
                    pieces.append(text[pos:lo])
                plan.append((lo, "special", (token_id, hi)))
                pos = hi
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
        """Token ids of the rendered conversation and its loss mask (see `encode_chats`)."""
        ids, mask = self.encode_chats([messages], only_last=only_last)[0]
        return ids, mask.tolist()

    def encode_prompt(
        self, messages: Sequence[dict], tools: Sequence[dict] | None = None, open_thinking: bool = False
    ) -> list[int]:
        """Token ids of a generation prompt (the template's generation header; with MiniMind-3's
        template `<think>\n` when `open_thinking`, else an empty think block), with special-token
        strings inside messages and tools as plain text (for chat and serving). `tools` (JSON
        schemas) override any on the system message."""
        kwargs = {"open_thinking": True} if open_thinking else {}
        return self.encode_chats([messages], add_generation_prompt=True, tools=tools, **kwargs)[0][0]

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
            if isinstance(value, list):  # a conversation: train on its messages' text (MiniMind-3's fields included)
                value = "\n".join(
                    x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)
                    for m in value
                    if isinstance(m, dict)
                    for x in (m.get("reasoning_content"), m.get("content"), m.get("tools"), m.get("tool_calls"))
                    if x and isinstance(x, (str, list, dict))
                )
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
    template: str = DEFAULT_TEMPLATE,
) -> Path:
    """Train byte-level BPE on the `field` of jsonl `inputs` (streamed) and write an HF-loadable dir.

    `template` (a key of TEMPLATES): "minimind3" (default) writes MiniMind-3's 36 added tokens (same
    ids, order and special flags as its tokenizer) and its chat template with tools and thinking;
    "chatml" writes MiniMind2's three special tokens and ChatML template.

    A non-empty `out_dir` is refused unless `overwrite`, and then only a tokenizer dir llmcore made
    that holds none of the inputs is replaced (as a whole, once the new one is complete)."""
    from llmcore.data_prep.faults import fault_point
    from llmcore.data_prep.jsonl import DEFAULT_MAX_LINE_BYTES, input_files

    paths = input_files(inputs)
    out = check_out_dir(
        out_dir,
        overwrite=overwrite,
        what="a tokenizer dir llmcore made",
        inputs=paths,
        replaceable=tokenizer_dir_problem,
    )
    if template not in TEMPLATES:
        raise LLMCoreError(f"--template {template!r}: expected one of {', '.join(TEMPLATES)}")
    chat_template, added_tokens = TEMPLATES[template]
    added_names = [t for t, _ in added_tokens]
    if vocab_size < 256 + len(added_tokens):
        raise LLMCoreError(
            f"vocab size {vocab_size} is too small: byte-level BPE with the {template} template's "
            f"{len(added_tokens)} added tokens needs at least {256 + len(added_tokens)}"
        )

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=added_names,  # ids 0.. in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    counts = {"used": 0, "skipped": 0}
    tok.train_from_iterator(
        _iter_training_texts(paths, field, counts, max_line_bytes or DEFAULT_MAX_LINE_BYTES), trainer=trainer
    )
    if counts["used"] == 0:
        raise DataError(f'no usable "{field}" strings in the inputs', str(paths[0]), reason="empty_text")
    if counts["skipped"]:
        log.warning("tokenizer: skipped %d lines without a usable %r string", counts["skipped"], field)
    for i, token in enumerate(added_names):
        assert tok.token_to_id(token) == i, "added tokens must take ids 0.. in their order"
    if not all(special for _, special in added_tokens):
        # The trainer adds every reserved token as special; MiniMind-3 marks <think>, <tool_call>, ... not special.
        data = json.loads(tok.to_str())
        flags = dict(added_tokens)
        for entry in data["added_tokens"]:
            entry["special"] = flags.get(entry["content"], entry["special"])
        tok = tokenizers.Tokenizer.from_str(json.dumps(data, ensure_ascii=False))

    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for i, (t, special) in enumerate(added_tokens)
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        # MiniMind-3 lists its named specials here; MiniMind2's ChatML config lists none
        "additional_special_tokens": [t for t, special in added_tokens if special and t != PAD_TOKEN]
        if template != "chatml"
        else [],
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": PAD_TOKEN,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "model_max_length": 32768,
        "chat_template": chat_template,
    }
    remove_leftovers(out.parent, out.name)
    try:
        with atomic_dir(out) as tmp:  # the whole dir appears at once; an old one is replaced only then
            tok.save(str(tmp / "tokenizer.json"))
            write_json(tmp / "tokenizer_config.json", config)
            write_json(
                tmp / MARKER_FILE,
                {
                    "format": "llmcore-tokenizer",
                    "version": 1,
                    "vocab_size": vocab_size,
                    "fingerprint": _fingerprint(tok),
                    "inputs": [str(p) for p in paths],
                    "field": field,
                    "template": template,
                },
            )
            fault_point("tokenizer:install")
    except OSError as err:
        raise LLMCoreError(
            f"--out {out}: cannot write the tokenizer dir: {err.strerror or err} "
            "(nothing was written there; any old tokenizer dir is unchanged)"
        ) from err
    return out
