"""docs/INTERNALS.md's listed signatures hold against the code.

The format (written down in INTERNALS itself): in the sections named in `SECTIONS`, every backticked
`name(args)` (optionally followed by `-> ...` inside the same backticks) is a signature. `name` is a
function, class or method found in the section's modules (`Class.method` and dotted module paths
work too); `args` are parameter names, each optionally with `: annotation` or `=default`; a bare
`*` is the keyword-only marker and `...` stands for parameters left out. The check: every listed
name is a parameter of the real object, in the same order, and, unless `...` is listed, every
parameter without a default is listed. So a renamed, removed, reordered or new required parameter,
or a function that no longer exists, fails here until the page says so.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "INTERNALS.md"

# Section heading (start) -> where its names live (modules, or classes as "module:Class").
SECTIONS: dict[str, list[str]] = {
    "Writing files": ["llmcore.io"],
    "Reading jsonl": ["llmcore.data_prep.jsonl", "llmcore.data_prep.faults"],
    "Loaders": ["llmcore.data_prep.loaders", "llmcore.data_prep.loaders:Loader"],
    "Reference ops and kernels": ["llmcore.reference", "llmcore.kernels"],
    "Model": [
        "llmcore.model",
        "llmcore.model:LLM",
        "llmcore.generate",
        "llmcore.checkpoint",
        "llmcore.convert",
        "llmcore.lora",
    ],
    "Training": [
        "llmcore.train",
        "llmcore.train.trainer:Trainer",
        "llmcore.train.stages",
        "llmcore.train.stages:Stage",
        "llmcore.train.config",
        "llmcore.train.config:TrainConfig",
        "llmcore.train.engine",
        "llmcore.train.engine:PlainEngine",
        "llmcore.train.distributed",
        "llmcore.train.deepspeed_config",
        "llmcore.train.optim_state",
        "llmcore.train.optim",
        "llmcore.train.feed",
        "llmcore.train.feed:DeviceFeed",
        "llmcore.train.checkpointing",
        "llmcore.train.speed",
        "llmcore.launch",
        "llmcore.launch.cli",
        "llmcore.launch.node",
    ],
}
# Backticked calls in those sections that are examples or other libraries' APIs, not our signatures.
NOT_SIGNATURES = {"torch.load", "torch.compile", "replaceable"}
# Spans whose calls are not Python signatures: the custom ops' schemas (`torch.ops.llmcore.*`).
IGNORED_SPANS = re.compile(r"Ops: .*?each has", re.S)

ENTRY = re.compile(r"`((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*)\(([^`]*?)\)(?:\s*->[^`]*)?`", re.S)


def sections() -> dict[str, str]:
    out = {}
    for block in re.split(r"^## ", DOC.read_text(encoding="utf-8"), flags=re.M)[1:]:
        title = block.splitlines()[0]
        for start in SECTIONS:
            if title.startswith(start):
                out[start] = block
    return out


def split_args(text: str) -> list[str]:
    """Top-level comma split (commas inside brackets or quotes belong to an annotation or default)."""
    parts, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def doc_params(args: str) -> tuple[list[str], bool]:
    """(parameter names as listed, whether `...` leaves some out)."""
    names, partial = [], False
    for part in split_args(args):
        if part == "...":
            partial = True
        elif part != "*":
            names.append(re.split(r"[:=]", part, maxsplit=1)[0].strip().lstrip("*"))
    return names, partial


def resolve(name: str, homes: list[str]) -> Any:
    if name.startswith("llmcore."):
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            try:
                obj: Any = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
            return obj
    for home in homes:
        module, _, cls = home.partition(":")
        obj = importlib.import_module(module)
        if cls:
            obj = getattr(obj, cls)
        try:
            for attr in name.split("."):
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        if callable(obj):  # a class attribute of the same name (Trainer.peak_tflops = None) is not it
            return obj
    raise AttributeError(f"{name} is in none of {homes}")


def is_signature(args: str) -> bool:
    """Parameters, not a call chain (`RunDirLock(out).acquire()`) or an example call (`f(x, g(...))`)."""
    depth = 0
    for ch in args:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth < 0:
            return False
    names, _ = doc_params(args)
    return all(n.isidentifier() for n in names)


def entries() -> list[tuple[str, str, str]]:
    found = []
    for start, text in sections().items():
        for m in ENTRY.finditer(IGNORED_SPANS.sub("", text)):
            if m.group(1) not in NOT_SIGNATURES and is_signature(m.group(2)):
                found.append((start, m.group(1), m.group(2)))
    return found


def test_the_chosen_sections_exist_and_list_signatures():
    assert set(sections()) == set(SECTIONS), "a section named in SECTIONS is gone from INTERNALS.md"
    counts = {start: sum(1 for s, _, _ in entries() if s == start) for start in SECTIONS}
    assert all(n >= 1 for n in counts.values()), counts


@pytest.mark.parametrize(("section", "name", "args"), entries(), ids=lambda v: v if isinstance(v, str) else "")
def test_listed_signature_matches_the_code(section: str, name: str, args: str):
    obj = resolve(name, SECTIONS[section])
    target = obj.__init__ if inspect.isclass(obj) else obj
    params = [p for p in inspect.signature(target).parameters.values() if p.name not in ("self", "cls")]
    real = [p.name for p in params]
    listed, partial = doc_params(args)
    missing = [n for n in listed if n not in real]
    assert not missing, f"INTERNALS ({section}) lists {name}({args}); the code has {name}({', '.join(real)})"
    positions = [real.index(n) for n in listed]
    assert positions == sorted(positions), f"{name}: INTERNALS lists ({args}), the code's order is {real}"
    if not partial:
        required = [
            p.name
            for p in params
            if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        unlisted = [n for n in required if n not in listed]
        assert not unlisted, f"{name}: required parameter(s) {unlisted} missing from INTERNALS ({args})"


def test_the_check_catches_drift():
    assert doc_params("path, *, indent=2, write: Callable[[Path], None], ...") == (["path", "indent", "write"], True)
    with pytest.raises(AttributeError):
        resolve("no_such_function", ["llmcore.io"])
