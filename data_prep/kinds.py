"""Shard kinds: one object per kind of training document (`pretrain`, `sft`, `dpo`), in one registry.

A kind says everything the data pipeline needs to know about its documents:
- which jsonl records it accepts (`check`) and how `prep stats` recognises them (`detect`);
- its Arrow columns (`columns`: name -> element type, `token_columns`, `schema()`);
- how a block of checked records becomes flat column arrays (`encode`, run in prep's workers; chat
  kinds take `EncodeOptions`, e.g. MiniMind's empty-think rule, and raise ChatTemplateError with
  the payload's index when the tokenizer's template cannot render one);
- a document's length for the loaders (`doc_lengths`);
- what `prep stats` measures (`row_text`, `count_tokens`) and what `prep inspect --decode` adds (`render`);
- the help of its `llmcore prep KIND` command (`help`, `text_field` for the `--field` flag).

prep, jsonl, stats, shards and the CLI ask the registry (`get_kind`, `KINDS`); none of them
compares kind names. Adding a kind (e.g. KTO's unpaired rows) is one subclass here and one line
in `KINDS`; see docs/INTERNALS.md.

Importing this module is cheap (no numpy, pyarrow or tokenizer at import time): the CLI builds
its `prep` commands from it, and the shard reader uses it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmcore.data_prep.jsonl import BadLine, check_messages, check_text
from llmcore.errors import LLMCoreError

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from llmcore.data_prep.tokenizer import Tokenizer

# name -> (values, lengths): the flat token values of a block of documents and each one's length.
Columns = dict[str, "tuple[np.ndarray, np.ndarray]"]


@dataclass(frozen=True)
class EncodeOptions:
    """How chat kinds render conversations (`prep sft|dpo` flags). The default renders every row
    exactly as the tokenizer's template does.

    drop_empty_think: the share of conversations whose empty `<think>\n\n</think>\n\n` blocks are
    removed (MiniMind-3's SFT uses 0.8); which rows is decided by a hash of (`seed`, the row), so
    it is reproducible and independent of workers and block order."""

    drop_empty_think: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop_empty_think <= 1.0:
            raise LLMCoreError(f"--drop-empty-think must be between 0 and 1, not {self.drop_empty_think}")

    def drops(self, conversations: list[list[dict]]) -> list[bool] | None:
        """Per conversation: whether its empty think blocks are dropped (None: none are)."""
        if self.drop_empty_think <= 0:
            return None
        import json

        from llmcore.data_prep.tokenizer import empty_think_drop

        return [
            empty_think_drop(json.dumps(c, ensure_ascii=False, sort_keys=True), self.drop_empty_think, self.seed)
            for c in conversations
        ]


class ShardKind(ABC):
    """One kind of document. Subclasses set the class attributes and implement check/encode/... ."""

    name: str = ""
    help: str = ""  # the `llmcore prep NAME` help: what it reads and writes, then an example
    columns: dict[str, str] = {}  # column -> element type (Arrow/numpy name); every column is a list of it
    token_columns: tuple[str, ...] = ()  # the columns holding token ids (uint16-checked, counted)
    text_field: bool = False  # records carry their text in a field the user names with --field
    chat: bool = False  # records are conversations rendered by the chat template (takes EncodeOptions)
    fallback: bool = False  # what `detect_kind` answers when no other kind claims a record

    # -- records ---------------------------------------------------------------------------------
    def detect(self, obj: dict) -> bool:
        """Whether a jsonl record looks like this kind (for `prep stats` without a kind)."""
        return False

    @abstractmethod
    def check(self, obj: dict, field: str = "text") -> Any:
        """The validated payload of one record (what `encode` takes), or a BadLine."""

    # -- columns ---------------------------------------------------------------------------------
    def schema(self) -> "pa.Schema":
        import pyarrow as pa

        return pa.schema([pa.field(name, pa.list_(pa.type_for_alias(t))) for name, t in self.columns.items()])

    def manifest_columns(self) -> dict[str, str]:
        return {name: f"list<{t}>" for name, t in self.columns.items()}

    @abstractmethod
    def encode(self, tok: "Tokenizer", payloads: list, options: EncodeOptions | None = None) -> Columns:
        """Tokenize checked payloads (in order) into every column of `columns` (values as int64 or uint8).
        A chat kind raises ChatTemplateError whose `index` is the payload the template cannot render."""

    def doc_lengths(self, column_lengths: Callable[[str], "np.ndarray"]) -> "np.ndarray":
        """Tokens per document (int64) from per-column lengths: the longest token column."""
        import numpy as np

        lens = column_lengths(self.token_columns[0])
        for c in self.token_columns[1:]:
            lens = np.maximum(lens, column_lengths(c))
        return lens

    # -- stats and inspect -----------------------------------------------------------------------
    @abstractmethod
    def row_text(self, payload: Any) -> str:
        """The characters a record contributes (what `prep stats` counts per row)."""

    @abstractmethod
    def count_tokens(self, tok: "Tokenizer", payloads: list) -> list[int]:
        """Tokens per record as prep would store them (for `prep stats --tokenizer`)."""

    @abstractmethod
    def render(self, tok: "Tokenizer", doc: dict[str, list[int]]) -> dict[str, str]:
        """Text fields that `prep inspect --decode` adds to a document's JSON line."""

    def __repr__(self) -> str:
        return f"<shard kind {self.name}>"


# ---------------------------------------------------------------------------------------------
# Encoding helpers shared by the kinds (numpy imported on use: they run in prep's workers).


def flatten(id_lists: list[list[int]]) -> "tuple[np.ndarray, np.ndarray]":
    """Lists of ids as (flat int64 values, int64 lengths)."""
    import itertools

    import numpy as np

    lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
    values = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int64, count=int(lengths.sum()))
    return values, lengths


