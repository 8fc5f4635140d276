"""`llmcore eval bench`: multiple-choice benchmarks (CMMLU, C-Eval, a generic jsonl) scored as
lm-evaluation-harness (0.4.x) scores its `multiple_choice` tasks.

For each question the prompt (context) is the subject's description, then `shots` solved examples
from the dev split (the first ones, lm-eval's `first_n` sampler), each `text + " " + answer +
"\\n\\n"`, then the question's text. Each choice is a continuation `" " + choice`. The score of a
choice is the summed log-probability of its continuation tokens after the context; `acc` takes the
arg-max, `acc_norm` the arg-max of the score divided by the choice's length in characters (lm-eval's
definition; for the letter choices of CMMLU and C-Eval every length is 1, so it equals `acc`).

Tokenization follows lm-eval's `_encode_pair` for causal models: trailing whitespace of the context
moves to the continuation, `whole = encode(context + continuation)`, `context_ids = encode(context)`,
and the continuation's ids are `whole[len(context_ids):]`; no BOS is added. Special-token strings in
a question are tokenized as the Hugging Face tokenizer does (`Tokenizer.encode`).

Scoring is batched with the KV cache: a batch of contexts (left-padded; each pad token is its own
document, so it is never attended to) runs once, and only then each choice's continuation, so a
prompt is encoded once however many choices it has. Log-probabilities are taken in fp32.

Data layouts (the official ones):
- cmmlu: `DIR/test/*.csv` and `DIR/dev/*.csv`, columns `Question,A,B,C,D,Answer` (the official files
  start with an unnamed index column), subject = file stem;
- ceval: `DIR/val/*.csv` and `DIR/dev/*.csv`, columns `id,question,A,B,C,D,answer`, subject = file
  stem without `_val`/`_dev`;
- mc: a jsonl file (or a dir with `test.jsonl` and optionally `dev.jsonl`) of
  `{"question", "choices": [...], "answer": index or letter, "subject"?}`, rendered as lm-eval's
  ARC task renders (`Question: ...\\nAnswer:`, each choice's text as the continuation).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import string
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from llmcore.errors import DataError, LLMCoreError
from llmcore.eval_subjects import CEVAL_SUBJECTS, CMMLU_SUBJECTS

log = logging.getLogger(__name__)

LETTERS = string.ascii_uppercase
MAX_SHOTS = 5


@dataclass
class Question:
    """One multiple-choice item: its subject, question text, choice texts and gold index."""

    subject: str
    question: str
    choices: list[str]
    answer: int
    source: str = ""  # "file:line", for error messages and the predictions file


@dataclass
class TaskFormat:
    """How one benchmark renders a question and its choices (lm-eval's task YAML, as code)."""

    name: str
    description: Callable[[str], str]  # subject -> text before the shots
    doc_to_text: Callable[[Question], str]
    doc_to_choice: Callable[[Question], list[str]]  # the strings scored (without the delimiter)
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"


def _letters_text(q: Question) -> str:
    options = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(q.choices))
    return f"{q.question.strip()}{options}\n答案："


def _letters(q: Question) -> list[str]:
    return list(LETTERS[: len(q.choices)])


FORMATS: dict[str, TaskFormat] = {
    "cmmlu": TaskFormat(
        "cmmlu",
        lambda s: f"以下是关于{CMMLU_SUBJECTS.get(s, s)}的单项选择题，请直接给出正确答案的选项。\n\n",
        _letters_text,
        _letters,
    ),
    "ceval": TaskFormat(
        "ceval",
        lambda s: f"以下是中国关于{CEVAL_SUBJECTS.get(s, s)}的单项选择题，请选出其中的正确答案。\n\n",
        _letters_text,
        _letters,
    ),
    "mc": TaskFormat("mc", lambda s: "", lambda q: f"Question: {q.question}\nAnswer:", lambda q: list(q.choices)),
}
TASKS = tuple(FORMATS)


# ----------------------------------------------------------------------------------------------
# Reading the official layouts


def _answer_index(value: Any, n_choices: int, path: Path, line: int) -> int:
    if isinstance(value, bool):
        raise DataError(f"answer {value!r} is not a choice", str(path), line)
    if isinstance(value, int):
        if 0 <= value < n_choices:
            return value
        raise DataError(f"answer {value} is out of range 0..{n_choices - 1}", str(path), line)
    if isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS[:n_choices]:
        return LETTERS.index(value.strip().upper())
    raise DataError(f"answer {value!r} is not one of {', '.join(LETTERS[:n_choices])}", str(path), line)