def with_bos_eos(values: "np.ndarray", lengths: "np.ndarray", bos: int, eos: int) -> "tuple[np.ndarray, np.ndarray]":
    """[bos] + ids + [eos] for every document, done on the flat arrays in one pass."""
    import numpy as np

    out_len = lengths + 2
    ends = np.cumsum(out_len)
    starts = ends - out_len
    out = np.empty(int(out_len.sum()), dtype=np.int64)
    inner = np.ones(len(out), dtype=bool)
    inner[starts] = False
    inner[ends - 1] = False
    out[inner] = values
    out[starts] = bos
    out[ends - 1] = eos
    return out, out_len


def encode_chats(
    tok: "Tokenizer", conversations: list[list[dict]], only_last: bool, drops: list[bool] | None = None
) -> tuple[list[list[int]], "list[np.ndarray]"]:
    """Chat-template token ids and loss masks (each assistant turn after its header through its
    <|im_end|>; only the final one when `only_last`) for each conversation."""
    encoded = tok.encode_chats(conversations, only_last=only_last, drop_empty_think=drops)  # typed specials stay text
    return [ids for ids, _ in encoded], [mask for _, mask in encoded]


def masked_chats(
    tok: "Tokenizer",
    conversations: list[list[dict]],
    only_last: bool,
    tokens: str,
    mask: str,
    drops: list[bool] | None = None,
) -> Columns:
    """Columns `tokens` and `mask` for conversations (see `encode_chats`)."""
    import numpy as np

    ids, masks = encode_chats(tok, conversations, only_last=only_last, drops=drops)
    values = flatten(ids)
    return {tokens: values, mask: (np.concatenate(masks) if masks else np.zeros(0, np.uint8), values[1])}


def marked_text(tok: "Tokenizer", tokens: list[int], mask: list[int]) -> str:
    """Decode with the loss-carrying spans wrapped in double square brackets."""
    parts, start = [], 0
    for i in range(1, len(tokens) + 1):
        if i == len(tokens) or mask[i] != mask[start]:
            text = tok.decode(tokens[start:i])
            parts.append(f"[[{text}]]" if mask[start] else text)
            start = i
    return "".join(parts)


def _contents(messages: list[dict]) -> str:
    return "\n".join(filter(None, (x for m in messages for x in (m.get("reasoning_content"), m["content"]))))


# ---------------------------------------------------------------------------------------------
# The kinds.


class PretrainKind(ShardKind):
    name = "pretrain"
    help = """Tokenize {"text": ...} lines into a pretrain shard dir: tokens are bos, encode(text), eos.

    Example: llmcore prep pretrain --input dataset/pretrain_hq.jsonl --tokenizer tok/ --out shards/pretrain
    """
    columns = {"tokens": "uint16"}
    token_columns = ("tokens",)
    text_field = True
    fallback = True

    def check(self, obj: dict, field: str = "text") -> str | BadLine:
        return check_text(obj, field)

    def encode(self, tok: "Tokenizer", payloads: list[str], options: EncodeOptions | None = None) -> Columns:
        values, lengths = flatten(tok.encode_text_batch(payloads))  # special-token strings stay text
        return {"tokens": with_bos_eos(values, lengths, tok.bos_id, tok.eos_id)}

    def row_text(self, payload: str) -> str:
        return payload

    def count_tokens(self, tok: "Tokenizer", payloads: list[str]) -> list[int]:
        return [len(ids) + 2 for ids in tok.encode_text_batch(payloads)]  # + bos/eos as prep stores them

    def render(self, tok: "Tokenizer", doc: dict[str, list[int]]) -> dict[str, str]:
        return {"text": tok.decode(doc["tokens"])}