def _read_csv(path: Path, columns: Sequence[str], answer_col: str, subject: str) -> list[Question]:
    """Rows of one CMMLU/C-Eval CSV; a missing column or a bad answer is a one-line DataError."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"not UTF-8 text ({err.reason} at byte {err.start})", str(path)) from None
    except OSError as err:
        raise DataError(f"cannot read: {err.strerror or err}", str(path)) from None
    reader = csv.reader(text.splitlines(keepends=True))
    try:
        header = next(reader)
    except StopIteration:
        raise DataError("empty file (expected a header row)", str(path), 1) from None
    except csv.Error as err:
        raise DataError(f"bad CSV: {err}", str(path), 1) from None
    header = [h.strip() for h in header]
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"missing column(s) {', '.join(missing)} (header: {','.join(header)})", str(path), 1)
    where = {c: header.index(c) for c in columns}
    option_cols = [c for c in columns if len(c) == 1 and c in LETTERS]
    out: list[Question] = []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise DataError(f"bad CSV: {err}", str(path), reader.line_num) from None
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            raise DataError(f"{len(row)} fields, the header has {len(header)}", str(path), line)
        qcol = next(c for c in columns if c.lower() == "question")
        question = row[where[qcol]]
        if not question.strip():
            raise DataError("empty question", str(path), line)
        choices = [row[where[c]] for c in option_cols]
        answer = _answer_index(row[where[answer_col]], len(choices), path, line)
        out.append(Question(subject, question, choices, answer, f"{path}:{line}"))
    return out


def _subject_files(folder: Path, known: dict[str, str], suffix: str, task: str) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(folder.glob("*.csv")):
        subject = path.stem[: -len(suffix)] if suffix and path.stem.endswith(suffix) else path.stem
        if subject not in known:
            raise DataError(
                f"unknown {task} subject {subject!r} (file names are the official subject names, "
                f"e.g. {next(iter(known))}{suffix}.csv)",
                str(path),
            )
        files[subject] = path
    return files


def _load_csv_task(data: Path, task: str) -> tuple[dict[str, list[Question]], dict[str, list[Question]]]:
    if task == "cmmlu":
        known, eval_split, suffixes = CMMLU_SUBJECTS, "test", ("", "")
        columns, answer_col = ("Question", "A", "B", "C", "D", "Answer"), "Answer"
    else:
        known, eval_split, suffixes = CEVAL_SUBJECTS, "val", ("_val", "_dev")
        columns, answer_col = ("question", "A", "B", "C", "D", "answer"), "answer"
    if not data.is_dir():
        raise LLMCoreError(f"--data {data}: not a directory (a {task} dir holds {eval_split}/ and dev/)")
    if not (data / eval_split).is_dir():
        raise LLMCoreError(
            f"--data {data}: no {eval_split}/ folder (the official {task} layout: {eval_split}/*.csv and dev/*.csv)"
        )
    eval_files = _subject_files(data / eval_split, known, suffixes[0], task)
    if not eval_files:
        raise LLMCoreError(f"--data {data}: {eval_split}/ holds no .csv files")
    dev_files = _subject_files(data / "dev", known, suffixes[1], task) if (data / "dev").is_dir() else {}
    questions = {s: _read_csv(p, columns, answer_col, s) for s, p in eval_files.items()}
    dev = {s: _read_csv(p, columns, answer_col, s) for s, p in dev_files.items()}
    return questions, dev


def _read_mc_jsonl(path: Path) -> list[Question]:
    from llmcore.data_prep.jsonl import BadLine, iter_records

    out: list[Question] = []
    for line, rec in iter_records(path):
        if isinstance(rec, BadLine):
            raise DataError(rec.message, str(path), line)
        if not isinstance(rec, dict):
            raise DataError("expected a JSON object with question, choices, answer", str(path), line)
        q, choices = rec.get("question"), rec.get("choices")
        if not isinstance(q, str) or not q.strip():
            raise DataError("question must be a non-empty string", str(path), line)
        if (
            not isinstance(choices, list)
            or not 2 <= len(choices) <= len(LETTERS)
            or not all(isinstance(c, str) and c.strip() for c in choices)
        ):
            raise DataError(f"choices must be a list of 2..{len(LETTERS)} non-empty strings", str(path), line)
        if "answer" not in rec:
            raise DataError("missing answer", str(path), line)
        subject = rec.get("subject", "all")
        if not isinstance(subject, str) or not subject.strip():
            raise DataError("subject must be a non-empty string", str(path), line)
        out.append(
            Question(
                subject, q, list(choices), _answer_index(rec["answer"], len(choices), path, line), f"{path}:{line}"
            )
        )
    if not out:
        raise DataError("no questions", str(path))
    return out


def _group(questions: Iterable[Question]) -> dict[str, list[Question]]:
    groups: dict[str, list[Question]] = {}
    for q in questions:
        groups.setdefault(q.subject, []).append(q)
    return groups


def load_task(task: str, data: str | Path) -> tuple[dict[str, list[Question]], dict[str, list[Question]]]:
    """`(questions, dev)` by subject, from the official layout of `task` at `data`."""
    if task not in FORMATS:
        raise LLMCoreError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    data = Path(data)
    if not data.exists():
        raise LLMCoreError(f"--data {data}: no such file or directory")
    if task in ("cmmlu", "ceval"):
        return _load_csv_task(data, task)
    test, dev_file = (data / "test.jsonl", data / "dev.jsonl") if data.is_dir() else (data, None)
    if not test.is_file():
        raise LLMCoreError(f"--data {data}: an mc dir holds test.jsonl (and optionally dev.jsonl)")
    dev = _group(_read_mc_jsonl(dev_file)) if dev_file is not None and dev_file.is_file() else {}
    return _group(_read_mc_jsonl(test)), dev


# ----------------------------------------------------------------------------------------------
# Prompts and tokens


@dataclass
class Request:
    """One question ready to score: its context ids and one id list per choice continuation."""

    question: Question
    context: list[int]
    continuations: list[list[int]]
    choice_strings: list[str]


def build_context(fmt: TaskFormat, q: Question, shots: Sequence[Question]) -> str:
    """lm-eval's plain-text context: description, solved shots, the question's text."""
    parts = [fmt.description(q.subject)]
    for s in shots:
        parts.append(fmt.doc_to_text(s) + fmt.target_delimiter + fmt.doc_to_choice(s)[s.answer] + fmt.fewshot_delimiter)
    parts.append(fmt.doc_to_text(q))
    return "".join(parts)


def encode_pair(tok: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair` for causal models (see the module docstring)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok.encode(context + continuation)
    context_ids = tok.encode(context)
    return context_ids, whole[len(context_ids) :]


def build_requests(
    fmt: TaskFormat, tok: Any, questions: Sequence[Question], dev: Sequence[Question], shots: int
) -> list[Request]:
    out = []
    for q in questions:
        context = build_context(fmt, q, dev[:shots])
        strings = fmt.doc_to_choice(q)
        conts = []
        ctx_ids: list[int] = []
        for s in strings:
            ctx_ids, cont = encode_pair(tok, context, fmt.target_delimiter + s)
            if not cont:
                raise DataError(f"choice {s!r} encodes to no tokens", q.source)
            conts.append(cont)
        out.append(Request(q, ctx_ids, conts, strings))
    return out


# ----------------------------------------------------------------------------------------------
# Scoring


def _repeat_cache(model: Any, cache: Any, repeats: int, extra: int) -> Any:
    """A cache with each row of `cache` repeated `repeats` times (rows i*repeats .. stay together),
    room for `extra` more tokens."""
    b = cache.k[0].shape[0]
    new = model.new_kv_cache(b * repeats, cache.length + extra)
    n = cache.length
    for layer in range(len(cache.k)):
        new.k[layer][:, :n] = cache.k[layer][:, :n].repeat_interleave(repeats, dim=0)
        new.v[layer][:, :n] = cache.v[layer][:, :n].repeat_interleave(repeats, dim=0)
    new.doc[:, :n] = cache.doc[:, :n].repeat_interleave(repeats, dim=0)
    new.next_pos = cache.next_pos.repeat_interleave(repeats, dim=0)
    new.length = n
    return new


@torch.no_grad()
def score_batch(model: Any, requests: Sequence[Request], pad_id: int = 0) -> list[list[float]]:
    """Summed log-probability of each continuation of each request: `[request][choice]`.

    Contexts are left-truncated so context + continuation fits the model's positions (lm-eval cuts
    the same way: the newest `max_length` tokens are kept)."""
    device = model.embed_tokens.weight.device
    max_pos = model.config.max_position_embeddings
    n_choices = max(len(r.continuations) for r in requests)
    longest_cont = max(len(c) for r in requests for c in r.continuations)
    if longest_cont >= max_pos:
        raise LLMCoreError(
            f"a choice of {requests[0].question.source} has {longest_cont} tokens, more than the "
            f"model's {max_pos} positions"
        )
    contexts = [r.context[-(max_pos - longest_cont) :] for r in requests]
    width = max(len(c) for c in contexts)
    b = len(requests)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    pos = torch.zeros((b, width), dtype=torch.long)
    for i, c in enumerate(contexts):
        ids[i, width - len(c) :] = torch.tensor(c, dtype=torch.long)
        pos[i, width - len(c) :] = torch.arange(len(c))
    cache = model.new_kv_cache(b, width + (longest_cont - 1 if longest_cont > 1 else 0))
    last = model(ids.to(device), position_ids=pos.to(device), kv_cache=cache).logits[:, -1].float()
    first_lp = torch.log_softmax(last, dim=-1)  # (b, V): predicts each continuation's first token

    scores = [[0.0] * len(r.continuations) for r in requests]
    for i, r in enumerate(requests):
        for j, cont in enumerate(r.continuations):
            scores[i][j] = float(first_lp[i, cont[0]])
    if longest_cont == 1:
        return scores
    # Multi-token continuations: every choice row continues from its question's cached context.
    rows = _repeat_cache(model, cache, n_choices, longest_cont - 1)
    steps = longest_cont - 1
    feed = torch.full((b * n_choices, steps), pad_id, dtype=torch.long)
    for i, r in enumerate(requests):
        for j, cont in enumerate(r.continuations):
            if len(cont) > 1:
                feed[i * n_choices + j, : len(cont) - 1] = torch.tensor(cont[:-1], dtype=torch.long)
    logits = model(feed.to(device), kv_cache=rows).logits.float()
    lp = torch.log_softmax(logits, dim=-1)
    for i, r in enumerate(requests):
        for j, cont in enumerate(r.continuations):
            if len(cont) > 1:
                target = torch.tensor(cont[1:], dtype=torch.long, device=device)
                row = lp[i * n_choices + j, : len(cont) - 1]
                scores[i][j] += float(row.gather(-1, target.unsqueeze(-1)).sum())
    return scores


# ----------------------------------------------------------------------------------------------
# The command


@dataclass
class SubjectScore:
    acc: float
    acc_norm: float
    n: int


@dataclass
class BenchResult:
    task: str
    shots: int
    subjects: dict[str, SubjectScore]
    overall: SubjectScore
    chance: float  # expected acc of a uniform guess over the scored questions
    predictions: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        w = max(len(s) for s in self.subjects)
        out = [
            f"{s:<{w}}  acc {v.acc:.4f}  acc_norm {v.acc_norm:.4f}  ({v.n} questions)"
            for s, v in sorted(self.subjects.items())
        ]
        o = self.overall
        out.append(
            f"{self.task} overall ({self.shots}-shot): acc {o.acc:.4f}  acc_norm {o.acc_norm:.4f}  "
            f"({o.n} questions, chance {self.chance:.4f}, {self.seconds:.1f} s)"
        )
        return out


def _select(
    questions: dict[str, list[Question]], subjects: Sequence[str] | None, limit: int | None
) -> dict[str, list[Question]]:
    if subjects:
        unknown = [s for s in subjects if s not in questions]
        if unknown:
            raise LLMCoreError(
                f"--subjects: {', '.join(unknown)} not in the data (have: {', '.join(sorted(questions))})"
            )
        questions = {s: questions[s] for s in subjects}
    if limit is not None:
        if limit < 1:
            raise LLMCoreError(f"--limit must be >= 1, got {limit}")
        questions = {s: qs[:limit] for s, qs in questions.items()}
    return questions


def run_bench(
    model: Any,
    tok: Any,
    task: str,
    questions: dict[str, list[Question]],
    dev: dict[str, list[Question]],
    shots: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> BenchResult:
    """Score every question; `dev[subject][:shots]` are the solved examples of its prompt."""
    if not 0 <= shots <= MAX_SHOTS:
        raise LLMCoreError(f"--shots must be in 0..{MAX_SHOTS}, got {shots}")
    if batch_size < 1:
        raise LLMCoreError(f"--batch-size must be >= 1, got {batch_size}")
    fmt = FORMATS[task]
    if shots:
        short = [s for s in questions if len(dev.get(s, [])) < shots]
        if short:
            raise LLMCoreError(
                f"--shots {shots}: the dev split has fewer examples for {', '.join(short[:5])}"
                f"{' ...' if len(short) > 5 else ''}"
            )
    from tqdm import tqdm

    total = sum(len(qs) for qs in questions.values())
    bar = tqdm(
        total=total,
        unit="question",
        desc=f"{task} {shots}-shot",
        file=sys.stderr,
        disable=None if progress else True,
        dynamic_ncols=True,
    )
    t0 = time.perf_counter()
    per: dict[str, SubjectScore] = {}
    preds: list[dict[str, Any]] = []
    acc_all = norm_all = chance = 0.0
    for subject, qs in questions.items():
        requests = build_requests(fmt, tok, qs, dev.get(subject, []), shots)
        hits = hits_norm = 0
        for start in range(0, len(requests), batch_size):
            batch = requests[start : start + batch_size]
            for r, lls in zip(batch, score_batch(model, batch, pad_id=getattr(tok, "pad_id", 0))):
                pred = max(range(len(lls)), key=lambda j: lls[j])
                norm = [ll / len(s) for ll, s in zip(lls, r.choice_strings)]
                pred_norm = max(range(len(norm)), key=lambda j: norm[j])
                hits += pred == r.question.answer
                hits_norm += pred_norm == r.question.answer
                chance += 1 / len(lls)
                preds.append(
                    {
                        "subject": subject,
                        "source": r.question.source,
                        "gold": r.question.answer,
                        "pred": pred,
                        "pred_norm": pred_norm,
                        "loglikelihoods": lls,
                    }
                )
            bar.update(len(batch))
        per[subject] = SubjectScore(hits / len(qs), hits_norm / len(qs), len(qs))
        acc_all += hits
        norm_all += hits_norm
    bar.close()
    # lm-eval's group score for cmmlu/ceval-valid: the mean over questions (weight_by_size).
    overall = SubjectScore(acc_all / total, norm_all / total, total)
    return BenchResult(task, shots, per, overall, chance / total, preds, time.perf_counter() - t0)


def plot_result(result: BenchResult, path: Path, title: str) -> None:
    """Horizontal bars of acc per subject, with the chance level and the overall score marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmcore.io import atomic_write

    names = sorted(result.subjects, key=lambda s: result.subjects[s].acc)
    height = max(3.0, 0.22 * len(names) + 1.5)
    fig, ax = plt.subplots(figsize=(8, height))
    ax.barh(names, [result.subjects[s].acc for s in names], color="#4c72b0")
    ax.axvline(result.chance, color="#c44e52", ls="--", lw=1, label=f"chance {result.chance:.2f}")
    ax.axvline(result.overall.acc, color="#222222", lw=1, label=f"overall {result.overall.acc:.3f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("acc")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=110))
    plt.close(fig)


def eval_bench(
    ckpt: str | Path,
    task: str,
    data: str | Path,
    out: str | Path | None = None,
    shots: int = 0,
    subjects: Sequence[str] | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> BenchResult:
    """Load the model at `ckpt`, score `task` at `data`; with `out`, write results.json,
    predictions.jsonl and results.png there."""
    from llmcore.checkpoint import load_model_and_tokenizer
    from llmcore.common import resolve_device
    from llmcore.io import check_out_dir, write_json, write_text

    if task not in FORMATS:
        raise LLMCoreError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    out_dir = None
    if out is not None:
        out_dir = check_out_dir(
            out, overwrite=overwrite, what="eval bench results", inputs=(data, ckpt), replaceable=_results_dir_problem
        )
    questions, dev = load_task(task, data)
    questions = _select(questions, subjects, limit)
    dev_ = resolve_device(device)
    dtype = torch.bfloat16 if dev_.type == "cuda" else torch.float32
    model, tok = load_model_and_tokenizer(ckpt, dev_, dtype=dtype)
    result = run_bench(model, tok, task, questions, dev, shots=shots, batch_size=batch_size, progress=progress)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        summary = {
            "format": "llmcore-eval-bench",
            "task": task,
            "ckpt": str(ckpt),
            "data": str(data),
            "shots": shots,
            "limit": limit,
            "device": str(dev_),
            "seconds": round(result.seconds, 3),
            "chance": result.chance,
            "overall": vars(result.overall),
            "subjects": {s: vars(v) for s, v in sorted(result.subjects.items())},
        }
        write_text(
            out_dir / "predictions.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in result.predictions)
        )
        plot_result(
            result,
            out_dir / "results.png",
            f"{task} {shots}-shot: {Path(str(ckpt)).name}  (acc {result.overall.acc:.3f}, n={result.overall.n})",
        )
        write_json(out_dir / "results.json", summary)
    if not math.isfinite(result.overall.acc):
        raise LLMCoreError("no questions were scored")
    return result


def _results_dir_problem(path: Path) -> str | None:
    """Why `path` is not a results dir this command wrote (None when it is one, so it may be replaced)."""
    try:
        if json.loads((path / "results.json").read_text()).get("format") == "llmcore-eval-bench":
            return None
    except (OSError, ValueError, AttributeError):
        pass
    return "it is not an `llmcore eval bench` results dir"


# ----------------------------------------------------------------------------------------------
# Getting the data (not shipped: CC BY-NC-SA 4.0)

# Where each benchmark's official archive lives on ModelScope (the hub `prep download` uses), and
# the folder that marks its layout inside the archive.
BENCHMARK_ARCHIVES: dict[str, tuple[str, str, str]] = {
    "cmmlu": ("opencompass/cmmlu", "cmmlu_v1_0_1.zip", "test"),
    "ceval": ("opencompass/ceval-exam", "ceval-exam.zip", "val"),
}
_MAX_ARCHIVE_BYTES = 1 << 30  # the real archives are a few MB; refuse a zip bomb


def _safe_extract(archive: Path, dest: Path) -> None:
    """Unzip regular files only, each inside `dest`, within a total size cap."""
    import zipfile

    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as err:
        raise LLMCoreError(f"{archive}: not a zip archive ({err})") from None
    with zf:
        total = 0
        root = dest.resolve()
        for info in zf.infolist():
            if info.is_dir():
                continue
            target = (dest / info.filename).resolve()
            if root not in target.parents or (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise LLMCoreError(f"{archive}: refusing member {info.filename!r} (outside the folder or a link)")
            total += info.file_size
            if total > _MAX_ARCHIVE_BYTES:
                raise LLMCoreError(f"{archive}: unpacks to more than {_MAX_ARCHIVE_BYTES >> 20} MiB; refusing")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)


def download_benchmark(
    name: str, out: str | Path, timeout: float = 30.0, overwrite: bool = False, progress: bool = False
) -> Path:
    """Fetch `name`'s official archive and install its official layout (e.g. `test/`, `dev/`) as
    `out`, atomically; offline this fails within seconds with one line."""
    from llmcore.data_prep.download import download
    from llmcore.io import check_out_dir, install_dir, temp_dir_for

    if name not in BENCHMARK_ARCHIVES:
        raise LLMCoreError(f"--benchmark must be one of {', '.join(BENCHMARK_ARCHIVES)}, got {name!r}")
    dataset, file, marker = BENCHMARK_ARCHIVES[name]
    out = check_out_dir(
        out,
        overwrite=overwrite,
        what=f"a {name} dir",
        replaceable=lambda p: None if (p / marker).is_dir() else f"it holds no {marker}/ folder",
    )
    tmp = temp_dir_for(out)
    try:
        archive = download(dataset, file, tmp / "archive", timeout=timeout, progress=progress)
        _safe_extract(archive, tmp / "files")
        found = sorted({p.parent for p in (tmp / "files").rglob(f"{marker}/*.csv")}, key=lambda p: len(p.parts))
        if not found:
            raise LLMCoreError(f"{dataset}/{file}: no {marker}/*.csv inside the archive")
        layout = found[0].parent
        archive.unlink()
        install_dir(layout, out)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out