class SFTKind(ShardKind):
    name = "sft"
    help = """Tokenize {"conversations": [...]} lines with the tokenizer's chat template; loss_mask = each assistant turn after its header through <|im_end|>.

    MiniMind-3's format is accepted: tools on the system message, assistant tool_calls and
    reasoning_content, tool messages.

    Example: llmcore prep sft --input dataset/sft_t2t_mini.jsonl --tokenizer tok/ --out shards/sft
    """
    columns = {"tokens": "uint16", "loss_mask": "uint8"}
    token_columns = ("tokens",)
    chat = True

    def detect(self, obj: dict) -> bool:
        return "conversations" in obj

    def check(self, obj: dict, field: str = "text") -> list[dict] | BadLine:
        return check_messages(obj, "conversations")

    def encode(self, tok: "Tokenizer", payloads: list[list[dict]], options: EncodeOptions | None = None) -> Columns:
        return masked_chats(tok, payloads, False, "tokens", "loss_mask", (options or EncodeOptions()).drops(payloads))

    def row_text(self, payload: list[dict]) -> str:
        return _contents(payload)

    def count_tokens(self, tok: "Tokenizer", payloads: list[list[dict]]) -> list[int]:
        return [len(ids) for ids, _ in tok.encode_chats(payloads)]

    def render(self, tok: "Tokenizer", doc: dict[str, list[int]]) -> dict[str, str]:
        return {"text": marked_text(tok, doc["tokens"], doc["loss_mask"])}


class DPOKind(ShardKind):
    name = "dpo"
    help = """Tokenize {"chosen": [...], "rejected": [...]} lines; masks mark only the final assistant reply.

    Example: llmcore prep dpo --input dataset/dpo.jsonl --tokenizer tok/ --out shards/dpo
    """
    columns = {"chosen": "uint16", "chosen_mask": "uint8", "rejected": "uint16", "rejected_mask": "uint8"}
    token_columns = ("chosen", "rejected")
    chat = True

    def detect(self, obj: dict) -> bool:
        return "chosen" in obj or "rejected" in obj

    def check(self, obj: dict, field: str = "text") -> tuple[list[dict], list[dict]] | BadLine:
        chosen = check_messages(obj, "chosen", final_assistant=True)
        if isinstance(chosen, BadLine):
            return chosen
        rejected = check_messages(obj, "rejected", final_assistant=True)
        if isinstance(rejected, BadLine):
            return rejected
        # A pair that cannot teach anything: the same prompt must lead to two different replies.
        if chosen[:-1] != rejected[:-1]:
            return BadLine(
                "dpo_prompt_mismatch",
                "dpo pair: chosen and rejected have different prompts (the messages before the final reply differ)",
            )
        if chosen[-1] == rejected[-1]:
            return BadLine("dpo_identical", "dpo pair: chosen and rejected replies are the same")
        return chosen, rejected

    def encode(
        self, tok: "Tokenizer", payloads: list[tuple[list[dict], list[dict]]], options: EncodeOptions | None = None
    ) -> Columns:
        # one draw per pair (keyed by the chosen side), so both sides keep or drop the same prompt blocks
        drops = (options or EncodeOptions()).drops([p[0] for p in payloads])
        return {
            **masked_chats(tok, [p[0] for p in payloads], True, "chosen", "chosen_mask", drops),
            **masked_chats(tok, [p[1] for p in payloads], True, "rejected", "rejected_mask", drops),
        }

    def row_text(self, payload: tuple[list[dict], list[dict]]) -> str:
        return _contents(payload[0])  # the chosen side

    def count_tokens(self, tok: "Tokenizer", payloads: list[tuple[list[dict], list[dict]]]) -> list[int]:
        return [len(ids) for ids, _ in tok.encode_chats([p[0] for p in payloads])]

    def render(self, tok: "Tokenizer", doc: dict[str, list[int]]) -> dict[str, str]:
        return {
            "chosen_text": marked_text(tok, doc["chosen"], doc["chosen_mask"]),
            "rejected_text": marked_text(tok, doc["rejected"], doc["rejected_mask"]),
        }


# ---------------------------------------------------------------------------------------------
# The registry: name -> kind, in the order the CLI lists them.

KINDS: dict[str, ShardKind] = {k.name: k for k in (PretrainKind(), SFTKind(), DPOKind())}


def get_kind(kind: str | ShardKind) -> ShardKind:
    """The registered kind of that name (a ShardKind passes through); LLMCoreError naming the known ones."""
    if isinstance(kind, ShardKind):
        return kind
    try:
        return KINDS[kind]
    except (KeyError, TypeError):
        raise LLMCoreError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}") from None


def detect_kind(obj: dict) -> ShardKind:
    """Guess a record's kind from its keys: the first kind that claims it, else the fallback (pretrain)."""
    for k in KINDS.values():
        if not k.fallback and k.detect(obj):
            return k
    return default_kind()


def default_kind() -> ShardKind:
    return next(k for k in KINDS.values() if k.fallback)
